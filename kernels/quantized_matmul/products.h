// What the two quantized-product kernels share (`cpu_kernel.cc`, fp32 activations;
// `cpu_int8.cc`, int8 activations): the products of one FFI call and how their columns are
// split among the helper threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_row_tiles.h"
#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace spanjax::quantized {

namespace ffi = xla::ffi;

constexpr int kBlock = 32;  // weights per block along the input axis
constexpr int kLanes = 16;  // output columns side by side in the lane layout (`lanes.py`)

// One product y [R, N] = x [R, K] times w [N, K] transposed, w as codes, fp16 scales and fp16
// offsets (q4 only), in GGUF's block layout or the int8 kernel's lane layout (same sizes).
struct Problem {
  const float* x;        // [R, K]
  const uint8_t* q;      // codes: uint8 (q4) or int8 (q8)
  const uint16_t* d;     // fp16 scales, one per block
  const uint16_t* m;     // fp16 offsets (q4), else null
  float* y;              // [R, N]
  const float* xsum;     // [R, K / 32] row sums of x per block, where a kernel wants them
  int64_t rows, cols, depth;  // R, N, K
  bool four_bit;
};

// x [R, K] (fp32) and, per product, three arguments: codes (uint8, 16 bytes per block, for q4;
// int8, 32 per block, for q8), fp16 scales and fp16 offsets (q4; an empty array for q8), one
// fp32 result [R, N] each. `cols_multiple`: what N must divide by (16 for the lane layout).
// `layer` >= 0: each argument is a stack of layers (a leading [L] axis) and the product reads
// layer `layer` of it in place; -1: the arguments are one matrix.
inline ffi::Error ParseProblems(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, ffi::RemainingRets outs,
                                int64_t cols_multiple, int64_t layer, std::vector<Problem>& problems) {
  if (weights.size() != 3 * outs.size()) return ffi::Error::InvalidArgument("three weight arrays per result");
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] % kBlock != 0) return ffi::Error::InvalidArgument("x must be [R, K], K a multiple of 32");
  for (size_t i = 0; i < outs.size(); ++i) {
    auto q = weights.get<ffi::AnyBuffer>(3 * i);
    auto d = weights.get<ffi::Buffer<ffi::F16>>(3 * i + 1);
    auto m = weights.get<ffi::Buffer<ffi::F16>>(3 * i + 2);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!q.has_value() || !d.has_value() || !m.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("quantized product arguments of the wrong types");
    Problem p{};
    p.four_bit = q->element_type() == ffi::DataType::U8;
    if (!p.four_bit && q->element_type() != ffi::DataType::S8)
      return ffi::Error::InvalidArgument("codes must be uint8 (q4) or int8 (q8)");
    const auto yd = (*y)->dimensions();
    p.x = x.typed_data();
    p.y = (*y)->typed_data();
    p.rows = xd[0], p.depth = xd[1], p.cols = yd[1];
    const int64_t blocks = p.cols * (p.depth / kBlock);  // of one layer
    const int64_t code_bytes = blocks * (p.four_bit ? kBlock / 2 : kBlock);
    int64_t stack = 1;  // layers in each argument
    if (layer >= 0) {
      if (q->dimensions().size() == 0 || layer >= q->dimensions()[0])
        return ffi::Error::InvalidArgument("layer out of range of the stacked weights");
      stack = q->dimensions()[0];
    }
    if (yd[0] != p.rows || p.cols % cols_multiple != 0 || d->element_count() != stack * blocks ||
        (p.four_bit && m->element_count() != stack * blocks) || q->element_count() != stack * code_bytes)
      return ffi::Error::InvalidArgument("quantized product shapes do not match");
    const int64_t at = layer < 0 ? 0 : layer;
    p.q = static_cast<const uint8_t*>(q->untyped_data()) + at * code_bytes;
    p.d = d->typed_data() + at * blocks;
    p.m = p.four_bit ? m->typed_data() + at * blocks : nullptr;
    problems.push_back(p);
  }
  return ffi::Error::Success();
}

constexpr int kRowTile = 8;  // rows of x against one pass over the weights (`ForRowTiles`)

// Runs `columns(p, n0, n1)` over every product's columns as one parallel loop: about four
// chunks per thread for each product, none narrower than 16 columns, each a multiple of
// `unit` columns. One call for the products of one x keeps the small ones (a layer's k and v)
// from each paying a call's fixed cost (~9 us at eight rows, about their own work).
template <typename F>
void ForColumnChunks(const std::vector<Problem>& problems, int64_t unit, F columns) {
  const int64_t threads = Helpers::Get().threads();
  std::vector<int64_t> chunk_cols, first_chunk{0};
  for (const Problem& p : problems) {
    const int64_t cols = std::max<int64_t>(16, (p.cols + 4 * threads - 1) / (4 * threads));
    chunk_cols.push_back((cols + unit - 1) / unit * unit);
    first_chunk.push_back(first_chunk.back() + (p.cols + chunk_cols.back() - 1) / chunk_cols.back());
  }
  ParallelFor(first_chunk.back(), [&](int64_t c) {
    const size_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
    const Problem p = problems[i];  // a private copy, next to nothing another thread writes
    const int64_t n0 = (c - first_chunk[i]) * chunk_cols[i];
    columns(p, n0, std::min(p.cols, n0 + chunk_cols[i]));
  });
}

}  // namespace spanjax::quantized

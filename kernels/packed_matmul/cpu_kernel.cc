// Products with fp32 weights packed in column panels (`format.py`), through the XLA FFI.
//
// Why: XLA CPU's GEMM streams SmolLM2-135M's 425 MB of fp32 layer weights at 8 rows in
// 31 ms and computes 32 rows at ~51% of the FMA peak (2-core AMD EPYC Zen 4, 30 layers:
// 8 / 25 / 32 / 64 / 512 rows in 31 / 47 / 57 / 92 / 579 ms). A panel holds 48 output columns
// for every input, contiguous, so one tile of up to 8 rows x 48 columns keeps 24 accumulators
// in registers while the panel streams through once per tile: 14 / 29 / 34 / 64 / 490 ms in
// a standalone loop, 91-96% of the FMA peak from 64 rows up. A panel walk of the [in, out]
// matrix as it lies (stride `out` between inputs) measured 2-4x slower.
//
// `rows` names how many rows of x are tokens; the rest (padding up to the step's bucket) are
// skipped and their outputs left zero, so a 25-token question in a 32-row step computes 25.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "cpu_row_tiles.h"
#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 48;  // output columns of a panel: 3 AVX512 vectors, 6 AVX2 ones
constexpr int kRowTile = 8;     // rows of x against one pass over a panel (AVX512)

struct Product {
  const float* x;       // [R, K]
  const float* panels;  // [ceil(N / 48), K, 48]: this layer's
  float* y;             // [R, N]
  int64_t rows, cols, depth;
};

// y[r0 .. r0 + RB, columns of panel `pc`] over the whole depth: RB x 3 accumulators.
template <int RB>
SPANJAX_AVX512 void Tile512(const Product& p, int64_t pc, int64_t r0) {
  __m512 acc[RB][3];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  const float* w = p.panels + pc * p.depth * kPanel;
  const float* x = p.x + r0 * p.depth;
  for (int64_t k = 0; k < p.depth; ++k, w += kPanel) {
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
    for (int r = 0; r < RB; ++r) {
      const __m512 b = _mm512_set1_ps(x[r * p.depth + k]);
      acc[r][0] = _mm512_fmadd_ps(b, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(b, w2, acc[r][2]);
    }
  }
  const int64_t c0 = pc * kPanel, width = std::min<int64_t>(kPanel, p.cols - c0);
  for (int r = 0; r < RB; ++r) {
    float* y = p.y + (r0 + r) * p.cols + c0;
    for (int v = 0; v < 3; ++v) {
      const int64_t left = width - 16 * v;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      _mm512_mask_storeu_ps(y + 16 * v, mask, acc[r][v]);
    }
  }
}

// The AVX2 version: half a panel (24 columns, 3 vectors) at a time, 4 rows (12 accumulators
// of the 16 registers).
template <int RB>
void Tile256(const Product& p, int64_t pc, int64_t r0) {
  const int64_t c0 = pc * kPanel, width = std::min<int64_t>(kPanel, p.cols - c0);
  for (int64_t half = 0; half < 2 && 24 * half < width; ++half) {
    __m256 acc[RB][3];
    for (auto& row : acc)
      for (auto& a : row) a = _mm256_setzero_ps();
    const float* w = p.panels + pc * p.depth * kPanel + 24 * half;
    const float* x = p.x + r0 * p.depth;
    for (int64_t k = 0; k < p.depth; ++k, w += kPanel) {
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8), w2 = _mm256_loadu_ps(w + 16);
      for (int r = 0; r < RB; ++r) {
        const __m256 b = _mm256_broadcast_ss(x + r * p.depth + k);
        acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(b, w2, acc[r][2]);
      }
    }
    const int64_t h0 = 24 * half, cols = std::min<int64_t>(24, width - h0);
    for (int r = 0; r < RB; ++r) {
      alignas(32) float row[24];
      for (int v = 0; v < 3; ++v) _mm256_store_ps(row + 8 * v, acc[r][v]);
      std::memcpy(p.y + (r0 + r) * p.cols + c0 + h0, row, sizeof(float) * cols);
    }
  }
}

void Panel(const Product& p, int64_t pc, bool wide) {
  if (wide) {
    spanjax::ForRowTiles<kRowTile>(p.rows, [&](auto rb, int64_t r0) { Tile512<decltype(rb)::value>(p, pc, r0); });
  } else {
    spanjax::ForRowTiles<4>(p.rows, [&](auto rb, int64_t r0) { Tile256<decltype(rb)::value>(p, pc, r0); });
  }
}

// x [R, K] fp32, rows int32 [1] (rows of x that are tokens, the rest left zero), and per
// product its panels fp32 [..., ceil(N / 48), K, 48] (with `layer` >= 0 a stack of layers,
// [L, ...], read at layer `layer` in place); one fp32 result [R, N] per product. One parallel
// loop over every product's panels.
ffi::Error PackedMatmuls(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> rows, ffi::RemainingArgs weights,
                         ffi::RemainingRets outs, int64_t layer) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [R, K]");
  if (weights.size() != outs.size()) return ffi::Error::InvalidArgument("one panel array per result");
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("rows must hold one count");
  const int64_t valid = std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  std::vector<Product> products;
  std::vector<int64_t> first_panel{0};
  for (size_t i = 0; i < outs.size(); ++i) {
    auto w = weights.get<ffi::Buffer<ffi::F32>>(i);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("panels and results must be fp32");
    const auto wd = w->dimensions();
    const auto yd = (*y)->dimensions();
    const size_t lead = layer >= 0 ? 1 : 0;
    if (wd.size() != 3 + lead || wd[2 + lead] != kPanel || wd[1 + lead] != xd[1] || yd.size() != 2 ||
        yd[0] != xd[0] || (yd[1] + kPanel - 1) / kPanel != wd[lead])
      return ffi::Error::InvalidArgument("panel shapes do not match x and the result");
    if (layer >= 0 && layer >= wd[0]) return ffi::Error::InvalidArgument("layer out of range of the stacked panels");
    Product p{};
    p.x = x.typed_data();
    p.panels = w->typed_data() + std::max<int64_t>(layer, 0) * wd[lead] * xd[1] * kPanel;
    p.y = (*y)->typed_data();
    p.rows = valid, p.cols = yd[1], p.depth = xd[1];
    std::memset(p.y + valid * p.cols, 0, sizeof(float) * (xd[0] - valid) * p.cols);
    products.push_back(p);
    first_panel.push_back(first_panel.back() + (valid > 0 ? wd[lead] : 0));
  }
  const bool wide = spanjax::UseAvx512();
  spanjax::ParallelFor(first_panel.back(), [&](int64_t c) {
    const size_t i = std::upper_bound(first_panel.begin(), first_panel.end(), c) - first_panel.begin() - 1;
    Panel(products[i], c - first_panel[i], wide);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxPackedMatmuls, PackedMatmuls,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("layer"));

// Block-quantized products with int8 activations (AVX512-VNNI), called through the XLA FFI.
//
// The opt-in fast path of `cpu_kernel.cc`'s products, the arithmetic llama.cpp uses on CPU:
// each row of x is quantized per block of 32 to int8 (scale amax / 127, round to nearest even),
// and each block's dot product is an integer one, 64 multiply-adds per VNNI instruction
// instead of 16 per fp32 FMA. Results are no longer those of the dequantized fp32 model: they
// carry x's int8 rounding (about 0.4% of a block's largest value per element).
//
// Weights are read in a lane layout made once at load time (`lanes.py`): 16 output columns
// side by side, so one instruction multiplies four consecutive inputs of 16 columns by the
// same four bytes of x, and a block's sum lands in one vector with a lane per column. Lane
// layout, per group g of 16 columns and block b of 32 inputs, byte (t, c, i) is byte 4t + i
// of column 16g + c's GGUF block: for q8 the code of input 4t + i (t < 8); for q4 the low
// nibble is input 4t + i and the high nibble input 16 + 4t + i (t < 4). Scales (and q4
// offsets) are fp16 [group, block, 16].
//
//   q4: y += d_w * d_x * sum(q_w * q_x) + m_w * sum(x)          (sum(x) exact, in fp32)
//   q8: y += d_w * d_x * sum((q_w + 128) * q_x) - 128 * sum(q_x)  (VNNI multiplies unsigned
//       bytes by signed ones: the codes' sign bit is flipped and the shift taken back)

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "products.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using spanjax::quantized::kBlock;
using spanjax::quantized::kLanes;
using spanjax::quantized::Problem;

// x quantized per block: codes [R, K], scale, exact fp32 sum and (for q8) -128 * sum(codes)
// per [R, K / 32] block.
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
  std::vector<int32_t> shift;
};

SPANJAX_AVX512_VNNI void Quantize(const float* x, int64_t rows, int64_t depth, Activations& a) {
  const int64_t blocks = depth / kBlock;
  a.q.resize(rows * depth);
  a.d.resize(rows * blocks);
  a.sum.resize(rows * blocks);
  a.shift.resize(rows * blocks);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t rb = 0; rb < rows * blocks; ++rb) {
    const float* xb = x + rb * kBlock;  // row-major [R, K]: block rb of the flat array
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));  // nearest even
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + rb * kBlock), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + rb * kBlock + 16), _mm512_cvtsepi32_epi8(qhi));
    a.d[rb] = amax / 127.0f;
    a.sum[rb] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    a.shift[rb] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  }
}

// Rows [r0, r0 + RB) of y for column groups [g0, g1). One or two rows give each row two
// integer accumulators so its VNNI instructions do not wait on each other.
template <bool kFourBit, int RB>
SPANJAX_AVX512_VNNI void LaneTile(const Problem& p, const Activations& a, int64_t depth, int64_t r0, int64_t g0,
                                  int64_t g1) {
  constexpr int kAcc = RB <= 2 ? 2 : 1;
  constexpr int64_t group_bytes = kFourBit ? kLanes * kBlock / 2 : kLanes * kBlock;
  const int64_t blocks = depth / kBlock;
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  const __m512i sign_flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = g0; g < g1; ++g) {
    __m512 y[RB];
    for (int r = 0; r < RB; ++r) y[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* qb = p.q + (g * blocks + b) * group_bytes;
      __m512i w[8];
      if constexpr (kFourBit) {
        for (int t = 0; t < 4; ++t) {
          const __m512i v = _mm512_loadu_si512(qb + 64 * t);
          w[t] = _mm512_and_si512(v, low_mask);
          w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_mask);
        }
      } else {
        for (int t = 0; t < 8; ++t) w[t] = _mm512_xor_si512(_mm512_loadu_si512(qb + 64 * t), sign_flip);
      }
      const int64_t gb = (g * blocks + b) * kLanes;
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.d + gb)));
      __m512 mw = _mm512_setzero_ps();
      if constexpr (kFourBit) mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.m + gb)));
      for (int r = 0; r < RB; ++r) {
        const int64_t rb = (r0 + r) * blocks + b;
        const int8_t* xq = a.q.data() + rb * kBlock;
        __m512i acc[kAcc];
        acc[0] = kFourBit ? _mm512_setzero_si512() : _mm512_set1_epi32(a.shift[rb]);
        if constexpr (kAcc == 2) acc[1] = _mm512_setzero_si512();
        for (int t = 0; t < 8; ++t) {
          int32_t x4;
          std::memcpy(&x4, xq + 4 * t, 4);
          acc[t % kAcc] = _mm512_dpbusd_epi32(acc[t % kAcc], w[t], _mm512_set1_epi32(x4));
        }
        __m512i total = acc[0];
        if constexpr (kAcc == 2) total = _mm512_add_epi32(total, acc[1]);
        y[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[rb])), y[r]);
        if constexpr (kFourBit) y[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.sum[rb]), y[r]);
      }
    }
    for (int r = 0; r < RB; ++r) _mm512_storeu_ps(p.y + (r0 + r) * p.cols + g * kLanes, y[r]);
  }
}

template <bool kFourBit>
void Groups(const Problem& p, const Activations& a, int64_t rows, int64_t depth, int64_t g0, int64_t g1) {
  auto tile = [&](auto rows_tag, int64_t r) {
    LaneTile<kFourBit, decltype(rows_tag)::value>(p, a, depth, r, g0, g1);
  };
  spanjax::ForRowTiles<spanjax::quantized::kRowTile>(rows, tile);
}

// x [R, K] (fp32) and, per product, lane-layout codes (uint8 for q4, int8 for q8), fp16
// scales and fp16 offsets (q4; an empty array for q8); one fp32 result [R, N] per product, N a
// multiple of 16. As in `cpu_kernel.cc`, all products of one x run as one parallel loop
// (`products.h`); x is quantized once for all of them.
ffi::Error QuantizedMatmulsInt8(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, ffi::RemainingRets outs,
                          int64_t layer) {
  if (!spanjax::VnniSupported()) return ffi::Error::Internal("int8 products need AVX512-VNNI");
  std::vector<Problem> problems;
  if (ffi::Error e = spanjax::quantized::ParseProblems(x, weights, outs, kLanes, layer, problems); e.failure()) return e;
  const int64_t rows = x.dimensions()[0], depth = x.dimensions()[1];
  if (rows == 0) return ffi::Error::Success();
  thread_local Activations a;
  Quantize(x.typed_data(), rows, depth, a);
  const Activations& acts = a;  // the caller's (a thread_local named in the lambda would be the helper's)
  spanjax::quantized::ForColumnChunks(problems, kLanes, [&acts, rows, depth](const Problem& p, int64_t n0, int64_t n1) {
    const int64_t g0 = n0 / kLanes, g1 = n1 / kLanes;
    p.four_bit ? Groups<true>(p, acts, rows, depth, g0, g1) : Groups<false>(p, acts, rows, depth, g0, g1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxQuantizedMatmulsInt8, QuantizedMatmulsInt8,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets().Attr<int64_t>("layer"));

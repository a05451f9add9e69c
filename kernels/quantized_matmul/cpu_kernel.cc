// Block-quantized matrix products for XLA CPU, called through the XLA FFI.
//
// y[r, n] = sum_k x[r, k] * w[n, k], with w stored the way GGUF stores it: blocks of 32
// weights along k, each with an fp16 scale d (and, for 4-bit, an fp16 offset m):
//   q4 (GGUF Q4_1): w = d * q + m, q in 0..15, byte j of a block holds elements j (low
//                   nibble) and j + 16 (high nibble);
//   q8 (GGUF Q8_0): w = d * q, q in -128..127.
// Each block is expanded to fp32 in registers (exactly the values the dequantized model
// has) and multiplied with fp32 activations, so the only difference from a dense fp32
// product is the summation order. The point is bandwidth: a decode step reads every weight
// once, and 4-bit blocks are 20 bytes per 32 weights against 128 in fp32.
//
// Rows of x are processed eight at a time against one expanded block, so a decode batch of
// several sequences reads the weights once. Columns n are split into chunks shared with the
// kernels' helper threads (`cpu_threads.h`).
//
// Where the CPU has AVX512 (`cpu_isa.h`), a block expands to two 16-wide vectors instead of
// four 8-wide ones: half the FMAs and loads per row. At eight rows (a decode step of eight
// sequences) the product is bound by those instructions, not by reading the weights.
//
// Batches of two rows or more can read a second copy of the weights in the lane layout
// (`lanes.py`, the int8 kernel's): 16 output columns side by side, so each input's weights
// expand to one vector with a lane per column and every row adds x[r, k] times it, broadcast
// from memory. No per-column horizontal sums, and the broadcasts are narrow loads: at eight
// rows, one thread, 1536 x 576 q4, 130 -> 69 us with the weights in cache, 133 -> 87 us
// streamed from memory (the block layout's 16-wide loads of x were the bound). One row
// keeps the block layout: there the expansion, paid once per input instead of once per
// block, dominates (37 vs 49 us). With AVX512 the lane kernel applies each block's scale
// and offset to its sums instead of to each weight (`LaneTile512`): SmolLM2's 30 layers of
// q4 products at eight rows on a Zen 4, 11.9 -> 9.8 ms. Its results then differ from the
// dequantized model's by fp32 rounding of that other form too (measured: within 2x of the
// block kernel's error against a float64 product).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_threads.h"
#include "products.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using spanjax::quantized::kBlock;
using spanjax::quantized::kLanes;
using spanjax::quantized::Problem;


inline float HalfToFloat(uint16_t h) { return _cvtsh_ss(h); }

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 shuf = _mm_movehdup_ps(lo);
  __m128 sums = _mm_add_ps(lo, shuf);
  shuf = _mm_movehl_ps(shuf, sums);
  sums = _mm_add_ss(sums, shuf);
  return _mm_cvtss_f32(sums);
}

// The 32 weights of one block as four vectors of eight fp32 values, in k order.
struct Expanded {
  __m256 w[4];
};

inline __m256 BytesToFloat(__m128i bytes8_u) {  // low 8 bytes, unsigned
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8_u));
}

inline Expanded ExpandQ4(const uint8_t* qs, float d, float m) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, low_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  const __m256 vd = _mm256_set1_ps(d);
  const __m256 vm = _mm256_set1_ps(m);
  Expanded e;
  e.w[0] = _mm256_fmadd_ps(BytesToFloat(lo), vd, vm);
  e.w[1] = _mm256_fmadd_ps(BytesToFloat(_mm_srli_si128(lo, 8)), vd, vm);
  e.w[2] = _mm256_fmadd_ps(BytesToFloat(hi), vd, vm);
  e.w[3] = _mm256_fmadd_ps(BytesToFloat(_mm_srli_si128(hi, 8)), vd, vm);
  return e;
}

inline Expanded ExpandQ8(const int8_t* qs, float d) {
  const __m256 vd = _mm256_set1_ps(d);
  Expanded e;
  for (int i = 0; i < 4; ++i) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i));
    e.w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vd);
  }
  return e;
}

// n fp16 values to fp32, eight at a time.
inline void HalvesToFloats(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = HalfToFloat(h[i]);
}

// Columns this far ahead are prefetched into L1: each column is a few hundred bytes of codes
// in three arrays, and a chunk of columns is too short for the hardware prefetcher to ramp
// up. SmolLM2's 30 layers of products chained in one program, one row: 3.10-3.39 ->
// 2.65-2.79 ms (distances 2-32 tried: 8 best); eight rows 7.53 -> 6.93 ms. The lane kernel
// (few, long groups) gained nothing from it.
constexpr int64_t kPrefetchColumns = 8;

template <bool kFourBit>
inline void PrefetchColumn(const Problem& p, int64_t n, int64_t blocks) {
  if (n >= p.cols) return;
  constexpr int64_t block_bytes = kFourBit ? kBlock / 2 : kBlock;
  const char* q = reinterpret_cast<const char*>(p.q + n * blocks * block_bytes);
  for (int64_t b = 0; b < blocks * block_bytes; b += 64) _mm_prefetch(q + b, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p.d + n * blocks), _MM_HINT_T0);
  if (kFourBit) _mm_prefetch(reinterpret_cast<const char*>(p.m + n * blocks), _MM_HINT_T0);
}

// Rows [r0, r0 + RB) of y for columns [n0, n1). Few rows get several accumulators per row so
// the FMAs of one block do not wait on each other (their latency, not the loads, would bound
// a one-row product). A column's scales (and offsets) are converted to fp32 up front, eight
// per instruction, so a block broadcasts them from memory instead of converting two scalars:
// at one row the kernel is bound by instructions, not by reading memory.
template <bool kFourBit, int RB>
void RowTile(const Problem& p, int64_t r0, int64_t n0, int64_t n1) {
  constexpr int kAcc = RB == 1 ? 4 : (RB <= 3 ? 2 : 1);
  constexpr int64_t kGroup = 64;  // blocks whose scales are converted at once
  constexpr int64_t block_bytes = kFourBit ? kBlock / 2 : kBlock;
  const int64_t blocks = p.depth / kBlock;
  const float* x = p.x + r0 * p.depth;
  alignas(32) float scales[kGroup];
  alignas(32) float offsets[kGroup];
  for (int64_t n = n0; n < n1; ++n) {
    PrefetchColumn<kFourBit>(p, n + kPrefetchColumns, blocks);
    __m256 acc[RB][kAcc];
    for (int r = 0; r < RB; ++r)
      for (int a = 0; a < kAcc; ++a) acc[r][a] = _mm256_setzero_ps();
    const uint8_t* qn = p.q + n * blocks * block_bytes;
    for (int64_t g = 0; g < blocks; g += kGroup) {
      const int64_t count = std::min(kGroup, blocks - g);
      HalvesToFloats(p.d + n * blocks + g, count, scales);
      if (kFourBit) HalvesToFloats(p.m + n * blocks + g, count, offsets);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t b = g + j;
        const Expanded e = kFourBit ? ExpandQ4(qn + b * block_bytes, scales[j], offsets[j])
                                    : ExpandQ8(reinterpret_cast<const int8_t*>(qn + b * block_bytes), scales[j]);
        const float* xb = x + b * kBlock;
        for (int r = 0; r < RB; ++r) {
          const float* xr = xb + r * p.depth;
          for (int i = 0; i < 4; ++i)
            acc[r][i % kAcc] = _mm256_fmadd_ps(e.w[i], _mm256_loadu_ps(xr + 8 * i), acc[r][i % kAcc]);
        }
      }
    }
    for (int r = 0; r < RB; ++r) {
      __m256 total = acc[r][0];
      for (int a = 1; a < kAcc; ++a) total = _mm256_add_ps(total, acc[r][a]);
      p.y[(r0 + r) * p.cols + n] = HorizontalSum(total);
    }
  }
}

// One block of column n as two 16-wide vectors: elements 0-15 and 16-31.
template <bool kFourBit>
SPANJAX_AVX512 inline void Expand16(const uint8_t* qs, float d, float m, __m512& w0, __m512& w1) {
  const __m512 vd = _mm512_set1_ps(d);
  if constexpr (kFourBit) {  // low nibbles: elements 0-15, high nibbles: 16-31
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m512 vm = _mm512_set1_ps(m);
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low_mask))), vd, vm);
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask))),
                         vd, vm);
  } else {
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16));
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0)), vd);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1)), vd);
  }
}

// RowTile with 16-wide vectors. Two accumulators per row keep its FMAs from waiting on each
// other. (Two columns sharing each load of x were tried at eight rows: no measurable change,
// the 16 FMAs per block bound it.)
template <bool kFourBit, int RB>
SPANJAX_AVX512 void RowTile512(const Problem& p, int64_t r0, int64_t n0, int64_t n1) {
  constexpr int64_t kGroup = 64;
  constexpr int64_t block_bytes = kFourBit ? kBlock / 2 : kBlock;
  const int64_t blocks = p.depth / kBlock;
  const float* x = p.x + r0 * p.depth;
  alignas(64) float scales[kGroup];
  alignas(64) float offsets[kGroup];
  for (int64_t n = n0; n < n1; ++n) {
    PrefetchColumn<kFourBit>(p, n + kPrefetchColumns, blocks);
    __m512 acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < blocks; g += kGroup) {
      const int64_t count = std::min(kGroup, blocks - g);
      HalvesToFloats(p.d + n * blocks + g, count, scales);
      if (kFourBit) HalvesToFloats(p.m + n * blocks + g, count, offsets);
      for (int64_t j = 0; j < count; ++j) {
        __m512 w0, w1;
        Expand16<kFourBit>(p.q + (n * blocks + g + j) * block_bytes, scales[j], kFourBit ? offsets[j] : 0.0f, w0, w1);
        const float* xb = x + (g + j) * kBlock;
        for (int r = 0; r < RB; ++r) {
          acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + r * p.depth), acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + r * p.depth + 16), acc[r][1]);
        }
      }
    }
    for (int r = 0; r < RB; ++r) p.y[(r0 + r) * p.cols + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
  }
}

// acc[r] += w * x[r, k] for the RB rows, x[r, k] at xk[r * stride] broadcast from memory.
template <int RB>
SPANJAX_AVX512 inline void AddInput512(__m512 (&acc)[RB], __m512 w, const float* xk, int64_t stride) {
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(xk[r * stride]), acc[r]);
}

template <int RB>
inline void AddInput256(__m256 (&acc)[RB], __m256 w, const float* xk, int64_t stride) {
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_set1_ps(xk[r * stride]), acc[r]);
}

// The kBits-bit field at bit kBit of each 32-bit lane moved to the top of the mantissa of
// 1.0f (bits 23 - kBits .. 22): the float 1 + q / 2^kBits, exact, from one shift and one
// ternary logic op ((a & mask) | one), where a convert took a shift, a mask (or a second
// shift) and a convert.
template <int kBits, int kBit>
SPANJAX_AVX512 inline __m512 CodePlusOne(__m512i v) {
  constexpr int kTo = 23 - kBits;
  const __m512i mask = _mm512_set1_epi32(((1 << kBits) - 1) << kTo), one = _mm512_set1_epi32(0x3F800000);
  __m512i a = v;
  if constexpr (kBit < kTo) a = _mm512_slli_epi32(v, kTo - kBit);
  if constexpr (kBit > kTo) a = _mm512_srli_epi32(v, kBit - kTo);
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(a, mask, one, 0xEA));
}

// Rows [r0, r0 + RB) of y for column groups [g0, g1), weights in the lane layout: per group
// of 16 columns and block of 32 inputs, byte (t, c, i) at 64t + 4c + i holds column c's code
// for input 4t + i (q8, t < 8) or its codes for inputs 4t + i (low nibble) and 16 + 4t + i
// (high nibble; q4, t < 4); fp16 scales (and offsets) [group, block, 16]. Input k's 16 codes
// are byte i of each 32-bit lane of quad t's 64 bytes.
//
// The scale (and offset) are applied per block, not per weight. The codes come
// out as f = 1 + c / 2^bits (`CodePlusOne`; q8's signed bytes flipped to c = q + 128 first),
// so q = 2^bits (f - 1) (- 128) and a block adds
//   q4: sum_k (d q + m) x[r, k] = 16 d sum_k f x[r, k] + (m - 16 d) sum_k x[r, k],
//   q8: sum_k d q x[r, k]       = 256 d sum_k f x[r, k] - 384 d sum_k x[r, k],
// with the row sums of x per block taken once per call (`xsum`). An input costs two integer
// ops and the rows' FMAs, where it cost two integer ops, a convert and a multiply or FMA
// before them; two FMAs per row and block come on top. Same values up to rounding: the
// block's sums are fp32 either way.
template <bool kFourBit, int RB>
SPANJAX_AVX512 void LaneTile512(const Problem& p, int64_t r0, int64_t g0, int64_t g1) {
  constexpr int64_t group_bytes = kFourBit ? kLanes * kBlock / 2 : kLanes * kBlock;
  const int64_t blocks = p.depth / kBlock;
  const __m512 unit = _mm512_set1_ps(kFourBit ? 16.0f : 256.0f);
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t gb = (g * blocks + b) * kLanes;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.d + gb)));
      const __m512 scale = _mm512_mul_ps(d, unit);  // of sum f x
      const __m512 offset =                          // of sum x
          kFourBit ? _mm512_sub_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.m + gb))), scale)
                   : _mm512_mul_ps(d, _mm512_set1_ps(-384.0f));
      const uint8_t* qb = p.q + (g * blocks + b) * group_bytes;
      const float* xb = p.x + r0 * p.depth + b * kBlock;
      __m512 part[RB];
      for (int r = 0; r < RB; ++r) part[r] = _mm512_setzero_ps();
      for (int t = 0; t < (kFourBit ? 4 : 8); ++t) {
        const float* xt = xb + 4 * t;
        if constexpr (kFourBit) {  // byte i: inputs 4t + i (low nibble) and 16 + 4t + i (high)
          const __m512i v = _mm512_loadu_si512(qb + 64 * t);
          AddInput512<RB>(part, CodePlusOne<4, 0>(v), xt, p.depth);
          AddInput512<RB>(part, CodePlusOne<4, 4>(v), xt + 16, p.depth);
          AddInput512<RB>(part, CodePlusOne<4, 8>(v), xt + 1, p.depth);
          AddInput512<RB>(part, CodePlusOne<4, 12>(v), xt + 17, p.depth);
          AddInput512<RB>(part, CodePlusOne<4, 16>(v), xt + 2, p.depth);
          AddInput512<RB>(part, CodePlusOne<4, 20>(v), xt + 18, p.depth);
          AddInput512<RB>(part, CodePlusOne<4, 24>(v), xt + 3, p.depth);
          AddInput512<RB>(part, CodePlusOne<4, 28>(v), xt + 19, p.depth);
        } else {  // byte i: input 4t + i, its sign bit flipped (q + 128)
          const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(qb + 64 * t), _mm512_set1_epi32(0x80808080));
          AddInput512<RB>(part, CodePlusOne<8, 0>(v), xt, p.depth);
          AddInput512<RB>(part, CodePlusOne<8, 8>(v), xt + 1, p.depth);
          AddInput512<RB>(part, CodePlusOne<8, 16>(v), xt + 2, p.depth);
          AddInput512<RB>(part, CodePlusOne<8, 24>(v), xt + 3, p.depth);
        }
      }
      const float* xs = p.xsum + r0 * blocks + b;
      for (int r = 0; r < RB; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * blocks]), offset, _mm512_fmadd_ps(part[r], scale, acc[r]));
    }
    for (int r = 0; r < RB; ++r) _mm512_storeu_ps(p.y + (r0 + r) * p.cols + g * kLanes, acc[r]);
  }
}

// The lane layout eight columns at a time (AVX2, no ternary logic op): the group's columns
// 0-7 are the first 32 bytes of each quad, 8-15 the next 32. Each input's codes are shifted,
// masked (q4) or sign-extended (q8) and converted, and the weights d * q + m formed as in
// `Expand16`, so results differ from the block kernel's only in the order of the sums.
template <bool kFourBit, int RB>
void LaneTile256(const Problem& p, int64_t r0, int64_t g0, int64_t g1) {
  constexpr int64_t group_bytes = kFourBit ? kLanes * kBlock / 2 : kLanes * kBlock;
  const int64_t blocks = p.depth / kBlock;
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  for (int64_t g = g0; g < g1; ++g) {
    for (int half = 0; half < 2; ++half) {
      __m256 acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t gb = (g * blocks + b) * kLanes + 8 * half;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.d + gb)));
        const __m256 m = kFourBit ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.m + gb)))
                                  : _mm256_setzero_ps();
        const uint8_t* qb = p.q + (g * blocks + b) * group_bytes + 32 * half;
        const float* xb = p.x + r0 * p.depth + b * kBlock;
        for (int t = 0; t < (kFourBit ? 4 : 8); ++t) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * t));
          for (int i = 0; i < 4; ++i) {
            if constexpr (kFourBit) {
              const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * i), nibble));
              const __m256 high = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * i + 4), nibble));
              AddInput256<RB>(acc, _mm256_fmadd_ps(low, d, m), xb + 4 * t + i, p.depth);
              AddInput256<RB>(acc, _mm256_fmadd_ps(high, d, m), xb + 16 + 4 * t + i, p.depth);
            } else {
              const __m256i codes = _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * i), 24);
              AddInput256<RB>(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(codes), d), xb + 4 * t + i, p.depth);
            }
          }
        }
      }
      for (int r = 0; r < RB; ++r) _mm256_storeu_ps(p.y + (r0 + r) * p.cols + g * kLanes + 8 * half, acc[r]);
    }
  }
}

// Every row tile of columns [c0, c1) (the block layout) or column groups [c0, c1) (the lane
// layout), at the vector width chosen at run time.
template <bool kLaneLayout, bool kFourBit, bool kWide>
void TilesOf(const Problem& p, int64_t c0, int64_t c1) {
  auto tile = [&](auto rows_tag, int64_t r) {
    constexpr int kRows = decltype(rows_tag)::value;
    if constexpr (kLaneLayout && kWide) {
      LaneTile512<kFourBit, kRows>(p, r, c0, c1);
    } else if constexpr (kLaneLayout) {
      LaneTile256<kFourBit, kRows>(p, r, c0, c1);
    } else if constexpr (kWide) {
      RowTile512<kFourBit, kRows>(p, r, c0, c1);
    } else {
      RowTile<kFourBit, kRows>(p, r, c0, c1);
    }
  };
  spanjax::ForRowTiles<spanjax::quantized::kRowTile>(p.rows, tile);
}

template <bool kLaneLayout>
void Tiles(const Problem& p, int64_t c0, int64_t c1, bool wide) {
  if (wide) {
    p.four_bit ? TilesOf<kLaneLayout, true, true>(p, c0, c1) : TilesOf<kLaneLayout, false, true>(p, c0, c1);
  } else {
    p.four_bit ? TilesOf<kLaneLayout, true, false>(p, c0, c1) : TilesOf<kLaneLayout, false, false>(p, c0, c1);
  }
}

// Each row's sum of x per block of 32 inputs: [R, K / 32].
SPANJAX_AVX512 std::vector<float> RowBlockSums(const Problem& p) {
  const int64_t blocks = p.depth / kBlock;
  std::vector<float> sums(p.rows * blocks);
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = p.x + r * p.depth + b * kBlock;
      sums[r * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xb), _mm512_loadu_ps(xb + 16)));
    }
  return sums;
}

// `QuantizedMatmuls` on the lane copy: the same arguments with lane-layout codes, scales and
// offsets (N a multiple of 16).
ffi::Error QuantizedMatmulsLanes(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, ffi::RemainingRets outs,
                          int64_t layer) {
  std::vector<Problem> problems;
  if (ffi::Error e = spanjax::quantized::ParseProblems(x, weights, outs, kLanes, layer, problems); e.failure()) return e;
  const bool wide = spanjax::UseAvx512();
  std::vector<float> xsum;  // for LaneTile512
  if (wide && !problems.empty()) {  // one x for every product of the call
    xsum = RowBlockSums(problems.front());
    for (Problem& p : problems) p.xsum = xsum.data();
  }
  spanjax::quantized::ForColumnChunks(problems, kLanes, [wide](const Problem& p, int64_t n0, int64_t n1) {
    Tiles<true>(p, n0 / kLanes, n1 / kLanes, wide);
  });
  return ffi::Error::Success();
}

// x [R, K] (fp32) and, per product, codes (uint8 [N, K / 32, 16] for q4, int8 [N, K / 32, 32]
// for q8), fp16 scales [N, K / 32] and fp16 offsets [N, K / 32] (q4; an empty array for q8);
// one fp32 result [R, N] per product. The products of one x (a layer's q, k and v; gate and
// up) run as one parallel loop over their column chunks (`products.h`).
ffi::Error QuantizedMatmuls(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, ffi::RemainingRets outs,
                          int64_t layer) {
  std::vector<Problem> problems;
  if (ffi::Error e = spanjax::quantized::ParseProblems(x, weights, outs, 1, layer, problems); e.failure()) return e;
  const bool wide = spanjax::UseAvx512();
  spanjax::quantized::ForColumnChunks(problems, 1, [wide](const Problem& p, int64_t n0, int64_t n1) {
    Tiles<false>(p, n0, n1, wide);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxQuantizedMatmuls, QuantizedMatmuls,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets().Attr<int64_t>("layer"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxQuantizedMatmulsLanes, QuantizedMatmulsLanes,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets().Attr<int64_t>("layer"));

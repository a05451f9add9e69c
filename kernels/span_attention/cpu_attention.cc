// Span attention on XLA CPU, called through the XLA FFI: one kernel for decode batches (at most
// one query token per sequence) and one for every other batch (prefill chunks, mixed batches).
// Same contract as every implementation (meta.py): keys are stored before RoPE and rotated
// here with RoPE tables indexed by key position; a query sees slot j of listed entry i iff
// j < block_lens[s, i] and block_pos[s, i] + j <= q_pos; the logit is
// scale[s, i] * (q . k * sm_scale) + bias[s, i].
//
// Why C++, decode: the jnp decode path (xla.py `decode_attention`) is a handful of large XLA
// ops, each a pass over all of the step's keys in memory (gather, rotate, a block-diagonal
// product, mask, exp, a second product), ~8 ms of a ~20 ms one-stream SmolLM2 step after 512
// tokens and most of an 8-stream one. Here a work item is a chunk of one sequence's pages
// (split-K): it reads each token's keys for every KV head together, rotates each in registers
// and scores it against the head's G query heads, then sums the values weighted by its
// partial softmax; the chunks of a sequence are merged at the end. Where the CPU has AVX512
// the vector work is 16-wide (`cpu_isa.h`).
//
// Why C++, prefill: the jnp tiled path's loop over (tile, page group) items runs each page
// group as separate XLA ops (gather, rotate, product, mask, online-softmax update) with the
// tiles' scores in memory between them. Here a work item is (sequence, KV head, tile of query
// tokens): the tile's rows (tokens x the KV head's G query heads) stay in cache while blocks of
// 32 keys are rotated, scored, masked and folded into an online softmax, FlashAttention-style.
// One layer, SmolLM2-135M shapes, 2 cores (AMD EPYC Zen 5), RoPE tables prepared as in a step,
// kernel vs the jnp loop: 512 tokens from scratch 1.9-2.3 vs 4.6-4.8 ms; 512 after 1,536
// 12.8 vs 16.6; 512 after 3,584 27 vs 33-38; a 25-token question after 4,200 2.9-3.3 vs 4.4-5.2.
// With AVX512 (head dim a multiple of 64) a tile's rows go in the vector lanes and an item
// covers every KV head (`AttendTileLanes`): 30 layers of a 22-token question after 4,126 keys,
// 46-53 -> 37-39 ms; of a 25-token one after 1,783, 23-28 -> 17-23 ms (docs/kernels.md).
//
// Work items are shared with the helper threads (`cpu_threads.h`).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "cpu_isa.h"
#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxGroup = 16;   // query heads per KV head
constexpr int64_t kMaxHeadDim = 256;

inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {  // bf16 bit patterns -> fp32 (exact)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float HorizontalMax(__m256 v) {
  __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

template <typename KV>
struct Problem {
  const float* q;  // [T, Hq, D], RoPE applied
  const KV* k;     // [pages, P, Hkv, D], before RoPE
  const KV* v;
  const int32_t* tables;  // [S, M]
  const int32_t* pos;
  const int32_t* lens;
  const int32_t* cu;     // [S + 1]
  const int32_t* q_pos;  // [T]
  const float* cos;      // [rope_rows, D / 2]: RoPE tables of positions 0 .. rope_rows - 1
  const float* sin;
  const float* inv_freq;  // [D / 2]: for a key position outside the tables
  int64_t rope_rows;
  const float* scale;  // [S, M]
  const float* bias;
  float* out;  // [T, Hq, D]
  int64_t T, Hq, Hkv, D, S, M, P, pages;
  float sm_scale;
};

// exp(x) as 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial (Cephes' expf
// coefficients): within ~2 ulp of expf, and exp(-inf) = 0 (masked rows never get here: every
// score is finite, and the running max is subtracted first). Exp8 and Exp16 share these
// constants and apply the same operations per lane, so both widths give the same results.
constexpr float kExpMin = -87.3f;  // below: 0 after the final scaling anyway
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The RoPE rows (cos, sin; D / 2 each) of key position `position`: the tables' rows, or for a
// position outside them (rare: positions past the block table's width in slots) computed into
// `buffer` (D floats) the way `rope.py` does, fp32 angle then cos and sin.
template <typename KV>
inline std::pair<const float*, const float*> RopeRows(const Problem<KV>& p, int64_t position, float* buffer) {
  const int64_t half = p.D / 2;
  if (position >= 0 && position < p.rope_rows) return {p.cos + position * half, p.sin + position * half};
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(position) * p.inv_freq[i];
    buffer[i] = std::cos(angle);
    buffer[half + i] = std::sin(angle);
  }
  return {buffer, buffer + half};
}

// The key stored at element offset `row` of the pool, rotated to key position `position` into
// `key` (32-byte aligned, D floats).
template <typename KV>
inline void RotateKey(const Problem<KV>& p, int64_t row, int64_t position, float* key) {
  const int64_t half = p.D / 2;
  alignas(32) float buffer[kMaxHeadDim];
  const auto [c, sn] = RopeRows(p, position, buffer);
  for (int64_t d = 0; d < half; d += 8) {  // rotate-half RoPE, as rope.py `rotate`
    const __m256 k1 = Load8(p.k + row + d), k2 = Load8(p.k + row + half + d);
    const __m256 vc = _mm256_loadu_ps(c + d), vs = _mm256_loadu_ps(sn + d);
    _mm256_store_ps(key + d, _mm256_fmsub_ps(k1, vc, _mm256_mul_ps(k2, vs)));
    _mm256_store_ps(key + half + d, _mm256_fmadd_ps(k2, vc, _mm256_mul_ps(k1, vs)));
  }
}

// ---- decode: at most one query token per sequence ----

// Listed pages per decode work item. A sequence's keys are split into chunks (split-K, as in
// flash-decoding) so that one long sequence still keeps every thread busy, and each chunk
// reads its tokens' keys for all KV heads at once: a token's heads are adjacent in the pool,
// so a chunk streams whole pages from memory. Items by (sequence, KV head) read each page
// three times with gaps and streamed ~14 GB/s, chunks ~25 GB/s: decode attention at several
// sequences is bound by reading the pool (8 sequences x 520 tokens, SmolLM2: 6.4 MB a layer).
constexpr int64_t kChunkEntries = 4;

// The seen tokens of one listed entry: consecutive in the pool and in position.
struct KeyRun {
  int64_t first, n, position;  // index of the first in `offsets`, count, its key position
  float scale, bias;
};

struct Scratch {
  std::vector<float> scores;     // [Hq, stride]: logits, then softmax weights
  std::vector<int64_t> offsets;  // [keys] element offset of each seen token's row (all heads)
  std::vector<KeyRun> runs;
  std::vector<float> sums;  // [Hq, 16, 16]: DecodeOps16's per-key partial dot products
};

// Tokens ahead whose keys and values are requested while a token is scored: the hardware
// prefetcher does not cross pages, and each page is a separate stream.
constexpr int64_t kPrefetchAhead = 4;

template <typename KV>
inline void PrefetchToken(const Problem<KV>& p, int64_t row) {
  const int64_t bytes = p.Hkv * p.D * static_cast<int64_t>(sizeof(KV));
  const char* k = reinterpret_cast<const char*>(p.k + row);
  const char* v = reinterpret_cast<const char*>(p.v + row);
  for (int64_t b = 0; b < bytes; b += 64) {
    _mm_prefetch(k + b, _MM_HINT_T0);
    _mm_prefetch(v + b, _MM_HINT_T1);  // read in the second pass
  }
}

// The partial softmax of one chunk, per query head: [max, sum, D unnormalized outputs].
inline int64_t PartialSize(int64_t D) { return D + 2; }

// The vector work of a decode chunk, 8-wide (AVX2) and 16-wide (AVX512): `ScoreKeys` rotates
// consecutive tokens' keys for each KV head and writes their logits against the head's G
// query heads to `scores[hq * stride + j]`; `WeightedValuesGroup` sums the seen tokens' values
// of a KV head's query heads, weighted, into `out[g]` (D floats each, unnormalized).
struct DecodeOps8 {
  template <typename KV>
  static void Score(const Problem<KV>& p, int64_t base, int64_t position, const float* q, float scale, float bias,
                    float* scores, int64_t stride) {
    const int64_t G = p.Hq / p.Hkv, D = p.D;
    alignas(32) float key[kMaxHeadDim];
    for (int64_t h = 0; h < p.Hkv; ++h) {
      RotateKey(p, base + h * D, position, key);
      for (int64_t g = 0; g < G; ++g) {
        const float* qh = q + (h * G + g) * D;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_load_ps(key + d), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), _mm256_load_ps(key + d + 8), acc1);
        }
        scores[(h * G + g) * stride] = scale * HorizontalSum(_mm256_add_ps(acc0, acc1)) + bias;
      }
    }
  }

  // `n` consecutive tokens (rows[j] at position + j), each scored as above; the tokens at
  // `ahead` are prefetched meanwhile.
  template <typename KV>
  static void ScoreKeys(const Problem<KV>& p, const int64_t* rows, int64_t n, int64_t position, const int64_t* ahead,
                        int64_t n_ahead, const float* q, float scale, float bias, float* scores, int64_t stride,
                        Scratch&) {
    for (int64_t j = 0; j < n; ++j) {
      if (j < n_ahead) PrefetchToken(p, ahead[j]);
      Score(p, rows[j], position + j, q, scale, bias, scores + j, stride);
    }
  }

  template <typename KV>
  static void WeightedValues(const Problem<KV>& p, const int64_t* rows, int64_t seen, const float* w,
                             int64_t head_offset, float* out) {
    for (int64_t d0 = 0; d0 < p.D; d0 += 32) {  // 4 accumulators = 32 dimensions in registers
      const int64_t width = std::min<int64_t>(32, p.D - d0);  // D % 16 == 0: 16 or 32
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t k = 0; k < seen; ++k) {
        const KV* value = p.v + rows[k] + head_offset + d0;
        const __m256 wk = _mm256_set1_ps(w[k]);
        acc[0] = _mm256_fmadd_ps(wk, Load8(value), acc[0]);
        acc[1] = _mm256_fmadd_ps(wk, Load8(value + 8), acc[1]);
        if (width == 32) {
          acc[2] = _mm256_fmadd_ps(wk, Load8(value + 16), acc[2]);
          acc[3] = _mm256_fmadd_ps(wk, Load8(value + 24), acc[3]);
        }
      }
      for (int a = 0; a < width / 8; ++a) _mm256_storeu_ps(out + d0 + 8 * a, acc[a]);
    }
  }

  // WeightedValues for the `n` query heads of one KV head (weights w[g], outputs out[g]).
  template <typename KV>
  static void WeightedValuesGroup(const Problem<KV>& p, const int64_t* rows, int64_t seen, const float* const* w,
                                  int64_t n, int64_t head_offset, float* const* out) {
    for (int64_t g = 0; g < n; ++g) WeightedValues(p, rows, seen, w[g], head_offset, out[g]);
  }
};

SPANJAX_AVX512 inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
SPANJAX_AVX512 inline __m512 Load16(const uint16_t* p) {  // bf16 bit patterns -> fp32 (exact)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Lane j of the result: the sum of the 16 floats of row j of `rows` ([16, 16]). Each level
// adds pairs of half-width pieces of two rows, halving the rows: 8 + 4 + 2 + 1 combinations
// of two shuffles and an add. The levels leave row r in lane kLane[r] (a
// swap of pairs, its own inverse), so rows are read in that order to come out in place.
SPANJAX_AVX512 inline __m512 SumsOf16(const float* rows) {
  static constexpr int kLane[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j) {  // b[j]: 128-bit lanes 0-1 hold row j's pieces, 2-3 row j + 8's
    const __m512 x = _mm512_loadu_ps(rows + 16 * kLane[j]), y = _mm512_loadu_ps(rows + 16 * kLane[j + 8]);
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int j = 0; j < 4; ++j)  // c[j]: lanes hold rows j, j + 8, j + 4, j + 12
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[j], b[j + 4], 0x88), _mm512_shuffle_f32x4(b[j], b[j + 4], 0xDD));
  for (int j = 0; j < 2; ++j) {  // d[j]: in each lane, two floats of c[j]'s row, two of c[j + 2]'s
    const __m512d x = _mm512_castps_pd(c[j]), y = _mm512_castps_pd(c[j + 2]);
    d[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Half the instructions of DecodeOps8 for the same work; needs D % 32 == 0 (whole 16-wide
// halves for the rotation).
struct DecodeOps16 {
  // `ScoreKeys` for heads of 16 * kVecs dimensions: a rotated key in registers, the cos and
  // sin of its position loaded once for every KV head.
  template <int kVecs, typename KV>
  SPANJAX_AVX512 static void ScoreKeysOf(const Problem<KV>& p, const int64_t* rows, int64_t n, int64_t position,
                                         const int64_t* ahead, int64_t n_ahead, const float* q, float scale,
                                         float bias, float* scores, int64_t stride, float* sums) {
    constexpr int kHalf = kVecs / 2;
    const int64_t G = p.Hq / p.Hkv, D = p.D, half = D / 2;
    alignas(64) float buffer[kMaxHeadDim];
    for (int64_t j = 0; j < n; ++j) {
      if (j < n_ahead) PrefetchToken(p, ahead[j]);
      const auto [c, sn] = RopeRows(p, position + j, buffer);
      __m512 vc[kHalf], vs[kHalf];
      for (int i = 0; i < kHalf; ++i) vc[i] = _mm512_loadu_ps(c + 16 * i), vs[i] = _mm512_loadu_ps(sn + 16 * i);
      for (int64_t h = 0; h < p.Hkv; ++h) {
        const KV* k = p.k + rows[j] + h * D;
        __m512 key[kVecs];
        for (int i = 0; i < kHalf; ++i) {  // rotate-half RoPE, as RotateKey
          const __m512 k1 = Load16(k + 16 * i), k2 = Load16(k + half + 16 * i);
          key[i] = _mm512_fmsub_ps(k1, vc[i], _mm512_mul_ps(k2, vs[i]));
          key[kHalf + i] = _mm512_fmadd_ps(k2, vc[i], _mm512_mul_ps(k1, vs[i]));
        }
        const float* qh = q + h * G * D;
        float* out = sums + (h * G * 16 + j) * 16;
        for (int64_t g = 0; g < G; ++g, qh += D, out += 256) {
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), key[0]);
          for (int i = 1; i < kVecs; ++i) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * i), key[i], acc);
          _mm512_storeu_ps(out, acc);
        }
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    const __m512 vscale = _mm512_set1_ps(scale), vbias = _mm512_set1_ps(bias);
    for (int64_t hq = 0; hq < p.Hq; ++hq)  // rows past n hold an earlier block's sums: masked off
      _mm512_mask_storeu_ps(scores + hq * stride, valid, _mm512_fmadd_ps(SumsOf16(sums + hq * 256), vscale, vbias));
  }

  // Up to 16 consecutive tokens (rows[j] at position + j): each key is rotated per KV head and
  // dotted with the head's G query heads into one 16-float vector of partial sums per (query
  // head, token); the 16 tokens' vectors of a query head are then summed together by
  // `SumsOf16` (a transpose-and-add tree: ~3 shuffles and adds per logit, where a horizontal
  // sum per logit took ~8). The tokens at `ahead` are prefetched meanwhile.
  template <typename KV>
  SPANJAX_AVX512 static void ScoreKeys(const Problem<KV>& p, const int64_t* rows, int64_t n, int64_t position,
                                       const int64_t* ahead, int64_t n_ahead, const float* q, float scale, float bias,
                                       float* scores, int64_t stride, Scratch& scratch) {
    if (static_cast<int64_t>(scratch.sums.size()) < p.Hq * 256) scratch.sums.resize(p.Hq * 256, 0.0f);
    float* sums = scratch.sums.data();
    switch (p.D / 16) {  // D % 32 == 0, D <= kMaxHeadDim
      case 2: ScoreKeysOf<2>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
      case 4: ScoreKeysOf<4>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
      case 6: ScoreKeysOf<6>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
      case 8: ScoreKeysOf<8>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
      case 10: ScoreKeysOf<10>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
      case 12: ScoreKeysOf<12>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
      case 14: ScoreKeysOf<14>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
      default: ScoreKeysOf<16>(p, rows, n, position, ahead, n_ahead, q, scale, bias, scores, stride, sums); break;
    }
  }

  // 32 values from `p`: fp32 as two vectors in order; bf16 as one load whose 32-bit lanes
  // hold pairs, split into the even elements (shifted up) and the odd ones (masked), two
  // integer ops where converting in order took two widening shuffles and two shifts.
  SPANJAX_AVX512 static void Load32(const float* p, __m512& a, __m512& b) { a = Load16(p), b = Load16(p + 16); }
  SPANJAX_AVX512 static void Load32(const uint16_t* p, __m512& even, __m512& odd) {
    const __m512i v = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

  // Stores the sums of Load32's two vectors in element order.
  SPANJAX_AVX512 static void Store32(float* out, __m512 a, __m512 b, const float*) {
    _mm512_storeu_ps(out, a), _mm512_storeu_ps(out + 16, b);
  }
  SPANJAX_AVX512 static void Store32(float* out, __m512 even, __m512 odd, const uint16_t*) {
    const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(even, low, odd));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(even, high, odd));
  }

  // NG query heads of one KV head at once: each value is loaded and converted once for all of
  // them (NG x 4 accumulators), where a pass per head converted it NG times.
  template <int NG, typename KV>
  SPANJAX_AVX512 static void ValuesOfHeads(const Problem<KV>& p, const int64_t* rows, int64_t seen,
                                           const float* const* w, int64_t head_offset, float* const* out) {
    for (int64_t d0 = 0; d0 < p.D; d0 += 64) {
      const bool full = p.D - d0 >= 64;  // D % 32 == 0: 64 or 32 dimensions
      __m512 acc[NG][4];
      for (auto& head : acc)
        for (auto& a : head) a = _mm512_setzero_ps();
      for (int64_t k = 0; k < seen; ++k) {
        const KV* value = p.v + rows[k] + head_offset + d0;
        __m512 v0, v1, v2, v3;
        Load32(value, v0, v1);
        if (full) {
          Load32(value + 32, v2, v3);
        } else {
          v2 = v0, v3 = v1;
        }
        for (int g = 0; g < NG; ++g) {
          const __m512 wk = _mm512_set1_ps(w[g][k]);
          acc[g][0] = _mm512_fmadd_ps(wk, v0, acc[g][0]);
          acc[g][1] = _mm512_fmadd_ps(wk, v1, acc[g][1]);
          acc[g][2] = _mm512_fmadd_ps(wk, v2, acc[g][2]);
          acc[g][3] = _mm512_fmadd_ps(wk, v3, acc[g][3]);
        }
      }
      for (int g = 0; g < NG; ++g) {
        Store32(out[g] + d0, acc[g][0], acc[g][1], p.v);
        if (full) Store32(out[g] + d0 + 32, acc[g][2], acc[g][3], p.v);
      }
    }
  }

  template <typename KV>
  SPANJAX_AVX512 static void WeightedValuesGroup(const Problem<KV>& p, const int64_t* rows, int64_t seen,
                                                 const float* const* w, int64_t n, int64_t head_offset,
                                                 float* const* out) {
    for (int64_t g = 0; g < n; g += 4) {  // at most 4 heads (16 accumulators) a pass
      switch (std::min<int64_t>(4, n - g)) {
        case 1: ValuesOfHeads<1>(p, rows, seen, w + g, head_offset, out + g); break;
        case 2: ValuesOfHeads<2>(p, rows, seen, w + g, head_offset, out + g); break;
        case 3: ValuesOfHeads<3>(p, rows, seen, w + g, head_offset, out + g); break;
        default: ValuesOfHeads<4>(p, rows, seen, w + g, head_offset, out + g); break;
      }
    }
  }
};

// One chunk of sequence s (listed entries [i0, i1)): every seen token's key is rotated per KV
// head and scored against that head's G query heads while it is in registers; then each
// query head's softmax weights (eight at a time) and its weighted sum of the values. Writes
// the chunk's partials for every head.
template <typename KV, typename Ops>
void AttendChunk(const Problem<KV>& p, int64_t s, int64_t i0, int64_t i1, float* partial, Scratch& scratch) {
  const int64_t t = p.cu[s];
  const int64_t G = p.Hq / p.Hkv, D = p.D, Hq = p.Hq;
  const int64_t qp = p.q_pos[t];
  const float* q = p.q + t * Hq * D;  // sm_scale goes into each entry's scale
  const int64_t cap = (i1 - i0) * p.P;
  const int64_t stride = (cap + 7) / 8 * 8;  // per head, a multiple of 8
  scratch.scores.resize(Hq * stride);
  scratch.offsets.resize(cap);
  float* scores = scratch.scores.data();
  int64_t seen = 0;
  scratch.runs.clear();
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t entry = s * p.M + i;
    const int64_t page = p.tables[entry];
    if (page < 0 || page >= p.pages) continue;  // unused entries (block_lens 0) carry any id
    const int64_t visible = std::min<int64_t>({p.lens[entry], p.P, qp - p.pos[entry] + 1});
    if (visible <= 0) continue;
    scratch.runs.push_back({seen, visible, p.pos[entry], (p.scale ? p.scale[entry] : 1.0f) * p.sm_scale,
                            p.bias ? p.bias[entry] : 0.0f});
    for (int64_t j = 0; j < visible; ++j) scratch.offsets[seen++] = (page * p.P + j) * p.Hkv * D;
  }
  const int64_t* offsets = scratch.offsets.data();
  for (const KeyRun& run : scratch.runs)
    for (int64_t j0 = 0; j0 < run.n; j0 += 16) {  // blocks of 16 tokens (a page, at the usual size)
      const int64_t first = run.first + j0, n = std::min<int64_t>(16, run.n - j0);
      const int64_t n_ahead = std::clamp<int64_t>(seen - first - kPrefetchAhead, 0, n);
      Ops::ScoreKeys(p, offsets + first, n, run.position + j0, offsets + first + kPrefetchAhead, n_ahead, q,
                     run.scale, run.bias, scores + first, stride, scratch);
    }
  const int64_t full = seen / 8 * 8;
  for (int64_t hq = 0; hq < Hq; ++hq) {
    float* out = partial + hq * PartialSize(D);
    if (seen == 0) {  // nothing here: a partial that the merge skips
      out[0] = 0.0f, out[1] = 0.0f;
      continue;
    }
    float* w = scores + hq * stride;
    __m256 max8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t e = 0; e < full; e += 8) max8 = _mm256_max_ps(max8, _mm256_loadu_ps(w + e));
    float m = HorizontalMax(max8);
    for (int64_t e = full; e < seen; ++e) m = std::max(m, w[e]);
    if (!std::isfinite(m)) m = 0.0f;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum8 = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e < full; e += 8) {
      const __m256 x = Exp8(_mm256_sub_ps(_mm256_loadu_ps(w + e), vm));
      _mm256_storeu_ps(w + e, x);
      sum8 = _mm256_add_ps(sum8, x);
    }
    float total = HorizontalSum(sum8);
    for (; e < seen; ++e) {
      w[e] = std::exp(w[e] - m);
      total += w[e];
    }
    out[0] = m, out[1] = total;
  }
  if (seen == 0) return;
  const float* weights[kMaxGroup];
  float* outs[kMaxGroup];
  for (int64_t h = 0; h < p.Hkv; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      weights[g] = scores + (h * G + g) * stride;
      outs[g] = partial + (h * G + g) * PartialSize(D) + 2;
    }
    Ops::WeightedValuesGroup(p, scratch.offsets.data(), seen, weights, G, h * D, outs);
  }
}

// The calling thread's buffer for a call's chunk partials, kept between calls (a decode step
// calls once per layer) and not cleared: every chunk writes all of its partials.
inline std::vector<float>& PartialsBuffer(int64_t size) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer;
}

// One output row from its chunks' partials (the first at `first`, the next ones `stride`
// floats apart): each chunk's sums rescaled to the largest max, then normalized. Chunks that
// saw nothing (sum 0) are skipped; a row that saw nothing stays zero.
inline void MergeRow(const float* first, int64_t stride, int64_t chunks, int64_t D, float* out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < chunks; ++c)
    if (first[c * stride + 1] > 0.0f) m = std::max(m, first[c * stride]);
  if (m == -std::numeric_limits<float>::infinity()) return;
  float total = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* part = first + c * stride;
    if (part[1] <= 0.0f) continue;
    const float f = std::exp(part[0] - m);
    total += f * part[1];
    for (int64_t d = 0; d < D; ++d) out[d] += f * part[2 + d];
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// ---- prefill: any number of query tokens per sequence ----

constexpr int64_t kTileRows = 96;  // query rows (tokens x G heads) of one work item, at most
constexpr int64_t kMinSplitEntries = 8;  // listed entries per chunk when a tile's keys are split
constexpr int64_t kKeyBlock = 32;  // keys scored together: four 8-wide vectors per row
constexpr int kRowGroup = 3;       // rows whose accumulators share each loaded key or value

struct TileScratch {
  std::vector<float> q, acc;  // [rows, D]: scaled queries; unnormalized outputs
  // Per row, sized to a multiple of 8 (vector passes over rows): running max, this block's
  // max, this block's rescale of the row's sums, and the running sums as 8 partial sums.
  std::vector<float> m, block_max, corr, l8;
  std::vector<int32_t> row_pos;  // per row: its token's position (INT32_MIN: a padding row)
  std::vector<float> keys_t;     // [D, kKeyBlock]: the block's rotated keys, transposed
  std::vector<float> values;     // [kKeyBlock, D] as fp32
  std::vector<float> scores;     // [rows, kKeyBlock]: logits, then softmax weights
  alignas(64) int32_t key_pos[kKeyBlock];
  alignas(64) float key_scale[kKeyBlock], key_bias[kKeyBlock];
};

// A row group's accumulators for 8 * kVectors dimensions from d0, rescaled by their rows'
// `corr`, plus the block's softmax weights times its values. kVectors is a constant so that the
// accumulators live in registers (a runtime count left them on the stack: 2x slower).
template <int kVectors>
inline void AccumulateValues(TileScratch& w, int64_t r, int64_t D, int64_t d0, int64_t nk) {
  const float* p[kRowGroup];
  float* o[kRowGroup];
  __m256 a[kRowGroup][kVectors];
  for (int i = 0; i < kRowGroup; ++i) {
    p[i] = w.scores.data() + (r + i) * kKeyBlock;
    o[i] = w.acc.data() + (r + i) * D + d0;
    const __m256 c = _mm256_set1_ps(w.corr[r + i]);
    for (int v = 0; v < kVectors; ++v) a[i][v] = _mm256_mul_ps(_mm256_loadu_ps(o[i] + 8 * v), c);
  }
  const float* value = w.values.data() + d0;
  for (int64_t k = 0; k < nk; ++k, value += D) {
    for (int i = 0; i < kRowGroup; ++i) {
      const __m256 wk = _mm256_broadcast_ss(p[i] + k);
      for (int v = 0; v < kVectors; ++v) a[i][v] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(value + 8 * v), a[i][v]);
    }
  }
  for (int i = 0; i < kRowGroup; ++i)
    for (int v = 0; v < kVectors; ++v) _mm256_storeu_ps(o[i] + 8 * v, a[i][v]);
}

// The block's logits against every row (scaled and biased when weighted), masked to -inf
// where unseen, and each row's block max. Rows go in groups of kRowGroup (the caller pads
// them), so each loaded key vector feeds three rows' accumulators: twelve in registers,
// enough to hide the FMA latency (pairs ran ~25% slower, four rows spill).
inline void ScoreBlock8(TileScratch& w, int64_t rows, int64_t D, bool weighted) {
  const float* kt = w.keys_t.data();
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; r += kRowGroup) {
    __m256 a[kRowGroup][4];
    for (auto& row : a)
      for (auto& x : row) x = _mm256_setzero_ps();
    const float* q = w.q.data() + r * D;
    for (int64_t d = 0; d < D; ++d) {
      for (int i = 0; i < kRowGroup; ++i) {
        const __m256 b = _mm256_broadcast_ss(q + i * D + d);
        for (int v = 0; v < 4; ++v) a[i][v] = _mm256_fmadd_ps(b, _mm256_loadu_ps(kt + d * kKeyBlock + 8 * v), a[i][v]);
      }
    }
    for (int i = 0; i < kRowGroup; ++i) {
      const int64_t row = r + i;
      float* s = w.scores.data() + row * kKeyBlock;
      const __m256i qp = _mm256_set1_epi32(w.row_pos[row]);
      __m256 mx = neg_inf;
      for (int v = 0; v < 4; ++v) {
        __m256 x = a[i][v];
        if (weighted)
          x = _mm256_fmadd_ps(x, _mm256_load_ps(w.key_scale + 8 * v), _mm256_load_ps(w.key_bias + 8 * v));
        const __m256i kp = _mm256_load_si256(reinterpret_cast<const __m256i*>(w.key_pos + 8 * v));
        x = _mm256_blendv_ps(x, neg_inf, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kp, qp)));  // key after query
        _mm256_storeu_ps(s + 8 * v, x);
        mx = _mm256_max_ps(mx, x);
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      w.block_max[row] = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    }
  }
}

// Exp8 sixteen at a time.
SPANJAX_AVX512 inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// The block's softmax weights (0 where masked) in place of its logits, and each row's sums,
// kept as eight partial sums, rescaled and increased.
inline void SoftmaxWeights8(TileScratch& w, int64_t rows) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t row = 0; row < rows; ++row) {
    float* s = w.scores.data() + row * kKeyBlock;
    const __m256 vm = _mm256_set1_ps(w.m[row]);
    __m256 sum = _mm256_mul_ps(_mm256_loadu_ps(w.l8.data() + 8 * row), _mm256_set1_ps(w.corr[row]));
    for (int v = 0; v < 4; ++v) {
      const __m256 x = _mm256_loadu_ps(s + 8 * v);
      const __m256 e = _mm256_and_ps(Exp8(_mm256_sub_ps(x, vm)), _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ));
      _mm256_storeu_ps(s + 8 * v, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(w.l8.data() + 8 * row, sum);
  }
}

// Scores one block of `nk` keys (columns past nk: zero keys at position INT32_MAX) against
// every row, and folds it into the rows' online softmax. The softmax's per-row bookkeeping
// runs eight rows at a time and keeps the sums as vectors: done per row with a scalar exp and
// a horizontal sum, it cost more than the QK product.
inline void FoldKeyBlock(TileScratch& w, int64_t rows, int64_t D, int64_t nk, bool weighted) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  ScoreBlock8(w, rows, D, weighted);
  // New running maxima and the rescale of what the rows summed so far, eight rows at a time;
  // a row that has seen nothing yet keeps max -inf and rescales its (zero) sums by 0.
  for (int64_t r = 0; r < rows; r += 8) {
    const __m256 m_old = _mm256_loadu_ps(w.m.data() + r);
    const __m256 m_new = _mm256_max_ps(m_old, _mm256_loadu_ps(w.block_max.data() + r));
    const __m256 fresh = _mm256_cmp_ps(m_old, neg_inf, _CMP_EQ_OQ);
    _mm256_storeu_ps(w.corr.data() + r, _mm256_blendv_ps(Exp8(_mm256_sub_ps(m_old, m_new)), _mm256_setzero_ps(), fresh));
    _mm256_storeu_ps(w.m.data() + r, m_new);
  }
  // Softmax weights (exactly 0 where masked: Exp8 floors at e^-87) and the sums.
  SoftmaxWeights8(w, rows);
  // acc = acc * corr + weights @ values, a row group at a time.
  for (int64_t r = 0; r < rows; r += kRowGroup) {
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      if (D - d0 >= 32)  // D % 16 == 0: 32 or 16 dimensions left
        AccumulateValues<4>(w, r, D, d0, nk);
      else
        AccumulateValues<2>(w, r, D, d0, nk);
    }
  }
}

// Calls key(offset, position) for each slot a token at position q_max or before may see in the
// listed entries [i0, i1) of sequence s, in listing order: `offset` is the slot's element
// offset in the pool for KV head 0 (head h's row is at offset + h * D).
template <typename KV, typename Key>
inline void ForSeenSlots(const Problem<KV>& p, int64_t s, int64_t i0, int64_t i1, int64_t q_max, Key key) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t entry = s * p.M + i;
    const int64_t page = p.tables[entry];
    if (page < 0 || page >= p.pages) continue;  // unused entries (block_lens 0) carry any id
    const int64_t visible = std::min<int64_t>({p.lens[entry], p.P, q_max - p.pos[entry] + 1});
    for (int64_t j = 0; j < visible; ++j) key(entry, (page * p.P + j) * p.Hkv * p.D, p.pos[entry] + j);
  }
}

// One row's result from its running max m, sum l and unnormalized output acc (D floats): with
// `part`, its partial softmax for MergeRow (PartialSize(D) floats); else acc / l into `out`
// (zeros for a row that saw nothing).
inline void FinishRow(float m, float l, const float* acc, int64_t D, float* part, float* out) {
  if (part != nullptr) {
    part[0] = l > 0.0f ? m : 0.0f, part[1] = l;
    std::copy(acc, acc + D, part + 2);
    return;
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * inv;
}

// One (sequence, KV head, tokens [t0, t1), listed entries [i0, i1)): the tile's rows are its
// tokens x the KV head's G query heads. Keys are collected in listing order, kKeyBlock at a
// time, from the entries whose slots some token of the tile may see; each key is rotated once
// per tile. Writes the rows' outputs, or with `partial` their partial softmax (as the decode
// chunks: max, sum, unnormalized output; PartialSize(D) floats a row) for MergeRow.
template <typename KV>
void AttendTile(const Problem<KV>& p, int64_t s, int64_t h, int64_t t0, int64_t t1, int64_t i0, int64_t i1,
                float* partial, TileScratch& w) {
  const int64_t G = p.Hq / p.Hkv, D = p.D;
  const int64_t rows = (t1 - t0) * G, padded = (rows + kRowGroup - 1) / kRowGroup * kRowGroup;
  w.q.assign(padded * D, 0.0f);
  w.acc.assign(padded * D, 0.0f);
  const int64_t padded8 = (padded + 7) / 8 * 8;
  w.m.assign(padded8, -std::numeric_limits<float>::infinity());
  w.block_max.assign(padded8, -std::numeric_limits<float>::infinity());
  w.corr.assign(padded8, 0.0f);
  w.l8.assign(8 * padded8, 0.0f);
  w.row_pos.assign(padded, std::numeric_limits<int32_t>::min());
  w.keys_t.assign(D * kKeyBlock, 0.0f);
  w.values.assign(kKeyBlock * D, 0.0f);
  w.scores.resize(padded * kKeyBlock);
  int64_t q_max = std::numeric_limits<int64_t>::min();
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t qp = p.q_pos[t];
    q_max = std::max<int64_t>(q_max, qp);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = (t - t0) * G + g;
      w.row_pos[r] = qp;
      const float* src = p.q + (t * p.Hq + h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) w.q[r * D + d] = src[d] * p.sm_scale;
    }
  }
  const bool weighted = p.scale != nullptr;
  int64_t nk = 0;
  auto fold = [&] {
    for (int64_t k = nk; k < kKeyBlock; ++k) {  // the block's unused columns: never seen
      w.key_pos[k] = std::numeric_limits<int32_t>::max();
      w.key_scale[k] = 1.0f, w.key_bias[k] = 0.0f;
      for (int64_t d = 0; d < D; ++d) w.keys_t[d * kKeyBlock + k] = 0.0f;
    }
    FoldKeyBlock(w, padded, D, nk, weighted);
    nk = 0;
  };
  alignas(32) float key[kMaxHeadDim];
  ForSeenSlots(p, s, i0, i1, q_max, [&](int64_t entry, int64_t offset, int64_t position) {
    const int64_t row = offset + h * D;
    RotateKey(p, row, position, key);
    for (int64_t d = 0; d < D; ++d) w.keys_t[d * kKeyBlock + nk] = key[d];
    float* value = w.values.data() + nk * D;
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(value + d, Load8(p.v + row + d));
    w.key_pos[nk] = static_cast<int32_t>(position);
    if (weighted) w.key_scale[nk] = p.scale[entry], w.key_bias[nk] = p.bias[entry];
    if (++nk == kKeyBlock) fold();
  });
  if (nk > 0) fold();
  for (int64_t r = 0; r < rows; ++r) {
    const float l = HorizontalSum(_mm256_loadu_ps(w.l8.data() + 8 * r));
    FinishRow(w.m[r], l, w.acc.data() + r * D, D, partial == nullptr ? nullptr : partial + r * PartialSize(D),
              p.out + ((t0 + r / G) * p.Hq + h * G + r % G) * D);
  }
}

// ---- prefill, 16 wide (AVX512, D % 64 == 0): a tile's rows in the vector lanes ----
//
// The work items and results of AttendTile, laid out the other way round: the tile's queries
// are transposed once (QT [D, R], R its rows padded to 16) and each key's elements are
// broadcast against row vectors. Keys are then used as they are stored, rotated 16 wide and
// never transposed (AttendTile transposes every key element by element, about a third of its
// time), and the online softmax runs down the lanes: a row's max, rescale and sum are vector
// operations on 16 rows, with no horizontal reductions.

constexpr int kLaneRowGroup = 4;  // rows whose value accumulators share each loaded value: 16 registers

struct LaneHead {                   // one KV head's rows
  std::vector<float> qt;            // [D, R]: scaled queries, transposed
  std::vector<float> acc;           // [R, D]: unnormalized outputs
  std::vector<float> m, l, corr;    // [R]: running max and sum; this block's rescale of the sums
  std::vector<float> keys, values;  // [kKeyBlock, D]: the block's rotated keys; its values as fp32
  std::vector<float> probs;         // [kKeyBlock, R]: logits, then softmax weights
};

struct LaneScratch {
  std::vector<LaneHead> heads;
  std::vector<int32_t> row_pos;  // [R]: each row's token position (INT32_MIN: padding)
  alignas(64) int32_t key_pos[kKeyBlock];
  alignas(64) float key_scale[kKeyBlock], key_bias[kKeyBlock];
};

// The logits of the block's keys [0, nk) against every row, KB keys at a time: each key element
// is broadcast against the NV row vectors of QT (KB * NV accumulators), the sums scaled and
// biased when weighted, and -inf where the key comes after the row's token. Keys past nk in
// the last group are scored too (stale rows of the buffer) and not stored.
template <int NV, int KB>
SPANJAX_AVX512 void ScoreLanes(const LaneScratch& w, LaneHead& head, int64_t R, int64_t D, int64_t nk, bool weighted) {
  static_assert(kKeyBlock % KB == 0, "key groups must tile the block");
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i row_pos[NV];
  for (int v = 0; v < NV; ++v) row_pos[v] = _mm512_loadu_si512(w.row_pos.data() + 16 * v);
  for (int64_t k = 0; k < nk; k += KB) {
    __m512 a[KB][NV];
    for (auto& key : a)
      for (auto& x : key) x = _mm512_setzero_ps();
    const float* key = head.keys.data() + k * D;
    const float* qt = head.qt.data();
    for (int64_t d = 0; d < D; ++d, qt += R) {
      __m512 q[NV];
      for (int v = 0; v < NV; ++v) q[v] = _mm512_loadu_ps(qt + 16 * v);
      for (int j = 0; j < KB; ++j) {
        const __m512 b = _mm512_set1_ps(key[j * D + d]);
        for (int v = 0; v < NV; ++v) a[j][v] = _mm512_fmadd_ps(b, q[v], a[j][v]);
      }
    }
    for (int j = 0; j < KB && k + j < nk; ++j) {
      const __m512 scale = _mm512_set1_ps(w.key_scale[k + j]), bias = _mm512_set1_ps(w.key_bias[k + j]);
      const __m512i key_pos = _mm512_set1_epi32(w.key_pos[k + j]);
      float* out = head.probs.data() + (k + j) * R;
      for (int v = 0; v < NV; ++v) {
        const __m512 x = weighted ? _mm512_fmadd_ps(a[j][v], scale, bias) : a[j][v];
        const __mmask16 after = _mm512_cmpgt_epi32_mask(key_pos, row_pos[v]);
        _mm512_storeu_ps(out + 16 * v, _mm512_mask_blend_ps(after, x, neg_inf));
      }
    }
  }
}

// The block's logits for R / 16 row vectors, with as many keys at a time as the 32 registers
// hold accumulators for (16-24): each pass reads the transposed queries once, so more keys a
// pass mean fewer query loads per FMA.
SPANJAX_AVX512 void ScoreLanesFor(const LaneScratch& w, LaneHead& head, int64_t R, int64_t D, int64_t nk,
                                  bool weighted) {
  switch (R / 16) {
    case 1: ScoreLanes<1, 16>(w, head, R, D, nk, weighted); break;
    case 2: ScoreLanes<2, 8>(w, head, R, D, nk, weighted); break;
    case 3: ScoreLanes<3, 8>(w, head, R, D, nk, weighted); break;
    case 4: ScoreLanes<4, 4>(w, head, R, D, nk, weighted); break;
    case 5: ScoreLanes<5, 4>(w, head, R, D, nk, weighted); break;
    default: ScoreLanes<6, 4>(w, head, R, D, nk, weighted); break;  // kTileRows = 96: at most six
  }
}

// Folds the block's logits into the rows' online softmax, 16 rows a vector: new maxima, the
// rescale of what the rows summed so far (0 for a row that had seen nothing), and the softmax
// weights in place of the logits (exactly 0 where masked).
SPANJAX_AVX512 void SoftmaxLanes(LaneHead& head, int64_t R, int64_t nk) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < R; r += 16) {
    float* column = head.probs.data() + r;
    __m512 block_max = neg_inf;
    for (int64_t k = 0; k < nk; ++k) block_max = _mm512_max_ps(block_max, _mm512_loadu_ps(column + k * R));
    const __m512 m_old = _mm512_loadu_ps(head.m.data() + r), m_new = _mm512_max_ps(m_old, block_max);
    const __mmask16 seen = _mm512_cmp_ps_mask(m_old, neg_inf, _CMP_NEQ_OQ);
    const __m512 corr = _mm512_maskz_mov_ps(seen, Exp16(_mm512_sub_ps(m_old, m_new)));
    __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(head.l.data() + r), corr);
    for (int64_t k = 0; k < nk; ++k) {
      const __m512 x = _mm512_loadu_ps(column + k * R);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, neg_inf, _CMP_NEQ_OQ), Exp16(_mm512_sub_ps(x, m_new)));
      _mm512_storeu_ps(column + k * R, e);
      sum = _mm512_add_ps(sum, e);
    }
    _mm512_storeu_ps(head.corr.data() + r, corr);
    _mm512_storeu_ps(head.m.data() + r, m_new);
    _mm512_storeu_ps(head.l.data() + r, sum);
  }
}

// acc = acc * corr + weights @ values for rows [r, r + kLaneRowGroup) and 64 dimensions from d0.
SPANJAX_AVX512 void AccumulateLanes(LaneHead& head, int64_t r, int64_t R, int64_t D, int64_t d0, int64_t nk) {
  __m512 a[kLaneRowGroup][4];
  for (int i = 0; i < kLaneRowGroup; ++i) {
    const float* o = head.acc.data() + (r + i) * D + d0;
    const __m512 c = _mm512_set1_ps(head.corr[r + i]);
    for (int v = 0; v < 4; ++v) a[i][v] = _mm512_mul_ps(_mm512_loadu_ps(o + 16 * v), c);
  }
  const float* value = head.values.data() + d0;
  const float* weight = head.probs.data() + r;
  for (int64_t k = 0; k < nk; ++k, value += D, weight += R) {
    __m512 x[4];
    for (int v = 0; v < 4; ++v) x[v] = _mm512_loadu_ps(value + 16 * v);
    for (int i = 0; i < kLaneRowGroup; ++i) {
      const __m512 wk = _mm512_set1_ps(weight[i]);
      for (int v = 0; v < 4; ++v) a[i][v] = _mm512_fmadd_ps(wk, x[v], a[i][v]);
    }
  }
  for (int i = 0; i < kLaneRowGroup; ++i)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(head.acc.data() + (r + i) * D + d0 + 16 * v, a[i][v]);
}

// AttendTile's work, for every KV head at once (tokens [t0, t1) of sequence s, listed entries
// [i0, i1)), with each head's rows in the lanes: a token's keys and values for all heads lie
// side by side in the pool, so the item reads each page once, front to back (an item per head
// read a third of each token's bytes, and the three items streamed ~14 GB/s). The outputs,
// or with `partial` each head's rows' partials (kTileRows rows a head).
template <typename KV>
SPANJAX_AVX512 void AttendTileLanes(const Problem<KV>& p, int64_t s, int64_t t0, int64_t t1, int64_t i0, int64_t i1,
                                    float* partial, LaneScratch& w) {
  static_assert(kTileRows <= 96, "ScoreLanesFor handles up to six row vectors");
  const int64_t G = p.Hq / p.Hkv, D = p.D, half = D / 2;
  const int64_t rows = (t1 - t0) * G, R = (rows + 15) / 16 * 16;
  const int64_t grouped = (rows + kLaneRowGroup - 1) / kLaneRowGroup * kLaneRowGroup;
  w.heads.resize(p.Hkv);
  w.row_pos.assign(R, std::numeric_limits<int32_t>::min());
  int64_t q_max = std::numeric_limits<int64_t>::min();
  for (int64_t t = t0; t < t1; ++t) {
    q_max = std::max<int64_t>(q_max, p.q_pos[t]);
    for (int64_t g = 0; g < G; ++g) w.row_pos[(t - t0) * G + g] = p.q_pos[t];
  }
  for (int64_t h = 0; h < p.Hkv; ++h) {
    LaneHead& head = w.heads[h];
    head.qt.assign(D * R, 0.0f);
    head.acc.assign(R * D, 0.0f);
    head.m.assign(R, -std::numeric_limits<float>::infinity());
    head.l.assign(R, 0.0f);
    head.corr.assign(R, 0.0f);
    head.keys.resize(kKeyBlock * D);
    head.values.resize(kKeyBlock * D);
    head.probs.resize(kKeyBlock * R);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = p.q + ((t0 + r / G) * p.Hq + h * G + r % G) * D;
      for (int64_t d = 0; d < D; ++d) head.qt[d * R + r] = src[d] * p.sm_scale;
    }
  }
  const bool weighted = p.scale != nullptr;
  int64_t nk = 0;
  auto fold = [&] {
    for (LaneHead& head : w.heads) {
      ScoreLanesFor(w, head, R, D, nk, weighted);
      SoftmaxLanes(head, R, nk);
      for (int64_t r = 0; r < grouped; r += kLaneRowGroup)
        for (int64_t d0 = 0; d0 < D; d0 += 64) AccumulateLanes(head, r, R, D, d0, nk);
    }
    nk = 0;
  };
  alignas(64) float buffer[kMaxHeadDim];
  // The slot's keys and values for every KV head, side by side in the pool, into each head's block.
  ForSeenSlots(p, s, i0, i1, q_max, [&](int64_t entry, int64_t offset, int64_t position) SPANJAX_AVX512 {
    const auto [c, sn] = RopeRows(p, position, buffer);
    for (int64_t h = 0; h < p.Hkv; ++h) {
      const int64_t row = offset + h * D;
      float* key = w.heads[h].keys.data() + nk * D;
      for (int64_t d = 0; d < half; d += 16) {  // rotate-half RoPE, as RotateKey
        const __m512 k1 = Load16(p.k + row + d), k2 = Load16(p.k + row + half + d);
        const __m512 vc = _mm512_loadu_ps(c + d), vs = _mm512_loadu_ps(sn + d);
        _mm512_storeu_ps(key + d, _mm512_fmsub_ps(k1, vc, _mm512_mul_ps(k2, vs)));
        _mm512_storeu_ps(key + half + d, _mm512_fmadd_ps(k2, vc, _mm512_mul_ps(k1, vs)));
      }
      float* value = w.heads[h].values.data() + nk * D;
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(value + d, Load16(p.v + row + d));
    }
    w.key_pos[nk] = static_cast<int32_t>(position);
    if (weighted) w.key_scale[nk] = p.scale[entry], w.key_bias[nk] = p.bias[entry];
    if (++nk == kKeyBlock) fold();
  });
  if (nk > 0) fold();
  for (int64_t h = 0; h < p.Hkv; ++h) {
    const LaneHead& head = w.heads[h];
    for (int64_t r = 0; r < rows; ++r)
      FinishRow(head.m[r], head.l[r], head.acc.data() + r * D, D,
                partial == nullptr ? nullptr : partial + (h * kTileRows + r) * PartialSize(D),
                p.out + ((t0 + r / G) * p.Hq + h * G + r % G) * D);
  }
}

// Runs `kernel` over the buffers of one call: the shapes checked, the output zeroed (padding
// tokens and rows that see nothing stay zero).
template <typename KV, ffi::DataType kType, typename Kernel>
ffi::Error RunAttention(const char* name, ffi::Buffer<ffi::F32> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                        ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lens,
                        ffi::Buffer<ffi::S32> cu, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> cos,
                        ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> inv_freq, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bias, float sm_scale, ffi::ResultBuffer<ffi::F32> out, Kernel kernel) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto td = tables.dimensions();
  Problem<KV> p{};
  p.T = qd[0], p.Hq = qd[1], p.D = qd[2];
  p.pages = kd[0], p.P = kd[1], p.Hkv = kd[2];
  p.S = td[0], p.M = td[1];
  if (p.D % 16 != 0 || p.D > kMaxHeadDim || p.Hkv < 1 || p.Hq % p.Hkv != 0 || p.Hq / p.Hkv > kMaxGroup)
    return ffi::Error::InvalidArgument(std::string(name) + ": unsupported head layout");
  p.q = q.typed_data();
  p.k = reinterpret_cast<const KV*>(k.typed_data());
  p.v = reinterpret_cast<const KV*>(v.typed_data());
  p.tables = tables.typed_data(), p.pos = pos.typed_data(), p.lens = lens.typed_data();
  p.cu = cu.typed_data(), p.q_pos = q_pos.typed_data();
  if (inv_freq.element_count() != p.D / 2 || cos.element_count() != sin.element_count() ||
      cos.element_count() % (p.D / 2) != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": RoPE tables must be [rows, D / 2], inv_freq [D / 2]");
  p.cos = cos.typed_data(), p.sin = sin.typed_data(), p.inv_freq = inv_freq.typed_data();
  p.rope_rows = cos.element_count() / (p.D / 2);
  p.scale = scale.element_count() ? scale.typed_data() : nullptr;  // empty = plain contract
  p.bias = bias.element_count() ? bias.typed_data() : nullptr;
  p.out = out->typed_data();
  p.sm_scale = sm_scale;
  std::memset(p.out, 0, sizeof(float) * p.T * p.Hq * p.D);
  kernel(p);
  return ffi::Error::Success();
}

template <typename KV>
void DecodeAll(const Problem<KV>& p) {
  const int64_t per_seq = (p.M + kChunkEntries - 1) / kChunkEntries;
  std::vector<int64_t> seqs;  // sequences with a query token
  for (int64_t s = 0; s < p.S; ++s)
    if (p.cu[s + 1] > p.cu[s] && p.cu[s] >= 0 && p.cu[s] < p.T) seqs.push_back(s);
  const int64_t items = static_cast<int64_t>(seqs.size()) * per_seq, size = p.Hq * PartialSize(p.D);
  std::vector<float>& partials = PartialsBuffer(items * size);
  const bool wide = spanjax::UseAvx512() && p.D % 32 == 0;
  spanjax::ParallelFor(items, [&](int64_t item) {
    thread_local Scratch scratch;
    const int64_t s = seqs[item / per_seq], i0 = item % per_seq * kChunkEntries, i1 = std::min(p.M, i0 + kChunkEntries);
    float* partial = partials.data() + item * size;
    if (wide) {
      AttendChunk<KV, DecodeOps16>(p, s, i0, i1, partial, scratch);
    } else {
      AttendChunk<KV, DecodeOps8>(p, s, i0, i1, partial, scratch);
    }
  });
  for (size_t n = 0; n < seqs.size(); ++n)
    for (int64_t hq = 0; hq < p.Hq; ++hq)
      MergeRow(partials.data() + n * per_seq * size + hq * PartialSize(p.D), size, per_seq, p.D,
               p.out + (p.cu[seqs[n]] * p.Hq + hq) * p.D);
}

// Work items are (tile, KV head) and, when those are too few to keep the threads busy (a
// question of a few tokens after thousands of cached ones: one tile, Hkv items), each tile's
// listed entries are split into chunks whose partial softmaxes are merged afterwards.
template <typename KV>
void PrefillAll(const Problem<KV>& p) {
  struct Tile {
    int64_t s, t0, t1;
  };
  const int64_t tokens = std::max<int64_t>(1, kTileRows / (p.Hq / p.Hkv));
  std::vector<Tile> tiles;
  int64_t used = 0;  // listed entries up to the last one any sequence uses
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t a = std::max<int64_t>(0, p.cu[s]), b = std::min<int64_t>(p.T, p.cu[s + 1]);
    for (int64_t t0 = a; t0 < b; t0 += tokens) tiles.push_back({s, t0, std::min(b, t0 + tokens)});
    if (b > a)
      for (int64_t i = p.M - 1; i >= used; --i)
        if (p.lens[s * p.M + i] > 0 && p.tables[s * p.M + i] >= 0 && p.tables[s * p.M + i] < p.pages) {
          used = i + 1;
          break;
        }
  }
  // 16 wide, an item covers every KV head of its tile (AttendTileLanes); else one head.
  const bool lanes = spanjax::UseAvx512() && p.D % 64 == 0;
  const int64_t heads = lanes ? p.Hkv : 1;  // KV heads per item
  const int64_t base_items = static_cast<int64_t>(tiles.size()) * (p.Hkv / heads);
  const int64_t want = 8 * spanjax::Helpers::Get().threads();  // items for an even share
  const int64_t split = base_items == 0 || base_items >= want
                            ? 1
                            : std::max<int64_t>(1, std::min((want + base_items - 1) / base_items, used / kMinSplitEntries));
  const int64_t per_chunk = split == 1 ? p.M : (used + split - 1) / split;
  const int64_t items = base_items * split, part_rows = heads * kTileRows * PartialSize(p.D);
  std::vector<float>& partials = PartialsBuffer(split > 1 ? items * part_rows : 0);
  // Last tiles first: a sequence's later tokens see more keys, and the longest items should
  // not be the ones left for the end.
  spanjax::ParallelFor(items, [&](int64_t item) {
    const int64_t i = items - 1 - item, c = i % split, th = i / split;
    const Tile& tile = tiles[th * heads / p.Hkv];
    const int64_t i0 = c * per_chunk, i1 = split == 1 ? p.M : std::min(used, i0 + per_chunk);
    float* partial = split > 1 ? partials.data() + i * part_rows : nullptr;
    if (lanes) {
      thread_local LaneScratch scratch;
      AttendTileLanes(p, tile.s, tile.t0, tile.t1, i0, i1, partial, scratch);
    } else {
      thread_local TileScratch scratch;
      AttendTile(p, tile.s, th % p.Hkv, tile.t0, tile.t1, i0, i1, partial, scratch);
    }
  });
  if (split == 1) return;
  const int64_t G = p.Hq / p.Hkv;
  for (int64_t th = 0; th < base_items; ++th) {
    const Tile& tile = tiles[th * heads / p.Hkv];
    for (int64_t hh = 0; hh < heads; ++hh) {
      const int64_t h = th * heads % p.Hkv + hh;
      for (int64_t r = 0; r < (tile.t1 - tile.t0) * G; ++r) {
        const int64_t t = tile.t0 + r / G, g = r % G;
        MergeRow(partials.data() + th * split * part_rows + (hh * kTileRows + r) * PartialSize(p.D), part_rows, split,
                 p.D, p.out + (t * p.Hq + h * G + g) * p.D);
      }
    }
  }
}

template <typename KV, ffi::DataType kType>
ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                           ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lens,
                           ffi::Buffer<ffi::S32> cu, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> cos,
                           ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> inv_freq, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, float sm_scale, ffi::ResultBuffer<ffi::F32> out) {
  return RunAttention<KV, kType>("decode attention", q, k, v, tables, pos, lens, cu, q_pos, cos, sin, inv_freq, scale,
                                 bias, sm_scale, out, DecodeAll<KV>);
}

template <typename KV, ffi::DataType kType>
ffi::Error PrefillAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                            ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lens,
                            ffi::Buffer<ffi::S32> cu, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> cos,
                            ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> inv_freq, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, float sm_scale, ffi::ResultBuffer<ffi::F32> out) {
  return RunAttention<KV, kType>("prefill attention", q, k, v, tables, pos, lens, cu, q_pos, cos, sin, inv_freq, scale,
                                 bias, sm_scale, out, PrefillAll<KV>);
}

#define SPANJAX_ATTENTION_BINDING(kType)          \
  ffi::Ffi::Bind()                             \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<kType>>()               \
      .Arg<ffi::Buffer<kType>>()               \
      .Arg<ffi::Buffer<ffi::S32>>()            \
      .Arg<ffi::Buffer<ffi::S32>>()            \
      .Arg<ffi::Buffer<ffi::S32>>()            \
      .Arg<ffi::Buffer<ffi::S32>>()            \
      .Arg<ffi::Buffer<ffi::S32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Attr<float>("sm_scale")                 \
      .Ret<ffi::Buffer<ffi::F32>>()

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxDecodeAttentionF32, (DecodeAttention<float, ffi::F32>),
                              SPANJAX_ATTENTION_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxDecodeAttentionBf16, (DecodeAttention<uint16_t, ffi::U16>),
                              SPANJAX_ATTENTION_BINDING(ffi::U16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxPrefillAttentionF32, (PrefillAttention<float, ffi::F32>),
                              SPANJAX_ATTENTION_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxPrefillAttentionBf16, (PrefillAttention<uint16_t, ffi::U16>),
                              SPANJAX_ATTENTION_BINDING(ffi::U16));

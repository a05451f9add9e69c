// Span attention for decode batches on XLA CPU (at most one query token per sequence),
// called through the XLA FFI. Same contract as every implementation (meta.py): keys are
// stored before RoPE and rotated here with the step's key tables; a query sees slot j of
// listed entry i iff j < block_lens[s, i] and block_pos[s, i] + j <= q_pos; the logit is
// scale[s, i] * (q . k * sm_scale) + bias[s, i].
//
// Why C++: the jnp decode path (xla.py `decode_attention`) is a handful of large XLA ops,
// each a pass over all of the step's keys in memory (gather, rotate, a block-diagonal product,
// mask, exp, a second product), ~8 ms of a ~20 ms one-stream SmolLM2 step after 512 tokens and
// most of an 8-stream one. Here each (sequence, KV head) reads its keys once, rotates each in
// registers, and scores it against the head's G query heads while it is there, then sums the
// values weighted by the softmax. Work items (sequence, KV head) are shared with the helper
// threads (`cpu_threads.h`).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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
  const float* cos;      // [S, M * P, D / 2]
  const float* sin;
  const float* scale;  // [S, M]
  const float* bias;
  float* out;  // [T, Hq, D]
  int64_t T, Hq, Hkv, D, S, M, P, pages;
  float sm_scale;
};

// exp(x) for eight floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
// (Cephes' expf coefficients): within ~2 ulp of expf, and exp(-inf) = 0 (masked rows never get
// here: every score is finite, and the running max is subtracted first).
inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));  // below: 0 after the final scaling anyway
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

struct Scratch {
  std::vector<float> scores;      // [G, keys] (padded to a multiple of 8 per head)
  std::vector<int64_t> offsets;   // [keys] element offset of each seen key's value row
};

// One (sequence, KV head): every seen key is rotated and scored against the G query heads
// in one visit; then each head's softmax weights (eight at a time) and its weighted sum of the
// values, D/8 accumulators held in registers per 32 dimensions.
template <typename KV>
void Attend(const Problem<KV>& p, int64_t s, int64_t h, Scratch& scratch) {
  const int64_t t = p.cu[s];
  if (p.cu[s + 1] <= t || t < 0 || t >= p.T) return;  // no query token: its rows stay zero
  const int64_t G = p.Hq / p.Hkv, D = p.D, half = D / 2;
  const int64_t qp = p.q_pos[t];
  alignas(32) float q[kMaxGroup * kMaxHeadDim];
  alignas(32) float key[kMaxHeadDim];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) q[g * D + d] = p.q[(t * p.Hq + h * G + g) * D + d] * p.sm_scale;

  const int64_t stride = (p.M * p.P + 7) / 8 * 8;  // per head, a multiple of 8
  scratch.scores.resize(G * stride);
  scratch.offsets.resize(p.M * p.P);
  float* scores = scratch.scores.data();
  int64_t seen = 0;
  for (int64_t i = 0; i < p.M; ++i) {
    const int64_t entry = s * p.M + i;
    const int64_t page = p.tables[entry];
    if (page < 0 || page >= p.pages) continue;  // unused entries (block_lens 0) carry any id
    const int64_t visible = std::min<int64_t>({p.lens[entry], p.P, qp - p.pos[entry] + 1});
    const float scale = p.scale ? p.scale[entry] : 1.0f;
    const float bias = p.bias ? p.bias[entry] : 0.0f;
    for (int64_t j = 0; j < visible; ++j) {
      const int64_t row = ((page * p.P + j) * p.Hkv + h) * D;
      const float* c = p.cos + (entry * p.P + j) * half;
      const float* sn = p.sin + (entry * p.P + j) * half;
      for (int64_t d = 0; d < half; d += 8) {  // rotate-half RoPE, as rope.py `rotate`
        const __m256 k1 = Load8(p.k + row + d), k2 = Load8(p.k + row + half + d);
        const __m256 vc = _mm256_loadu_ps(c + d), vs = _mm256_loadu_ps(sn + d);
        _mm256_store_ps(key + d, _mm256_fmsub_ps(k1, vc, _mm256_mul_ps(k2, vs)));
        _mm256_store_ps(key + half + d, _mm256_fmadd_ps(k2, vc, _mm256_mul_ps(k1, vs)));
      }
      for (int64_t g = 0; g < G; ++g) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          acc0 = _mm256_fmadd_ps(_mm256_load_ps(q + g * D + d), _mm256_load_ps(key + d), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_load_ps(q + g * D + d + 8), _mm256_load_ps(key + d + 8), acc1);
        }
        scores[g * stride + seen] = scale * HorizontalSum(_mm256_add_ps(acc0, acc1)) + bias;
      }
      scratch.offsets[seen] = row;
      ++seen;
    }
  }
  if (seen == 0) return;

  const int64_t full = seen / 8 * 8;
  for (int64_t g = 0; g < G; ++g) {
    float* w = scores + g * stride;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < seen; ++e) m = std::max(m, w[e]);
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
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    float* o = p.out + (t * p.Hq + h * G + g) * D;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {  // 4 accumulators = 32 dimensions in registers
      const int64_t width = std::min<int64_t>(32, D - d0);  // D % 16 == 0: 16 or 32
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t k = 0; k < seen; ++k) {
        const KV* value = p.v + scratch.offsets[k] + d0;
        const __m256 wk = _mm256_set1_ps(w[k]);
        acc[0] = _mm256_fmadd_ps(wk, Load8(value), acc[0]);
        acc[1] = _mm256_fmadd_ps(wk, Load8(value + 8), acc[1]);
        if (width == 32) {
          acc[2] = _mm256_fmadd_ps(wk, Load8(value + 16), acc[2]);
          acc[3] = _mm256_fmadd_ps(wk, Load8(value + 24), acc[3]);
        }
      }
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int a = 0; a < width / 8; ++a) _mm256_storeu_ps(o + d0 + 8 * a, _mm256_mul_ps(acc[a], vinv));
    }
  }
}

template <typename KV, ffi::DataType kType>
ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                           ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lens,
                           ffi::Buffer<ffi::S32> cu, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> cos,
                           ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                           float sm_scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto td = tables.dimensions();
  Problem<KV> p{};
  p.T = qd[0], p.Hq = qd[1], p.D = qd[2];
  p.pages = kd[0], p.P = kd[1], p.Hkv = kd[2];
  p.S = td[0], p.M = td[1];
  if (p.D % 16 != 0 || p.D > kMaxHeadDim || p.Hkv < 1 || p.Hq % p.Hkv != 0 || p.Hq / p.Hkv > kMaxGroup)
    return ffi::Error::InvalidArgument("decode attention: unsupported head layout");
  p.q = q.typed_data();
  p.k = reinterpret_cast<const KV*>(k.typed_data());
  p.v = reinterpret_cast<const KV*>(v.typed_data());
  p.tables = tables.typed_data(), p.pos = pos.typed_data(), p.lens = lens.typed_data();
  p.cu = cu.typed_data(), p.q_pos = q_pos.typed_data();
  p.cos = cos.typed_data(), p.sin = sin.typed_data();
  p.scale = scale.element_count() ? scale.typed_data() : nullptr;  // empty = plain contract
  p.bias = bias.element_count() ? bias.typed_data() : nullptr;
  p.out = out->typed_data();
  p.sm_scale = sm_scale;
  std::memset(p.out, 0, sizeof(float) * p.T * p.Hq * p.D);
  spanjax::ParallelFor(p.S * p.Hkv, [p](int64_t item) {
    thread_local Scratch scratch;
    Attend(p, item / p.Hkv, item % p.Hkv, scratch);
  });
  return ffi::Error::Success();
}

#define SPANJAX_DECODE_BINDING(kType)          \
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
      .Attr<float>("sm_scale")                 \
      .Ret<ffi::Buffer<ffi::F32>>()

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxDecodeAttentionF32, (DecodeAttention<float, ffi::F32>),
                              SPANJAX_DECODE_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpanjaxDecodeAttentionBf16, (DecodeAttention<uint16_t, ffi::U16>),
                              SPANJAX_DECODE_BINDING(ffi::U16));

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

struct Scratch {
  std::vector<float> scores;      // [keys, G]
  std::vector<int64_t> offsets;   // [keys] element offset of each seen key's value row
};

// One (sequence, KV head): every seen key is rotated and scored against the G query heads
// in one visit, then the values are summed with the softmax weights.
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

  scratch.scores.resize(p.M * p.P * G);
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
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8)
          acc = _mm256_fmadd_ps(_mm256_load_ps(q + g * D + d), _mm256_load_ps(key + d), acc);
        scores[seen * G + g] = scale * HorizontalSum(acc) + bias;
      }
      scratch.offsets[seen] = row;
      ++seen;
    }
  }
  if (seen == 0) return;

  float total[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < seen; ++e) m = std::max(m, scores[e * G + g]);
    if (!std::isfinite(m)) m = 0.0f;
    float l = 0.0f;
    for (int64_t e = 0; e < seen; ++e) {
      const float w = std::exp(scores[e * G + g] - m);
      scores[e * G + g] = w;
      l += w;
    }
    total[g] = l;
  }
  alignas(32) float acc[kMaxGroup * kMaxHeadDim];
  std::memset(acc, 0, sizeof(float) * G * D);
  for (int64_t e = 0; e < seen; ++e) {
    const KV* value = p.v + scratch.offsets[e];
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 x = Load8(value + d);
      for (int64_t g = 0; g < G; ++g) {
        float* a = acc + g * D + d;
        _mm256_store_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(scores[e * G + g]), x, _mm256_load_ps(a)));
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
    float* o = p.out + (t * p.Hq + h * G + g) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
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

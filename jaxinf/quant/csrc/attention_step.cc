// Decode-step attention for XLA:CPU over the transformer's stacked, head-major KV cache, called
// through the XLA FFI (jaxinf/models/cpu_attention.py calls it; jaxinf/quant/cpu_kernel.py builds
// and registers every source of this folder as one shared library).
//
//   q [B, T, H, D], k / v [L, B, Hkv, S, D] (the whole stack: `layer` picks one, so the layer's
//   cache is read in place instead of being sliced out, a copy on XLA:CPU), lengths [B] int32
//   -> o [B, T, H, D]; q and o fp32, k and v both fp32 or both fp16 (llama.cpp's default KV
//   cache type: half the bytes to stream per step; widened to fp32 on load, vcvtph2ps)
//
// Query t of row b sits at position lengths[b] - T + t and sees slots s < lengths[b] - T + t + 1
// (clamped to [0, S]): only the valid slots are read, not the whole S. A query that sees no slot
// gets zeros (the XLA form's convention). GQA: query head h reads kv head h / (H / Hkv).
//
// Per query: logits scale * <q, k_s>, their max m, weights exp(logit - m), out = sum_s w_s v_s /
// sum_s w_s: the XLA form's arithmetic (`pallas_kernels.attention`, chunked XLA), with the sums
// in another order and exp from a polynomial (relative error below 2e-7, exp(x) flushes to 0
// below x = -87.3, where the weight is negligible beside the max's weight of 1).
//
// Threads: one task per (b, kv head), taken from an atomic counter by the calling thread and by
// tasks on XLA's intra-op pool (ffi::ThreadPool), as lowbit_matmul.cc does. A task's rows reuse
// its K / V slots from cache (one DRAM read per step).
//
// Instruction sets, with target attributes, chosen at run time: AVX-512F (DQ, BW, VL), else
// AVX2 + FMA + F16C (8-float vectors, the exponent field set directly in exp); a scalar path with
// std::exp elsewhere and for head dims above 128. The `path` attribute forces one (tests).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "half.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXINF_ATT_X86 1
#else
#define JAXINF_ATT_X86 0
#endif

namespace ffi = xla::ffi;

namespace {

struct Att {
  const float* q;        // [B, T, H, D]
  const void* k;         // [L, B, Hkv, S, D], fp32 or fp16 (`half`)
  const void* v;
  const int32_t* len;    // [B]
  float* o;              // [B, T, H, D]
  int64_t B, T, H, Hkv, S, D, layer;
  float scale;
  bool half;

  const void* kv_head(const void* base, int64_t b, int64_t hk) const {
    const int64_t i = ((layer * B + b) * Hkv + hk) * S * D;
    return half ? static_cast<const void*>(static_cast<const uint16_t*>(base) + i)
                : static_cast<const void*>(static_cast<const float*>(base) + i);
  }
  int64_t limit(int64_t b, int64_t t) const {
    const int64_t lim = static_cast<int64_t>(len[b]) - T + t + 1;
    return std::min<int64_t>(S, std::max<int64_t>(0, lim));
  }
};

// Element i of a K / V head stored as KV (float, or uint16_t holding fp16), as fp32.
inline float kv_at(const float* p, int64_t i) { return p[i]; }
inline float kv_at(const uint16_t* p, int64_t i) { return jaxinf::half_to_float(p[i]); }

// One query row: q, its K / V head, its limit -> out (D floats). `w`: scratch of S floats.
template <typename KV>
void row_scalar(const Att& a, const float* q, const void* kp, const void* vp, int64_t lim,
                float* w, float* out) {
  const KV* k = static_cast<const KV*>(kp);
  const KV* v = static_cast<const KV*>(vp);
  for (int64_t d = 0; d < a.D; ++d) out[d] = 0.0f;
  if (lim == 0) return;
  float m = -INFINITY;
  for (int64_t s = 0; s < lim; ++s) {
    float dot = 0.0f;
    for (int64_t d = 0; d < a.D; ++d) dot += q[d] * kv_at(k, s * a.D + d);
    w[s] = a.scale * dot;
    m = std::max(m, w[s]);
  }
  float denom = 0.0f;
  for (int64_t s = 0; s < lim; ++s) {
    w[s] = std::exp(w[s] - m);
    denom += w[s];
  }
  for (int64_t s = 0; s < lim; ++s)
    for (int64_t d = 0; d < a.D; ++d) out[d] += w[s] * kv_at(v, s * a.D + d);
  for (int64_t d = 0; d < a.D; ++d) out[d] /= denom;
}

#if JAXINF_ATT_X86
#define JAXINF_ATT_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// exp(x) = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (two-part ln 2), e^r = 1 + r + r^2 P(r)
// with Cephes' degree-5 P (highest power first) on |r| <= ln 2 / 2.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// 2^n applied by vscalefps (exact), x clamped to [-88.4, 88.4].
JAXINF_ATT_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)),
                    _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

JAXINF_ATT_AVX512 inline __mmask16 tail_mask(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// 16 lanes of a K / V head from element i on, the lanes outside `m` zero, as fp32.
JAXINF_ATT_AVX512 inline __m512 load16(const float* p, int64_t i, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p + i);
}
JAXINF_ATT_AVX512 inline __m512 load16(const uint16_t* p, int64_t i, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p + i));
}

// NC = ceil(D / 16) vectors per head vector, the last one masked to D's tail.
template <int NC, typename KV>
JAXINF_ATT_AVX512 void row_avx512(const Att& a, const float* q, const void* kp, const void* vp,
                                  int64_t lim, float* w, float* out) {
  const KV* k = static_cast<const KV*>(kp);
  const KV* v = static_cast<const KV*>(vp);
  const __mmask16 last = tail_mask(a.D - 16 * (NC - 1));
  auto mask = [&](int c) { return c == NC - 1 ? last : static_cast<__mmask16>(0xFFFF); };
  if (lim == 0) {
    for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(out + 16 * c, mask(c), _mm512_setzero_ps());
    return;
  }
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c)
    qv[c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(c), q + 16 * c), _mm512_set1_ps(a.scale));
  // logits, one slot at a time (the products' lanes summed)
  float m = -INFINITY;
  for (int64_t s = 0; s < lim; ++s) {
    const int64_t ks = s * a.D;
    __m512 acc = _mm512_mul_ps(qv[0], load16(k, ks, mask(0)));
    for (int c = 1; c < NC; ++c)
      acc = _mm512_fmadd_ps(qv[c], load16(k, ks + 16 * c, mask(c)), acc);
    w[s] = _mm512_reduce_add_ps(acc);
    m = std::max(m, w[s]);
  }
  // weights and their sum
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t s = 0; s < lim; s += 16) {
    const __mmask16 ms = tail_mask(lim - s);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(ms, w + s), mv));
    _mm512_mask_storeu_ps(w + s, ms, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(ms, e));
  }
  // out = sum_s w_s v_s / sum_s w_s
  __m512 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < lim; ++s) {
    const __m512 ws = _mm512_set1_ps(w[s]);
    const int64_t vs = s * a.D;
    for (int c = 0; c < NC; ++c)
      acc[c] = _mm512_fmadd_ps(ws, load16(v, vs + 16 * c, mask(c)), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (int c = 0; c < NC; ++c)
    _mm512_mask_storeu_ps(out + 16 * c, mask(c), _mm512_mul_ps(acc[c], inv));
}

bool att_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok;
}

#define JAXINF_ATT_AVX2 __attribute__((target("avx2,fma,f16c")))

// exp as exp512, with 2^n put into the exponent field (no vscalefps on AVX2): x clamped to
// [-87.3, 88.37] so that n stays in [-126, 127], and exp(x) = 0 below x = -87.3.
JAXINF_ATT_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.37f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), tiny);
}

JAXINF_ATT_AVX2 inline __m256i tail_mask8(int64_t count) {
  const int32_t c = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(8, count)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

JAXINF_ATT_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 lanes of a K / V head from element i on, the first `n` (1..8) of them read, the rest zero
// (`m` masks the same lanes), as fp32. fp16: a whole 8-lane chunk is one 16-byte load, a tail
// goes through a zeroed copy (AVX2 has no masked 16-bit load).
JAXINF_ATT_AVX2 inline __m256 load8(const float* p, int64_t i, __m256i m, int64_t) {
  return _mm256_maskload_ps(p + i, m);
}
JAXINF_ATT_AVX2 inline __m256 load8(const uint16_t* p, int64_t i, __m256i, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
  alignas(16) uint16_t t[8] = {};
  std::memcpy(t, p + i, static_cast<size_t>(n) * sizeof(uint16_t));
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// As row_avx512 in 8-float vectors: NC = ceil(D / 8), the last one masked to D's tail.
template <int NC, typename KV>
JAXINF_ATT_AVX2 void row_avx2(const Att& a, const float* q, const void* kp, const void* vp,
                              int64_t lim, float* w, float* out) {
  const KV* k = static_cast<const KV*>(kp);
  const KV* v = static_cast<const KV*>(vp);
  const int64_t tail = a.D - 8 * (NC - 1);
  auto count = [&](int c) { return c == NC - 1 ? tail : int64_t{8}; };
  const __m256i full = _mm256_set1_epi32(-1), last = tail_mask8(tail);
  auto mask = [&](int c) { return c == NC - 1 ? last : full; };
  if (lim == 0) {
    for (int c = 0; c < NC; ++c) _mm256_maskstore_ps(out + 8 * c, mask(c), _mm256_setzero_ps());
    return;
  }
  __m256 qv[NC];
  for (int c = 0; c < NC; ++c)
    qv[c] = _mm256_mul_ps(_mm256_maskload_ps(q + 8 * c, mask(c)), _mm256_set1_ps(a.scale));
  float m = -INFINITY;
  for (int64_t s = 0; s < lim; ++s) {
    const int64_t ks = s * a.D;
    __m256 acc = _mm256_mul_ps(qv[0], load8(k, ks, mask(0), count(0)));
    for (int c = 1; c < NC; ++c)
      acc = _mm256_fmadd_ps(qv[c], load8(k, ks + 8 * c, mask(c), count(c)), acc);
    w[s] = hsum256(acc);
    m = std::max(m, w[s]);
  }
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t s = 0; s < lim; s += 8) {
    const __m256i ms = tail_mask8(lim - s);
    const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(w + s, ms), mv)),
                                   _mm256_castsi256_ps(ms));
    _mm256_maskstore_ps(w + s, ms, e);
    sum = _mm256_add_ps(sum, e);
  }
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t s = 0; s < lim; ++s) {
    const __m256 ws = _mm256_set1_ps(w[s]);
    const int64_t vs = s * a.D;
    for (int c = 0; c < NC; ++c)
      acc[c] = _mm256_fmadd_ps(ws, load8(v, vs + 8 * c, mask(c), count(c)), acc[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum256(sum));
  for (int c = 0; c < NC; ++c)
    _mm256_maskstore_ps(out + 8 * c, mask(c), _mm256_mul_ps(acc[c], inv));
}

bool att_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif  // JAXINF_ATT_X86

using RowFn = void (*)(const Att&, const float*, const void*, const void*, int64_t, float*,
                       float*);

// `path`: 0 the fastest this CPU runs, 1 scalar, 2 AVX2, 3 AVX-512 (as lowbit_matmul's).
bool att_path_available(int32_t path) {
#if JAXINF_ATT_X86
  if (path == 2) return att_has_avx2();
  if (path == 3) return att_has_avx512();
#endif
  return path == 0 || path == 1;
}

template <typename KV>
RowFn pick_row_kv(const Att& a, int32_t path) {
#if JAXINF_ATT_X86
  if (path == 3 || (path == 0 && att_has_avx512())) {
    switch ((a.D + 15) / 16) {
      case 1: return row_avx512<1, KV>;
      case 2: return row_avx512<2, KV>;
      case 3: return row_avx512<3, KV>;
      case 4: return row_avx512<4, KV>;
      case 5: return row_avx512<5, KV>;
      case 6: return row_avx512<6, KV>;
      case 7: return row_avx512<7, KV>;
      case 8: return row_avx512<8, KV>;
      default: break;
    }
  } else if (path == 2 || (path == 0 && att_has_avx2())) {
    switch ((a.D + 7) / 8) {
      case 1: return row_avx2<1, KV>;
      case 2: return row_avx2<2, KV>;
      case 3: return row_avx2<3, KV>;
      case 4: return row_avx2<4, KV>;
      case 5: return row_avx2<5, KV>;
      case 6: return row_avx2<6, KV>;
      case 7: return row_avx2<7, KV>;
      case 8: return row_avx2<8, KV>;
      case 9: return row_avx2<9, KV>;
      case 10: return row_avx2<10, KV>;
      case 11: return row_avx2<11, KV>;
      case 12: return row_avx2<12, KV>;
      case 13: return row_avx2<13, KV>;
      case 14: return row_avx2<14, KV>;
      case 15: return row_avx2<15, KV>;
      case 16: return row_avx2<16, KV>;
      default: break;
    }
  }
#endif
  (void)a;
  (void)path;
  return row_scalar<KV>;
}

RowFn pick_row(const Att& a, int32_t path) {
  return a.half ? pick_row_kv<uint16_t>(a, path) : pick_row_kv<float>(a, path);
}

struct Tasks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  Att a;
  RowFn row = nullptr;

  // Task (b, kv head): every query head of its group, every new token.
  void work() {
    std::vector<float> w(static_cast<size_t>(std::max<int64_t>(a.S, 1)));
    const int64_t group = a.H / a.Hkv;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) return;
      const int64_t b = i / a.Hkv, hk = i % a.Hkv;
      const void* k = a.kv_head(a.k, b, hk);
      const void* v = a.kv_head(a.v, b, hk);
      for (int64_t t = 0; t < a.T; ++t) {
        const int64_t lim = a.limit(b, t);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t off = ((b * a.T + t) * a.H + hk * group + g) * a.D;
          row(a, a.q + off, k, v, lim, w.data(), a.o + off);
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::Buffer<ffi::S32> lengths,
                         ffi::ResultBuffer<ffi::F32> o, int64_t layer, float scale,
                         int32_t path, ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             ld = lengths.dimensions(), od = o->dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || ld.size() != 1 || od.size() != 4)
    return ffi::Error::InvalidArgument(
        "attention_step: expected q [B, T, H, D], k and v [L, B, Hkv, S, D], lengths [B]");
  Att a{};
  a.B = qd[0];
  a.T = qd[1];
  a.H = qd[2];
  a.D = qd[3];
  a.Hkv = kd[2];
  a.S = kd[3];
  a.layer = layer;
  a.scale = scale;
  for (size_t i = 0; i < 5; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("attention_step: k and v differ");
  if (kd[1] != a.B || kd[4] != a.D || ld[0] != a.B || a.Hkv < 1 || a.H % a.Hkv != 0 ||
      layer < 0 || layer >= kd[0])
    return ffi::Error::InvalidArgument("attention_step: operand shapes do not agree");
  for (size_t i = 0; i < 4; ++i)
    if (od[i] != qd[i]) return ffi::Error::InvalidArgument("attention_step: bad output shape");
  if (k.element_type() != v.element_type() ||
      (k.element_type() != ffi::DataType::F32 && k.element_type() != ffi::DataType::F16))
    return ffi::Error::InvalidArgument("attention_step: k and v must both be f32 or both f16");
  a.half = k.element_type() == ffi::DataType::F16;
  if (!att_path_available(path))
    return ffi::Error::InvalidArgument("attention_step: this CPU does not run the requested path");
  if (a.B * a.T * a.H * a.D == 0) return ffi::Error::Success();
  a.q = q.typed_data();
  a.k = k.untyped_data();
  a.v = v.untyped_data();
  a.len = lengths.typed_data();
  a.o = o->typed_data();

  auto tasks = std::make_shared<Tasks>();
  tasks->count = a.B * a.Hkv;
  tasks->a = a;
  tasks->row = pick_row(a, path);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min(threads, tasks->count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([tasks] { tasks->work(); });
  tasks->work();
  // Wait for tasks that helpers took; a helper that starts later finds none left.
  while (tasks->done.load(std::memory_order_acquire) < tasks->count) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinfAttentionStep, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("path")
                                  .Ctx<ffi::ThreadPool>());

// Decode-shaped low-bit products for XLA:CPU, called through the XLA FFI
// (jaxinf/quant/cpu_kernel.py builds, loads and registers this file).
//
//   y[M, N] = x[M, K] @ W[K, N],   W[k, n] = s[k / group_size, n] * q[n, k]
//
// Weight layout (the kernel layout of a QArray, produced at quantization time): the codes
// transposed, one output column per row, so that every dot product reads K contiguous codes:
//   int8:  q  int8  [N, K]
//   int4:  p  uint8 [N, ceil(K / 2)], byte j of row n holds k = 2j (low nibble) and k = 2j + 1
//          (high nibble), 4-bit two's complement (QArray's nibble rule, along K instead of rows)
//   fp32:  w  float32 [N, K] (not quantized: the same streaming GEMV for fp32 weights; XLA's
//          own fp32 dot reads a decode step's weights at ~60 % of the DRAM bandwidth)
//   scale  float32 [G, N], G = K / group_size.
//
// Activations:
//   act_int8 = 0: x stays fp32; the codes are widened to fp32 in registers and FMA'd (fp32
//                  accumulation per group, each group's sum times its scale, summed over groups).
//   act_int8 = 1: each row of x is quantized to int8 with s_x = max|x| / 127 (1 for an all-zero
//                  row; round half to even), as QArray's XLA path does, and the integer dot runs
//                  on AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32). vpdpbusd wants an unsigned operand,
//                  so the weight code is offset to unsigned (int8: q + 128, int4: q + 8, by an XOR
//                  of the sign bit) and the offset times the group's sum of x codes is subtracted.
//
// Threads: the N output columns are cut into blocks taken from an atomic counter by the calling
// thread and by tasks scheduled on XLA's intra-op thread pool (ffi::ThreadPool); the caller waits
// only for blocks that others have started, never for a task to start.
//
// Instruction sets: the AVX-512 (F, BW, VL, VNNI) paths are compiled with target attributes and
// chosen at run time (__builtin_cpu_supports); a portable scalar path computes the same sums
// everywhere else (and for an int4 group size that is odd).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXINF_X86 1
#else
#define JAXINF_X86 0
#endif

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;      // [M, K] fp32 activations
  const void* w;       // int8 [N, K] or uint8 [N, KB]
  const float* scale;  // [G, N]
  float* y;            // [M, N]
  int64_t M, N, K, KB, G, gs;
  bool int4;
  bool f32w;           // fp32 weights [N, K] (fp32 activations only)
  bool act_int8;
  // per-call scratch (built once before the column blocks run)
  const float* xa;     // fp32 x rearranged for int4 (per group, chunks of 32 k: 16 even, 16 odd)
  int64_t xa_row;      // floats per row of xa
  const int8_t* qx;    // int8 x (int8 weights: [M, K]; int4 weights: chunks of 64 k: 32 even, 32 odd)
  int64_t qx_row;      // bytes per row of qx
  const float* sx;     // [M] activation scales
  const int32_t* sumx; // [M, G] sums of the int8 x codes per group
};

inline int8_t nib(uint8_t b, int hi) {
  int v = hi ? (b >> 4) : (b & 0xF);
  return static_cast<int8_t>((v ^ 8) - 8);
}

inline int8_t code_at(const Problem& p, int64_t n, int64_t k) {
  if (!p.int4) return static_cast<const int8_t*>(p.w)[n * p.K + k];
  const uint8_t b = static_cast<const uint8_t*>(p.w)[n * p.KB + k / 2];
  return nib(b, static_cast<int>(k & 1));
}

// ---- scratch: activation rearrangement and quantization ------------------------------------

constexpr int64_t kF4Chunk = 32;  // k per step of the int4 fp32 path (16 bytes of codes)
constexpr int64_t kQ4Chunk = 64;  // k per step of the int4 int8 path (32 bytes of codes)

int64_t chunks_per_group(int64_t gs, int64_t chunk) { return (gs + chunk - 1) / chunk; }

// int4, fp32 x: per row, per group, per chunk of 32 k: the 16 even-k then the 16 odd-k values
// (relative to the chunk start), zero past the group's end.
void build_xa(const Problem& p, std::vector<float>& xa, int64_t& row) {
  const int64_t cpg = chunks_per_group(p.gs, kF4Chunk);
  row = p.G * cpg * kF4Chunk;
  xa.assign(static_cast<size_t>(p.M * row), 0.0f);
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t g = 0; g < p.G; ++g) {
      for (int64_t c = 0; c < cpg; ++c) {
        float* dst = xa.data() + m * row + (g * cpg + c) * kF4Chunk;
        const int64_t k0 = g * p.gs + c * kF4Chunk;
        const int64_t k1 = std::min(k0 + kF4Chunk, (g + 1) * p.gs);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t t = k - k0;
          dst[(t & 1) * 16 + t / 2] = p.x[m * p.K + k];
        }
      }
    }
  }
}

// int8 x, one row: s_x = max|x| / 127 (1 when 0), q = clip(round_half_even(x / s_x), +-127).
void quantize_row_scalar(const float* x, int64_t K, int8_t* q, float* s_out) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  *s_out = s;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] / s);  // the default rounding mode: half to even
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
}

#if JAXINF_X86
// The same with AVX-512 (a true division and round-half-even, as the scalar form).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void quantize_row_avx512(const float* x, int64_t K, int8_t* q, float* s_out) {
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x + k)));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  *s_out = s;
  const __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + k), vs);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    _mm512_mask_cvtepi32_storeu_epi8(q + k, mk, _mm512_cvtps_epi32(v));
  }
}
#endif

bool has_avx512();

// int8 x for the W8A8 paths: codes (int8 weights: [M, K]; int4 weights: per group, chunks of
// 64 k, the 32 even-k then the 32 odd-k codes, zero past the group's end), scales and per-group
// sums of the codes.
void quantize_rows(const Problem& p, std::vector<int8_t>& qx, int64_t& row, std::vector<float>& sx,
                   std::vector<int32_t>& sumx) {
  const int64_t cpg = chunks_per_group(p.gs, kQ4Chunk);
  row = p.int4 ? p.G * cpg * kQ4Chunk : p.K;
  qx.assign(static_cast<size_t>(p.M * row), 0);
  sx.assign(static_cast<size_t>(p.M), 1.0f);
  sumx.assign(static_cast<size_t>(p.M * p.G), 0);
  std::vector<int8_t> tmp(static_cast<size_t>(p.K));
  for (int64_t m = 0; m < p.M; ++m) {
    int8_t* q = p.int4 ? tmp.data() : qx.data() + m * row;
#if JAXINF_X86
    if (has_avx512()) {
      quantize_row_avx512(p.x + m * p.K, p.K, q, &sx[m]);
    } else {
      quantize_row_scalar(p.x + m * p.K, p.K, q, &sx[m]);
    }
#else
    quantize_row_scalar(p.x + m * p.K, p.K, q, &sx[m]);
#endif
    for (int64_t g = 0; g < p.G; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k) sum += q[k];
      sumx[m * p.G + g] = sum;
    }
    if (p.int4) {
      for (int64_t g = 0; g < p.G; ++g) {
        for (int64_t kk = 0; kk < p.gs; ++kk) {
          const int64_t c = kk / kQ4Chunk, t = kk % kQ4Chunk;
          qx[m * row + (g * cpg + c) * kQ4Chunk + (t & 1) * 32 + t / 2] = q[g * p.gs + kk];
        }
      }
    }
  }
}

// ---- scalar path ----------------------------------------------------------------------------

void scalar_block(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.0f;
      if (p.act_int8) {
        for (int64_t g = 0; g < p.G; ++g) {
          int32_t acc = 0;
          for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k) {
            int8_t q;
            if (p.int4) {
              const int64_t kk = k - g * p.gs, c = kk / kQ4Chunk, t = kk % kQ4Chunk;
              const int64_t cpg = chunks_per_group(p.gs, kQ4Chunk);
              q = p.qx[m * p.qx_row + (g * cpg + c) * kQ4Chunk + (t & 1) * 32 + t / 2];
            } else {
              q = p.qx[m * p.qx_row + k];
            }
            acc += static_cast<int32_t>(q) * code_at(p, n, k);
          }
          total += static_cast<float>(acc) * p.scale[g * p.N + n];
        }
        total *= p.sx[m];
      } else {
        const float* xr = p.x + m * p.K;
        const float* wf = static_cast<const float*>(p.w) + n * p.K;
        for (int64_t g = 0; g < p.G; ++g) {
          float acc = 0.0f;
          for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k)
            acc += xr[k] * (p.f32w ? wf[k] : static_cast<float>(code_at(p, n, k)));
          total += acc * p.scale[g * p.N + n];
        }
      }
      p.y[m * p.N + n] = total;
    }
  }
}

// ---- AVX-512 paths --------------------------------------------------------------------------

#if JAXINF_X86
#define JAXINF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define JAXINF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

JAXINF_AVX512 inline __mmask16 mask16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}
JAXINF_AVX512 inline __mmask32 mask32(int64_t count) {
  return count >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                     : static_cast<__mmask32>((1u << count) - 1);
}
JAXINF_AVX512 inline __mmask64 mask64(int64_t count) {
  return count >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << count) - 1);
}

// fp32 x, int8 codes (F32W false) or fp32 weights (F32W true): MT rows x NT columns at a time.
template <int MT, int NT, bool F32W>
JAXINF_AVX512 inline void f32_dense_tile(const Problem& p, int64_t m0, int64_t n0) {
  __m512 tot[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k0 = g * p.gs, k1 = k0 + p.gs;
    __m512 acc[MT][NT];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 16) {
      const __mmask16 mk = mask16(k1 - k);
      __m512 wv[NT];
      for (int j = 0; j < NT; ++j) {
        if constexpr (F32W) {
          wv[j] = _mm512_maskz_loadu_ps(mk, static_cast<const float*>(p.w) + (n0 + j) * p.K + k);
        } else {
          const __m128i b =
              _mm_maskz_loadu_epi8(mk, static_cast<const int8_t*>(p.w) + (n0 + j) * p.K + k);
          wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        }
      }
      for (int i = 0; i < MT; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(mk, p.x + (m0 + i) * p.K + k);
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    for (int j = 0; j < NT; ++j) {
      const __m512 s = _mm512_set1_ps(p.scale[g * p.N + n0 + j]);
      for (int i = 0; i < MT; ++i) tot[i][j] = _mm512_fmadd_ps(acc[i][j], s, tot[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) p.y[(m0 + i) * p.N + n0 + j] = _mm512_reduce_add_ps(tot[i][j]);
}

template <int MT, int NT>
JAXINF_AVX512 void f32_i8_tile(const Problem& p, int64_t m0, int64_t n0) {
  f32_dense_tile<MT, NT, false>(p, m0, n0);
}

template <int MT, int NT>
JAXINF_AVX512 void f32_f32_tile(const Problem& p, int64_t m0, int64_t n0) {
  f32_dense_tile<MT, NT, true>(p, m0, n0);
}

// fp32 x (rearranged, build_xa), int4 codes.
template <int MT, int NT>
JAXINF_AVX512 void f32_i4_tile(const Problem& p, int64_t m0, int64_t n0) {
  const uint8_t* w = static_cast<const uint8_t*>(p.w);
  const int64_t cpg = chunks_per_group(p.gs, kF4Chunk);
  __m512 tot[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k0 = g * p.gs, k1 = k0 + p.gs;
    __m512 acc[MT][NT];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < cpg; ++c) {
      const int64_t k = k0 + c * kF4Chunk;
      const __mmask16 mb = mask16((std::min(k1 - k, kF4Chunk) + 1) / 2);
      __m512 lo[NT], hi[NT];
      for (int j = 0; j < NT; ++j) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mb, w + (n0 + j) * p.KB + k / 2));
        lo[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28));
        hi[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 28));
      }
      for (int i = 0; i < MT; ++i) {
        const float* xa = p.xa + (m0 + i) * p.xa_row + (g * cpg + c) * kF4Chunk;
        const __m512 xe = _mm512_loadu_ps(xa), xo = _mm512_loadu_ps(xa + 16);
        for (int j = 0; j < NT; ++j) {
          acc[i][j] = _mm512_fmadd_ps(xe, lo[j], acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(xo, hi[j], acc[i][j]);
        }
      }
    }
    for (int j = 0; j < NT; ++j) {
      const __m512 s = _mm512_set1_ps(p.scale[g * p.N + n0 + j]);
      for (int i = 0; i < MT; ++i) tot[i][j] = _mm512_fmadd_ps(acc[i][j], s, tot[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) p.y[(m0 + i) * p.N + n0 + j] = _mm512_reduce_add_ps(tot[i][j]);
}

// W8A8 tiles: a group's integer sums times its scale into the fp32 totals, and the group's
// offset term (scale times the sum of the x codes) into `corr`.
template <int MT, int NT>
JAXINF_VNNI inline void q8_group_end(const Problem& p, int64_t g, int64_t m0, int64_t n0,
                                     const __m512i (&acc)[MT][NT], __m512 (&tot)[MT][NT],
                                     float (&corr)[MT][NT]) {
  for (int j = 0; j < NT; ++j) {
    const float sc = p.scale[g * p.N + n0 + j];
    const __m512 s = _mm512_set1_ps(sc);
    for (int i = 0; i < MT; ++i) {
      tot[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), s, tot[i][j]);
      corr[i][j] += sc * static_cast<float>(p.sumx[(m0 + i) * p.G + g]);
    }
  }
}

// y = s_x (sum of the totals - offset x corr).
template <int MT, int NT>
JAXINF_VNNI inline void q8_store(const Problem& p, int64_t m0, int64_t n0,
                                 const __m512 (&tot)[MT][NT], const float (&corr)[MT][NT],
                                 float offset) {
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j)
      p.y[(m0 + i) * p.N + n0 + j] =
          p.sx[m0 + i] * (_mm512_reduce_add_ps(tot[i][j]) - offset * corr[i][j]);
}

// int8 x, int8 codes (VNNI): sum (q + 128) * qx - 128 * sum qx, per group.
template <int MT, int NT>
JAXINF_VNNI void q8_i8_tile(const Problem& p, int64_t m0, int64_t n0) {
  const int8_t* w = static_cast<const int8_t*>(p.w);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 tot[MT][NT];
  float corr[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) tot[i][j] = _mm512_setzero_ps(), corr[i][j] = 0.0f;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k0 = g * p.gs, k1 = k0 + p.gs;
    __m512i acc[MT][NT];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 64) {
      const __mmask64 mk = mask64(k1 - k);
      __m512i wv[NT];
      for (int j = 0; j < NT; ++j)
        wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + (n0 + j) * p.K + k), flip);
      for (int i = 0; i < MT; ++i) {
        const __m512i xv = _mm512_maskz_loadu_epi8(mk, p.qx + (m0 + i) * p.qx_row + k);
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], xv);
      }
    }
    q8_group_end<MT, NT>(p, g, m0, n0, acc, tot, corr);
  }
  q8_store<MT, NT>(p, m0, n0, tot, corr, 128.0f);
}

// int8 x (rearranged, quantize_rows), int4 codes (VNNI): sum (q + 8) * qx - 8 * sum qx.
template <int MT, int NT>
JAXINF_VNNI void q8_i4_tile(const Problem& p, int64_t m0, int64_t n0) {
  const uint8_t* w = static_cast<const uint8_t*>(p.w);
  const int64_t cpg = chunks_per_group(p.gs, kQ4Chunk);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m512i eight = _mm512_set1_epi8(8);
  __m512 tot[MT][NT];
  float corr[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) tot[i][j] = _mm512_setzero_ps(), corr[i][j] = 0.0f;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k0 = g * p.gs, k1 = k0 + p.gs;
    __m512i acc[MT][NT];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int64_t c = 0; c < cpg; ++c) {
      const int64_t k = k0 + c * kQ4Chunk;
      const __mmask32 mb = mask32((std::min(k1 - k, kQ4Chunk) + 1) / 2);
      __m512i wv[NT];
      for (int j = 0; j < NT; ++j) {
        const __m256i b = _mm256_maskz_loadu_epi8(mb, w + (n0 + j) * p.KB + k / 2);
        const __m256i lo = _mm256_and_si256(b, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        wv[j] = _mm512_xor_si512(both, eight);  // two's-complement nibble -> q + 8 in [0, 15]
      }
      for (int i = 0; i < MT; ++i) {
        const __m512i xv =
            _mm512_loadu_si512(p.qx + (m0 + i) * p.qx_row + (g * cpg + c) * kQ4Chunk);
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], xv);
      }
    }
    q8_group_end<MT, NT>(p, g, m0, n0, acc, tot, corr);
  }
  q8_store<MT, NT>(p, m0, n0, tot, corr, 8.0f);
}

// Runs one kind of tile over rows [0, M) and columns [n0, n1): up to 8 rows per pass, so that a
// decode batch of up to 8 reads each weight once (a pass over the columns streams the weights),
// with NT = min(4, W / MT) columns per tile (W: the accumulator budget of the tile kind, within
// AVX-512's 32 registers; 4 columns at M = 1 for memory-level parallelism), tails with 1 column.
#define JAXINF_COLS(TILE, MT, W)                                                   \
  {                                                                              \
    constexpr int nt = std::max(1, std::min(4, (W) / (MT)));                     \
    int64_t n = n0;                                                              \
    for (; n + nt <= n1; n += nt) TILE<MT, nt>(p, m, n);                         \
    for (; n < n1; ++n) TILE<MT, 1>(p, m, n);                                    \
  }
#define JAXINF_DEFINE_BLOCK(NAME, TILE, ATTR, W)                                   \
  ATTR void NAME(const Problem& p, int64_t n0, int64_t n1) {                       \
    int64_t m = 0;                                                                 \
    for (; m + 8 <= p.M; m += 8) JAXINF_COLS(TILE, 8, W)                           \
    switch (p.M - m) {                                                             \
      case 7: JAXINF_COLS(TILE, 7, W) break;                                       \
      case 6: JAXINF_COLS(TILE, 6, W) break;                                       \
      case 5: JAXINF_COLS(TILE, 5, W) break;                                       \
      case 4: JAXINF_COLS(TILE, 4, W) break;                                       \
      case 3: JAXINF_COLS(TILE, 3, W) break;                                       \
      case 2: JAXINF_COLS(TILE, 2, W) break;                                       \
      case 1: JAXINF_COLS(TILE, 1, W) break;                                       \
      default: break;                                                              \
    }                                                                              \
  }

// accumulator budgets: the fp32 tiles keep MT x NT sums (+ NT weights, 1 x); the int4 one also
// holds 2 NT unpacked weight vectors; the W8A8 ones keep integer and float sums (2 MT NT)
JAXINF_DEFINE_BLOCK(f32_f32_block, f32_f32_tile, JAXINF_AVX512, 24)
JAXINF_DEFINE_BLOCK(f32_i8_block, f32_i8_tile, JAXINF_AVX512, 24)
JAXINF_DEFINE_BLOCK(f32_i4_block, f32_i4_tile, JAXINF_AVX512, 16)
JAXINF_DEFINE_BLOCK(q8_i8_block, q8_i8_tile, JAXINF_VNNI, 12)
JAXINF_DEFINE_BLOCK(q8_i4_block, q8_i4_tile, JAXINF_VNNI, 12)
#endif  // JAXINF_X86

using BlockFn = void (*)(const Problem&, int64_t, int64_t);

bool has_avx512() {
#if JAXINF_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

bool has_vnni() {
#if JAXINF_X86
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

// The path for this problem; `force_scalar` is the tests' switch.
BlockFn pick(const Problem& p, bool force_scalar) {
  if (force_scalar) return scalar_block;
#if JAXINF_X86
  const bool even_groups = !p.int4 || p.G == 1 || p.gs % 2 == 0;
  if (!even_groups) return scalar_block;
  if (p.act_int8) {
    if (!has_vnni()) return scalar_block;
    return p.int4 ? q8_i4_block : q8_i8_block;
  }
  if (!has_avx512()) return scalar_block;
  if (p.f32w) return f32_f32_block;
  return p.int4 ? f32_i4_block : f32_i8_block;
#else
  return scalar_block;
#endif
}

// ---- threads ----------------------------------------------------------------------------------

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t blocks = 0, block_cols = 0;
  Problem p;
  BlockFn fn = nullptr;

  // Takes blocks until none is left; returns when this thread has no more to do.
  void work() {
    for (;;) {
      const int64_t b = next.fetch_add(1, std::memory_order_relaxed);
      if (b >= blocks) return;
      const int64_t n0 = b * block_cols, n1 = std::min(p.N, n0 + block_cols);
      fn(p, n0, n1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void run_blocks(const Problem& p, BlockFn fn, ffi::ThreadPool& pool) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // about 4 blocks per thread (balance), at least 12 columns each (the tiles' widths)
  int64_t block_cols = std::max<int64_t>(12, (p.N + 4 * threads - 1) / (4 * threads));
  block_cols = (block_cols + 11) / 12 * 12;
  const int64_t blocks = (p.N + block_cols - 1) / block_cols;
  if (threads == 1 || blocks == 1) {
    fn(p, 0, p.N);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->blocks = blocks;
  shared->block_cols = block_cols;
  shared->p = p;
  shared->fn = fn;
  const int64_t helpers = std::min(threads, blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->work(); });
  shared->work();
  // Wait for blocks that helpers took; a helper that starts later finds none left and only
  // touches `shared` (which it co-owns), never the buffers.
  while (shared->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

ffi::Error check_common(int64_t M, int64_t K, int64_t N, int64_t G, int64_t gs) {
  if (M < 0 || K < 1 || N < 1) return ffi::Error::InvalidArgument("lowbit_matmul: empty operand");
  if (gs < 1 || G * gs != K)
    return ffi::Error::InvalidArgument("lowbit_matmul: group_size x groups != K");
  return ffi::Error::Success();
}

ffi::Error Impl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                ffi::ResultBuffer<ffi::F32> y, int64_t k_attr, int64_t group_size,
                int32_t act_int8, int32_t force_scalar, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(),
             yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("lowbit_matmul: expected 2-D x, w, scale and y");
  bool int4 = false, f32w = false;
  if (w.element_type() == ffi::DataType::S8) {
    int4 = false;
  } else if (w.element_type() == ffi::DataType::U8) {
    int4 = true;
  } else if (w.element_type() == ffi::DataType::F32) {
    f32w = true;
  } else {
    return ffi::Error::InvalidArgument("lowbit_matmul: w must be int8 (int8 codes), uint8 "
                                       "(packed int4 codes) or float32 (fp32 weights)");
  }
  if (f32w && act_int8 != 0)
    return ffi::Error::InvalidArgument("lowbit_matmul: fp32 weights take fp32 activations");
  Problem p{};
  p.M = xd[0];
  p.K = xd[1];
  p.N = wd[0];
  p.G = sd[0];
  p.gs = group_size;
  p.int4 = int4;
  p.f32w = f32w;
  p.act_int8 = act_int8 != 0;
  p.KB = int4 ? (p.K + 1) / 2 : p.K;
  if (p.K != k_attr || wd[1] != p.KB || sd[1] != p.N || yd[0] != p.M || yd[1] != p.N)
    return ffi::Error::InvalidArgument("lowbit_matmul: operand shapes do not agree");
  if (ffi::Error e = check_common(p.M, p.K, p.N, p.G, p.gs); e.failure()) return e;
  if (p.M == 0) return ffi::Error::Success();
  p.x = x.typed_data();
  p.w = w.untyped_data();
  p.scale = scale.typed_data();
  p.y = y->typed_data();

  std::vector<float> xa, sx;
  std::vector<int8_t> qx;
  std::vector<int32_t> sumx;
  if (p.act_int8) {
    quantize_rows(p, qx, p.qx_row, sx, sumx);
    p.qx = qx.data();
    p.sx = sx.data();
    p.sumx = sumx.data();
  } else if (int4) {
    build_xa(p, xa, p.xa_row);
    p.xa = xa.data();
  }
  run_blocks(p, pick(p, force_scalar != 0), pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinfLowbitMatmul, Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int32_t>("act_int8")
                                  .Attr<int32_t>("force_scalar")
                                  .Ctx<ffi::ThreadPool>());

// Which path a problem of this kind takes on this CPU: 0 scalar, 1 AVX-512, 2 AVX-512 VNNI.
extern "C" __attribute__((visibility("default"))) int jaxinf_lowbit_isa(int act_int8) {
  if (act_int8) return has_vnni() ? 2 : 0;
  return has_avx512() ? 1 : 0;
}

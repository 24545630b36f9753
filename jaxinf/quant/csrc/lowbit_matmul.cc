// Decode-shaped low-bit products for XLA:CPU, called through the XLA FFI
// (jaxinf/quant/cpu_kernel.py builds, loads and registers this file).
//
//   y[M, N] = x[M, K] @ W[K, N],   W[k, n] = s[k / group_size, n] * q[n, k]
//
// Weight layout (the kernel layout of a QArray, produced at quantization time): the codes
// transposed, one output column per row, so that every dot product reads K contiguous codes:
//   int8:  q  int8  [N, K]
//   int4:  panels of 16 output columns, uint8 [16 P, 4 ceil(K / 8)] (P = ceil(N / 16), columns
//          and k past the ends are zero codes): panel q holds ceil(K / 8) octets of 64 bytes, octet
//          o's 32-bit lane j is column 16 q + j, whose byte b holds k = 8 o + b (low nibble) and
//          k = 8 o + 4 + b (high nibble), 4-bit two's complement. One 64-byte load gives 16
//          columns x 8 k; a lane's 4 bytes meet 4 consecutive activations (vpdpbusd's group), so
//          the 16 sums of a panel stay in one register's lanes: no horizontal reduction, and a
//          group's 16 column scales are one contiguous load from `scale`.
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
//                  of the sign bit) and the offset times the group's sum of x codes is subtracted
//                  (int4: the group's integer sums start from it).
//
// Threads: the N output columns are cut into blocks taken from an atomic counter by the calling
// thread and by tasks scheduled on XLA's intra-op thread pool (ffi::ThreadPool); the caller waits
// only for blocks that others have started, never for a task to start.
//
// Instruction sets: the AVX-512 (F, BW, VL, VNNI) paths are compiled with target attributes and
// chosen at run time (__builtin_cpu_supports); a portable scalar path computes the same sums
// everywhere else (and for int4 groups that are not a multiple of 8 k).

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
  int64_t K8;          // int4: octets of k per panel (ceil(K / 8))
  bool int4;
  bool f32w;           // fp32 weights [N, K] (fp32 activations only)
  bool act_int8;
  // per-call scratch (built once before the column blocks run)
  const float* xa;     // fp32 x for int4: [M, 8 K8], zero past K
  int64_t xa_row;      // floats per row of xa
  const int8_t* qx;    // int8 x: [M, K] (int8 weights) or [M, 8 K8] zero past K (int4)
  int64_t qx_row;      // bytes per row of qx
  const float* sx;     // [M] activation scales
  const int32_t* sumx; // [M, G] sums of the int8 x codes per group
};

inline int8_t nib(uint8_t b, int hi) {
  int v = hi ? (b >> 4) : (b & 0xF);
  return static_cast<int8_t>((v ^ 8) - 8);
}

// int4: the 64 bytes of panel q, octet o.
inline const uint8_t* panel_at(const Problem& p, int64_t q, int64_t o) {
  return static_cast<const uint8_t*>(p.w) + (q * p.K8 + o) * 64;
}

inline int8_t code_at(const Problem& p, int64_t n, int64_t k) {
  if (!p.int4) return static_cast<const int8_t*>(p.w)[n * p.K + k];
  const uint8_t b = panel_at(p, n / 16, k / 8)[(n % 16) * 4 + (k & 3)];
  return nib(b, static_cast<int>((k >> 2) & 1));
}

// ---- scratch: activation rearrangement and quantization ------------------------------------

// int4, fp32 x: the rows padded with zeros to whole octets of k.
void build_xa(const Problem& p, std::vector<float>& xa, int64_t& row) {
  row = 8 * p.K8;
  xa.assign(static_cast<size_t>(p.M * row), 0.0f);
  for (int64_t m = 0; m < p.M; ++m)
    std::memcpy(xa.data() + m * row, p.x + m * p.K, sizeof(float) * static_cast<size_t>(p.K));
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

// int8 x for the W8A8 paths: codes ([M, K]; int4 weights: [M, 8 K8], zero past K), scales and
// per-group sums of the codes.
void quantize_rows(const Problem& p, std::vector<int8_t>& qx, int64_t& row, std::vector<float>& sx,
                   std::vector<int32_t>& sumx) {
  row = p.int4 ? 8 * p.K8 : p.K;
  qx.assign(static_cast<size_t>(p.M * row), 0);
  sx.assign(static_cast<size_t>(p.M), 1.0f);
  sumx.assign(static_cast<size_t>(p.M * p.G), 0);
  for (int64_t m = 0; m < p.M; ++m) {
    int8_t* q = qx.data() + m * row;
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
            acc += static_cast<int32_t>(p.qx[m * p.qx_row + k]) * code_at(p, n, k);
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

// int4 panels: the octets of group g (all of them when there is one group; a group is a whole
// number of octets on the vector paths).
inline int64_t octets_per_group(const Problem& p) { return p.G == 1 ? p.K8 : p.gs / 8; }

// The valid lanes (columns) of panel q, and the panel's 16 scales of group g.
JAXINF_AVX512 inline __mmask16 panel_lanes(const Problem& p, int64_t q) {
  return mask16(p.N - 16 * q);
}
JAXINF_AVX512 inline __m512 panel_scales(const Problem& p, int64_t g, int64_t q) {
  return _mm512_maskz_loadu_ps(panel_lanes(p, q), p.scale + g * p.N + 16 * q);
}

// The code of k = 8 o + R in every lane of an octet, sign-extended and converted to fp32.
template <int R>
JAXINF_AVX512 inline __m512 panel_codes_f32(__m512i v) {
  constexpr int off = 8 * (R & 3) + 4 * (R >> 2);
  return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28 - off), 28));
}

template <int MT, int NP, int R>
JAXINF_AVX512 inline void f32_i4p_step(const Problem& p, int64_t m0, int64_t o,
                                       const __m512i (&v)[NP], __m512 (&acc)[MT][NP]) {
  __m512 c[NP];
  for (int j = 0; j < NP; ++j) c[j] = panel_codes_f32<R>(v[j]);
  for (int i = 0; i < MT; ++i) {
    const __m512 xv = _mm512_set1_ps(p.xa[(m0 + i) * p.xa_row + 8 * o + R]);
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_fmadd_ps(xv, c[j], acc[i][j]);
  }
}

// fp32 x (zero-padded, build_xa), int4 panels q0 .. q0 + NP - 1: MT rows x 16 NP columns.
template <int MT, int NP>
JAXINF_AVX512 void f32_i4p_tile(const Problem& p, int64_t m0, int64_t q0) {
  const int64_t opg = octets_per_group(p);
  __m512 tot[MT][NP];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NP; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 acc[MT][NP];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t o = g * opg; o < (g + 1) * opg; ++o) {
      __m512i v[NP];
      for (int j = 0; j < NP; ++j) v[j] = _mm512_loadu_si512(panel_at(p, q0 + j, o));
      f32_i4p_step<MT, NP, 0>(p, m0, o, v, acc);
      f32_i4p_step<MT, NP, 1>(p, m0, o, v, acc);
      f32_i4p_step<MT, NP, 2>(p, m0, o, v, acc);
      f32_i4p_step<MT, NP, 3>(p, m0, o, v, acc);
      f32_i4p_step<MT, NP, 4>(p, m0, o, v, acc);
      f32_i4p_step<MT, NP, 5>(p, m0, o, v, acc);
      f32_i4p_step<MT, NP, 6>(p, m0, o, v, acc);
      f32_i4p_step<MT, NP, 7>(p, m0, o, v, acc);
    }
    for (int j = 0; j < NP; ++j) {
      const __m512 s = panel_scales(p, g, q0 + j);
      for (int i = 0; i < MT; ++i) tot[i][j] = _mm512_fmadd_ps(acc[i][j], s, tot[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NP; ++j)
      _mm512_mask_storeu_ps(p.y + (m0 + i) * p.N + 16 * (q0 + j), panel_lanes(p, q0 + j),
                            tot[i][j]);
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

// int8 x (zero-padded, quantize_rows), int4 panels (VNNI): per group, the 16 lanes' integer sums
// start at -8 sum(x codes) and add (q + 8) x over the group's octets (the low nibbles meet x's
// k = 8 o .. 8 o + 3, the high ones k = 8 o + 4 .. 8 o + 7, each 4 broadcast to all lanes).
template <int MT, int NP>
JAXINF_VNNI void q8_i4p_tile(const Problem& p, int64_t m0, int64_t q0) {
  const int64_t opg = octets_per_group(p);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x88));
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 tot[MT][NP];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NP; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m512i acc[MT][NP];
    for (int i = 0; i < MT; ++i) {
      const __m512i start = _mm512_set1_epi32(-8 * p.sumx[(m0 + i) * p.G + g]);
      for (int j = 0; j < NP; ++j) acc[i][j] = start;
    }
    for (int64_t o = g * opg; o < (g + 1) * opg; ++o) {
      __m512i lo[NP], hi[NP];
      for (int j = 0; j < NP; ++j) {
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(panel_at(p, q0 + j, o)), flip);
        lo[j] = _mm512_and_si512(v, low);                         // q + 8, k = 8 o + b
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);   // q + 8, k = 8 o + 4 + b
      }
      for (int i = 0; i < MT; ++i) {
        const int8_t* xq = p.qx + (m0 + i) * p.qx_row + 8 * o;
        int32_t x0, x1;
        std::memcpy(&x0, xq, 4);
        std::memcpy(&x1, xq + 4, 4);
        const __m512i xl = _mm512_set1_epi32(x0), xh = _mm512_set1_epi32(x1);
        for (int j = 0; j < NP; ++j) {
          acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo[j], xl);
          acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi[j], xh);
        }
      }
    }
    for (int j = 0; j < NP; ++j) {
      const __m512 s = panel_scales(p, g, q0 + j);
      for (int i = 0; i < MT; ++i)
        tot[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), s, tot[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    const __m512 sx = _mm512_set1_ps(p.sx[m0 + i]);
    for (int j = 0; j < NP; ++j)
      _mm512_mask_storeu_ps(p.y + (m0 + i) * p.N + 16 * (q0 + j), panel_lanes(p, q0 + j),
                            _mm512_mul_ps(tot[i][j], sx));
  }
}

// Runs one kind of tile over rows [0, M) and columns [n0, n1): up to 8 rows per pass, so that a
// decode batch of up to 8 reads each weight once (a pass over the columns streams the weights).
// Row-layout tiles (int8 codes, fp32 weights) take NT = min(4, W / MT) columns (W: the
// accumulator budget of the tile kind, within AVX-512's 32 registers; 4 columns at M = 1 for
// memory-level parallelism), tails with 1 column; int4 panel tiles take NP = min(4, 8 / MT)
// panels of 16 columns (n0 is then a multiple of 16).
#define JAXINF_COLS(TILE, MT, W)                                                   \
  {                                                                              \
    constexpr int nt = std::max(1, std::min(4, (W) / (MT)));                     \
    int64_t n = n0;                                                              \
    for (; n + nt <= n1; n += nt) TILE<MT, nt>(p, m, n);                         \
    for (; n < n1; ++n) TILE<MT, 1>(p, m, n);                                    \
  }
#define JAXINF_PANELS(TILE, MT, W)                                                 \
  {                                                                              \
    constexpr int np = std::max(1, std::min(4, (W) / (MT)));                     \
    const int64_t q1 = (n1 + 15) / 16;                                           \
    int64_t q = n0 / 16;                                                         \
    for (; q + np <= q1; q += np) TILE<MT, np>(p, m, q);                         \
    for (; q < q1; ++q) TILE<MT, 1>(p, m, q);                                    \
  }
#define JAXINF_DEFINE_BLOCK(NAME, TILE, ATTR, SWEEP, W)                            \
  ATTR void NAME(const Problem& p, int64_t n0, int64_t n1) {                       \
    int64_t m = 0;                                                                 \
    for (; m + 8 <= p.M; m += 8) SWEEP(TILE, 8, W)                                 \
    switch (p.M - m) {                                                             \
      case 7: SWEEP(TILE, 7, W) break;                                             \
      case 6: SWEEP(TILE, 6, W) break;                                             \
      case 5: SWEEP(TILE, 5, W) break;                                             \
      case 4: SWEEP(TILE, 4, W) break;                                             \
      case 3: SWEEP(TILE, 3, W) break;                                             \
      case 2: SWEEP(TILE, 2, W) break;                                             \
      case 1: SWEEP(TILE, 1, W) break;                                             \
      default: break;                                                              \
    }                                                                              \
  }

// accumulator budgets: the fp32 row tiles keep MT x NT sums (+ NT weights, 1 x); the W8A8 row
// tile keeps integer and float sums (2 MT NT); the panel tiles 2 MT NP sums (+ 2 NP codes)
JAXINF_DEFINE_BLOCK(f32_f32_block, f32_f32_tile, JAXINF_AVX512, JAXINF_COLS, 24)
JAXINF_DEFINE_BLOCK(f32_i8_block, f32_i8_tile, JAXINF_AVX512, JAXINF_COLS, 24)
JAXINF_DEFINE_BLOCK(q8_i8_block, q8_i8_tile, JAXINF_VNNI, JAXINF_COLS, 12)
JAXINF_DEFINE_BLOCK(f32_i4_block, f32_i4p_tile, JAXINF_AVX512, JAXINF_PANELS, 8)
JAXINF_DEFINE_BLOCK(q8_i4_block, q8_i4p_tile, JAXINF_VNNI, JAXINF_PANELS, 8)
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
  const bool whole_octets = !p.int4 || p.G == 1 || p.gs % 8 == 0;
  if (!whole_octets) return scalar_block;
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
  // about 4 blocks per thread (balance), a multiple of 48 columns each (whole row tiles of 1-4
  // columns, whole int4 panels of 16)
  int64_t block_cols = std::max<int64_t>(48, (p.N + 4 * threads - 1) / (4 * threads));
  block_cols = (block_cols + 47) / 48 * 48;
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
  p.K8 = (p.K + 7) / 8;
  p.KB = int4 ? 4 * p.K8 : p.K;
  if (int4) p.N = sd[1];  // the panels' rows are the columns padded to a multiple of 16
  const int64_t rows = int4 ? (p.N + 15) / 16 * 16 : p.N;
  if (p.K != k_attr || wd[0] != rows || wd[1] != p.KB || sd[1] != p.N || yd[0] != p.M ||
      yd[1] != p.N)
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

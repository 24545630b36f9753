// Decode-shaped low-bit products for XLA:CPU, called through the XLA FFI
// (jaxinf/quant/cpu_kernel.py builds, loads and registers this file).
//
//   y[M, N] = x[M, K] @ W[K, N],   W[k, n] = s[k / group_size, n] * q[n, k]
//
// Weight layout (the kernel layout of a QArray, produced at quantization time): integer codes in
// panels of 16 output columns (P = ceil(N / 16) panels; columns and k past the ends are zero
// codes), each panel a run of 64-byte steps whose 32-bit lane j is column 16 q + j:
//   int4:  uint8 [16 P, 4 ceil(K / 8)]: panel q holds ceil(K / 8) octets; octet o's lane j holds
//          in byte b k = 8 o + b (low nibble) and k = 8 o + 4 + b (high nibble), 4-bit two's
//          complement. One 64-byte load gives 16 columns x 8 k.
//   int8:  int8 [16 P, 4 ceil(K / 4)]: panel q holds ceil(K / 4) quads; quad o's lane j holds
//          k = 4 o + b in byte b. One 64-byte load gives 16 columns x 4 k.
//          A lane's 4 bytes meet 4 consecutive activations (vpdpbusd's group), so the 16 sums of
//          a panel stay in one register's lanes: no horizontal reduction, and a group's 16 column
//          scales are one contiguous load from `scale`.
//   fp32:  float32 [16 P, K]: panel q holds K lines of 16 floats, line k the columns 16 q .. 16 q +
//          15 at that k (not quantized: the same streaming product for fp32 weights, whose 16
//          sums per panel need no horizontal reduction; XLA's own fp32 dot reads a decode step's
//          weights at ~60 % of the DRAM bandwidth); `scale` is ones [1, N].
//   scale  float32 or float16 [G, N], G = K / group_size (fp16: llama.cpp's Q4_0 / Q8_0 storage,
//          widened to fp32 on load: vcvtph2ps).
//
// Activations:
//   act_int8 = 0: x stays fp32; the codes are widened to fp32 in registers and FMA'd (fp32
//                  accumulation per group, each group's sum times its scale, summed over groups).
//   act_int8 = 1: each row of x is quantized to int8 with s_x = max|x| / 127 (1 for an all-zero
//                  row; round half to even), as QArray's XLA path does, and the integer dot runs
//                  on AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32). vpdpbusd wants an unsigned operand,
//                  so the weight code is offset to unsigned (int8: q + 128, int4: q + 8, by an XOR
//                  of the sign bit) and the group's integer sums start from minus the offset
//                  times the group's sum of x codes.
//
// Threads: the N output columns are cut into blocks taken from an atomic counter by the calling
// thread and by tasks scheduled on XLA's intra-op thread pool (ffi::ThreadPool); the caller waits
// only for blocks that others have started, never for a task to start.
//
// Instruction sets, compiled with target attributes and chosen at run time
// (__builtin_cpu_supports): AVX-512 (F, BW, VL, DQ; VNNI for W8A8); AVX2 + FMA (half-panels of 8
// columns, W8A8 by vpmaddubsw + vpmaddwd); a portable scalar path computes the same sums
// everywhere else (and for groups that are not a whole number of panel steps: 8 k for int4, 4 k
// for int8). The `path` attribute forces one (the tests run each path this CPU has).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "half.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXINF_X86 1
#else
#define JAXINF_X86 0
#endif

namespace ffi = xla::ffi;

namespace {

using jaxinf::half_to_float;

struct Problem {
  const float* x;      // [M, K] fp32 activations
  const void* w;       // int4 / int8 panels [16 P, 4 KS] or float32 panels [16 P, K]
  const void* scale;   // [G, N], float32 or float16 (scale_f16)
  bool scale_f16;
  float* y;            // [M, N]
  int64_t M, N, K, KB, G, gs;
  int64_t kstep;       // panels: k per 64-byte step (int4 8, int8 4)
  int64_t KS;          // panels: steps per panel (ceil(K / kstep))
  bool int4;           // int4 panels (uint8)
  bool f32w;           // fp32 weight panels (fp32 activations only); else int8 / int4 panels
  bool act_int8;
  // per-call scratch (built once before the column blocks run)
  const float* xa;     // fp32 x for panels: [M, kstep KS], zero past K
  int64_t xa_row;      // floats per row of xa
  const int8_t* qx;    // int8 x: [M, kstep KS], zero past K
  int64_t qx_row;      // bytes per row of qx
  const float* sx;     // [M] activation scales
  const int32_t* sumx; // [M, G] sums of the int8 x codes per group
};

inline int8_t nib(uint8_t b, int hi) {
  int v = hi ? (b >> 4) : (b & 0xF);
  return static_cast<int8_t>((v ^ 8) - 8);
}

// Panels: the 64 bytes of panel q, step o.
inline const uint8_t* panel_at(const Problem& p, int64_t q, int64_t o) {
  return static_cast<const uint8_t*>(p.w) + (q * p.KS + o) * 64;
}

inline int8_t code_at(const Problem& p, int64_t n, int64_t k) {
  const uint8_t b = panel_at(p, n / 16, k / p.kstep)[(n % 16) * 4 + (k & 3)];
  if (!p.int4) return static_cast<int8_t>(b);
  return nib(b, static_cast<int>((k >> 2) & 1));
}

// The scale of group g, column n, as fp32; the address of that entry (prefetches).
inline float scale_at(const Problem& p, int64_t g, int64_t n) {
  const int64_t i = g * p.N + n;
  return p.scale_f16 ? half_to_float(static_cast<const uint16_t*>(p.scale)[i])
                     : static_cast<const float*>(p.scale)[i];
}
inline const char* scale_addr(const Problem& p, int64_t g, int64_t n) {
  return static_cast<const char*>(p.scale) + (g * p.N + n) * (p.scale_f16 ? 2 : 4);
}

// ---- scratch: activation rearrangement and quantization ------------------------------------

// Panels, fp32 x: the rows padded with zeros to whole steps of k.
void build_xa(const Problem& p, std::vector<float>& xa, int64_t& row) {
  row = p.kstep * p.KS;
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

// int8 x for the W8A8 paths: codes ([M, kstep KS], zero past K), scales and per-group sums of
// the codes.
void quantize_rows(const Problem& p, std::vector<int8_t>& qx, int64_t& row, std::vector<float>& sx,
                   std::vector<int32_t>& sumx) {
  row = p.kstep * p.KS;
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
          total += static_cast<float>(acc) * scale_at(p, g, n);
        }
        total *= p.sx[m];
      } else {
        const float* xr = p.x + m * p.K;
        // fp32 panel n / 16: [K, 16] floats, column n in lane n % 16
        const float* wf = static_cast<const float*>(p.w) + (n / 16) * 16 * p.K + n % 16;
        for (int64_t g = 0; g < p.G; ++g) {
          float acc = 0.0f;
          for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k)
            acc += xr[k] * (p.f32w ? wf[16 * k] : static_cast<float>(code_at(p, n, k)));
          total += acc * scale_at(p, g, n);
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

// Panels: the steps of group g (all of them when there is one group; a group is a whole number
// of steps on the vector paths).
inline int64_t steps_per_group(const Problem& p) { return p.G == 1 ? p.KS : p.gs / p.kstep; }

// The valid lanes (columns) of panel q, and the panel's 16 scales of group g.
JAXINF_AVX512 inline __mmask16 panel_lanes(const Problem& p, int64_t q) {
  return mask16(p.N - 16 * q);
}
JAXINF_AVX512 inline __m512 panel_scales(const Problem& p, int64_t g, int64_t q) {
  if (p.scale_f16)
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
        panel_lanes(p, q), static_cast<const uint16_t*>(p.scale) + g * p.N + 16 * q));
  return _mm512_maskz_loadu_ps(panel_lanes(p, q),
                               static_cast<const float*>(p.scale) + g * p.N + 16 * q);
}
// A panel's scales are one 64-byte line per group, N floats apart: a stride of pages that the
// hardware prefetchers do not follow, so at large K (many groups) the scale loads missed to
// memory. Prefetch the line SCALE_AHEAD groups ahead.
constexpr int64_t SCALE_AHEAD = 4;
template <int NP>
JAXINF_AVX512 inline void prefetch_scales(const Problem& p, int64_t g, int64_t q0) {
  if (g + SCALE_AHEAD >= p.G) return;
  for (int j = 0; j < NP; ++j)
    _mm_prefetch(scale_addr(p, g + SCALE_AHEAD, 16 * (q0 + j)), _MM_HINT_T0);
}

// fp32 x, fp32 weight panels q0 .. q0 + NP - 1 (panel q: [K, 16] floats, one 64-byte line per k):
// MT rows x 16 NP columns, x[m, k] broadcast against the panel's 16 columns, so no horizontal
// sums (the weights are read once for up to 8 rows).
template <int MT, int NP>
JAXINF_AVX512 void f32_f32p_tile(const Problem& p, int64_t m0, int64_t q0) {
  const float* w = static_cast<const float*>(p.w);
  __m512 acc[MT][NP];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; ++k) {
    __m512 wv[NP];
    for (int j = 0; j < NP; ++j) wv[j] = _mm512_loadu_ps(w + ((q0 + j) * p.K + k) * 16);
    for (int i = 0; i < MT; ++i) {
      const __m512 xb = _mm512_set1_ps(p.x[(m0 + i) * p.K + k]);
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NP; ++j)  // scale: ones (one group)
      _mm512_mask_storeu_ps(p.y + (m0 + i) * p.N + 16 * (q0 + j), panel_lanes(p, q0 + j),
                            _mm512_mul_ps(acc[i][j], panel_scales(p, 0, q0 + j)));
}

// k per 64-byte panel step: int4 an octet (8 k), int8 a quad (4 k).
template <int BITS>
constexpr int panel_kstep() { return BITS == 4 ? 8 : 4; }

// The code of k = kstep o + R in every lane of a panel step, sign-extended, as fp32. int4: byte
// R & 3 of the lane, low nibble for R < 4, high for R >= 4; int8: byte R.
template <int BITS, int R>
JAXINF_AVX512 inline __m512 panel_codes_f32(__m512i v, __m512 lut) {
  if constexpr (BITS == 4) {
    constexpr int off = 8 * (R & 3) + 4 * (R >> 2);
    if constexpr (off == 0) return _mm512_permutexvar_ps(v, lut);
    else return _mm512_permutexvar_ps(_mm512_srli_epi32(v, off), lut);
  } else if constexpr (R == 3) {
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
  } else {
    // byte b = q (two's complement) at bits 8 r .. 8 r + 7 (r = 0 or 1; R = 2 is shifted down
    // to r = 0 first) made the mantissa of a float of exponent 23 - 8 r, its sign bit flipped
    // (u = q + 128): one vpternlogd (c ^ (v & m)) gives 2^(23 - 8 r) + u exactly, and one
    // subtraction of 2^(23 - 8 r) + 128 leaves q. Exact, and the subtraction runs on the
    // floating-point adders, not on the FMA or shuffle units that the FMA and shifts need.
    constexpr int r = R == 1 ? 1 : 0;
    const __m512i m = _mm512_set1_epi32(0xFF << (8 * r));
    const __m512i c = _mm512_set1_epi32(((127 + 23 - 8 * r) << 23) | (0x80 << (8 * r)));
    const __m512i b = R == 2 ? _mm512_srli_epi32(v, 16) : v;
    const __m512 f = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(b, m, c, 0x6A));
    return _mm512_sub_ps(f, _mm512_set1_ps(static_cast<float>((1 << (23 - 8 * r)) + 128)));
  }
}

template <int BITS, int MT, int NP, int R>
JAXINF_AVX512 inline void f32_panel_step(const Problem& p, int64_t m0, int64_t o,
                                         const __m512i (&v)[NP], __m512 (&acc)[MT][NP],
                                         __m512 lut) {
  __m512 c[NP];
  for (int j = 0; j < NP; ++j) c[j] = panel_codes_f32<BITS, R>(v[j], lut);
  for (int i = 0; i < MT; ++i) {
    const __m512 xv = _mm512_set1_ps(p.xa[(m0 + i) * p.xa_row + panel_kstep<BITS>() * o + R]);
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_fmadd_ps(xv, c[j], acc[i][j]);
  }
}

template <int BITS, int MT, int NP, int... R>
JAXINF_AVX512 inline void f32_panel_steps(const Problem& p, int64_t m0, int64_t o,
                                          const __m512i (&v)[NP], __m512 (&acc)[MT][NP],
                                          __m512 lut, std::integer_sequence<int, R...>) {
  (f32_panel_step<BITS, MT, NP, R>(p, m0, o, v, acc, lut), ...);
}

// Weight-only products widen every code in registers, so their compute takes about as long as
// reading the weights from DRAM, and the loads had to run ahead of it: a software prefetch
// PREFETCH_STEPS steps (512 bytes) ahead in each panel made the 110M Llama's int4 decode 3-4 %
// faster at batch 1 (2-core AMD EPYC Zen 4; 16 steps ahead was no better, and the W8A8 tiles,
// whose compute is 3x lighter, gained nothing).
constexpr int64_t PREFETCH_STEPS = 8;

// fp32 x (zero-padded, build_xa), int4 or int8 panels q0 .. q0 + NP - 1: MT rows x 16 NP
// columns; per group, fp32 sums in the 16 lanes times the group's 16 scales.
template <int BITS, int MT, int NP>
JAXINF_AVX512 void f32_panel_tile(const Problem& p, int64_t m0, int64_t q0) {
  const int64_t spg = steps_per_group(p);
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512 tot[MT][NP];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NP; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    prefetch_scales<NP>(p, g, q0);
    __m512 acc[MT][NP];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t o = g * spg; o < (g + 1) * spg; ++o) {
      __m512i v[NP];
      if (o + PREFETCH_STEPS < p.KS)
        for (int j = 0; j < NP; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(panel_at(p, q0 + j, o + PREFETCH_STEPS)),
                       _MM_HINT_T0);
      for (int j = 0; j < NP; ++j) v[j] = _mm512_loadu_si512(panel_at(p, q0 + j, o));
      f32_panel_steps<BITS, MT, NP>(p, m0, o, v, acc, lut,
                                    std::make_integer_sequence<int, panel_kstep<BITS>()>{});
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

template <int MT, int NP>
JAXINF_AVX512 void f32_i4p_tile(const Problem& p, int64_t m0, int64_t q0) {
  f32_panel_tile<4, MT, NP>(p, m0, q0);
}
template <int MT, int NP>
JAXINF_AVX512 void f32_i8p_tile(const Problem& p, int64_t m0, int64_t q0) {
  f32_panel_tile<8, MT, NP>(p, m0, q0);
}

// int8 x (zero-padded, quantize_rows), int4 or int8 panels (VNNI). vpdpbusd multiplies unsigned
// bytes by signed ones, so the codes are offset to unsigned by an XOR of their sign bits (int4:
// q + 8 in each nibble, int8: q + 128) and each lane's integer sum of a group starts at -offset
// times the group's sum of x codes. int4: the low nibbles of octet o meet x's k = 8 o .. 8 o + 3,
// the high ones k = 8 o + 4 .. 8 o + 7; int8: quad o meets k = 4 o .. 4 o + 3; each 4 x codes
// broadcast to all lanes.
template <int BITS, int MT, int NP>
JAXINF_VNNI void q8_panel_tile(const Problem& p, int64_t m0, int64_t q0) {
  constexpr int kstep = panel_kstep<BITS>();
  constexpr int32_t offset = BITS == 4 ? 8 : 128;
  const int64_t spg = steps_per_group(p);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(BITS == 4 ? 0x88 : 0x80));
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 tot[MT][NP];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NP; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    prefetch_scales<NP>(p, g, q0);
    __m512i acc[MT][NP];
    for (int i = 0; i < MT; ++i) {
      const __m512i start = _mm512_set1_epi32(-offset * p.sumx[(m0 + i) * p.G + g]);
      for (int j = 0; j < NP; ++j) acc[i][j] = start;
    }
    for (int64_t o = g * spg; o < (g + 1) * spg; ++o) {
      __m512i lo[NP], hi[NP];
      for (int j = 0; j < NP; ++j) {
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(panel_at(p, q0 + j, o)), flip);
        if constexpr (BITS == 4) {
          lo[j] = _mm512_and_si512(v, low);                        // q + 8, k = 8 o + b
          hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);  // q + 8, k = 8 o + 4 + b
        } else {
          lo[j] = v;                                               // q + 128, k = 4 o + b
        }
      }
      for (int i = 0; i < MT; ++i) {
        const int8_t* xq = p.qx + (m0 + i) * p.qx_row + kstep * o;
        int32_t x0;
        std::memcpy(&x0, xq, 4);
        const __m512i xl = _mm512_set1_epi32(x0);
        for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo[j], xl);
        if constexpr (BITS == 4) {
          int32_t x1;
          std::memcpy(&x1, xq + 4, 4);
          const __m512i xh = _mm512_set1_epi32(x1);
          for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi[j], xh);
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

template <int MT, int NP>
JAXINF_VNNI void q8_i4p_tile(const Problem& p, int64_t m0, int64_t q0) {
  q8_panel_tile<4, MT, NP>(p, m0, q0);
}
template <int MT, int NP>
JAXINF_VNNI void q8_i8p_tile(const Problem& p, int64_t m0, int64_t q0) {
  q8_panel_tile<8, MT, NP>(p, m0, q0);
}

// Runs one kind of tile over rows [0, M) and columns [n0, n1): up to 8 rows per pass, so that a
// decode batch of up to 8 reads each weight once (a pass over the columns streams the weights).
// A tile takes NP = min(4, W / MT) panels of 16 columns (W: the accumulator budget of the tile
// kind, within AVX-512's 32 registers; 4 panels at M = 1 for memory-level parallelism), tails
// with 1 panel (n0 is a multiple of 16).
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

// accumulator budgets: the fp32-weight tile keeps MT x NP sums (+ NP weights, 1 x); the code
// tiles a group's sums and the totals (2 MT NP, + 2 NP codes)
JAXINF_DEFINE_BLOCK(f32_f32_block, f32_f32p_tile, JAXINF_AVX512, JAXINF_PANELS, 24)
JAXINF_DEFINE_BLOCK(f32_i8_block, f32_i8p_tile, JAXINF_AVX512, JAXINF_PANELS, 8)
JAXINF_DEFINE_BLOCK(q8_i8_block, q8_i8p_tile, JAXINF_VNNI, JAXINF_PANELS, 8)
JAXINF_DEFINE_BLOCK(f32_i4_block, f32_i4p_tile, JAXINF_AVX512, JAXINF_PANELS, 8)
JAXINF_DEFINE_BLOCK(q8_i4_block, q8_i4p_tile, JAXINF_VNNI, JAXINF_PANELS, 8)
#endif  // JAXINF_X86

// ---- AVX2 paths ------------------------------------------------------------------------------
//
// The same panels read as half-panels of 8 columns (one 256-bit register: a panel step's first or
// second 32 bytes), so a tile is MT rows x NH half-panels. fp32 weights and weight-only codes as
// on AVX-512 (FMA, codes widened in registers). W8A8 without VNNI: vpmaddubsw (u8 x s8 -> pairs
// summed to s16, saturating) then vpmaddwd by ones (-> the lane's 4 products summed to s32).
//   int8: the unsigned operand is |w| (|-128| = 128 as u8) and the signed one x sign(w)
//         (vpsignb; x codes are in [-127, 127], so negating is exact): |w| x sign(w) x = w x,
//         a pair at most 2 x 128 x 127 = 32512, below the s16 limit;
//   int4: the unsigned operand is w + 8 (nibbles in [0, 15], by the XOR of the sign bit as on
//         VNNI) and the sum starts at -8 times the group's sum of x codes; a pair is at most
//         2 x 15 x 127 = 3810, so the low and high nibbles' pairs are added in s16 before vpmaddwd.

#if JAXINF_X86
#define JAXINF_AVX2 __attribute__((target("avx2,fma,f16c")))

// Lanes i < count of a half-panel, as a vpmaskmov mask.
JAXINF_AVX2 inline __m256i lanes8(int64_t count) {
  const int32_t c = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(8, count)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// Half-panel h: columns 8 h .. 8 h + 7 (panel h / 2, bytes 32 (h % 2) of each 64-byte step).
JAXINF_AVX2 inline __m256 half_scales(const Problem& p, int64_t g, int64_t h) {
  if (p.scale_f16) {
    const uint16_t* s = static_cast<const uint16_t*>(p.scale) + g * p.N + 8 * h;
    const int64_t count = p.N - 8 * h;
    if (count >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
    alignas(16) uint16_t tail[8] = {};
    std::memcpy(tail, s, sizeof(uint16_t) * static_cast<size_t>(std::max<int64_t>(0, count)));
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
  }
  return _mm256_maskload_ps(static_cast<const float*>(p.scale) + g * p.N + 8 * h,
                            lanes8(p.N - 8 * h));
}
JAXINF_AVX2 inline void store_half(const Problem& p, int64_t m, int64_t h, __m256 v) {
  _mm256_maskstore_ps(p.y + m * p.N + 8 * h, lanes8(p.N - 8 * h), v);
}
inline const uint8_t* half_at(const Problem& p, int64_t h, int64_t o) {
  return panel_at(p, h / 2, o) + 32 * (h & 1);
}
template <int NH>
inline void prefetch_half_scales(const Problem& p, int64_t g, int64_t h0) {
  if (g + SCALE_AHEAD >= p.G) return;
  for (int j = 0; j < NH; j += 2)  // a 64-byte line holds two half-panels' scales
    _mm_prefetch(scale_addr(p, g + SCALE_AHEAD, 8 * (h0 + j)), _MM_HINT_T0);
}

// fp32 x, fp32 weight panels: MT rows x 8 NH columns, x[m, k] broadcast against 8 columns.
template <int MT, int NH>
JAXINF_AVX2 void f32_f32h_tile(const Problem& p, int64_t m0, int64_t h0) {
  // locals, so that the loop neither reloads p nor keeps the sums in memory
  const int64_t K = p.K;
  const float* wh[NH];
  const float* xr[MT];
#pragma GCC unroll 16
  for (int j = 0; j < NH; ++j)
    wh[j] = static_cast<const float*>(p.w) + (h0 + j) / 2 * 16 * K + 8 * ((h0 + j) & 1);
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i) xr[i] = p.x + (m0 + i) * K;
  __m256 acc[MT][NH];
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[NH];
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) wv[j] = _mm256_loadu_ps(wh[j] + 16 * k);
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const __m256 xb = _mm256_broadcast_ss(xr[i] + k);
#pragma GCC unroll 16
      for (int j = 0; j < NH; ++j) acc[i][j] = _mm256_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j)  // scale: ones (one group)
      store_half(p, m0 + i, h0 + j, _mm256_mul_ps(acc[i][j], half_scales(p, 0, h0 + j)));
}

// The code of k = kstep o + R in every lane of a half-panel step, sign-extended, as fp32.
template <int BITS, int R>
JAXINF_AVX2 inline __m256 half_codes_f32(__m256i v) {
  if constexpr (BITS == 4) {
    constexpr int off = 8 * (R & 3) + 4 * (R >> 2);
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28 - off), 28));
  } else {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * R), 24));
  }
}

template <int BITS, int MT, int NH, int R>
JAXINF_AVX2 inline void f32_half_step(const float* const (&xo)[MT], const __m256i (&v)[NH],
                                      __m256 (&acc)[MT][NH]) {
  __m256 c[NH];
#pragma GCC unroll 16
  for (int j = 0; j < NH; ++j) c[j] = half_codes_f32<BITS, R>(v[j]);
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i) {
    const __m256 xv = _mm256_broadcast_ss(xo[i] + R);
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) acc[i][j] = _mm256_fmadd_ps(xv, c[j], acc[i][j]);
  }
}

template <int BITS, int MT, int NH, int... R>
JAXINF_AVX2 inline void f32_half_steps(const float* const (&xo)[MT], const __m256i (&v)[NH],
                                       __m256 (&acc)[MT][NH], std::integer_sequence<int, R...>) {
  (f32_half_step<BITS, MT, NH, R>(xo, v, acc), ...);
}

// The tiles below keep p's fields and the row / half-panel pointers in locals: with them read
// through `p` inside the loop, GCC reloaded them and kept the sums in memory (2x slower at 7 rows).
//
// fp32 x (build_xa), int4 or int8 codes: per group, fp32 sums in the 8 lanes times the scales.
template <int BITS, int MT, int NH>
JAXINF_AVX2 void f32_half_tile(const Problem& p, int64_t m0, int64_t h0) {
  constexpr int kstep = panel_kstep<BITS>();
  const int64_t spg = steps_per_group(p), G = p.G;
  const uint8_t* wh[NH];
  const float* xr[MT];
#pragma GCC unroll 16
  for (int j = 0; j < NH; ++j) wh[j] = half_at(p, h0 + j, 0);
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i) xr[i] = p.xa + (m0 + i) * p.xa_row;
  __m256 tot[MT][NH];
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) tot[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_half_scales<NH>(p, g, h0);
    __m256 acc[MT][NH];
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NH; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t o = g * spg; o < (g + 1) * spg; ++o) {
      __m256i v[NH];
#pragma GCC unroll 16
      for (int j = 0; j < NH; ++j)
        v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh[j] + 64 * o));
      const float* xo[MT];
#pragma GCC unroll 16
      for (int i = 0; i < MT; ++i) xo[i] = xr[i] + kstep * o;
      f32_half_steps<BITS, MT, NH>(xo, v, acc, std::make_integer_sequence<int, kstep>{});
    }
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) {
      const __m256 s = half_scales(p, g, h0 + j);
#pragma GCC unroll 16
      for (int i = 0; i < MT; ++i) tot[i][j] = _mm256_fmadd_ps(acc[i][j], s, tot[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) store_half(p, m0 + i, h0 + j, tot[i][j]);
}

template <int MT, int NH>
JAXINF_AVX2 void f32_i4h_tile(const Problem& p, int64_t m0, int64_t h0) {
  f32_half_tile<4, MT, NH>(p, m0, h0);
}
template <int MT, int NH>
JAXINF_AVX2 void f32_i8h_tile(const Problem& p, int64_t m0, int64_t h0) {
  f32_half_tile<8, MT, NH>(p, m0, h0);
}

// int8 x (quantize_rows), int4 or int8 codes, integer sums by vpmaddubsw + vpmaddwd (see above).
template <int BITS, int MT, int NH>
JAXINF_AVX2 void q8_half_tile(const Problem& p, int64_t m0, int64_t h0) {
  constexpr int kstep = panel_kstep<BITS>();
  const int64_t spg = steps_per_group(p), G = p.G;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i low = _mm256_set1_epi8(0x0F);
  const uint8_t* wh[NH];
  const int8_t* xr[MT];
  const int32_t* sums[MT];
#pragma GCC unroll 16
  for (int j = 0; j < NH; ++j) wh[j] = half_at(p, h0 + j, 0);
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i) {
    xr[i] = p.qx + (m0 + i) * p.qx_row;
    sums[i] = p.sumx + (m0 + i) * G;
  }
  __m256 tot[MT][NH];
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) tot[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_half_scales<NH>(p, g, h0);
    __m256i acc[MT][NH];
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const __m256i start = _mm256_set1_epi32(BITS == 4 ? -8 * sums[i][g] : 0);
#pragma GCC unroll 16
      for (int j = 0; j < NH; ++j) acc[i][j] = start;
    }
    for (int64_t o = g * spg; o < (g + 1) * spg; ++o) {
      __m256i a[NH], b[NH];  // int8: |w|, w; int4: the low and the high nibbles + 8
#pragma GCC unroll 16
      for (int j = 0; j < NH; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh[j] + 64 * o));
        if constexpr (BITS == 4) {
          const __m256i u = _mm256_xor_si256(v, flip);
          a[j] = _mm256_and_si256(u, low);
          b[j] = _mm256_and_si256(_mm256_srli_epi16(u, 4), low);
        } else {
          a[j] = _mm256_abs_epi8(v);
          b[j] = v;
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < MT; ++i) {
        const int8_t* xq = xr[i] + kstep * o;
        int32_t x0;
        std::memcpy(&x0, xq, 4);
        const __m256i xl = _mm256_set1_epi32(x0);
        if constexpr (BITS == 4) {
          int32_t x1;
          std::memcpy(&x1, xq + 4, 4);
          const __m256i xh = _mm256_set1_epi32(x1);
#pragma GCC unroll 16
          for (int j = 0; j < NH; ++j) {
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a[j], xl),
                                                   _mm256_maddubs_epi16(b[j], xh));
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
          }
        } else {
#pragma GCC unroll 16
          for (int j = 0; j < NH; ++j) {
            const __m256i pairs = _mm256_maddubs_epi16(a[j], _mm256_sign_epi8(xl, b[j]));
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
          }
        }
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) {
      const __m256 s = half_scales(p, g, h0 + j);
#pragma GCC unroll 16
      for (int i = 0; i < MT; ++i)
        tot[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][j]), s, tot[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i) {
    const __m256 sx = _mm256_set1_ps(p.sx[m0 + i]);
#pragma GCC unroll 16
    for (int j = 0; j < NH; ++j) store_half(p, m0 + i, h0 + j, _mm256_mul_ps(tot[i][j], sx));
  }
}

template <int MT, int NH>
JAXINF_AVX2 void q8_i4h_tile(const Problem& p, int64_t m0, int64_t h0) {
  q8_half_tile<4, MT, NH>(p, m0, h0);
}
template <int MT, int NH>
JAXINF_AVX2 void q8_i8h_tile(const Problem& p, int64_t m0, int64_t h0) {
  q8_half_tile<8, MT, NH>(p, m0, h0);
}

// As JAXINF_PANELS in half-panels: NH = min(8, W / MT) halves of 8 columns (AVX2's 16 registers),
// tails with 1 half; only halves that hold a column are computed.
#define JAXINF_HALVES(TILE, MT, W)                                                 \
  {                                                                              \
    constexpr int nh = std::max(1, std::min(8, (W) / (MT)));                     \
    const int64_t h1 = (n1 + 7) / 8;                                             \
    int64_t h = n0 / 8;                                                          \
    for (; h + nh <= h1; h += nh) TILE<MT, nh>(p, m, h);                         \
    for (; h < h1; ++h) TILE<MT, 1>(p, m, h);                                    \
  }

// code tiles: accumulator budgets in 256-bit registers, a group's sums and the totals
// fp32 weights: up to 8 rows per pass over the weights, as one or two row groups per column
// tile (the second group reads the tile again from L1 / L2, not from DRAM). A group of MT rows x
// NH halves keeps 12 sums where it can: on a Zen 3 core a 7-row x 1-half tile (one broadcast per
// FMA) ran at 43 GFLOP/s from L1, 4 x 3 / 3 x 4 / 6 x 2 tiles at 66-68.
template <int NH, int... G>
JAXINF_AVX2 void f32_pass(const Problem& p, int64_t m, int64_t n0, int64_t n1) {
  const int64_t h1 = (n1 + 7) / 8;
  int64_t h = n0 / 8;
  for (; h + NH <= h1; h += NH) {
    int64_t r = m;
    ((f32_f32h_tile<G, NH>(p, r, h), r += G), ...);
  }
  for (; h < h1; ++h) {
    int64_t r = m;
    ((f32_f32h_tile<G, 1>(p, r, h), r += G), ...);
  }
}

JAXINF_AVX2 void f32_f32_block2(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.M; m += 8) {
    switch (std::min<int64_t>(8, p.M - m)) {
      case 1: f32_pass<8, 1>(p, m, n0, n1); break;
      case 2: f32_pass<4, 2>(p, m, n0, n1); break;
      case 3: f32_pass<4, 3>(p, m, n0, n1); break;
      case 4: f32_pass<3, 4>(p, m, n0, n1); break;
      case 5: f32_pass<4, 3, 2>(p, m, n0, n1); break;
      case 6: f32_pass<2, 6>(p, m, n0, n1); break;
      case 7: f32_pass<3, 4, 3>(p, m, n0, n1); break;
      default: f32_pass<3, 4, 4>(p, m, n0, n1); break;
    }
  }
}
JAXINF_DEFINE_BLOCK(f32_i8_block2, f32_i8h_tile, JAXINF_AVX2, JAXINF_HALVES, 6)
JAXINF_DEFINE_BLOCK(q8_i8_block2, q8_i8h_tile, JAXINF_AVX2, JAXINF_HALVES, 6)
JAXINF_DEFINE_BLOCK(f32_i4_block2, f32_i4h_tile, JAXINF_AVX2, JAXINF_HALVES, 6)
JAXINF_DEFINE_BLOCK(q8_i4_block2, q8_i4h_tile, JAXINF_AVX2, JAXINF_HALVES, 6)
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

bool has_avx2() {
#if JAXINF_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// `path`: 0 the fastest this CPU runs, 1 scalar, 2 AVX2, 3 AVX-512 (the tests' switch).
enum Path : int32_t { kBest = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

bool runs_avx512(bool act_int8) { return act_int8 ? has_vnni() : has_avx512(); }

// Whether this CPU runs `path` for a problem with (act_int8) or without int8 activations.
bool path_available(int32_t path, bool act_int8) {
  switch (path) {
    case kBest:
    case kScalar: return true;
    case kAvx2: return has_avx2();
    case kAvx512: return runs_avx512(act_int8);
    default: return false;
  }
}

// The block function for this problem and path (an available one).
BlockFn pick(const Problem& p, int32_t path) {
  if (path == kScalar) return scalar_block;
#if JAXINF_X86
  const bool whole_steps = p.f32w || p.G == 1 || p.gs % p.kstep == 0;
  if (!whole_steps) return scalar_block;
  if (path == kAvx512 || (path == kBest && runs_avx512(p.act_int8))) {
    if (p.act_int8) return p.int4 ? q8_i4_block : q8_i8_block;
    if (p.f32w) return f32_f32_block;
    return p.int4 ? f32_i4_block : f32_i8_block;
  }
  if (path == kAvx2 || (path == kBest && has_avx2())) {
    if (p.act_int8) return p.int4 ? q8_i4_block2 : q8_i8_block2;
    if (p.f32w) return f32_f32_block2;
    return p.int4 ? f32_i4_block2 : f32_i8_block2;
  }
#endif
  return scalar_block;
}

// ---- threads ----------------------------------------------------------------------------------

// One call's products: up to kMaxProducts weights that share x (a fused projection such as q, k
// and v), cut into column blocks numbered across the products, so that every thread streams
// weights until the last block of the last product is taken.
constexpr int kMaxProducts = 8;

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t blocks = 0, block_cols = 0;
  int count = 0;
  Problem p[kMaxProducts];
  BlockFn fn[kMaxProducts] = {};
  int64_t first[kMaxProducts + 1] = {};  // product i has blocks [first[i], first[i + 1])

  // Takes blocks until none is left; returns when this thread has no more to do.
  void work() {
    for (;;) {
      const int64_t b = next.fetch_add(1, std::memory_order_relaxed);
      if (b >= blocks) return;
      int i = 0;
      while (b >= first[i + 1]) ++i;
      const int64_t n0 = (b - first[i]) * block_cols, n1 = std::min(p[i].N, n0 + block_cols);
      fn[i](p[i], n0, n1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void run_blocks(const Problem* ps, const BlockFn* fns, int count, ffi::ThreadPool& pool) {
  // Every product is shared, small ones included: on a 2-core AMD EPYC (Zen 3) the 12.7M
  // transformer decoded 1.3-1.9x slower with products below 150 kB (or all) on the calling thread
  // alone, although a lone 384 x 384 int4 product ran 2x faster that way (7 against 15 us): a
  // helper that is kept busy stays awake, and waking it costs more than its share of the work.
  // Own helper threads spinning between calls (as llama.cpp's OpenMP threads do) were slower
  // still there: 378-403 against 498-675 tok/s for the fp32-ffi 12.7M model at batch 1.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += ps[i].N;
  // about 4 blocks per thread (balance), a multiple of 64 columns each: whole panels of 16, and
  // whole tiles of 4 panels where a tile takes 4 (one row: a tail tile of one panel would be a
  // single chain of dependent FMAs)
  int64_t block_cols = std::max<int64_t>(64, (total + 4 * threads - 1) / (4 * threads));
  block_cols = (block_cols + 63) / 64 * 64;
  auto shared = std::make_shared<Shared>();
  shared->count = count;
  shared->block_cols = block_cols;
  for (int i = 0; i < count; ++i) {
    shared->p[i] = ps[i];
    shared->fn[i] = fns[i];
    shared->first[i + 1] = shared->first[i] + (ps[i].N + block_cols - 1) / block_cols;
  }
  const int64_t blocks = shared->blocks = shared->first[count];
  if (threads == 1 || blocks == 1) {
    for (int i = 0; i < count; ++i) fns[i](ps[i], 0, ps[i].N);
    return;
  }
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

// Reads one product's operands into `p` (x, its shape and the attributes are the call's); checks
// shapes, kinds and the path.
ffi::Error setup(Problem& p, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::AnyBuffer scale,
                 ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t k_attr, int64_t group_size,
                 int32_t act_int8, int32_t path) {
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
    return ffi::Error::InvalidArgument("lowbit_matmul: w must be int8 (int8 code panels), uint8 "
                                       "(int4 code panels) or float32 (fp32 weights)");
  }
  if (f32w && act_int8 != 0)
    return ffi::Error::InvalidArgument("lowbit_matmul: fp32 weights take fp32 activations");
  if (scale.element_type() != ffi::DataType::F32 && scale.element_type() != ffi::DataType::F16)
    return ffi::Error::InvalidArgument("lowbit_matmul: scale must be float32 or float16");
  p = Problem{};
  p.scale_f16 = scale.element_type() == ffi::DataType::F16;
  p.M = xd[0];
  p.K = xd[1];
  p.G = sd[0];
  p.gs = group_size;
  p.int4 = int4;
  p.f32w = f32w;
  p.act_int8 = act_int8 != 0;
  p.kstep = int4 ? 8 : 4;
  p.KS = (p.K + p.kstep - 1) / p.kstep;
  p.KB = f32w ? p.K : 4 * p.KS;
  p.N = sd[1];  // the panels' rows are the columns padded to a multiple of 16
  const int64_t rows = (p.N + 15) / 16 * 16;
  if (p.K != k_attr || wd[0] != rows || wd[1] != p.KB || sd[1] != p.N || yd[0] != p.M ||
      yd[1] != p.N)
    return ffi::Error::InvalidArgument("lowbit_matmul: operand shapes do not agree");
  if (ffi::Error e = check_common(p.M, p.K, p.N, p.G, p.gs); e.failure()) return e;
  if (f32w && p.G != 1)
    return ffi::Error::InvalidArgument("lowbit_matmul: fp32 weights take one group (ones)");
  if (!path_available(path, p.act_int8))
    return ffi::Error::InvalidArgument("lowbit_matmul: this CPU does not run the requested path");
  p.x = x.typed_data();
  p.w = w.untyped_data();
  p.scale = scale.untyped_data();
  p.y = y->typed_data();
  return ffi::Error::Success();
}

// Runs products that share x and the kind of weight (checked by the callers): the activation
// scratch (padded or quantized x) is built once for all of them.
void run_products(Problem* ps, int count, int32_t path, ffi::ThreadPool& pool) {
  if (ps[0].M == 0) return;
  std::vector<float> xa, sx;
  std::vector<int8_t> qx;
  std::vector<int32_t> sumx;
  Problem& p = ps[0];
  if (p.act_int8) {
    quantize_rows(p, qx, p.qx_row, sx, sumx);
    p.qx = qx.data();
    p.sx = sx.data();
    p.sumx = sumx.data();
  } else if (!p.f32w) {
    build_xa(p, xa, p.xa_row);
    p.xa = xa.data();
  }
  BlockFn fns[kMaxProducts];
  for (int i = 0; i < count; ++i) {
    ps[i].xa = p.xa;
    ps[i].xa_row = p.xa_row;
    ps[i].qx = p.qx;
    ps[i].qx_row = p.qx_row;
    ps[i].sx = p.sx;
    ps[i].sumx = p.sumx;
    fns[i] = pick(ps[i], path);
  }
  run_blocks(ps, fns, count, pool);
}

ffi::Error Impl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::AnyBuffer scale,
                ffi::ResultBuffer<ffi::F32> y, int64_t k_attr, int64_t group_size,
                int32_t act_int8, int32_t path, ffi::ThreadPool pool) {
  Problem p;
  if (ffi::Error e = setup(p, x, w, scale, y, k_attr, group_size, act_int8, path); e.failure())
    return e;
  run_products(&p, 1, path, pool);
  return ffi::Error::Success();
}

// x @ W_i for several weights W_i (arguments w_0, scale_0, w_1, scale_1, ...; results y_i) of
// one kind (element type, K, group size): one call instead of one per weight, so the threads
// are handed work once and the activations are prepared once.
ffi::Error ImplMany(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                    int64_t k_attr, int64_t group_size, int32_t act_int8, int32_t path,
                    ffi::ThreadPool pool) {
  const size_t count = rets.size();
  if (count < 1 || count > static_cast<size_t>(kMaxProducts) || args.size() != 2 * count)
    return ffi::Error::InvalidArgument("lowbit_matmul_many: expected 1 to 8 (w, scale) pairs "
                                       "and as many results");
  Problem ps[kMaxProducts];
  for (size_t i = 0; i < count; ++i) {
    auto w = args.get<ffi::AnyBuffer>(2 * i);
    auto scale = args.get<ffi::AnyBuffer>(2 * i + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error() || scale.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("lowbit_matmul_many: bad operand types");
    if (ffi::Error e = setup(ps[i], x, *w, *scale, *y, k_attr, group_size, act_int8, path);
        e.failure())
      return e;
    if (ps[i].int4 != ps[0].int4 || ps[i].f32w != ps[0].f32w || ps[i].G != ps[0].G)
      return ffi::Error::InvalidArgument("lowbit_matmul_many: the weights differ in kind or groups");
  }
  run_products(ps, static_cast<int>(count), path, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinfLowbitMatmul, Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int32_t>("act_int8")
                                  .Attr<int32_t>("path")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinfLowbitMatmulMany, ImplMany,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int32_t>("act_int8")
                                  .Attr<int32_t>("path")
                                  .Ctx<ffi::ThreadPool>());

// The path a problem of this kind takes on this CPU: 0 scalar, 1 AVX-512, 2 AVX-512 VNNI, 3 AVX2.
extern "C" __attribute__((visibility("default"))) int jaxinf_lowbit_isa(int act_int8) {
  if (runs_avx512(act_int8 != 0)) return act_int8 ? 2 : 1;
  return has_avx2() ? 3 : 0;
}

// Whether this CPU runs `path` (as the FFI attribute: 1 scalar, 2 AVX2, 3 AVX-512).
extern "C" __attribute__((visibility("default"))) int jaxinf_lowbit_has(int path, int act_int8) {
  return path_available(path, act_int8 != 0) ? 1 : 0;
}

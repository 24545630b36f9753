// IEEE binary16 -> float for the scalar paths of this folder's kernels (exact: every half is a
// float). The vector paths convert with vcvtph2ps (F16C / AVX-512F).
#ifndef JAXINF_QUANT_CSRC_HALF_H_
#define JAXINF_QUANT_CSRC_HALF_H_

#include <cstdint>
#include <cstring>

namespace jaxinf {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man x 2^-24
    const float f = static_cast<float>(man) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace jaxinf

#endif  // JAXINF_QUANT_CSRC_HALF_H_

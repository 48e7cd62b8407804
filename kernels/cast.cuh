// fp32 <-> bf16 / fp16 conversions, written once for the CPU (g++) and CUDA (nvcc) on raw bits.
//
// defines: Bf16Bits, F16Bits, FloatToBf16, Bf16ToFloat, FloatToF16, F16ToFloat
//
// Rounding is to nearest, ties to even (IEEE 754's default and what cuda_bf16.h / cuda_fp16.h's __float2bfloat16
// and __float2half do), on bit patterns only, so both compilers produce identical bits without depending on
// either one's half-precision types. NaN stays NaN (quiet, sign kept); overflow rounds to infinity; fp16
// subnormals are produced and consumed exactly.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/optimizer.cuh"  // ZERO_HD

namespace zero::kernels {

using Bf16Bits = uint16_t;
using F16Bits = uint16_t;

ZERO_HD uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

ZERO_HD float BitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

ZERO_HD Bf16Bits FloatToBf16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<Bf16Bits>((u >> 16) | 0x0040u);  // quiet NaN
  // Add just under half an ulp of bf16, plus the lowest kept bit, so that exact ties go to the even value.
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<Bf16Bits>(rounded >> 16);
}

ZERO_HD float Bf16ToFloat(Bf16Bits b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

ZERO_HD F16Bits FloatToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<F16Bits>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN
  if (abs >= 0x477ff000u) return static_cast<F16Bits>(sign | 0x7c00u);  // rounds to >= 65520: infinity
  const int32_t exp = static_cast<int32_t>(abs >> 23) - 127;          // unbiased fp32 exponent
  uint32_t mant = (abs & 0x7fffffu) | 0x800000u;                       // 24 significant bits
  int32_t shift;                                                       // bits to drop from mant
  uint32_t half_exp;                                                   // fp16 biased exponent before rounding
  if (exp >= -14) {  // normal fp16
    shift = 13;
    half_exp = static_cast<uint32_t>(exp + 15);
  } else {  // subnormal fp16 (or zero): the value is mant * 2^(exp-23), fp16 subnormals are k * 2^-24
    shift = -1 - exp;  // 13 + (-14 - exp)
    half_exp = 0;
    if (shift > 24) return static_cast<F16Bits>(sign);  // below half the smallest subnormal (and zero): +-0
  }
  const uint32_t kept = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  uint32_t q = kept;
  if (rest > halfway || (rest == halfway && (kept & 1u))) ++q;
  // Normal: q has the implicit bit at 2^10; carry out of the mantissa bumps the exponent, as the encoding
  // (half_exp << 10) + (q - 2^10) does naturally. Subnormal: q may reach 2^10, which encodes the smallest normal.
  const uint32_t bits = half_exp == 0 ? q : (half_exp << 10) + (q - 0x400u);
  return static_cast<F16Bits>(sign | bits);
}

ZERO_HD float F16ToFloat(F16Bits h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return BitsFloat(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  // Subnormal (or zero): mant * 2^-24, exact in fp32.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

}  // namespace zero::kernels

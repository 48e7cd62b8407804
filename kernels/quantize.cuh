// Blockwise symmetric quantization for ZeRO++'s collectives (qwZ: parameters in 8 bits; qgZ: gradients in 8 or 4
// bits), written once for the CPU (g++) and CUDA (nvcc).
//
// defines: kQuantBlock, QuantElem, QuantMax, QuantBlocks, QuantCodeBytes, QuantPayloadBytes, LoadAsFloat,
//          StoreFromFloat, QuantScale, QuantEncode, QuantEncodePair, QuantDecode
//
// A payload holds n elements as ceil(n / kQuantBlock) fp32 scales followed by the codes, padded to a multiple of 4
// bytes (so that payloads laid end to end keep their scales aligned):
//   scale[b] = max |x| over block b / qmax   (qmax = 127 for 8 bits, 7 for 4 bits; NaN if the block holds an inf
//                                             or NaN, so that an overflow reaches the loss scaler after dequantizing)
//   code[i]  = x[i] / scale[b] rounded to nearest, ties to even, clamped to [-qmax, qmax]; 0 when scale is 0 or NaN
//   8 bits: one signed byte per element; 4 bits: two elements per byte, element 2j in the low nibble (two's
//   complement nibbles)
//   dequantized: code * scale   (NaN for a block that held a non-finite value)
// Blocks are 256 elements with an fp32 scale each: 1/64 byte of overhead per element (ZeRO++ uses groups of a
// similar size); a block's scale adapts to its largest value, so a few large values cost precision only nearby.
//
// Error of one round trip, per element of block b, with A = max |x| over the block (fp32 arithmetic included):
//   |dequantized - x| <= A / (2 * qmax) + A * 2^-22 + 2^-140
// (half a quantization step; the division, the rounding of the scale and the product each cost an fp32 ulp; the
// absolute term covers blocks so small that the scale is an fp32 subnormal). The CPU and CUDA instantiations give
// the same bits: every element's code depends only on its value and its block's maximum, which is exact in any
// order, and the build disables FMA contraction.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cast.cuh"
#include "kernels/optimizer.cuh"  // ZERO_HD

namespace zero::kernels {

inline constexpr int64_t kQuantBlock = 256;

// The element type of quantized data before and after (what the caller's buffers hold).
enum class QuantElem : int { kF32, kBf16, kF16 };

ZERO_HD int QuantMax(int bits) { return bits == 4 ? 7 : 127; }
ZERO_HD int64_t QuantBlocks(int64_t n) { return (n + kQuantBlock - 1) / kQuantBlock; }
ZERO_HD int64_t QuantCodeBytes(int64_t n, int bits) { return (n * bits + 7) / 8; }
// Bytes of the payload of n elements: the scales, then the codes rounded up to 4 bytes.
ZERO_HD int64_t QuantPayloadBytes(int64_t n, int bits) {
  return 4 * QuantBlocks(n) + (QuantCodeBytes(n, bits) + 3) / 4 * 4;
}

ZERO_HD float LoadAsFloat(const void* p, int64_t i, QuantElem kind) {
  switch (kind) {
    case QuantElem::kBf16: return Bf16ToFloat(static_cast<const uint16_t*>(p)[i]);
    case QuantElem::kF16: return F16ToFloat(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

ZERO_HD void StoreFromFloat(void* p, int64_t i, float v, QuantElem kind) {
  switch (kind) {
    case QuantElem::kBf16: static_cast<uint16_t*>(p)[i] = FloatToBf16(v); break;
    case QuantElem::kF16: static_cast<uint16_t*>(p)[i] = FloatToF16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// x - x is 0 for finite x and NaN for inf and NaN: no <cmath> classification needed on either compiler.
ZERO_HD bool QuantFinite(float x) { return x - x == 0.0f; }

// A block's scale from its largest finite magnitude and whether every value was finite.
ZERO_HD float QuantScale(float amax, bool all_finite, int bits) {
  if (!all_finite) return BitsFloat(0x7fc00000u);  // quiet NaN
  return amax / static_cast<float>(QuantMax(bits));
}

ZERO_HD int QuantEncode(float x, float scale, int bits) {
  if (!(scale > 0.0f)) return 0;  // an all-zero block, or a non-finite one (NaN scale)
  const float qmax = static_cast<float>(QuantMax(bits));
  float y = rintf(x / scale);  // to nearest, ties to even (the default rounding mode on both compilers)
  y = y > qmax ? qmax : (y < -qmax ? -qmax : y);
  return static_cast<int>(y);
}

// Writes the codes of elements i0 and i0 + 1 (i0 even; `has_second` false past the end, whose code is then 0):
// two bytes for 8 bits, one byte for 4. A pair never straddles a block (kQuantBlock is even) nor, for 4 bits, a
// byte, so threads that own different pairs never write the same byte.
ZERO_HD void QuantEncodePair(int q0, int q1, bool has_second, int bits, uint8_t* codes, int64_t i0) {
  if (bits == 4) {
    codes[i0 / 2] = static_cast<uint8_t>((static_cast<unsigned>(q0) & 0xFu) | ((static_cast<unsigned>(q1) & 0xFu) << 4));
  } else {
    codes[i0] = static_cast<uint8_t>(static_cast<int8_t>(q0));
    if (has_second) codes[i0 + 1] = static_cast<uint8_t>(static_cast<int8_t>(q1));
  }
}

// The dequantized element i of a payload (codes, scales) in fp32.
ZERO_HD float QuantDecode(const uint8_t* codes, const float* scales, int64_t i, int bits) {
  int q;
  if (bits == 4) {
    const unsigned nibble = (i % 2 == 0 ? codes[i / 2] : codes[i / 2] >> 4) & 0xFu;
    q = nibble >= 8 ? static_cast<int>(nibble) - 16 : static_cast<int>(nibble);
  } else {
    q = static_cast<int8_t>(codes[i]);
  }
  return static_cast<float>(q) * scales[i / kQuantBlock];
}

}  // namespace zero::kernels

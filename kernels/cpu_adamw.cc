// CPU AdamW step (cpu_adamw.h) with Google Highway: the per-element code below is compiled once per SIMD
// target (hwy/foreach_target.h includes this file again for each), and AdamWStepCpu picks the best target the
// CPU supports at run time.
//
// Why it is bitwise equal to the scalar functor: the vector body is AdamWElement's expression tree written
// with Highway's Mul/Add/Sub/Div/Sqrt in the same order (IEEE single precision, round to nearest even, no FMA:
// the build passes -ffp-contract=off, and no MulAdd or approximate reciprocal is used), lanes are independent,
// and the heads and tails that do not fill a vector run the functor itself. The copy's conversions are exact
// integer re-statements of cast.cuh (or F16C's vcvtps2ph, which rounds to nearest even the same way).
//
// Why it is fast: it is one pass (28 B/param for fp32 master/m/v in place and an fp32 gradient, +2 per param
// for a 16-bit copy), so memory bandwidth bounds it; two vectors per iteration so a 16-bit copy fills one full
// vector, which is streamed (non-temporal, no read-for-ownership of lines this pass never reads).

// The shared part, compiled once (guarded: this file is included once per target).
#ifndef ZERO_KERNELS_CPU_ADAMW_SHARED_
#define ZERO_KERNELS_CPU_ADAMW_SHARED_

#include "kernels/cpu_adamw.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cast.cuh"

namespace zero::kernels::adamw_detail {

enum class CopyKind : uint8_t { kNone, kF32, kBF16, kF16 };

struct Args {
  AdamWCoeffs c;
  float* master;
  float* m;
  float* v;
  const void* grad;
  DType grad_dtype;
  void* copy;
  CopyKind copy_kind;
};

template <DType G>
inline float GradAt(const void* grad, int64_t i) {
  if constexpr (G == DType::kF32) {
    return static_cast<const float*>(grad)[i];
  } else if constexpr (G == DType::kBF16) {
    return Bf16ToFloat(static_cast<const Bf16Bits*>(grad)[i]);
  } else {
    return F16ToFloat(static_cast<const F16Bits*>(grad)[i]);
  }
}

// The reference semantics, element by element: heads and tails run exactly this.
template <DType G, CopyKind C>
inline void ScalarRange(const Args& a, int64_t i, int64_t end) {
  const AdamWElement f{a.c};
  for (; i < end; ++i) {
    f(a.master[i], a.m[i], a.v[i], GradAt<G>(a.grad, i));
    if constexpr (C == CopyKind::kF32) {
      static_cast<float*>(a.copy)[i] = a.master[i];
    } else if constexpr (C == CopyKind::kBF16) {
      static_cast<Bf16Bits*>(a.copy)[i] = FloatToBf16(a.master[i]);
    } else if constexpr (C == CopyKind::kF16) {
      static_cast<F16Bits*>(a.copy)[i] = FloatToF16(a.master[i]);
    }
  }
}

}  // namespace zero::kernels::adamw_detail

#endif  // ZERO_KERNELS_CPU_ADAMW_SHARED_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu_adamw.cc"
#include <hwy/cache_control.h>
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

// F16C (vcvtph2ps, and vcvtps2ph with an explicit round-to-nearest-even immediate) is part of Highway's AVX2 and
// AVX-512 targets. Highway 1.0.3's f16 conversions for the other targets truncate and turn inf/NaN into finite
// numbers, so those use the integer versions below.
#undef ZERO_ADAMW_HW_F16
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && !defined(HWY_DISABLE_F16C)
#define ZERO_ADAMW_HW_F16 1
#else
#define ZERO_ADAMW_HW_F16 0
#endif

HWY_BEFORE_NAMESPACE();
namespace zero::kernels::adamw_detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Highway's HWY_SCALAR target (the fallback below SSSE3 when, as with GCC < 12.3, its EMU128 is unavailable)
// has one-lane vectors only: there the functor's own loop is the kernel.
#if HWY_TARGET != HWY_SCALAR
using DF = hn::ScalableTag<float>;
using DU32 = hn::RebindToUnsigned<DF>;
using DI32 = hn::RebindToSigned<DF>;
using DU16 = hn::Repartition<uint16_t, DF>;  // a full vector of 16-bit lanes (twice DF's lane count)
using DU16H = hn::Rebind<uint16_t, DF>;      // DF's lane count of 16-bit lanes (half a vector)
using VF = hn::Vec<DF>;
using VU32 = hn::Vec<DU32>;
using VU16 = hn::Vec<DU16>;

struct VecCoeffs {
  explicit VecCoeffs(const AdamWCoeffs& c)
      : decay(hn::Set(DF(), c.decay)),
        one_minus_b1(hn::Set(DF(), c.one_minus_b1)),
        beta2(hn::Set(DF(), c.beta2)),
        one_minus_b2(hn::Set(DF(), c.one_minus_b2)),
        neg_step_size(hn::Set(DF(), c.neg_step_size)),
        bc2_sqrt(hn::Set(DF(), c.bc2_sqrt)),
        eps(hn::Set(DF(), c.eps)),
        grad_scale(hn::Set(DF(), c.grad_scale)) {}
  VF decay, one_minus_b1, beta2, one_minus_b2, neg_step_size, bc2_sqrt, eps, grad_scale;
};

// AdamWElement::operator(), lane-wise, same operations in the same order.
HWY_INLINE void Update(const VecCoeffs& k, VF& p, VF& m, VF& v, VF raw_grad) {
  const VF g = hn::Mul(raw_grad, k.grad_scale);
  p = hn::Mul(p, k.decay);
  m = hn::Add(m, hn::Mul(k.one_minus_b1, hn::Sub(g, m)));
  v = hn::Add(hn::Mul(v, k.beta2), hn::Mul(hn::Mul(k.one_minus_b2, g), g));
  const VF denom = hn::Add(hn::Div(hn::Sqrt(v), k.bc2_sqrt), k.eps);
  p = hn::Add(p, hn::Mul(k.neg_step_size, hn::Div(m, denom)));
}

// ---- Conversions, each equal to its cast.cuh counterpart for every input.

// F16ToFloat on 16-bit patterns held in 32-bit lanes.
HWY_INLINE VF F16BitsToFloat(VU32 h) {
  const DF df;
  const DU32 du;
  const DI32 di;
  const VU32 sign = hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000u)));
  const VU32 exp = hn::And(hn::ShiftRight<10>(h), hn::Set(du, 0x1fu));
  const VU32 mant = hn::And(h, hn::Set(du, 0x3ffu));
  const VU32 mant_bits = hn::ShiftLeft<13>(mant);
  const VU32 normal = hn::Or(hn::ShiftLeft<23>(hn::Add(exp, hn::Set(du, 112u))), mant_bits);
  const VU32 inf_nan = hn::Or(hn::Set(du, 0x7f800000u), mant_bits);
  // Subnormal or zero: mant * 2^-24, exact in fp32.
  const VU32 subnormal =
      hn::BitCast(du, hn::Mul(hn::ConvertTo(df, hn::BitCast(di, mant)), hn::Set(df, 5.9604644775390625e-08f)));
  VU32 bits = hn::IfThenElse(hn::Eq(exp, hn::Set(du, 0x1fu)), inf_nan, normal);
  bits = hn::IfThenElse(hn::Eq(exp, hn::Zero(du)), subnormal, bits);
  return hn::BitCast(df, hn::Or(bits, sign));
}

// FloatToF16, result in the low 16 bits of 32-bit lanes.
HWY_INLINE VU32 FloatToF16Bits(VF f) {
  const DF df;
  const DU32 du;
  const DI32 di;
  const VU32 u = hn::BitCast(du, f);
  const VU32 abs = hn::And(u, hn::Set(du, 0x7fffffffu));
  const VU32 sign = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 0x8000u));
  // Normal result (|f| >= 2^-14): rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest
  // even; a carry out of the mantissa bumps the exponent, which is the right encoding.
  const VU32 lsb = hn::And(hn::ShiftRight<13>(abs), hn::Set(du, 1u));
  const VU32 normal =
      hn::ShiftRight<13>(hn::Add(hn::Sub(abs, hn::Set(du, 0x38000000u)), hn::Add(hn::Set(du, 0xfffu), lsb)));
  // Subnormal result (|f| < 2^-14): in 0.5 + |f| the float's ulp is 2^-24, fp16's subnormal step, so the
  // addition itself rounds to nearest even, and the bits above 0.5's are the encoding (2^10: the smallest normal).
  const VU32 subnormal =
      hn::Sub(hn::BitCast(du, hn::Add(hn::BitCast(df, abs), hn::Set(df, 0.5f))), hn::Set(du, 0x3f000000u));
  const hn::Vec<DI32> abs_i = hn::BitCast(di, abs);  // <= 0x7fffffff: signed compares are exact
  VU32 bits = hn::IfThenElse(hn::RebindMask(du, hn::Lt(abs_i, hn::Set(di, 0x38800000))), subnormal, normal);
  // >= 65520 rounds to infinity (and infinity stays infinity).
  bits = hn::IfThenElse(hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x477fefff))), hn::Set(du, 0x7c00u), bits);
  const VU32 quiet_nan = hn::Or(hn::Set(du, 0x7e00u), hn::And(hn::ShiftRight<13>(abs), hn::Set(du, 0x3ffu)));
  bits = hn::IfThenElse(hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x7f800000))), quiet_nan, bits);
  return hn::Or(bits, sign);
}

// FloatToBf16 (Highway 1.0.3's DemoteTo truncates): add just under half a bf16 ulp plus the kept lsb, so exact
// ties go to even; NaN keeps its sign and top payload bits and is made quiet. (AVX512-BF16's vcvtneps2bf16 is
// not used: it flushes fp32 denormal inputs to zero, where cast.cuh keeps them, e.g. 0x007fffff -> 0x0080. These
// few integer operations cost nothing measurable in a pass bound by memory bandwidth.)
HWY_INLINE VU32 FloatToBf16Bits(VF f) {
  const DU32 du;
  const DI32 di;
  const VU32 u = hn::BitCast(du, f);
  const VU32 lsb = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1u));
  const VU32 rounded = hn::ShiftRight<16>(hn::Add(u, hn::Add(hn::Set(du, 0x7fffu), lsb)));
  const VU32 quiet_nan = hn::Or(hn::ShiftRight<16>(u), hn::Set(du, 0x0040u));
  const auto is_nan = hn::Gt(hn::BitCast(di, hn::And(u, hn::Set(du, 0x7fffffffu))), hn::Set(di, 0x7f800000));
  return hn::IfThenElse(hn::RebindMask(du, is_nan), quiet_nan, rounded);
}

template <DType G>
HWY_INLINE VF LoadGrad(const void* grad, int64_t i) {
  const DF df;
  if constexpr (G == DType::kF32) {
    return hn::LoadU(df, static_cast<const float*>(grad) + i);
  } else if constexpr (G == DType::kBF16) {
    const VU32 bits = hn::PromoteTo(DU32(), hn::LoadU(DU16H(), static_cast<const uint16_t*>(grad) + i));
    return hn::BitCast(df, hn::ShiftLeft<16>(bits));  // bf16 is the top half of an fp32: exact
  } else {
#if ZERO_ADAMW_HW_F16
    const hn::Rebind<hwy::float16_t, DF> df16;
    return hn::PromoteTo(df, hn::LoadU(df16, static_cast<const hwy::float16_t*>(grad) + i));
#else
    return F16BitsToFloat(hn::PromoteTo(DU32(), hn::LoadU(DU16H(), static_cast<const uint16_t*>(grad) + i)));
#endif
  }
}

// The 16-bit copy of two vectors, lo's lanes first: one full vector.
template <CopyKind C>
HWY_INLINE VU16 CopyBits(VF lo, VF hi) {
  const DU16 du16;
  if constexpr (C == CopyKind::kF16 && ZERO_ADAMW_HW_F16) {
    const hn::Rebind<hwy::float16_t, DF> df16;
    const DU16H du16h;
    return hn::Combine(du16, hn::BitCast(du16h, hn::DemoteTo(df16, hi)), hn::BitCast(du16h, hn::DemoteTo(df16, lo)));
  } else {
    const VU32 lo_bits = C == CopyKind::kBF16 ? FloatToBf16Bits(lo) : FloatToF16Bits(lo);
    const VU32 hi_bits = C == CopyKind::kBF16 ? FloatToBf16Bits(hi) : FloatToF16Bits(hi);
    // The values sit in the low (even, little-endian) halves of the 32-bit lanes.
    return hn::ConcatEven(du16, hn::BitCast(du16, hi_bits), hn::BitCast(du16, lo_bits));
  }
}

// Whole pairs of vectors from i; returns where it stopped. kStream: the copy at i is vector-aligned.
template <DType G, CopyKind C, bool kStream>
HWY_INLINE int64_t VectorLoop(const Args& a, int64_t i, int64_t end) {
  const DF df;
  const DU16 du16;
  const int64_t n = static_cast<int64_t>(hn::Lanes(df));
  const VecCoeffs k(a.c);
  for (; i + 2 * n <= end; i += 2 * n) {
    VF p0 = hn::LoadU(df, a.master + i), p1 = hn::LoadU(df, a.master + i + n);
    VF m0 = hn::LoadU(df, a.m + i), m1 = hn::LoadU(df, a.m + i + n);
    VF v0 = hn::LoadU(df, a.v + i), v1 = hn::LoadU(df, a.v + i + n);
    Update(k, p0, m0, v0, LoadGrad<G>(a.grad, i));
    Update(k, p1, m1, v1, LoadGrad<G>(a.grad, i + n));
    hn::StoreU(p0, df, a.master + i);
    hn::StoreU(p1, df, a.master + i + n);
    hn::StoreU(m0, df, a.m + i);
    hn::StoreU(m1, df, a.m + i + n);
    hn::StoreU(v0, df, a.v + i);
    hn::StoreU(v1, df, a.v + i + n);
    if constexpr (C == CopyKind::kF32) {
      float* copy = static_cast<float*>(a.copy) + i;
      if constexpr (kStream) {
        hn::Stream(p0, df, copy);
        hn::Stream(p1, df, copy + n);
      } else {
        hn::StoreU(p0, df, copy);
        hn::StoreU(p1, df, copy + n);
      }
    } else if constexpr (C != CopyKind::kNone) {
      uint16_t* copy = static_cast<uint16_t*>(a.copy) + i;
      const VU16 bits = CopyBits<C>(p0, p1);
      if constexpr (kStream) {
        hn::Stream(bits, du16, copy);
      } else {
        hn::StoreU(bits, du16, copy);
      }
    }
  }
  return i;
}
#endif  // HWY_TARGET != HWY_SCALAR

template <DType G, CopyKind C>
void Range(const Args& a, int64_t begin, int64_t end) {
#if HWY_TARGET == HWY_SCALAR
  ScalarRange<G, C>(a, begin, end);
#else
  const int64_t vector_bytes = static_cast<int64_t>(hn::Lanes(DF()) * sizeof(float));
  // Peel scalar elements until the copy (the master when there is no copy) is vector-aligned: the copy can then
  // be streamed, and the loads and stores of master/m/v (usually aligned alike) do not split cache lines.
  const void* anchor = C == CopyKind::kNone ? static_cast<const void*>(a.master) : a.copy;
  const int64_t elem_bytes = C == CopyKind::kBF16 || C == CopyKind::kF16 ? 2 : 4;
  const auto addr = static_cast<int64_t>(reinterpret_cast<uintptr_t>(anchor) % static_cast<uintptr_t>(vector_bytes));
  const int64_t at_begin = (addr + begin * elem_bytes) % vector_bytes;
  int64_t i = begin;
  bool aligned = false;
  if (at_begin % elem_bytes == 0) {  // a misaligned element pointer can never be vector-aligned
    i = std::min(end, begin + (vector_bytes - at_begin) % vector_bytes / elem_bytes);
    ScalarRange<G, C>(a, begin, i);
    aligned = true;
  }
  i = aligned ? VectorLoop<G, C, C != CopyKind::kNone>(a, i, end) : VectorLoop<G, C, false>(a, i, end);
  ScalarRange<G, C>(a, i, end);
  // Streaming stores are weakly ordered: make them visible before the caller hands the copy on.
  if (C != CopyKind::kNone) hwy::FlushStream();
#endif
}

template <DType G>
void RangeForGrad(const Args& a, int64_t begin, int64_t end) {
  switch (a.copy_kind) {
    case CopyKind::kNone:
      return Range<G, CopyKind::kNone>(a, begin, end);
    case CopyKind::kF32:
      return Range<G, CopyKind::kF32>(a, begin, end);
    case CopyKind::kBF16:
      return Range<G, CopyKind::kBF16>(a, begin, end);
    case CopyKind::kF16:
      return Range<G, CopyKind::kF16>(a, begin, end);
  }
}

// The per-target entry points exported to the dispatch tables.
void AdamWRange(const Args& a, int64_t begin, int64_t end) {
  switch (a.grad_dtype) {
    case DType::kBF16:
      return RangeForGrad<DType::kBF16>(a, begin, end);
    case DType::kF16:
      return RangeForGrad<DType::kF16>(a, begin, end);
    default:
      return RangeForGrad<DType::kF32>(a, begin, end);
  }
}

const char* DispatchedTargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace zero::kernels::adamw_detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace zero::kernels {
namespace adamw_detail {

HWY_EXPORT(AdamWRange);
HWY_EXPORT(DispatchedTargetName);

// Below this many elements a parallel region costs more than it saves (as in cpu_kernels.cc).
constexpr int64_t kParallelMin = int64_t{1} << 16;
// Thread chunks start on multiples of this many elements past the aligned head: 128 B of a 16-bit copy,
// 256 B of fp32, so no two threads write the same cache line and every chunk starts vector-aligned.
constexpr int64_t kChunkAlign = 64;

bool ToCopyKind(const void* copy, DType dtype, CopyKind* kind) {
  if (copy == nullptr) {
    *kind = CopyKind::kNone;
    return true;
  }
  switch (dtype) {
    case DType::kF32:
      *kind = CopyKind::kF32;
      return true;
    case DType::kBF16:
      *kind = CopyKind::kBF16;
      return true;
    case DType::kF16:
      *kind = CopyKind::kF16;
      return true;
    default:
      return false;
  }
}

}  // namespace adamw_detail

bool AdamWStepCpu(const AdamWCoeffs& c, float* master, float* m, float* v, const void* grad, DType grad_dtype,
                  void* copy, DType copy_dtype, int64_t n, int threads) {
  using namespace adamw_detail;
  CopyKind copy_kind;
  if (!ToCopyKind(copy, copy_dtype, &copy_kind)) return false;
  if (grad_dtype != DType::kF32 && grad_dtype != DType::kBF16 && grad_dtype != DType::kF16) return false;
  if (n <= 0) return true;
  const Args a{c, master, m, v, grad, grad_dtype, copy, copy_kind};
  auto* range = &HWY_DYNAMIC_DISPATCH(AdamWRange);
  const int team = (n < kParallelMin || threads <= 1) ? 1 : threads;
  if (team == 1) {
    range(a, 0, n);
    return true;
  }
  // Chunk boundaries: after the head that aligns the anchor (the copy, else the master) to 64 B, multiples of
  // kChunkAlign elements. Any split gives the same bits; this one only keeps threads off each other's lines.
  const uintptr_t anchor = reinterpret_cast<uintptr_t>(copy != nullptr ? copy : master);
  const int64_t elem_bytes = copy_kind == CopyKind::kBF16 || copy_kind == CopyKind::kF16 ? 2 : 4;
  const int64_t misalign = static_cast<int64_t>(anchor % 64);
  const int64_t head = misalign % elem_bytes != 0 ? 0 : std::min(n, (64 - misalign) % 64 / elem_bytes);
  const auto boundary = [&](int k, int parts) -> int64_t {
    if (k == 0) return 0;
    if (k == parts) return n;
    const int64_t share = (n - head) * k / parts;
    return std::min(n, head + (share + kChunkAlign - 1) / kChunkAlign * kChunkAlign);
  };
#pragma omp parallel num_threads(team)
  {
    const int k = omp_get_thread_num();
    const int parts = omp_get_num_threads();
    range(a, boundary(k, parts), boundary(k + 1, parts));
  }
  return true;
}

const char* AdamWTargetName() { return HWY_DYNAMIC_DISPATCH(adamw_detail::DispatchedTargetName)(); }

std::vector<int64_t> AdamWTargets() {
  std::vector<int64_t> targets;
  // Lower bits are better targets.
  for (int64_t t = HWY_TARGETS & hwy::SupportedTargets(); t != 0; t &= t - 1) targets.push_back(t & -t);
  return targets;
}

void TEST_AdamWForceTarget(int64_t target) { hwy::SetSupportedTargetsForTest(target); }

}  // namespace zero::kernels
#endif  // HWY_ONCE

// The CPU instantiation of the written-once device math against plain scalar references.
//  * Casts: bit-exact against a reference that enumerates every finite bf16 / fp16 value (computed from the
//    bit fields with ldexp, not with the code under test) and picks the nearest, ties to even; fp16 is also
//    checked against the compiler's _Float16 where it has one. Every 16-bit pattern round-trips.
//  * AdamW and SGD: bitwise against a scalar float loop with the same operation order (for thread counts 1
//    and 2), and within 2e-6 relative of a double-precision evaluation of the same formula: one step of a
//    handful of float operations, each off by at most half an ulp (6e-8), with eps keeping denominators away
//    from zero, accumulates to a few 1e-7 at most.
//  * Sum of squares: within 1e-12 relative of a plain fp64 sum (both accumulate in fp64; only the order
//    differs), exact non-finite counts, and the same bits for any thread count; a batch of ranges bitwise equal
//    to the scalar blocked order per range.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu_kernels.h"
#include "testing/random.h"

namespace zero::kernels {
namespace {

using zero::testing::RandomFloats;

const int64_t kSizes[] = {0, 1, 7, 15, 17, 4096 + 3, (int64_t{1} << 20) + 5};

// Value of a finite 16-bit float from its fields: `mant_bits` mantissa bits, exponent bias `bias`.
double SmallFloatValue(uint16_t bits, int mant_bits, int bias) {
  const int exp = (bits >> mant_bits) & ((1 << (15 - mant_bits)) - 1);
  const int mant = bits & ((1 << mant_bits) - 1);
  if (exp == 0) return std::ldexp(static_cast<double>(mant), 1 - bias - mant_bits);
  return std::ldexp(static_cast<double>(mant + (1 << mant_bits)), exp - bias - mant_bits);
}

// Nearest-even rounding to a 16-bit format by search over its positive finite values (sorted by bits).
class NearestReference {
 public:
  NearestReference(int mant_bits, int bias) {
    const uint16_t inf = static_cast<uint16_t>(((1 << (15 - mant_bits)) - 1) << mant_bits);
    for (uint32_t b = 0; b < inf; ++b) values_.push_back(SmallFloatValue(static_cast<uint16_t>(b), mant_bits, bias));
    // The value the next encoding would have if the exponent went on: the overflow boundary's upper side.
    overflow_ = 2 * values_.back() - values_[values_.size() - 2];
    inf_ = inf;
  }
  uint16_t Round(float f) const {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double x = std::fabs(static_cast<double>(f));
    if (std::isinf(f)) return sign | inf_;
    const auto hi = std::lower_bound(values_.begin(), values_.end(), x);
    if (hi == values_.end()) {  // above the largest finite value
      const double lo = values_.back();
      const bool up = (x - lo) > (overflow_ - x) || ((x - lo) == (overflow_ - x) && (values_.size() - 1) % 2 == 1);
      return sign | (up ? inf_ : static_cast<uint16_t>(values_.size() - 1));
    }
    const size_t h = static_cast<size_t>(hi - values_.begin());
    if (*hi == x || h == 0) return sign | static_cast<uint16_t>(h);
    const double dlo = x - values_[h - 1], dhi = *hi - x;
    const size_t pick = dlo < dhi ? h - 1 : dhi < dlo ? h : ((h - 1) % 2 == 0 ? h - 1 : h);
    return sign | static_cast<uint16_t>(pick);
  }

 private:
  std::vector<double> values_;
  double overflow_ = 0;
  uint16_t inf_ = 0;
};

const NearestReference& Bf16Ref() {
  static const NearestReference r(7, 127);
  return r;
}
const NearestReference& F16Ref() {
  static const NearestReference r(10, 15);
  return r;
}

// Floats that exercise rounding: random bit patterns, exact ties and near-ties of both formats, subnormals,
// the overflow boundaries, zeros and infinities.
std::vector<float> AwkwardFloats() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, 65536.0f, 1e-8f, -3e-8f,
                          std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()};
  std::mt19937 rng(7);
  for (int i = 0; i < 1 << 18; ++i) v.push_back(std::bit_cast<float>(static_cast<uint32_t>(rng())));
  std::uniform_real_distribution<float> mag(-30.0f, 17.0f);
  for (int i = 0; i < 1 << 18; ++i) {
    const float x = std::exp2(mag(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
    v.push_back(x);
    const uint32_t u = std::bit_cast<uint32_t>(x);
    v.push_back(std::bit_cast<float>((u & 0xffff0000u) | 0x8000u));  // bf16 tie
    v.push_back(std::bit_cast<float>((u & 0xffffe000u) | 0x1000u));  // fp16 tie (normal range)
  }
  for (uint32_t k = 0; k < 2048; ++k) v.push_back(std::ldexp(static_cast<float>(k) + 0.5f, -24));  // fp16 subnormal ties
  std::erase_if(v, [](float f) { return std::isnan(f); });  // NaN payloads are checked separately
  return v;
}

TEST(CastTest, Bf16MatchesNearestEvenReference) {
  int checked = 0;
  for (float f : AwkwardFloats()) {
    ASSERT_EQ(FloatToBf16(f), Bf16Ref().Round(f)) << std::hexfloat << f;
    ++checked;
  }
  EXPECT_GT(checked, 700000);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::bit_cast<float>(0x7f800001u)))));  // signaling stays NaN
}

TEST(CastTest, F16MatchesNearestEvenReference) {
  for (float f : AwkwardFloats()) ASSERT_EQ(FloatToF16(f), F16Ref().Round(f)) << std::hexfloat << f;
  EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(std::bit_cast<float>(0x7f800001u)))));
}

#if defined(__FLT16_MAX__)
TEST(CastTest, F16MatchesCompilerFloat16) {
  for (float f : AwkwardFloats()) {
    const _Float16 h = static_cast<_Float16>(f);
    ASSERT_EQ(FloatToF16(f), std::bit_cast<uint16_t>(h)) << std::hexfloat << f;
  }
}
#endif

TEST(CastTest, EverySixteenBitPatternRoundTrips) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const auto bits = static_cast<uint16_t>(b);
    const float bf = Bf16ToFloat(bits), hf = F16ToFloat(bits);
    if (std::isnan(bf)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(bf))));
    } else {
      ASSERT_EQ(FloatToBf16(bf), bits);
      if ((b & 0x7fff) < 0x7f80) {
        ASSERT_EQ(static_cast<double>(std::fabs(bf)), SmallFloatValue(b & 0x7fff, 7, 127));
      }
    }
    if (std::isnan(hf)) {
      EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(hf))));
    } else {
      ASSERT_EQ(FloatToF16(hf), bits);
      if ((b & 0x7fff) < 0x7c00) {
        ASSERT_EQ(static_cast<double>(std::fabs(hf)), SmallFloatValue(b & 0x7fff, 10, 15));
      }
    }
  }
}

TEST(CastTest, CastCpuAppliesTheScalarFunctionsForEverySize) {
  for (int64_t n : kSizes) {
    const std::vector<float> src = RandomFloats(n, 3, -70000.0f, 70000.0f);
    std::vector<uint16_t> b(static_cast<size_t>(n)), h(static_cast<size_t>(n));
    std::vector<float> back(static_cast<size_t>(n)), copy(static_cast<size_t>(n));
    for (int threads : {1, 2}) {
      ASSERT_TRUE(CastCpu(src.data(), DType::kF32, b.data(), DType::kBF16, n, threads));
      ASSERT_TRUE(CastCpu(src.data(), DType::kF32, h.data(), DType::kF16, n, threads));
      ASSERT_TRUE(CastCpu(src.data(), DType::kF32, copy.data(), DType::kF32, n, threads));
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(b[i], FloatToBf16(src[i]));
        ASSERT_EQ(h[i], FloatToF16(src[i]));
        ASSERT_EQ(std::bit_cast<uint32_t>(copy[i]), std::bit_cast<uint32_t>(src[i]));
      }
      ASSERT_TRUE(CastCpu(b.data(), DType::kBF16, back.data(), DType::kF32, n, threads));
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(back[i], Bf16ToFloat(b[i]));
      ASSERT_TRUE(CastCpu(h.data(), DType::kF16, back.data(), DType::kF32, n, threads));
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(back[i], F16ToFloat(h[i]));
    }
  }
  uint16_t x = 0;
  EXPECT_FALSE(CastCpu(&x, DType::kBF16, &x, DType::kF16, 1, 1));  // not a supported pair
}

TEST(ElementwiseTest, ScaleAndAccumulateMatchScalarLoops) {
  for (int64_t n : kSizes) {
    std::vector<float> x = RandomFloats(n, 5, -3, 3), acc = RandomFloats(n, 6, -3, 3);
    std::vector<float> want_x = x, want_acc = acc;
    for (int64_t i = 0; i < n; ++i) {
      want_acc[i] = want_acc[i] + x[i];
      want_x[i] = want_x[i] * 0.37f;
    }
    AccumulateCpu(acc.data(), x.data(), n, 2);
    ScaleCpu(x.data(), 0.37f, n, 2);
    if (n == 0) continue;  // memcmp of empty vectors' null data() is undefined (UBSan)
    ASSERT_EQ(std::memcmp(acc.data(), want_acc.data(), acc.size() * sizeof(float)), 0) << n;
    ASSERT_EQ(std::memcmp(x.data(), want_x.data(), x.size() * sizeof(float)), 0) << n;
  }
}

TEST(SumSquaresTest, MatchesFp64SumCountsNonFiniteAndIgnoresThreads) {
  for (int64_t n : kSizes) {
    std::vector<float> x = RandomFloats(n, 9, -4, 4);
    if (n > 10) {
      x[3] = std::numeric_limits<float>::infinity();
      x[n - 2] = std::numeric_limits<float>::quiet_NaN();
    }
    double want = 0;
    int64_t bad = 0;
    for (float e : x) std::isfinite(e) ? void(want += static_cast<double>(e) * e) : void(++bad);
    const SumSquares one = SumSquaresCpu(x.data(), n, 1), two = SumSquaresCpu(x.data(), n, 2);
    EXPECT_NEAR(one.sum, want, 1e-12 * std::max(1.0, want)) << n;
    EXPECT_EQ(one.nonfinite, bad) << n;
    EXPECT_EQ(std::bit_cast<uint64_t>(one.sum), std::bit_cast<uint64_t>(two.sum)) << n;
    EXPECT_EQ(one.nonfinite, two.nonfinite);
    // bf16 / fp16 inputs: the sum of the widened values.
    std::vector<uint16_t> b(static_cast<size_t>(n)), h(static_cast<size_t>(n));
    ASSERT_TRUE(CastCpu(x.data(), DType::kF32, b.data(), DType::kBF16, n, 1));
    ASSERT_TRUE(CastCpu(x.data(), DType::kF32, h.data(), DType::kF16, n, 1));
    double want_b = 0, want_h = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float vb = Bf16ToFloat(b[i]), vh = F16ToFloat(h[i]);
      if (std::isfinite(vb)) want_b += static_cast<double>(vb) * vb;
      if (std::isfinite(vh)) want_h += static_cast<double>(vh) * vh;
    }
    const SumSquares sb = SumSquaresCpu(b.data(), DType::kBF16, n, 2), sh = SumSquaresCpu(h.data(), DType::kF16, n, 2);
    EXPECT_NEAR(sb.sum, want_b, 1e-12 * std::max(1.0, want_b));
    EXPECT_NEAR(sh.sum, want_h, 1e-12 * std::max(1.0, want_h));
    EXPECT_EQ(sb.nonfinite, bad);
    EXPECT_EQ(sh.nonfinite, bad);
  }
}

// The scalar definition of kernels/sum_squares.cuh's order, written out: fp64 per kSumBlock block in element
// order, then the blocks in order. (The order the engine's norm had before the batched kernels; every backend must
// keep these bits.)
SumSquares BlockedScalarSum(const std::vector<float>& widened, int64_t begin, int64_t n) {
  SumSquares want;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    double block = 0.0;
    for (int64_t i = b; i < std::min(n, b + kSumBlock); ++i) {
      const float e = widened[static_cast<size_t>(begin + i)];
      if (std::isfinite(e)) {
        block += static_cast<double>(e) * static_cast<double>(e);
      } else {
        ++want.nonfinite;
      }
    }
    want.sum += block;
  }
  return want;
}

// A batch of ranges of every awkward size (empty ones among them, block tails, a range spanning many blocks) in
// one buffer, in f32, bf16 and f16: each range's total equals the scalar blocked sum bit for bit, and the single-
// range call, for 1, 2 and 3 threads.
TEST(SumSquaresTest, BatchOfRangesEqualsBlockedScalarSumPerRange) {
  const std::vector<int64_t> sizes = {0, 1, 7, 4095, 4096, 4097, 0, 3 * 4096 + 5, (int64_t{1} << 18) + 3, 0, 64};
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  std::vector<float> x = RandomFloats(total, 21, -5, 5);
  x[3] = std::numeric_limits<float>::infinity();              // in range 2 (7 elements)
  x[static_cast<size_t>(total) - 2] = std::numeric_limits<float>::quiet_NaN();  // in the last range
  x[20000] = -std::numeric_limits<float>::infinity();         // in the range of 3 blocks and a tail
  for (const DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dt));
    std::vector<uint16_t> half(static_cast<size_t>(total));
    std::vector<float> widened = x;
    if (dt != DType::kF32) {
      ASSERT_TRUE(CastCpu(x.data(), DType::kF32, half.data(), dt, total, 1));
      for (int64_t i = 0; i < total; ++i) widened[i] = dt == DType::kBF16 ? Bf16ToFloat(half[i]) : F16ToFloat(half[i]);
    }
    const size_t elem = dt == DType::kF32 ? 4 : 2;
    const char* base = dt == DType::kF32 ? reinterpret_cast<const char*>(x.data())
                                         : reinterpret_cast<const char*>(half.data());
    std::vector<SumSquaresRange> ranges;
    int64_t at = 0;
    for (int64_t n : sizes) {
      ranges.push_back({base + at * static_cast<int64_t>(elem), n});
      at += n;
    }
    for (const int threads : {1, 2, 3}) {
      std::vector<SumSquares> got(sizes.size());
      ASSERT_TRUE(SumSquaresCpu(ranges.data(), static_cast<int64_t>(ranges.size()), dt, threads, got.data()));
      at = 0;
      for (size_t r = 0; r < sizes.size(); ++r) {
        const SumSquares want = BlockedScalarSum(widened, at, sizes[r]);
        const SumSquares one = SumSquaresCpu(ranges[r].x, dt, sizes[r], threads);
        EXPECT_EQ(std::bit_cast<uint64_t>(got[r].sum), std::bit_cast<uint64_t>(want.sum))
            << "range " << r << " threads " << threads << ": " << got[r].sum << " vs " << want.sum;
        EXPECT_EQ(got[r].nonfinite, want.nonfinite) << "range " << r;
        EXPECT_EQ(std::bit_cast<uint64_t>(one.sum), std::bit_cast<uint64_t>(want.sum)) << "range " << r;
        at += sizes[r];
      }
    }
    // An unsupported dtype writes nothing and says so.
    std::vector<SumSquares> untouched(1, SumSquares{7.0, 7});
    EXPECT_FALSE(SumSquaresCpu(ranges.data(), 1, DType::kF64, 1, untouched.data()));
    EXPECT_EQ(untouched[0].nonfinite, 7);
  }
  EXPECT_TRUE(SumSquaresCpu(nullptr, 0, DType::kF32, 2, nullptr));  // an empty batch is fine
}

struct OptState {
  std::vector<float> p, m, v, g;
};

OptState MakeState(int64_t n) {
  OptState s{RandomFloats(n, 11, -1, 1), RandomFloats(n, 12, -0.1f, 0.1f), RandomFloats(n, 13, 0.001f, 0.01f),
             RandomFloats(n, 14, -2, 2)};
  return s;
}

double RelErr(double got, double want) { return std::fabs(got - want) / std::max(1.0, std::fabs(want)); }

TEST(OptimizerKernelTest, AdamWMatchesScalarLoopAndDoubleFormula) {
  const double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-6, wd = 0.05, scale = 0.125;
  const int64_t t = 3;
  const AdamWCoeffs c = MakeAdamWCoeffs(lr, b1, b2, eps, wd, t, scale);
  for (int64_t n : kSizes) {
    const OptState init = MakeState(n);
    for (int threads : {1, 2}) {
      OptState s = init, want = init;
      AdamWCpu(c, s.p.data(), s.m.data(), s.v.data(), s.g.data(), n, threads);
      double worst = 0;
      for (int64_t i = 0; i < n; ++i) {
        // Scalar float loop, same operations in the same order: bitwise.
        float& p = want.p[i];
        float& m = want.m[i];
        float& v = want.v[i];
        const float g = init.g[i] * c.grad_scale;
        p = p * c.decay;
        m = m + c.one_minus_b1 * (g - m);
        v = v * c.beta2 + (c.one_minus_b2 * g) * g;
        p = p + c.neg_step_size * (m / (std::sqrt(v) / c.bc2_sqrt + c.eps));
        // The formula in double.
        const double gd = static_cast<double>(init.g[i]) * scale;
        const double md = b1 * init.m[i] + (1 - b1) * gd;
        const double vd = b2 * init.v[i] + (1 - b2) * gd * gd;
        double pd = init.p[i] * (1 - lr * wd);
        pd -= lr / (1 - std::pow(b1, t)) * md / (std::sqrt(vd) / std::sqrt(1 - std::pow(b2, t)) + eps);
        worst = std::max({worst, RelErr(s.p[i], pd), RelErr(s.m[i], md), RelErr(s.v[i], vd)});
      }
      if (n == 0) continue;  // memcmp of empty vectors' null data() is undefined (UBSan)
      ASSERT_EQ(std::memcmp(s.p.data(), want.p.data(), s.p.size() * 4), 0) << n;
      ASSERT_EQ(std::memcmp(s.m.data(), want.m.data(), s.m.size() * 4), 0) << n;
      ASSERT_EQ(std::memcmp(s.v.data(), want.v.data(), s.v.size() * 4), 0) << n;
      EXPECT_LE(worst, 2e-6) << "n " << n;
    }
  }
}

TEST(OptimizerKernelTest, SgdMatchesDoubleFormulaIncludingFirstStepAndNesterov) {
  const double lr = 0.1, mom = 0.9, damp = 0.1, wd = 0.01, scale = 0.5;
  for (bool first : {true, false}) {
    for (bool nesterov : {false, true}) {
      const double d = nesterov ? 0.0 : damp;  // torch requires dampening 0 with Nesterov
      const SgdCoeffs c = MakeSgdCoeffs(lr, mom, d, wd, nesterov, first, scale);
      for (int64_t n : kSizes) {
        const OptState init = MakeState(n);
        OptState s = init;
        SgdCpu(c, s.p.data(), s.m.data(), s.g.data(), n, 2);
        double worst = 0;
        for (int64_t i = 0; i < n; ++i) {
          double g = static_cast<double>(init.g[i]) * scale + wd * init.p[i];
          const double buf = first ? g : mom * init.m[i] + (1 - d) * g;
          const double step = nesterov ? g + mom * buf : buf;
          worst = std::max({worst, RelErr(s.m[i], buf), RelErr(s.p[i], init.p[i] - lr * step)});
        }
        EXPECT_LE(worst, 2e-6) << "n " << n << " first " << first << " nesterov " << nesterov;
      }
    }
  }
}

}  // namespace
}  // namespace zero::kernels

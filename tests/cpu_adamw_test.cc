// AdamWStepCpu (kernels/cpu_adamw.h) against a plain scalar loop: AdamWElement on the gradient widened with
// cast.cuh's Bf16ToFloat / F16ToFloat, then FloatToBf16 / FloatToF16 for the copy. Every comparison is bitwise
// (memcmp of master, m, v and the copy), for every SIMD target this CPU runs (each forced in turn), gradient
// dtypes f32/bf16/fp16, copies none/f32/bf16/fp16, sizes around the vector widths, 1 and 3 threads, and pointers
// aligned or offset by one element (master and copy alike, and differently).
//
// About NaN: x86 returns the first operand's payload when both operands of an add or multiply are NaN, and a
// compiler may swap the operands of a commutative operation, so two NaNs with different payloads meeting in one
// element have no single right answer. Inputs here put NaN in at most one of an element's four values; every
// NaN an element produces then carries that one payload (or is the default NaN that inf/inf makes), and bitwise
// comparison is meaningful.
#include "kernels/cpu_adamw.h"

#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cast.cuh"

namespace zero::kernels {
namespace {

const int64_t kSizes[] = {0, 1, 7, 15, 17, 4096 + 3, int64_t{1} << 20};
const DType kGradDTypes[] = {DType::kF32, DType::kBF16, DType::kF16};

struct CopyCase {
  bool enabled;
  DType dtype;
};
const CopyCase kCopies[] = {{false, DType::kF32}, {true, DType::kF32}, {true, DType::kBF16}, {true, DType::kF16}};

// Element offsets of (master, m, v, grad) and of the copy from 64-byte-aligned bases.
struct Offsets {
  int64_t state;
  int64_t copy;
};
const Offsets kOffsets[] = {{0, 0}, {1, 1}, {0, 1}, {1, 0}};

std::string CopyName(const CopyCase& c) { return c.enabled ? DTypeName(c.dtype) : "none"; }

// 64-byte-aligned bytes, so that offsets are relative to a known alignment.
class Buffer {
 public:
  explicit Buffer(size_t bytes = 0) : bytes_(bytes) {
    const size_t rounded = (bytes + 64) / 64 * 64;
    data_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
    std::memset(data_.get(), 0xA5, rounded);
  }
  uint8_t* data() const { return data_.get(); }
  size_t bytes() const { return bytes_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t bytes_;
};

// Optimizer inputs for n elements; the gradient is held in every dtype, each the exact conversion of the f32
// values where representable (bf16/fp16 gradients come from rounding the f32 ones, or are set bit by bit).
struct Inputs {
  std::vector<float> master, m, v;
  std::vector<float> grad_f32;
  std::vector<uint16_t> grad_bf16, grad_f16;

  explicit Inputs(int64_t n) : master(n), m(n), v(n), grad_f32(n), grad_bf16(n), grad_f16(n) {}
  int64_t size() const { return static_cast<int64_t>(master.size()); }
  void SetGradFromF32() {
    for (int64_t i = 0; i < size(); ++i) {
      grad_bf16[i] = FloatToBf16(grad_f32[i]);
      grad_f16[i] = FloatToF16(grad_f32[i]);
    }
  }
  const void* Grad(DType dtype) const {
    switch (dtype) {
      case DType::kBF16:
        return grad_bf16.data();
      case DType::kF16:
        return grad_f16.data();
      default:
        return grad_f32.data();
    }
  }
};

Inputs RandomInputs(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Inputs in(n);
  for (int64_t i = 0; i < n; ++i) {
    in.master[i] = normal(rng);
    in.m[i] = 0.1f * normal(rng);
    in.v[i] = 0.01f * std::fabs(normal(rng));
    in.grad_f32[i] = 3.0f * normal(rng);
  }
  in.SetGradFromF32();
  return in;
}

// The state after one step, master/m/v/copy, in buffers placed at the given offsets.
struct State {
  Buffer master, m, v, grad, copy;
  float* p(int64_t off) const { return reinterpret_cast<float*>(master.data()) + off; }
  float* mm(int64_t off) const { return reinterpret_cast<float*>(m.data()) + off; }
  float* vv(int64_t off) const { return reinterpret_cast<float*>(v.data()) + off; }
  void* g(int64_t off, size_t es) const { return grad.data() + off * es; }
  void* c(int64_t off, size_t es) const { return copy.data() + off * es; }
};

State Place(const Inputs& in, DType grad_dtype, int64_t n, Offsets off, size_t copy_size) {
  const size_t gs = DTypeSize(grad_dtype);
  State s{Buffer((n + 1) * 4), Buffer((n + 1) * 4), Buffer((n + 1) * 4), Buffer((n + 1) * gs),
          Buffer((n + 1) * copy_size)};
  if (n == 0) return s;
  std::memcpy(s.p(off.state), in.master.data(), n * 4);
  std::memcpy(s.mm(off.state), in.m.data(), n * 4);
  std::memcpy(s.vv(off.state), in.v.data(), n * 4);
  std::memcpy(s.g(off.state, gs), in.Grad(grad_dtype), n * gs);
  return s;
}

// The specification: the functor, element by element, and cast.cuh for the copy.
void ReferenceStep(const AdamWCoeffs& c, const Inputs& in, DType grad_dtype, CopyCase copy, int64_t n,
                   std::vector<float>* p, std::vector<float>* m, std::vector<float>* v, std::vector<uint8_t>* out) {
  *p = std::vector<float>(in.master.begin(), in.master.begin() + n);
  *m = std::vector<float>(in.m.begin(), in.m.begin() + n);
  *v = std::vector<float>(in.v.begin(), in.v.begin() + n);
  out->assign(copy.enabled ? n * DTypeSize(copy.dtype) : 0, 0);
  const AdamWElement f{c};
  for (int64_t i = 0; i < n; ++i) {
    float g = in.grad_f32[i];
    if (grad_dtype == DType::kBF16) g = Bf16ToFloat(in.grad_bf16[i]);
    if (grad_dtype == DType::kF16) g = F16ToFloat(in.grad_f16[i]);
    f((*p)[i], (*m)[i], (*v)[i], g);
    if (!copy.enabled) continue;
    if (copy.dtype == DType::kF32) {
      std::memcpy(out->data() + i * 4, &(*p)[i], 4);
    } else {
      const uint16_t bits = copy.dtype == DType::kBF16 ? FloatToBf16((*p)[i]) : FloatToF16((*p)[i]);
      std::memcpy(out->data() + i * 2, &bits, 2);
    }
  }
}

// First index where two arrays of `es`-byte elements differ, for the failure message.
std::string FirstMismatch(const void* got, const void* want, int64_t n, size_t es) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(static_cast<const uint8_t*>(got) + i * es, static_cast<const uint8_t*>(want) + i * es, es) != 0) {
      uint32_t a = 0, b = 0;
      std::memcpy(&a, static_cast<const uint8_t*>(got) + i * es, es);
      std::memcpy(&b, static_cast<const uint8_t*>(want) + i * es, es);
      char buf[96];
      std::snprintf(buf, sizeof(buf), "first mismatch at %lld: got 0x%x, want 0x%x", static_cast<long long>(i), a, b);
      return buf;
    }
  }
  return "equal";
}

// Runs the kernel on `in` for every copy, thread count and offset, and compares bitwise with the reference.
void ExpectMatchesReference(const AdamWCoeffs& c, const Inputs& in, DType grad_dtype, int64_t n,
                            const std::vector<int>& thread_counts = {1, 3}) {
  std::vector<float> wp, wm, wv;
  std::vector<uint8_t> wcopy;
  for (const CopyCase& copy : kCopies) {
    ReferenceStep(c, in, grad_dtype, copy, n, &wp, &wm, &wv, &wcopy);
    const size_t cs = copy.enabled ? DTypeSize(copy.dtype) : 0;
    for (const Offsets off : kOffsets) {
      for (const int threads : thread_counts) {
        SCOPED_TRACE("grad " + std::string(DTypeName(grad_dtype)) + ", copy " + CopyName(copy) + ", n " +
                     std::to_string(n) + ", threads " + std::to_string(threads) + ", offsets " +
                     std::to_string(off.state) + "/" + std::to_string(off.copy));
        const State s = Place(in, grad_dtype, n, off, cs);
        ASSERT_TRUE(AdamWStepCpu(c, s.p(off.state), s.mm(off.state), s.vv(off.state),
                                 s.g(off.state, DTypeSize(grad_dtype)), grad_dtype,
                                 copy.enabled ? s.c(off.copy, cs) : nullptr, copy.dtype, n, threads));
        if (n == 0) continue;  // nothing to compare (and memcmp of an empty vector's null data() is undefined)
        EXPECT_EQ(std::memcmp(s.p(off.state), wp.data(), n * 4), 0) << FirstMismatch(s.p(off.state), wp.data(), n, 4);
        EXPECT_EQ(std::memcmp(s.mm(off.state), wm.data(), n * 4), 0) << FirstMismatch(s.mm(off.state), wm.data(), n, 4);
        EXPECT_EQ(std::memcmp(s.vv(off.state), wv.data(), n * 4), 0) << FirstMismatch(s.vv(off.state), wv.data(), n, 4);
        if (copy.enabled) {
          EXPECT_EQ(std::memcmp(s.c(off.copy, cs), wcopy.data(), n * cs), 0)
              << FirstMismatch(s.c(off.copy, cs), wcopy.data(), n, cs);
          // Nothing written outside [0, n): the byte before (offset 1) and after keep the fill pattern.
          const uint8_t* end = static_cast<const uint8_t*>(s.c(off.copy, cs)) + n * cs;
          EXPECT_EQ(*end, 0xA5);
          if (off.copy == 1) {
            EXPECT_EQ(s.copy.data()[0], 0xA5);
          }
        }
        if (::testing::Test::HasFailure()) return;  // one failing combination is enough to read
      }
    }
  }
}

AdamWCoeffs TypicalCoeffs() { return MakeAdamWCoeffs(1e-3, 0.9, 0.999, 1e-8, 0.01, 7, 0.37); }

// Per SIMD target: forces it for the test's duration.
class CpuAdamWTargetTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    TEST_AdamWForceTarget(GetParam());
    ASSERT_STREQ(AdamWTargetName(), hwy::TargetName(GetParam()));
  }
  void TearDown() override { TEST_AdamWForceTarget(0); }
};

TEST_P(CpuAdamWTargetTest, RandomStateEveryDTypeSizeThreadCountAndOffset) {
  const Inputs in = RandomInputs(kSizes[std::size(kSizes) - 1], 1234);
  for (const DType gd : kGradDTypes) {
    for (const int64_t n : kSizes) {
      ExpectMatchesReference(TypicalCoeffs(), in, gd, n);
      if (HasFailure()) return;
    }
  }
}

// With lr = 0 the master passes through unchanged (p * 1 + (-0) * finite), so the copy is the conversion of
// chosen bit patterns: exact ties and their neighbours for bf16 and fp16, denormals, overflow thresholds,
// infinities and NaNs (quiet and signaling, both signs).
TEST_P(CpuAdamWTargetTest, CopyRoundsChosenBitPatternsLikeCastCuh) {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
                                0x7f800001u, 0xff812345u, 0x7fbfffffu, 0x00000001u, 0x807fffffu, 0x00800000u,
                                0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x477fe000u, 0x477fefffu,
                                0x477ff000u, 0xc77ff000u, 0x477ff001u, 0x38800000u, 0x387fffffu, 0x387ff000u,
                                0x33800000u, 0x33000000u, 0x33000001u, 0x32ffffffu, 0x33c00000u, 0x33a00000u};
  for (uint32_t hi : {0x3f80u, 0x3f81u, 0xc2c7u, 0x0012u, 0x4b7fu}) {  // bf16 ties and neighbours, even and odd
    for (uint32_t lo : {0x7fffu, 0x8000u, 0x8001u, 0x0000u, 0xffffu}) bits.push_back(hi << 16 | lo);
  }
  for (uint32_t base : {0x3f800000u, 0x3c001000u, 0x46fffe00u, 0x387fe000u, 0x35000000u}) {  // fp16 ties
    for (uint32_t d : {0x0fffu, 0x1000u, 0x1001u, 0x3000u, 0x2fffu}) bits.push_back(base + d);
  }
  std::mt19937 rng(7);
  while (bits.size() < 4096 + 3) bits.push_back(static_cast<uint32_t>(rng()));  // any pattern, NaNs included
  const int64_t n = static_cast<int64_t>(bits.size());
  Inputs in(n);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(&in.master[i], &bits[i], 4);
    in.m[i] = 0.1f * normal(rng);
    in.v[i] = 0.01f * std::fabs(normal(rng));
    in.grad_f32[i] = normal(rng);
  }
  in.SetGradFromF32();
  const AdamWCoeffs c = MakeAdamWCoeffs(0.0, 0.9, 0.999, 1e-8, 0.0, 3, 1.0);
  for (const DType gd : kGradDTypes) ExpectMatchesReference(c, in, gd, n);
}

// Gradients that are inf, NaN (quiet and signaling, with payloads), overflow when scaled, zero of both signs,
// or denormal in each dtype, over a finite state; also a state with zeros and denormals.
TEST_P(CpuAdamWTargetTest, SpecialGradientsAndState) {
  const int64_t n = 4096 + 3;
  Inputs in = RandomInputs(n, 99);
  const uint32_t f32_specials[] = {0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc12345u, 0x7f800001u,
                                   0xff80abcdu, 0x7f7fffffu, 0xff7fffffu, 0x00000000u, 0x80000000u,
                                   0x00000001u, 0x807fffffu, 0x00400000u, 0x3f800000u};
  const uint16_t bf16_specials[] = {0x7f80u, 0xff80u, 0x7fc0u, 0xffc1u, 0x7f81u, 0xff9fu, 0x7f7fu,
                                    0x0000u, 0x8000u, 0x0001u, 0x807fu, 0x0040u, 0x3f80u};
  const uint16_t f16_specials[] = {0x7c00u, 0xfc00u, 0x7e00u, 0xfe01u, 0x7c01u, 0xfd55u, 0x7bffu,
                                   0x0000u, 0x8000u, 0x0001u, 0x83ffu, 0x0200u, 0x3c00u, 0x0400u};
  for (int64_t i = 0; i < n; i += 3) {  // every third element special, at every vector lane position
    const int64_t k = i / 3;
    std::memcpy(&in.grad_f32[i], &f32_specials[k % std::size(f32_specials)], 4);
    in.grad_bf16[i] = bf16_specials[k % std::size(bf16_specials)];
    in.grad_f16[i] = f16_specials[k % std::size(f16_specials)];
  }
  for (int64_t i = 1; i < n; i += 7) {  // zero and denormal state next to ordinary gradients
    in.m[i] = (i % 2) ? 0.0f : std::numeric_limits<float>::denorm_min() * static_cast<float>(i);
    in.v[i] = (i % 3) ? 0.0f : std::numeric_limits<float>::denorm_min();
    in.master[i] = (i % 5) ? -0.0f : 1e-40f;
  }
  for (const DType gd : kGradDTypes) {
    ExpectMatchesReference(TypicalCoeffs(), in, gd, n);
    ExpectMatchesReference(MakeAdamWCoeffs(1e-3, 0.9, 0.999, 1e-8, 0.01, 1, 65536.0), in, gd, n);  // fp16 scale
  }
}

// Gradients that are zero in every lane (v = 0, m = 0: the denominator is eps alone) and a state that grows large.
TEST_P(CpuAdamWTargetTest, ZeroGradientAndLargeState) {
  const int64_t n = 1000;
  Inputs in(n);
  for (int64_t i = 0; i < n; ++i) {
    in.master[i] = (i % 2 ? 1.0f : -1.0f) * std::ldexp(1.0f, static_cast<int>(i % 250) - 125);
    in.m[i] = i % 3 ? 0.0f : 1e30f;
    in.v[i] = i % 4 ? 0.0f : 3e38f;
    in.grad_f32[i] = i % 5 ? 0.0f : -0.0f;
  }
  in.SetGradFromF32();
  for (const DType gd : kGradDTypes) ExpectMatchesReference(TypicalCoeffs(), in, gd, n);
}

INSTANTIATE_TEST_SUITE_P(Targets, CpuAdamWTargetTest, ::testing::ValuesIn(AdamWTargets()),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return std::string(hwy::TargetName(info.param));
                         });

TEST(CpuAdamWTest, DispatchesToTheBestTargetAndNamesIt) {
  const std::vector<int64_t> targets = AdamWTargets();
  ASSERT_FALSE(targets.empty());
  const std::string name = AdamWTargetName();
  EXPECT_EQ(name, hwy::TargetName(targets[0]));
  EXPECT_NE(name, "Unknown");
  std::string all;
  for (const int64_t t : targets) all += std::string(" ") + hwy::TargetName(t);
  std::printf("AdamWStepCpu dispatches to %s; targets this CPU runs:%s\n", name.c_str(), all.c_str());
  RecordProperty("adamw_target", name);
}

// Within a few ulps of the formula evaluated in double (as kernels_test does for AdamWCpu): the bitwise
// reference is itself the right formula.
TEST(CpuAdamWTest, CloseToDoublePrecisionFormula) {
  const double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-6, wd = 0.05, scale = 0.125;
  const int64_t t = 3, n = (int64_t{1} << 16) + 17;
  const AdamWCoeffs c = MakeAdamWCoeffs(lr, b1, b2, eps, wd, t, scale);
  const Inputs in = RandomInputs(n, 5);
  std::vector<float> p = in.master, m = in.m, v = in.v;
  ASSERT_TRUE(
      AdamWStepCpu(c, p.data(), m.data(), v.data(), in.grad_f32.data(), DType::kF32, nullptr, DType::kF32, n, 2));
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double gd = static_cast<double>(in.grad_f32[i]) * scale;
    const double md = b1 * in.m[i] + (1 - b1) * gd;
    const double vd = b2 * in.v[i] + (1 - b2) * gd * gd;
    double pd = in.master[i] * (1 - lr * wd);
    pd -= lr / (1 - std::pow(b1, t)) * md / (std::sqrt(vd) / std::sqrt(1 - std::pow(b2, t)) + eps);
    for (const auto& [got, want] : {std::pair{p[i], pd}, {m[i], md}, {v[i], vd}}) {
      worst = std::max(worst, std::fabs(got - want) / std::max(1.0, std::fabs(want)));
    }
  }
  EXPECT_LE(worst, 2e-6);
}

TEST(CpuAdamWTest, RejectsUnsupportedDTypesWithoutWriting) {
  std::vector<float> p(8, 1.0f), m(8, 0.0f), v(8, 0.0f), g(8, 1.0f);
  std::vector<uint8_t> copy(64, 0xA5);
  const AdamWCoeffs c = TypicalCoeffs();
  EXPECT_FALSE(AdamWStepCpu(c, p.data(), m.data(), v.data(), g.data(), DType::kF64, nullptr, DType::kF32, 8, 1));
  EXPECT_FALSE(AdamWStepCpu(c, p.data(), m.data(), v.data(), g.data(), DType::kF32, copy.data(), DType::kU8, 8, 1));
  EXPECT_TRUE(std::all_of(p.begin(), p.end(), [](float x) { return x == 1.0f; }));
  EXPECT_TRUE(std::all_of(copy.begin(), copy.end(), [](uint8_t x) { return x == 0xA5; }));
  // copy_dtype is ignored without a copy; n = 0 touches nothing.
  EXPECT_TRUE(AdamWStepCpu(c, p.data(), m.data(), v.data(), g.data(), DType::kF32, nullptr, DType::kI64, 8, 1));
  EXPECT_TRUE(AdamWStepCpu(c, nullptr, nullptr, nullptr, nullptr, DType::kBF16, nullptr, DType::kF32, 0, 4));
}

}  // namespace
}  // namespace zero::kernels

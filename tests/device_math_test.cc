// The engine's device math through the Device interface (src/device.h), parameterised on the backend: each
// instantiation of the written-once kernels (CPU: kernels/cpu_kernels.cc; CUDA: kernels/*.cu) must equal a plain
// scalar loop over the same element functors bit for bit, at sizes 0, 1, 7, 4096+3 and 2^20 (and once past the
// largest grid, where grid-stride loops wrap). The build disables FMA contraction on both sides (-ffp-contract=off,
// --fmad=false), so exact equality is the right bar. Without a GPU the CUDA cases skip, saying why.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "device.h"
#include "kernels/cast.cuh"
#include "kernels/cpu_kernels.h"
#include "kernels/launch.cuh"
#include "testing/engine_harness.h"
#include "testing/random.h"

namespace zero::testing {
namespace {

constexpr int64_t kSizes[] = {0, 1, 7, 4096 + 3, int64_t{1} << 20};

class DeviceMathTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (GetParam() == Backend::kCpu) {
      device_ = NewCpuDevice();
      device_->set_threads(3);  // results must not depend on the thread count
      return;
    }
    const Status s = NewCudaDevice(0, nullptr, &device_);
    if (!s.ok()) GTEST_SKIP() << "CUDA device math cannot run here: " << s.ToString();
  }

  // A device copy of `host`.
  DeviceBuffer Upload(const std::vector<float>& host) {
    DeviceBuffer b;
    EXPECT_TRUE(device_->Allocate(static_cast<int64_t>(host.size()) * 4 + 4, MemoryCategory::kBuffers,
                                  MemoryKind::kDevice, "test", &b).ok());
    EXPECT_TRUE(device_->CopyToDevice(b.data(), host.data(), static_cast<int64_t>(host.size()) * 4).ok());
    return b;
  }
  // `values` rounded to dtype (kF32: as is) on the device, with their exact widening for the reference.
  struct Grad UploadGrad(const std::vector<float>& values, DType dtype);
  // One AdamW step of the device on copies of p, m, v with gradient `g` (and a `copy`-typed parameter copy), bitwise
  // against the scalar functor over every element; p, m, v become the expected values.
  void ExpectAdamWBitwise(const kernels::AdamWCoeffs& c, std::vector<float>& p, std::vector<float>& m,
                          std::vector<float>& v, const struct Grad& g, DType gd, DType copy);
  std::vector<float> Download(const DeviceBuffer& b, int64_t n) {
    std::vector<float> host(static_cast<size_t>(n));
    EXPECT_TRUE(device_->CopyToHost(host.data(), b.data(), n * 4).ok());
    return host;
  }

  // Device::SumSquares over one range, with a scratch of exactly the size it asks for.
  kernels::SumSquares OneSumSquares(const void* x, DType dtype, int64_t n) {
    DeviceBuffer scratch;
    const int64_t scratch_bytes = device_->SumSquaresScratchBytes(n);
    if (scratch_bytes > 0) {
      EXPECT_TRUE(device_->Allocate(scratch_bytes, MemoryCategory::kBuffers, MemoryKind::kDevice, "scratch",
                                    &scratch).ok());
    }
    const kernels::SumSquaresRange range{x, n};
    std::vector<kernels::SumSquares> out;
    const Status s = device_->SumSquares(std::span(&range, 1), dtype, scratch.data(), scratch_bytes, &out);
    EXPECT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(out.size(), 1u);
    return out.empty() ? kernels::SumSquares{} : out[0];
  }

  std::unique_ptr<Device> device_;
};

void ExpectBitwise(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], 4) != 0 && ++bad <= 3) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// The low-precision copy (none, bf16, fp16) the optimizer writes in the same pass, as 16-bit patterns.
std::vector<uint16_t> CopyOf(const std::vector<float>& p, DType dtype) {
  std::vector<uint16_t> out(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    out[i] = dtype == DType::kBF16 ? kernels::FloatToBf16(p[i]) : kernels::FloatToF16(p[i]);
  }
  return out;
}

class CopyTarget {
 public:
  CopyTarget(Device* device, DType dtype, int64_t n) : dtype_(dtype), n_(n) {
    if (dtype == DType::kF32) return;  // kF32 stands for "no copy" here
    EXPECT_TRUE(device->Allocate(n * 2 + 2, MemoryCategory::kBuffers, MemoryKind::kDevice, "copy", &buf_).ok());
    device_ = device;
  }
  void* ptr() const { return dtype_ == DType::kF32 ? nullptr : buf_.data(); }
  void Expect(const std::vector<float>& p) const {
    if (dtype_ == DType::kF32) return;
    std::vector<uint16_t> got(static_cast<size_t>(n_));
    ASSERT_TRUE(device_->CopyToHost(got.data(), buf_.data(), n_ * 2).ok());
    EXPECT_EQ(got, CopyOf(p, dtype_)) << "the " << DTypeName(dtype_) << " copy";
  }

 private:
  DType dtype_;
  int64_t n_;
  Device* device_ = nullptr;
  DeviceBuffer buf_;
};

// A gradient of `dtype` on the device, and its exact fp32 widening on the host.
struct Grad {
  DeviceBuffer buffer;
  std::vector<float> widened;
};

Grad DeviceMathTest::UploadGrad(const std::vector<float>& values, DType dtype) {
  Grad g;
  const int64_t n = static_cast<int64_t>(values.size());
  g.widened = values;
  if (dtype == DType::kF32) {
    g.buffer = Upload(values);
    return g;
  }
  std::vector<uint16_t> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    bits[i] = dtype == DType::kBF16 ? kernels::FloatToBf16(values[i]) : kernels::FloatToF16(values[i]);
    g.widened[i] = dtype == DType::kBF16 ? kernels::Bf16ToFloat(bits[i]) : kernels::F16ToFloat(bits[i]);
  }
  EXPECT_TRUE(device_->Allocate(n * 2 + 2, MemoryCategory::kBuffers, MemoryKind::kDevice, "grad", &g.buffer).ok());
  EXPECT_TRUE(device_->CopyToDevice(g.buffer.data(), bits.data(), n * 2).ok());
  return g;
}

void DeviceMathTest::ExpectAdamWBitwise(const kernels::AdamWCoeffs& c, std::vector<float>& p, std::vector<float>& m,
                                        std::vector<float>& v, const Grad& g, DType gd, DType copy) {
  const int64_t n = static_cast<int64_t>(p.size());
  DeviceBuffer dp = Upload(p), dm = Upload(m), dv = Upload(v);
  CopyTarget target(device_.get(), copy, n);
  ASSERT_TRUE(device_->AdamW(c, dp.as<float>(), dm.as<float>(), dv.as<float>(), g.buffer.data(), gd, target.ptr(),
                             copy, n, nullptr).ok());
  const kernels::AdamWElement f{c};
  for (int64_t i = 0; i < n; ++i) f(p[i], m[i], v[i], g.widened[i]);
  ExpectBitwise(Download(dp, n), p, "p");
  ExpectBitwise(Download(dm, n), m, "m");
  ExpectBitwise(Download(dv, n), v, "v");
  target.Expect(p);
}

TEST_P(DeviceMathTest, AdamWEqualsTheScalarFunctor) {
  for (DType gd : {DType::kF32, DType::kBF16, DType::kF16}) {
  for (DType copy : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE("n = " + std::to_string(n) + ", grad " + DTypeName(gd) + ", copy " + DTypeName(copy));
      std::vector<float> p = RandomFloats(n, 1, -1, 1), m = RandomFloats(n, 2, -0.1f, 0.1f), v = RandomFloats(n, 3, 0, 0.01f);
      Grad g = UploadGrad(RandomFloats(n, 4, -2, 2), gd);
      ExpectAdamWBitwise(kernels::MakeAdamWCoeffs(1e-3, 0.9, 0.999, 1e-8, 0.01, 7, 0.25), p, m, v, g, gd, copy);
    }
  }
  }
}

TEST_P(DeviceMathTest, SgdEqualsTheScalarFunctor) {
  for (DType copy : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (bool first : {true, false}) {
      for (int64_t n : kSizes) {
        SCOPED_TRACE("n = " + std::to_string(n) + (first ? " first step" : "") + ", copy " + DTypeName(copy));
        std::vector<float> p = RandomFloats(n, 5, -1, 1), buf = RandomFloats(n, 6, -0.1f, 0.1f);
        const std::vector<float> g = RandomFloats(n, 7, -2, 2);
        const auto c = kernels::MakeSgdCoeffs(0.1, 0.9, 0.1, 0.01, /*nesterov=*/!first, first, 0.5);
        DeviceBuffer dp = Upload(p), db = Upload(buf), dg = Upload(g);
        CopyTarget target(device_.get(), copy, n);
        ASSERT_TRUE(device_->Sgd(c, dp.as<float>(), db.as<float>(), dg.as<float>(), DType::kF32, target.ptr(), copy,
                                 n, nullptr).ok());
        const kernels::SgdElement f{c};
        for (int64_t i = 0; i < n; ++i) f(p[i], buf[i], g[i]);
        ExpectBitwise(Download(dp, n), p, "p");
        ExpectBitwise(Download(db, n), buf, "buf");
        target.Expect(p);
      }
    }
  }
}

TEST_P(DeviceMathTest, AccumulateAndZero) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    std::vector<float> acc = RandomFloats(n, 8, -1, 1);
    const std::vector<float> x = RandomFloats(n, 9, -1, 1);
    DeviceBuffer da = Upload(acc), dx = Upload(x);
    ASSERT_TRUE(device_->Accumulate(da.as<float>(), dx.as<float>(), DType::kF32, n, nullptr).ok());
    for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
    ExpectBitwise(Download(da, n), acc, "acc");
    ASSERT_TRUE(device_->Zero(da.data(), n * 4, nullptr).ok());
    ExpectBitwise(Download(da, n), std::vector<float>(static_cast<size_t>(n), 0.0f), "zeroed");
  }
}

TEST_P(DeviceMathTest, HalfPrecisionAccumulateAndSumSquares) {
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE("n = " + std::to_string(n) + " " + DTypeName(dt));
      Grad acc = UploadGrad(RandomFloats(n, 11, -1, 1), dt), x = UploadGrad(RandomFloats(n, 12, -1, 1), dt);
      ASSERT_TRUE(device_->Accumulate(acc.buffer.data(), x.buffer.data(), dt, n, nullptr).ok());
      std::vector<uint16_t> got(static_cast<size_t>(n)), want(static_cast<size_t>(n));
      ASSERT_TRUE(device_->CopyToHost(got.data(), acc.buffer.data(), n * 2).ok());
      for (int64_t i = 0; i < n; ++i) {
        const float sum = acc.widened[i] + x.widened[i];  // fp32 add of the exact widenings, then rounded
        want[i] = dt == DType::kBF16 ? kernels::FloatToBf16(sum) : kernels::FloatToF16(sum);
      }
      EXPECT_EQ(got, want);
      const kernels::SumSquares ss = OneSumSquares(x.buffer.data(), dt, n);
      const kernels::SumSquares ref = kernels::SumSquaresCpu(x.widened.data(), n, 1);
      EXPECT_EQ(std::memcmp(&ss.sum, &ref.sum, sizeof(double)), 0) << ss.sum << " vs " << ref.sum;
      EXPECT_EQ(ss.nonfinite, ref.nonfinite);
    }
  }
}

TEST_P(DeviceMathTest, SumSquaresEqualsBlockedScalarSum) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    std::vector<float> x = RandomFloats(n, 10, -3, 3);
    if (n > 7) {
      x[5] = std::numeric_limits<float>::infinity();
      x[static_cast<size_t>(n) - 1] = std::numeric_limits<float>::quiet_NaN();
    }
    DeviceBuffer dx = Upload(x);
    const kernels::SumSquares got = OneSumSquares(dx.as<float>(), DType::kF32, n);
    // The reference: fp64 per 4096-element block in order, then the block sums in order.
    double want = 0.0;
    int64_t bad = 0;
    for (int64_t b = 0; b < n; b += kernels::kSumBlock) {
      double block = 0.0;
      for (int64_t i = b; i < std::min(n, b + kernels::kSumBlock); ++i) {
        if (std::isfinite(x[i])) {
          block += static_cast<double>(x[i]) * static_cast<double>(x[i]);
        } else {
          ++bad;
        }
      }
      want += block;
    }
    EXPECT_EQ(std::memcmp(&got.sum, &want, sizeof(double)), 0) << got.sum << " vs " << want;
    EXPECT_EQ(got.nonfinite, bad);
  }
}

// A step's norm: many ranges (empty ones, block tails, one spanning more than a CUDA block's 256 blocks, ranges
// not starting on a block boundary of the buffer) in one call, in f32, bf16 and f16. Each range's total must equal
// the scalar blocked order bit for bit (the CUDA kernels compute every block in one pass and every range's total
// in a second; their block-to-range bookkeeping is what this checks). A scratch one byte short is refused.
TEST_P(DeviceMathTest, SumSquaresOfManyRangesInOneCall) {
  const std::vector<int64_t> sizes = {5, 0, 4096, 4097, 1, 300 * 4096 + 17, 0, 4095, 2 * 4096, 0};
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  std::vector<float> values = RandomFloats(total, 31, -2, 2);
  values[2] = std::numeric_limits<float>::quiet_NaN();  // range 0
  values[static_cast<size_t>(5 + 4096 + 100)] = std::numeric_limits<float>::infinity();  // range 3
  values[static_cast<size_t>(total - 1)] = -std::numeric_limits<float>::infinity();      // range 8
  for (const DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dt));
    Grad g = UploadGrad(values, dt);
    const int64_t elem = static_cast<int64_t>(DTypeSize(dt));
    std::vector<kernels::SumSquaresRange> ranges;
    int64_t at = 0;
    for (int64_t n : sizes) {
      ranges.push_back({g.buffer.as<char>() + at * elem, n});
      at += n;
    }
    const int64_t need = device_->SumSquaresScratchBytes(sizes);
    DeviceBuffer scratch;
    if (need > 0) {
      ASSERT_TRUE(device_->Allocate(need, MemoryCategory::kBuffers, MemoryKind::kDevice, "scratch", &scratch).ok());
    } else {
      EXPECT_EQ(GetParam(), Backend::kCpu) << "only the CPU needs no scratch";
    }
    std::vector<kernels::SumSquares> got;
    const Status s = device_->SumSquares(ranges, dt, scratch.data(), need, &got);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(got.size(), sizes.size());
    at = 0;
    for (size_t r = 0; r < sizes.size(); ++r) {
      double want = 0.0;
      int64_t bad = 0;
      for (int64_t b = 0; b < sizes[r]; b += kernels::kSumBlock) {
        double block = 0.0;
        for (int64_t i = b; i < std::min(sizes[r], b + kernels::kSumBlock); ++i) {
          const float e = g.widened[static_cast<size_t>(at + i)];
          if (std::isfinite(e)) {
            block += static_cast<double>(e) * static_cast<double>(e);
          } else {
            ++bad;
          }
        }
        want += block;
      }
      EXPECT_EQ(std::memcmp(&got[r].sum, &want, sizeof(double)), 0) << "range " << r << ": " << got[r].sum << " vs "
                                                                     << want;
      EXPECT_EQ(got[r].nonfinite, bad) << "range " << r;
      at += sizes[r];
    }
    if (need > 0) {
      const Status short_scratch = device_->SumSquares(ranges, dt, scratch.data(), need - 1, &got);
      EXPECT_EQ(short_scratch.code(), StatusCode::kInternal) << short_scratch.ToString();
    }
  }
}

// n values in [lo, hi) from a hash of the index: distinct along the whole range (no period a wrong stride could
// hide behind), and cheap enough for the 16.8 M elements below (a Mersenne twister would take most of a second).
std::vector<float> HashedFloats(int64_t n, uint64_t seed, float lo, float hi) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (static_cast<uint64_t>(i) + seed) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
    v[static_cast<size_t>(i)] = lo + (hi - lo) * static_cast<float>(z >> 40) * 0x1p-24f;
  }
  return v;
}

// Past the element-wise launchers' largest grid (kMaxBlocks blocks of kThreads): there every thread's grid-stride
// loop takes a second turn, which the sizes above never reach on a GPU (2^20 < 65535 * 256 = 16.7 M) and the CPU
// instantiation has no counterpart of. AdamW with a bf16 gradient and a bf16 copy (its load and copy functors
// indexed on the second turn) and the bf16 accumulation, bitwise against the scalar functors over every element.
TEST_P(DeviceMathTest, GridStrideLoopsWrapPastTheLargestGrid) {
  const int64_t n = kernels::kMaxBlocks * kernels::kThreads + 1001;
  ASSERT_EQ(kernels::BlocksFor(n), kernels::kMaxBlocks);
  std::vector<float> p = HashedFloats(n, 1, -1, 1), m = HashedFloats(n, 2, -0.1f, 0.1f),
                     v = HashedFloats(n, 3, 0, 0.01f);
  Grad g = UploadGrad(HashedFloats(n, 4, -2, 2), DType::kBF16);
  ExpectAdamWBitwise(kernels::MakeAdamWCoeffs(1e-3, 0.9, 0.999, 1e-8, 0.01, 3, 0.5), p, m, v, g, DType::kBF16,
                     DType::kBF16);

  Grad x = UploadGrad(HashedFloats(n, 5, -1, 1), DType::kBF16);
  ASSERT_TRUE(device_->Accumulate(g.buffer.data(), x.buffer.data(), DType::kBF16, n, nullptr).ok());
  std::vector<uint16_t> got(static_cast<size_t>(n)), want(static_cast<size_t>(n));
  ASSERT_TRUE(device_->CopyToHost(got.data(), g.buffer.data(), n * 2).ok());
  for (int64_t i = 0; i < n; ++i) want[i] = kernels::FloatToBf16(g.widened[i] + x.widened[i]);
  EXPECT_EQ(got, want);
}

INSTANTIATE_TEST_SUITE_P(Backends, DeviceMathTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) {
                           return std::string(info.param == Backend::kCpu ? "cpu" : "cuda");
                         });

}  // namespace
}  // namespace zero::testing

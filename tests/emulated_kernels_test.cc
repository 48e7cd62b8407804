// The emulated kernel launchers of the ZERO_CUDA_EMULATION build (testing/fake_cuda/emulated_kernels.cc): they
// stand in for kernels/*.cu when the engine's CUDA cases run without a GPU, so what they report is what those
// cases can find. Pinned here: a launch gives the CPU instantiation's bits on device memory; refuses an operand
// outside device memory (a GPU's illegal address) or a dead stream, writing nothing; reports an earlier call's
// uncleared error as its own, as the real launchers' cudaGetLastError does (src/cuda_errors.h); and the sum of
// squares follows reduce.cu's plumbing (table into the scratch, totals back to the host), refusing a short scratch.
// Built only in the emulated configuration: on a GPU a launch on host memory would poison the context.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_runtime.h"  // the stand-in
#include "testing/fake_cuda/device_vectors.h"
#include "kernels/cpu_adamw.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"

namespace zero::kernels {
namespace {

using testing::ToDevice;
using testing::ToHost;

std::vector<float> Ramp(int64_t n, float scale) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = scale * static_cast<float>((i * 37) % 101 - 50);
  return v;
}

class EmulatedCudaKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(cudaGetLastError(), cudaSuccess); }
  void TearDown() override { EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "a case left an error behind"; }
};

// AdamW with a bf16 copy on device memory gives AdamWStepCpu's bits on the same inputs.
TEST_F(EmulatedCudaKernelsTest, AdamWGivesTheCpuInstantiationsBits) {
  const int64_t n = 1000;
  std::vector<float> p = Ramp(n, 0.01f), m(n, 0.f), v(n, 0.f), g = Ramp(n, 0.003f);
  std::vector<uint16_t> copy(n, 0);
  const AdamWCoeffs c = MakeAdamWCoeffs(1e-3, 0.9, 0.999, 1e-8, 0.01, 1, 0.5);
  float *dp = ToDevice(p), *dm = ToDevice(m), *dv = ToDevice(v), *dg = ToDevice(g);
  uint16_t* dcopy = ToDevice(copy);
  ASSERT_EQ(AdamWCuda(c, dp, dm, dv, dg, GradKind::kF32, dcopy, CopyKind::kBf16, n, nullptr), cudaSuccess);
  ASSERT_TRUE(AdamWStepCpu(c, p.data(), m.data(), v.data(), g.data(), DType::kF32, copy.data(), DType::kBF16, n, 1));
  EXPECT_EQ(ToHost(dp, n), p);
  EXPECT_EQ(ToHost(dv, n), v);
  EXPECT_EQ(ToHost(dcopy, n), copy);
  for (void* d : {static_cast<void*>(dp), static_cast<void*>(dm), static_cast<void*>(dv), static_cast<void*>(dg),
                  static_cast<void*>(dcopy)}) {
    EXPECT_EQ(cudaFree(d), cudaSuccess);
  }
}

// Host memory handed to a kernel (a GPU: illegal address), or an operand running past its allocation, fails the
// launch with cudaErrorIllegalAddress and writes nothing; so does a stream that was destroyed
// (cudaErrorInvalidResourceHandle). Each error is the launch's own: cleared once returned.
TEST_F(EmulatedCudaKernelsTest, RefusesWhatAGpuWouldFaultOn) {
  const int64_t n = 64;
  std::vector<float> host(n, 1.f), ones(n, 1.f);
  float* d = ToDevice(ones);
  EXPECT_EQ(AccumulateCuda(host.data(), d, GradKind::kF32, n, nullptr), cudaErrorIllegalAddress);
  EXPECT_EQ(host, ones);  // nothing written
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(ScaleCuda(d, 2.f, n + 1, nullptr), cudaErrorIllegalAddress);  // one element past the allocation
  EXPECT_EQ(ToHost(d, n), ones);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  EXPECT_EQ(ScaleCuda(d, 2.f, n, s), cudaSuccess);
  ASSERT_EQ(cudaStreamDestroy(s), cudaSuccess);
  EXPECT_EQ(ScaleCuda(d, 2.f, n, s), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(ToHost(d, n), std::vector<float>(n, 2.f));  // the first scale only
  EXPECT_EQ(cudaFree(d), cudaSuccess);
}

// The real launchers return cudaGetLastError() after the launch, which reports any earlier runtime call of the
// thread that nobody cleared: so do these (why cuda_errors.h clears every error it turns into a Status).
TEST_F(EmulatedCudaKernelsTest, ReportsAnEarlierUnclearedErrorAsTheLaunchsOwn) {
  float* d = ToDevice(std::vector<float>(8, 3.f));
  EXPECT_EQ(cudaSetDevice(7), cudaErrorInvalidDevice);  // left uncleared
  EXPECT_EQ(ScaleCuda(d, 2.f, 8, nullptr), cudaErrorInvalidDevice);
  EXPECT_EQ(ToHost(d, 8), std::vector<float>(8, 6.f));    // the kernel itself ran
  EXPECT_EQ(ScaleCuda(d, 2.f, 8, nullptr), cudaSuccess);  // reported once
  EXPECT_EQ(cudaFree(d), cudaSuccess);
}

// Two ranges (one empty, one over two sum blocks) in one call: the totals reach the host array and equal
// SumSquaresCpu's; a scratch one byte short of SumSquaresScratchBytes is refused.
TEST_F(EmulatedCudaKernelsTest, SumSquaresFollowsTheScratchLayout) {
  const int64_t n = kSumBlock + 5;
  std::vector<float> x = Ramp(n, 0.25f);
  x[7] = std::nanf("");
  float* dx = ToDevice(x);
  const SumSquaresRange ranges[2] = {{dx, 0}, {dx, n}};
  const int64_t sizes[2] = {0, n};
  const int64_t need = SumSquaresScratchBytes(sizes, 2);
  void *scratch = nullptr, *short_scratch = nullptr;
  ASSERT_EQ(cudaMalloc(&scratch, static_cast<size_t>(need)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&short_scratch, static_cast<size_t>(need - 1)), cudaSuccess);
  SumSquares totals[2];
  totals[0].sum = totals[1].sum = -1.0;
  ASSERT_EQ(SumSquaresCuda(ranges, 2, GradKind::kF32, scratch, totals, nullptr), cudaSuccess);
  const SumSquares want = SumSquaresCpu(x.data(), n, 1);
  EXPECT_EQ(totals[0].sum, 0.0);
  EXPECT_EQ(totals[0].nonfinite, 0);
  EXPECT_EQ(totals[1].sum, want.sum);
  EXPECT_EQ(totals[1].nonfinite, 1);
  EXPECT_NE(SumSquaresCuda(ranges, 2, GradKind::kF32, short_scratch, totals, nullptr), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  for (void* d : {static_cast<void*>(dx), scratch, short_scratch}) EXPECT_EQ(cudaFree(d), cudaSuccess);
}

}  // namespace
}  // namespace zero::kernels

// The host-only CUDA runtime and cuBLAS stand-ins (testing/fake_cuda/) that let the LoRA example's CUDA model run
// in ctest without a GPU: they are only as good as their faithfulness to the real contracts, so this suite pins
// those down with hand-worked cases:
//   - cublasGemmEx / cublasGemmStridedBatchedEx against products worked out by hand from cuBLAS's column-major
//     definition (op N and T on each side, leading dimensions larger than the rows, batch strides, beta = 0
//     ignoring a NaN C, beta != 0 accumulating, bf16 operands and a bf16 result rounded to nearest even), and the
//     argument checks cuBLAS makes (leading dimension too small), and refusals of what cuBLAS leaves undefined
//     (an in-place product, overlapping batches, a handle used with another device than its own);
//   - launch configurations: the runtime's limits on grid and block dimensions (fake_cuda::CheckLaunch);
//   - device memory is unreadable from host code outside runtime calls (a write(2) of it fails with EFAULT: the
//     kernel checks the pointer, no signal needed), starts as a NaN pattern, and copies and memsets refuse a
//     direction or range that does not match where the pointers are;
//   - the last error is sticky until cudaGetLastError, and per host thread; live and peak bytes follow allocations;
//   - streams and events (created with flags and priorities, clamped to the device's range; queried, waited for,
//     destroyed) and every call that takes one refuse a handle that is not live; an event never recorded is
//     complete;
//   - cudaHostRegister/Unregister's rules and cudaPointerGetAttributes' answer for device, registered and
//     unregistered memory; cudaSetDevice, cudaMemGetInfo and the capacity cudaMalloc refuses beyond;
//   - concurrent calls from several threads (a trainer's second thread, e.g. a data loader on its Comm, next to
//     the thread that drives the engine);
//   - deferred mode: work runs when waited for and no earlier: a stream that does not wait for another reads its
//     stale bytes, cudaStreamWaitEvent orders it, queries answer cudaErrorNotReady before the work ran (without
//     making it the last error), copies follow the runtime's documented synchronization (a pageable cudaMemcpy
//     to the device lands on the legacy stream later; to the host it is complete on return), and blocking streams
//     and the legacy stream wait for each other;
//   - several devices: memory, streams and events belong to the thread's current device; a kernel launch on
//     another device's stream fails, and so does recording an event on a stream of another device than its own;
//     copies and waits across devices succeed (the CUDA programming guide's multi-device rules).
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "cublas_v2.h"
#include "cuda_runtime.h"
#include "testing/fake_cuda/device_vectors.h"

namespace {

using zero::testing::ToDevice;
using zero::testing::ToHost;

uint16_t Bf16Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);  // exact for the values used (few significant bits)
}

class FakeCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fake_cuda::SetDeferred(false);  // work at issue unless a case says otherwise (ZERO_FAKE_CUDA_DEFERRED aside)
    fake_cuda::SetDeviceCount(1);   // one device unless a case says otherwise (ZERO_FAKE_CUDA_DEVICES aside)
    ASSERT_EQ(cublasCreate(&h_), CUBLAS_STATUS_SUCCESS);
    live_ = fake_cuda::LiveAllocations();
  }
  void TearDown() override {
    fake_cuda::SetDeferred(false);
    EXPECT_EQ(cudaSetDevice(0), cudaSuccess);
    fake_cuda::SetDeviceCount(1);
    EXPECT_EQ(cublasDestroy(h_), CUBLAS_STATUS_SUCCESS);
    EXPECT_EQ(fake_cuda::LiveAllocations(), live_) << "a test leaked device memory";
  }
  cublasHandle_t h_ = nullptr;
  int64_t live_ = 0;
};

// A = [[1,2,3],[4,5,6]] (2x3), stored column-major with lda 3 (a padding row): 1 4 x | 2 5 x | 3 6 x.
// B = [[1,0],[0,1],[2,-1]] (3x2), stored column-major with ldb 3: 1 0 2 | 0 1 -1.
// A*B = [[1+0+6, 0+2-3],[4+0+12, 0+5-6]] = [[7,-1],[16,-1]].
TEST_F(FakeCudaTest, GemmFollowsTheColumnMajorContract) {
  const float nan = std::nanf("");
  float* A = ToDevice({1, 4, 99, 2, 5, 99, 3, 6, 99});
  float* B = ToDevice({1, 0, 2, 0, 1, -1});
  float* C = ToDevice({nan, nan, 55, nan, nan, 55});  // ldc 3; row 2 must stay untouched
  const float one = 1.f, zero = 0.f, two = 2.f;
  ASSERT_EQ(cublasGemmEx(h_, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, A, CUDA_R_32F, 3, B, CUDA_R_32F, 3, &zero, C,
                         CUDA_R_32F, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(ToHost(C, 6), (std::vector<float>{7, 16, 55, -1, -1, 55}));
  // beta != 0 reads C: C = 2 * A*B + 1 * C.
  ASSERT_EQ(cublasGemmEx(h_, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &two, A, CUDA_R_32F, 3, B, CUDA_R_32F, 3, &one, C,
                         CUDA_R_32F, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(ToHost(C, 6), (std::vector<float>{21, 48, 55, -3, -3, 55}));

  // (A*B)^T = B^T A^T: B stored as above read with op T is B^T (2x3), A with op T is A^T (3x2).
  float* D = ToDevice({0, 0, 0, 0});
  ASSERT_EQ(cublasGemmEx(h_, CUBLAS_OP_T, CUBLAS_OP_T, 2, 2, 3, &one, B, CUDA_R_32F, 3, A, CUDA_R_32F, 3, &zero, D,
                         CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(ToHost(D, 4), (std::vector<float>{7, -1, 16, -1}));

  // op N on A, op T on B: A (2x3) times Bt^T where Bt = B^T stored column-major 2x3 (ldb 2): 1 0 | 0 1 | 2 -1.
  float* Bt = ToDevice({1, 0, 0, 1, 2, -1});
  ASSERT_EQ(cublasGemmEx(h_, CUBLAS_OP_N, CUBLAS_OP_T, 2, 2, 3, &one, A, CUDA_R_32F, 3, Bt, CUDA_R_32F, 2, &zero, D,
                         CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(ToHost(D, 4), (std::vector<float>{7, 16, -1, -1}));

  // cuBLAS refuses a leading dimension below the stored rows.
  EXPECT_EQ(cublasGemmEx(h_, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, A, CUDA_R_32F, 1, B, CUDA_R_32F, 3, &zero, C,
                         CUDA_R_32F, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);
  // An operand that runs past its allocation is refused (a GPU would read garbage).
  EXPECT_EQ(cublasGemmEx(h_, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, A, CUDA_R_32F, 3, B, CUDA_R_32F, 4, &zero, C,
                         CUDA_R_32F, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);
  for (float* p : {A, B, C, D, Bt}) EXPECT_EQ(cudaFree(p), cudaSuccess);
}

// Three 1x2 * 2x1 products at batch strides, bf16 operands, a bf16 result: [1,2].[3,4] = 11, [0.5,-1].[2,2] = -1,
// [1,0].[256,1] = 256; then [1,1].[256,1] = 257, not a bf16 (8 significant bits), rounds to the even 256.
TEST_F(FakeCudaTest, StridedBatchedBf16RoundsItsResultToNearestEven) {
  std::vector<uint16_t> a = {Bf16Bits(1), Bf16Bits(2), 0, Bf16Bits(0.5f), Bf16Bits(-1), 0, Bf16Bits(1), 0, 0};
  std::vector<uint16_t> b = {Bf16Bits(3), Bf16Bits(4), Bf16Bits(2), Bf16Bits(2), Bf16Bits(256), Bf16Bits(1)};
  void *A, *B, *C;
  ASSERT_EQ(cudaMalloc(&A, a.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&B, b.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&C, 3 * 2), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(A, a.data(), a.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(B, b.data(), b.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  const float one = 1.f, zero = 0.f;
  // A is 1x2 with lda 1 (a row vector: columns one element apart), stride 3; B is 2x1 with ldb 2, stride 2.
  ASSERT_EQ(
      cublasGemmStridedBatchedEx(h_, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 2, &one, A, CUDA_R_16BF, 1, 3, B, CUDA_R_16BF, 2,
                                 2, &zero, C, CUDA_R_16BF, 1, 1, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      CUBLAS_STATUS_SUCCESS);
  std::vector<uint16_t> c(3);
  ASSERT_EQ(cudaMemcpy(c.data(), C, 6, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(c[0], Bf16Bits(11));
  EXPECT_EQ(c[1], Bf16Bits(-1));
  EXPECT_EQ(c[2], Bf16Bits(256));
  // 257 = 256 + 1: A = [1, 1] . B = [256, 1]; rounds to 256 (ties to even: 0x4380 is even, 0x4381 odd).
  std::vector<uint16_t> a2 = {Bf16Bits(1), Bf16Bits(1)};
  ASSERT_EQ(cudaMemcpy(A, a2.data(), 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cublasGemmEx(h_, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 2, &one, A, CUDA_R_16BF, 1, static_cast<uint16_t*>(B) + 4,
                         CUDA_R_16BF, 2, &zero, C, CUDA_R_16BF, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cudaMemcpy(c.data(), C, 2, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(c[0], 0x4380);  // 256
  for (void* p : {A, B, C}) EXPECT_EQ(cudaFree(p), cudaSuccess);
}

// Calls cuBLAS answers with undefined results (races between tiles or batches, kernels on the wrong device) are
// refused here rather than computed plausibly: an in-place product, batches whose C overlap, and a handle used
// with another device than the one current at its cublasCreate (current device, or operands).
TEST_F(FakeCudaTest, GemmRefusesWhatAGpuWouldComputeGarbageFor) {
  const float one = 1.f, zero = 0.f;
  float* A = ToDevice({1, 2, 3, 4});  // 2x2
  float* C = ToDevice({0, 0, 0, 0, 0, 0, 0, 0});
  const auto gemm = [&](cublasHandle_t h, const float* a, const float* b, float* c) {
    return cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, a, CUDA_R_32F, 2, b, CUDA_R_32F, 2, &zero, c,
                        CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  EXPECT_EQ(gemm(h_, A, A, C), CUBLAS_STATUS_SUCCESS);  // A read twice is fine
  EXPECT_EQ(ToHost(C, 4), (std::vector<float>{7, 10, 15, 22}));
  EXPECT_EQ(gemm(h_, A, C, C), CUBLAS_STATUS_INVALID_VALUE);       // C is B
  EXPECT_EQ(gemm(h_, C + 1, A, C + 2), CUBLAS_STATUS_INVALID_VALUE);  // C overlaps A's last elements
  // Two 2x2 products: C at stride 4 is fine, at stride 2 the second C overwrites half of the first.
  const auto batched = [&](long long stride_c) {
    return cublasGemmStridedBatchedEx(h_, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, A, CUDA_R_32F, 2, 0, A,
                                      CUDA_R_32F, 2, 0, &zero, C, CUDA_R_32F, 2, stride_c, 2, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT);
  };
  EXPECT_EQ(batched(4), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(batched(2), CUBLAS_STATUS_INVALID_VALUE);

  fake_cuda::SetDeviceCount(2);
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  float* A1 = ToDevice({1, 2, 3, 4});
  float* C1 = ToDevice({0, 0, 0, 0});
  EXPECT_EQ(gemm(h_, A1, A1, C1), CUBLAS_STATUS_INVALID_VALUE);  // h_ is device 0's, device 1 is current
  cublasHandle_t h1 = nullptr;
  ASSERT_EQ(cublasCreate(&h1), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(gemm(h1, A1, A1, C1), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(ToHost(C1, 4), (std::vector<float>{7, 10, 15, 22}));
  EXPECT_EQ(gemm(h1, A, A, C1), CUBLAS_STATUS_INVALID_VALUE);  // operands of device 0
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  EXPECT_EQ(gemm(h1, A, A, C), CUBLAS_STATUS_INVALID_VALUE);  // h1 is device 1's, device 0 is current
  EXPECT_EQ(gemm(h_, A, A, C), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasDestroy(h1), CUBLAS_STATUS_SUCCESS);
  for (float* p : {A, C, A1, C1}) EXPECT_EQ(cudaFree(p), cudaSuccess);
}

// The launch configurations the runtime refuses (cudaErrorInvalidConfiguration, also the last error) and the
// largest it accepts.
TEST_F(FakeCudaTest, LaunchConfigurationsFollowTheRuntimesLimits) {
  EXPECT_EQ(fake_cuda::CheckLaunch(0x7fffffffu, 65535, 65535, 1024, 1, 1), cudaSuccess);
  EXPECT_EQ(fake_cuda::CheckLaunch(1, 1, 1, 32, 32, 1), cudaSuccess);
  EXPECT_EQ(fake_cuda::CheckLaunch(1, 1, 1, 1, 1, 64), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  const unsigned int refused[][6] = {
      {0, 1, 1, 256, 1, 1},      // an empty grid
      {1, 1, 1, 0, 1, 1},        // an empty block
      {1, 65536, 1, 256, 1, 1},  // grid.y
      {1, 1, 65536, 256, 1, 1},  // grid.z
      {1, 1, 1, 1025, 1, 1},     // more than 1024 threads
      {1, 1, 1, 64, 32, 1},      // 2048 threads, each dimension within its limit
      {1, 1, 1, 1, 1, 65},       // block.z
  };
  for (const auto& c : refused) {
    SCOPED_TRACE(::testing::Message() << c[0] << "," << c[1] << "," << c[2] << " x " << c[3] << "," << c[4] << ","
                                      << c[5]);
    EXPECT_EQ(fake_cuda::CheckLaunch(c[0], c[1], c[2], c[3], c[4], c[5]), cudaErrorInvalidConfiguration);
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  }
}

TEST_F(FakeCudaTest, DeviceMemoryIsItsOwnWorld) {
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 64), cudaSuccess);
  EXPECT_TRUE(fake_cuda::IsDevice(d, 64));
  EXPECT_FALSE(fake_cuda::IsDevice(d, 65));
  // Host code cannot read it: the kernel refuses the pointer (EFAULT) instead of the process faulting.
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  errno = 0;
  EXPECT_EQ(write(fds[1], d, 16), -1);
  EXPECT_EQ(errno, EFAULT);
  // Fresh memory reads as NaN, not zero.
  float f[16];
  ASSERT_EQ(cudaMemcpy(f, d, sizeof(f), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(std::isnan(f[0]));
  // Directions must match where the pointers are; ranges must stay inside the allocation.
  float host[32] = {};
  EXPECT_EQ(cudaMemcpy(d, host, 64, cudaMemcpyDeviceToHost), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read once, then clear
  EXPECT_EQ(cudaMemcpy(host, d, 64, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(d, host, 128, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemset(host, 0, 8), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemset(static_cast<char*>(d) + 60, 0, 8), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFree(static_cast<char*>(d) + 4), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemset(d, 0, 64), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(f, d, sizeof(f), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(f[15], 0.f);
  {
    fake_cuda::DeviceAccess access;  // what kernels run inside
    EXPECT_EQ(static_cast<float*>(d)[3], 0.f);
  }
  EXPECT_EQ(cudaFree(d), cudaSuccess);
  close(fds[0]);
  close(fds[1]);
}

TEST_F(FakeCudaTest, LiveAndPeakBytesFollowAllocations) {
  const int64_t base = fake_cuda::LiveBytes();
  fake_cuda::ResetPeak();
  void *a, *b;
  ASSERT_EQ(cudaMallocAsync(&a, 1000, nullptr), cudaSuccess);
  ASSERT_EQ(cudaMallocAsync(&b, 24, nullptr), cudaSuccess);
  EXPECT_EQ(fake_cuda::LiveBytes(), base + 1024);
  EXPECT_EQ(cudaFreeAsync(a, nullptr), cudaSuccess);
  EXPECT_EQ(fake_cuda::LiveBytes(), base + 24);
  EXPECT_EQ(fake_cuda::PeakBytes(), base + 1024);
  EXPECT_EQ(cudaFreeAsync(b, nullptr), cudaSuccess);
  EXPECT_EQ(fake_cuda::LiveBytes(), base);
}

// Priorities: the device reports least 0 and greatest -5 (lower is higher, as on current GPUs); a request outside
// that range is clamped into it, not refused.
TEST_F(FakeCudaTest, StreamsHaveFlagsAndClampedPriorities) {
  int least = 1, greatest = 1;
  ASSERT_EQ(cudaDeviceGetStreamPriorityRange(&least, &greatest), cudaSuccess);
  EXPECT_EQ(least, 0);
  EXPECT_EQ(greatest, -5);
  const int64_t streams = fake_cuda::LiveStreams();
  cudaStream_t hi = nullptr, lo = nullptr, mid = nullptr, plain = nullptr;
  ASSERT_EQ(cudaStreamCreateWithPriority(&hi, cudaStreamNonBlocking, -100), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithPriority(&lo, cudaStreamNonBlocking, 3), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithPriority(&mid, cudaStreamDefault, -2), cudaSuccess);
  ASSERT_EQ(cudaStreamCreate(&plain), cudaSuccess);
  EXPECT_EQ(fake_cuda::StreamPriority(hi), -5);
  EXPECT_EQ(fake_cuda::StreamPriority(lo), 0);
  EXPECT_EQ(fake_cuda::StreamPriority(mid), -2);
  EXPECT_EQ(fake_cuda::StreamPriority(plain), 0);
  EXPECT_EQ(fake_cuda::LiveStreams(), streams + 4);
  cudaStream_t bad = nullptr;
  EXPECT_EQ(cudaStreamCreateWithFlags(&bad, 0x10), cudaErrorInvalidValue);  // not a stream flag
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  for (cudaStream_t s : {hi, lo, mid, plain}) EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
  EXPECT_EQ(fake_cuda::LiveStreams(), streams);
}

// Work completes at issue: a live stream is idle, a recorded event complete, and an event never recorded is
// complete too ("If cudaEventRecord() has not been called on this event, the function returns cudaSuccess"). A
// handle that is not live (destroyed, or never created) is cudaErrorInvalidResourceHandle wherever it is passed.
TEST_F(FakeCudaTest, StreamAndEventHandlesAreChecked) {
  const int64_t events = fake_cuda::LiveEvents();
  cudaStream_t s = nullptr;
  cudaEvent_t e = nullptr, fresh = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&fresh), cudaSuccess);
  EXPECT_EQ(fake_cuda::LiveEvents(), events + 2);
  EXPECT_EQ(cudaEventQuery(fresh), cudaSuccess);  // never recorded
  EXPECT_EQ(cudaStreamQuery(s), cudaSuccess);
  EXPECT_EQ(cudaStreamQuery(nullptr), cudaSuccess);  // the legacy stream
  EXPECT_EQ(cudaEventRecord(e, s), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(e), cudaSuccess);
  EXPECT_EQ(cudaEventSynchronize(e), cudaSuccess);
  EXPECT_EQ(cudaStreamWaitEvent(nullptr, e, cudaEventWaitDefault), cudaSuccess);
  EXPECT_EQ(cudaStreamWaitEvent(s, e, 0x8), cudaErrorInvalidValue);  // not a wait flag
  EXPECT_EQ(cudaEventRecord(e, nullptr), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  // An interprocess event must disable timing.
  cudaEvent_t ipc = nullptr;
  EXPECT_EQ(cudaEventCreateWithFlags(&ipc, cudaEventInterprocess), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);

  ASSERT_EQ(cudaStreamDestroy(s), cudaSuccess);
  ASSERT_EQ(cudaEventDestroy(e), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(s), cudaErrorInvalidResourceHandle);        // twice
  EXPECT_EQ(cudaStreamDestroy(nullptr), cudaErrorInvalidResourceHandle);  // the legacy stream is not ours
  EXPECT_EQ(cudaEventDestroy(e), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaStreamQuery(s), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaStreamSynchronize(s), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaEventQuery(e), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaEventRecord(fresh, s), cudaErrorInvalidResourceHandle);  // a live event on a dead stream
  EXPECT_EQ(cudaStreamWaitEvent(nullptr, e, 0), cudaErrorInvalidResourceHandle);
  float host[4] = {}, back[4] = {};
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, sizeof(host)), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(d, host, sizeof(host), cudaMemcpyHostToDevice, s), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaMemsetAsync(d, 0, sizeof(host), s), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidResourceHandle);
  EXPECT_FALSE(fake_cuda::IsValidStream(s));
  EXPECT_TRUE(fake_cuda::IsValidStream(nullptr));
  // cudaMemcpyDefault infers the direction from the pointers, both ways.
  host[2] = 7.f;
  ASSERT_EQ(cudaMemcpyAsync(d, host, sizeof(host), cudaMemcpyDefault, nullptr), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(back, d, sizeof(back), cudaMemcpyDefault), cudaSuccess);
  EXPECT_EQ(back[2], 7.f);
  EXPECT_EQ(cudaFree(d), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(fresh), cudaSuccess);
  EXPECT_EQ(fake_cuda::LiveEvents(), events);
}

// "Returns the last error that has been produced by any of the runtime calls in the same host thread": a failure
// on one thread is not another thread's last error; cudaPeekAtLastError reads it without clearing it.
TEST_F(FakeCudaTest, TheLastErrorIsPerThread) {
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  cudaError_t other_before = cudaErrorNotReady, other_after = cudaErrorNotReady;
  std::thread([&] {
    other_before = cudaSetDevice(1);  // this machine has one device: ordinal 1 does not exist
    other_after = cudaPeekAtLastError();
  }).join();
  EXPECT_EQ(other_before, cudaErrorInvalidDevice);
  EXPECT_EQ(other_after, cudaErrorInvalidDevice);
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);  // not this thread's
  EXPECT_EQ(cudaFree(reinterpret_cast<void*>(0x10)), cudaErrorInvalidValue);
  EXPECT_EQ(cudaPeekAtLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaPeekAtLastError(), cudaErrorInvalidValue);  // peeking does not clear
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_STREQ(cudaGetErrorString(cudaErrorInvalidResourceHandle), "invalid resource handle");
}

// One device: ordinal 0 only. cudaMemGetInfo's free bytes are the capacity less what is allocated, and cudaMalloc
// refuses beyond the capacity (out of memory, the runtime's error for it).
TEST_F(FakeCudaTest, OneDeviceOfAFixedCapacity) {
  int count = 0, device = -1;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess);
  EXPECT_EQ(count, 1);
  EXPECT_EQ(cudaSetDevice(0), cudaSuccess);
  EXPECT_EQ(cudaGetDevice(&device), cudaSuccess);
  EXPECT_EQ(device, 0);
  EXPECT_EQ(cudaSetDevice(-1), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidDevice);
  size_t free_bytes = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
  EXPECT_EQ(total, size_t{16} << 30);
  fake_cuda::SetCapacity(fake_cuda::LiveBytes() + 3 * 4096);
  void *a = nullptr, *b = nullptr;
  ASSERT_EQ(cudaMalloc(&a, 2 * 4096), cudaSuccess);
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
  EXPECT_EQ(free_bytes, size_t{4096});
  EXPECT_EQ(cudaMalloc(&b, 4097), cudaErrorMemoryAllocation);
  EXPECT_EQ(b, nullptr);
  EXPECT_EQ(cudaGetLastError(), cudaErrorMemoryAllocation);
  ASSERT_EQ(cudaMalloc(&b, 4096), cudaSuccess);  // exactly what is left
  EXPECT_EQ(cudaFree(a), cudaSuccess);
  EXPECT_EQ(cudaFree(b), cudaSuccess);
  fake_cuda::SetCapacity(int64_t{16} << 30);
}

// cudaHostRegister: ranges may not overlap (cudaErrorHostMemoryAlreadyRegistered), adjacent ones may; device
// memory, a null pointer, zero bytes or an unknown flag is cudaErrorInvalidValue. cudaHostUnregister takes the
// base address it was given (anything else: cudaErrorHostMemoryNotRegistered). cudaPointerGetAttributes: device
// memory is Device, any byte of a registered range is Host (the same address on both sides), any other host
// pointer is Unregistered, with success.
TEST_F(FakeCudaTest, HostRegistrationAndPointerAttributes) {
  const int64_t registrations = fake_cuda::LiveRegistrations();
  std::vector<char> host(3 * 4096);
  char* h = host.data();
  ASSERT_EQ(cudaHostRegister(h, 4096, cudaHostRegisterPortable), cudaSuccess);
  EXPECT_EQ(cudaHostRegister(h + 4095, 2, cudaHostRegisterDefault), cudaErrorHostMemoryAlreadyRegistered);
  EXPECT_EQ(cudaHostRegister(h - 1, 2, cudaHostRegisterDefault), cudaErrorHostMemoryAlreadyRegistered);
  ASSERT_EQ(cudaHostRegister(h + 4096, 4096, cudaHostRegisterPortable), cudaSuccess);  // adjacent
  EXPECT_EQ(cudaHostRegister(h + 2 * 4096, 16, 0x100), cudaErrorInvalidValue);
  EXPECT_EQ(cudaHostRegister(nullptr, 16, 0), cudaErrorInvalidValue);
  EXPECT_EQ(cudaHostRegister(h + 2 * 4096, 0, 0), cudaErrorInvalidValue);
  EXPECT_EQ(fake_cuda::LiveRegistrations(), registrations + 2);

  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 100), cudaSuccess);
  EXPECT_EQ(cudaHostRegister(d, 100, 0), cudaErrorInvalidValue);
  cudaPointerAttributes a;
  ASSERT_EQ(cudaPointerGetAttributes(&a, static_cast<char*>(d) + 10), cudaSuccess);
  EXPECT_EQ(a.type, cudaMemoryTypeDevice);
  EXPECT_EQ(a.device, 0);
  EXPECT_EQ(a.devicePointer, static_cast<char*>(d) + 10);
  EXPECT_EQ(a.hostPointer, nullptr);
  ASSERT_EQ(cudaPointerGetAttributes(&a, h + 5000), cudaSuccess);
  EXPECT_EQ(a.type, cudaMemoryTypeHost);
  EXPECT_EQ(a.hostPointer, h + 5000);
  EXPECT_EQ(a.devicePointer, h + 5000);
  ASSERT_EQ(cudaPointerGetAttributes(&a, h + 2 * 4096), cudaSuccess);  // just past the registered ranges
  EXPECT_EQ(a.type, cudaMemoryTypeUnregistered);
  EXPECT_EQ(cudaPointerGetAttributes(nullptr, h), cudaErrorInvalidValue);

  EXPECT_EQ(cudaHostUnregister(h + 1), cudaErrorHostMemoryNotRegistered);  // not the base address
  EXPECT_EQ(cudaGetLastError(), cudaErrorHostMemoryNotRegistered);
  EXPECT_EQ(cudaHostUnregister(h), cudaSuccess);
  EXPECT_EQ(cudaHostUnregister(h), cudaErrorHostMemoryNotRegistered);  // twice
  ASSERT_EQ(cudaPointerGetAttributes(&a, h), cudaSuccess);
  EXPECT_EQ(a.type, cudaMemoryTypeUnregistered);
  EXPECT_EQ(cudaHostUnregister(h + 4096), cudaSuccess);
  EXPECT_EQ(fake_cuda::LiveRegistrations(), registrations);
  (void)cudaGetLastError();
  EXPECT_EQ(cudaFree(d), cudaSuccess);
}

// A trainer's second thread calls the runtime while the thread driving the engine does: four threads
// allocating, copying round trips through their own device memory and freeing, at once, each on a stream of its
// own, must each get their own bytes back, and leave nothing behind.
TEST_F(FakeCudaTest, ConcurrentCallsFromSeveralThreads) {
  const int64_t live = fake_cuda::LiveAllocations(), streams = fake_cuda::LiveStreams();
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &wrong] {
      cudaStream_t s = nullptr;
      if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) ++wrong;
      for (int i = 0; i < 200; ++i) {
        std::vector<int> in(64 + i, t * 1000 + i), out(64 + i, -1);
        const size_t bytes = in.size() * sizeof(int);
        void* d = nullptr;
        if (cudaMalloc(&d, bytes) != cudaSuccess) ++wrong;
        if (cudaMemcpyAsync(d, in.data(), bytes, cudaMemcpyHostToDevice, s) != cudaSuccess) ++wrong;
        if (cudaMemcpyAsync(out.data(), d, bytes, cudaMemcpyDeviceToHost, s) != cudaSuccess) ++wrong;
        if (cudaStreamSynchronize(s) != cudaSuccess) ++wrong;
        if (out != in) ++wrong;
        if (cudaFree(d) != cudaSuccess) ++wrong;
      }
      if (cudaStreamDestroy(s) != cudaSuccess) ++wrong;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(fake_cuda::LiveAllocations(), live);
  EXPECT_EQ(fake_cuda::LiveStreams(), streams);
}

// Deferred mode. d starts as 0; a "kernel" on s1 writes 1 into d[0]; s2 copies d into pinned memory. Without a
// wait s2 runs first and reads 0, deterministically; after cudaStreamWaitEvent on an event recorded behind the
// kernel it reads 1. Queries of work that has not run answer cudaErrorNotReady (and run it): the next one succeeds.
TEST_F(FakeCudaTest, DeferredWorkRunsWhenWaitedForAndNotBefore) {
  fake_cuda::SetDeferred(true);
  cudaStream_t s1 = nullptr, s2 = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking), cudaSuccess);
  float* d = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), 4 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemsetAsync(d, 0, 4 * sizeof(float), s1), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(s1), cudaSuccess);
  std::vector<float> pinned(4, -1.f);
  ASSERT_EQ(cudaHostRegister(pinned.data(), 4 * sizeof(float), cudaHostRegisterPortable), cudaSuccess);

  ASSERT_EQ(fake_cuda::Enqueue(s1, [d] { d[0] = 1.f; }), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(pinned.data(), d, 4 * sizeof(float), cudaMemcpyDeviceToHost, s2), cudaSuccess);
  EXPECT_EQ(pinned[0], -1.f);  // into pinned memory: not before s2 is waited for
  ASSERT_EQ(cudaStreamSynchronize(s2), cudaSuccess);
  EXPECT_EQ(pinned[0], 0.f) << "s2 does not wait for s1: it reads d before the kernel";

  cudaEvent_t e = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(e, s1), cudaSuccess);  // behind the kernel, which has not run
  ASSERT_EQ(cudaStreamWaitEvent(s2, e, 0), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(pinned.data(), d, 4 * sizeof(float), cudaMemcpyDeviceToHost, s2), cudaSuccess);
  EXPECT_EQ(cudaStreamQuery(s2), cudaErrorNotReady);
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);  // an answer, not an error
  EXPECT_EQ(cudaStreamQuery(s2), cudaSuccess);
  EXPECT_EQ(pinned[0], 1.f) << "the wait orders s2 behind the kernel";
  EXPECT_EQ(cudaEventQuery(e), cudaSuccess);  // s2's wait ran s1 up to the record

  // An event recorded behind new work: not complete until queried or synchronized.
  ASSERT_EQ(fake_cuda::Enqueue(s1, [d] { d[1] = 2.f; }), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(e, s1), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(e), cudaErrorNotReady);
  EXPECT_EQ(cudaEventQuery(e), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(pinned.data(), d, 4 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(pinned[1], 2.f);

  ASSERT_EQ(cudaHostUnregister(pinned.data()), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(e), cudaSuccess);
  for (cudaStream_t s : {s1, s2}) EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
  EXPECT_EQ(cudaFree(d), cudaSuccess);
}

// A step (EnqueueStep: the NCCL stand-in's collectives) stays at the head of its stream until it says it is
// complete: at issue too, later work waits behind it, queries answer cudaErrorNotReady, an event behind it is not
// complete, another stream that waits for that event waits too, and a synchronization polls it to the end.
TEST_F(FakeCudaTest, AStepHoldsItsStreamUntilComplete) {
  for (bool deferred : {false, true}) {
    fake_cuda::SetDeferred(deferred);
    cudaStream_t s1 = nullptr, s2 = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking), cudaSuccess);
    ASSERT_EQ(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking), cudaSuccess);
    float* d = nullptr;
    ASSERT_EQ(cudaMalloc(&d, 2 * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMemset(d, 0, 2 * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    int runs = 0;
    bool release = false;
    ASSERT_EQ(fake_cuda::EnqueueStep(s1,
                                     [&runs, &release] {
                                       ++runs;
                                       return release;
                                     }),
              cudaSuccess);
    EXPECT_EQ(runs, deferred ? 0 : 1) << "at issue, a step first runs when it is enqueued";
    ASSERT_EQ(fake_cuda::Enqueue(s1, [d] { d[0] = 1.f; }), cudaSuccess);
    cudaEvent_t e = nullptr;
    ASSERT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
    ASSERT_EQ(cudaEventRecord(e, s1), cudaSuccess);
    ASSERT_EQ(cudaStreamWaitEvent(s2, e, 0), cudaSuccess);
    ASSERT_EQ(fake_cuda::Enqueue(s2, [d] { d[1] = 2.f; }), cudaSuccess);
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(cudaStreamQuery(s1), cudaErrorNotReady);
      EXPECT_EQ(cudaEventQuery(e), cudaErrorNotReady);
      EXPECT_EQ(cudaStreamQuery(s2), cudaErrorNotReady);
    }
    std::vector<float> host(2, -1.f);
    ASSERT_EQ(cudaMemcpyAsync(host.data(), d, 2 * sizeof(float), cudaMemcpyDeviceToHost, nullptr), cudaSuccess);
    EXPECT_EQ(host, (std::vector<float>{0.f, 0.f})) << "work behind the incomplete step ran";
    const int before = runs;
    EXPECT_GT(before, 3);
    release = true;
    ASSERT_EQ(cudaStreamSynchronize(s2), cudaSuccess);
    EXPECT_EQ(runs, before + 1);
    ASSERT_EQ(cudaMemcpy(host.data(), d, 2 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(host, (std::vector<float>{1.f, 2.f}));
    EXPECT_EQ(cudaEventDestroy(e), cudaSuccess);
    for (cudaStream_t s : {s1, s2}) EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
    EXPECT_EQ(cudaFree(d), cudaSuccess);
  }
}

// The runtime's documented synchronization of copies ("API synchronization behavior"), deferred as late as it
// allows. cudaMemcpy from pageable memory returns once the bytes are staged (the source may be reused), "but the
// DMA to final destination may not have completed": it lands on the legacy stream, which a non-blocking stream
// does not wait for and a blocking one (cudaStreamCreate) does. Copies to pageable host memory are complete on
// return, cudaMemcpyAsync's too.
TEST_F(FakeCudaTest, DeferredCopiesFollowTheDocumentedSynchronization) {
  fake_cuda::SetDeferred(true);
  cudaStream_t nonblocking = nullptr, blocking = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&nonblocking, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreate(&blocking), cudaSuccess);
  int* d = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), 2 * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMemset(d, 0, 2 * sizeof(int)), cudaSuccess);  // legacy stream, asynchronous
  ASSERT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
  std::vector<int> pageable = {5, 6}, pinned = {-1, -1};
  ASSERT_EQ(cudaHostRegister(pinned.data(), 2 * sizeof(int), cudaHostRegisterPortable), cudaSuccess);

  ASSERT_EQ(cudaMemcpy(d, pageable.data(), 2 * sizeof(int), cudaMemcpyHostToDevice), cudaSuccess);
  pageable = {7, 8};  // staged already: the copy carries 5, 6
  ASSERT_EQ(cudaMemcpyAsync(pinned.data(), d, 2 * sizeof(int), cudaMemcpyDeviceToHost, nonblocking), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(nonblocking), cudaSuccess);
  EXPECT_EQ(pinned, (std::vector<int>{0, 0})) << "the non-blocking stream read d before the DMA landed";
  ASSERT_EQ(cudaMemcpyAsync(pinned.data(), d, 2 * sizeof(int), cudaMemcpyDeviceToHost, blocking), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(blocking), cudaSuccess);
  EXPECT_EQ(pinned, (std::vector<int>{5, 6})) << "a blocking stream waits for the legacy stream's earlier work";

  // Into pageable memory: complete when the call returns, after the stream's earlier work.
  ASSERT_EQ(cudaMemsetAsync(d, 0, sizeof(int), nonblocking), cudaSuccess);
  std::vector<int> back = {-1, -1};
  ASSERT_EQ(cudaMemcpyAsync(back.data(), d, 2 * sizeof(int), cudaMemcpyDeviceToHost, nonblocking), cudaSuccess);
  EXPECT_EQ(back, (std::vector<int>{0, 6}));
  // cudaMemcpy to the host waits for the legacy stream's earlier work.
  ASSERT_EQ(cudaMemcpy(d, pageable.data(), 2 * sizeof(int), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(back.data(), d, 2 * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, (std::vector<int>{7, 8}));

  ASSERT_EQ(cudaHostUnregister(pinned.data()), cudaSuccess);
  for (cudaStream_t s : {nonblocking, blocking}) EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
  EXPECT_EQ(cudaFree(d), cudaSuccess);
}

// Two devices. Device 1's memory, stream and event, made while it is current, keep device 1 when device 0 becomes
// current; the current device is per thread. From device 0: a kernel (fake_cuda::Enqueue) on device 1's stream
// fails with cudaErrorInvalidResourceHandle; recording device 1's event on device 0's legacy stream fails too, on
// its own stream it succeeds; device 0's legacy stream may wait for it; a copy between the devices succeeds.
TEST_F(FakeCudaTest, SeveralDevicesFollowTheMultiDeviceRules) {
  fake_cuda::SetDeviceCount(2);
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess);
  EXPECT_EQ(count, 2);
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  void *a = nullptr, *b = nullptr;
  cudaStream_t s1 = nullptr;
  cudaEvent_t e1 = nullptr;
  ASSERT_EQ(cudaMalloc(&a, 64), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&e1, cudaEventDisableTiming), cudaSuccess);
  size_t free1 = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free1, &total), cudaSuccess);
  EXPECT_EQ(free1, total - 64);  // device 1's bytes
  int other_thread_device = -1;
  std::thread([&] { (void)cudaGetDevice(&other_thread_device); }).join();
  EXPECT_EQ(other_thread_device, 0);  // per thread: a new thread starts on device 0

  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&b, 64), cudaSuccess);
  size_t free0 = 0;
  ASSERT_EQ(cudaMemGetInfo(&free0, &total), cudaSuccess);
  EXPECT_EQ(free0, total - 64);
  EXPECT_EQ(fake_cuda::DeviceOf(a), 1);
  EXPECT_EQ(fake_cuda::DeviceOf(b), 0);
  EXPECT_EQ(fake_cuda::DeviceOf(&count), -1);
  EXPECT_EQ(fake_cuda::StreamDevice(s1), 1);
  EXPECT_EQ(fake_cuda::StreamDevice(nullptr), 0);
  cudaPointerAttributes attr;
  ASSERT_EQ(cudaPointerGetAttributes(&attr, static_cast<char*>(a) + 8), cudaSuccess);
  EXPECT_EQ(attr.device, 1);

  bool ran = false;
  EXPECT_EQ(fake_cuda::Enqueue(s1, [&] { ran = true; }), cudaErrorInvalidResourceHandle);
  EXPECT_FALSE(ran);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(fake_cuda::Enqueue(nullptr, [&] { ran = true; }), cudaSuccess);  // device 0's own legacy stream
  EXPECT_TRUE(ran);
  EXPECT_EQ(cudaEventRecord(e1, nullptr), cudaErrorInvalidResourceHandle);  // event of device 1, stream of 0
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaEventRecord(e1, s1), cudaSuccess);
  EXPECT_EQ(cudaStreamWaitEvent(nullptr, e1, 0), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(e1), cudaSuccess);
  // Copies cross devices (peer copies through unified addressing).
  ASSERT_EQ(cudaMemset(a, 7, 64), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(b, a, 64, cudaMemcpyDeviceToDevice), cudaSuccess);
  std::vector<char> back(64);
  ASSERT_EQ(cudaMemcpy(back.data(), b, 64, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, std::vector<char>(64, 7));

  EXPECT_EQ(cudaEventDestroy(e1), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(s1), cudaSuccess);
  EXPECT_EQ(cudaFree(a), cudaSuccess);
  EXPECT_EQ(cudaFree(b), cudaSuccess);
}

}  // namespace

// A host-only stand-in for the subset of the CUDA runtime that the LoRA example's CUDA model
// (examples/lora_finetune/model_cuda.cu) and its test use, so that the model's host code (allocation, copies, the
// matrix products' arguments, the kernels' plumbing) runs on a machine without a GPU and is compared with the CPU
// model in ctest (tests/lora_cuda_model_emulated_test.cc). Put this directory first on the include path of such a
// target and never on one that uses the real runtime.
//
// What it checks that a plain "malloc" stand-in would not:
//   - device memory is a separate world: each allocation is its own mapping, inaccessible (PROT_NONE) except while
//     a runtime call, a cuBLAS call or an emulated kernel runs, so host code that reads or writes device memory
//     directly faults here as it would (or worse, silently misbehave) on a GPU;
//   - copies name their direction: a kind that does not match where the pointers are (host or device), or a range
//     outside its allocation, fails with cudaErrorInvalidValue, as does freeing what was not allocated;
//   - the last error is sticky until cudaGetLastError, like the runtime's.
// What it does not show: everything runs synchronously in issue order on the calling thread (no stream
// concurrency, no ordering bug can appear), and kernels run through the CPU emulation of testing/cuda_emulation.h.
//
// The names are CUDA's; the types are distinct (Fake* tags) and the functions have C++ linkage, so a program may
// link the real runtime as well (libzero does) without a clash.
#pragma once

#include <cstddef>
#include <cstdint>

enum FakeCudaError : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
};
using cudaError_t = FakeCudaError;

enum FakeCudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
using cudaMemcpyKind = FakeCudaMemcpyKind;

struct FakeCudaStream;  // only the legacy default stream (nullptr) exists
using cudaStream_t = FakeCudaStream*;

enum FakeCudaDataType : int {
  CUDA_R_32F = 0,
  CUDA_R_16BF = 14,
};
using cudaDataType = FakeCudaDataType;

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);

cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream);

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();

namespace fake_cuda {

// Device bytes allocated now and at most since the last ResetPeak (what a test compares with an estimate).
int64_t LiveBytes();
int64_t PeakBytes();
void ResetPeak();
// Live allocations (a leak check for tests).
int64_t LiveAllocations();

// Makes device memory accessible for the lifetime of the object (kernels, cuBLAS, the runtime's own calls).
// Nests; not for use by the code under test.
class DeviceAccess {
 public:
  DeviceAccess();
  ~DeviceAccess();
  DeviceAccess(const DeviceAccess&) = delete;
  DeviceAccess& operator=(const DeviceAccess&) = delete;
};

// Records a failure as the runtime's sticky last error (a kernel launch that was refused).
void SetLastError(cudaError_t e);
// Whether [p, p + bytes) lies inside one device allocation.
bool IsDevice(const void* p, size_t bytes);

}  // namespace fake_cuda

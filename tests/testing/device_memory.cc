// CUDA runtime calls for the test helpers (device_memory.h).
#include "testing/device_memory.h"

#include <string>

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace zero::testing {

#if defined(ZERO_WITH_CUDA)
namespace {
Status Check(const char* what, cudaError_t rc) {
  if (rc == cudaSuccess) return Status::Ok();
  cudaGetLastError();  // leave no sticky last error for an unrelated launch check
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(rc));
}
}  // namespace

Status CudaDeviceCount(int* count) {
  *count = 0;
  const cudaError_t rc = cudaGetDeviceCount(count);
  if (rc != cudaSuccess) {
    cudaGetLastError();
    *count = 0;
    return Status::Unavailable(std::string("cudaGetDeviceCount: ") + cudaGetErrorString(rc));
  }
  if (*count == 0) return Status::Unavailable("no CUDA device");
  return Status::Ok();
}
Status CudaSetDevice(int device) { return Check("cudaSetDevice", cudaSetDevice(device)); }
Status DeviceMalloc(int64_t bytes, void** out) {
  *out = nullptr;
  return Check("cudaMalloc", cudaMalloc(out, static_cast<size_t>(bytes)));
}
void DeviceFree(void* p) {
  if (p != nullptr) cudaFree(p);
}
Status DeviceSynchronize() { return Check("cudaDeviceSynchronize", cudaDeviceSynchronize()); }
Status NewNonBlockingStream(void** stream) {
  cudaStream_t s = nullptr;
  Status st = Check("cudaStreamCreateWithFlags", cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  *stream = s;
  return st;
}
void DestroyStream(void* stream) {
  if (stream != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
}
Status MemsetAsync(void* p, int byte, int64_t bytes, void* stream) {
  return Check("cudaMemsetAsync",
               cudaMemsetAsync(p, byte, static_cast<size_t>(bytes), static_cast<cudaStream_t>(stream)));
}
Status StreamSynchronize(void* stream) {
  return Check("cudaStreamSynchronize", cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}
#else
namespace {
Status NoCuda() { return Status::Unavailable("this build has no CUDA (ZERO_WITH_CUDA=OFF or no toolkit)"); }
}  // namespace
Status CudaDeviceCount(int* count) {
  *count = 0;
  return NoCuda();
}
Status CudaSetDevice(int) { return NoCuda(); }
Status DeviceMalloc(int64_t, void** out) {
  *out = nullptr;
  return NoCuda();
}
void DeviceFree(void*) {}
Status DeviceSynchronize() { return NoCuda(); }
Status NewNonBlockingStream(void** stream) {
  *stream = nullptr;
  return NoCuda();
}
void DestroyStream(void*) {}
Status MemsetAsync(void*, int, int64_t, void*) { return NoCuda(); }
Status StreamSynchronize(void*) { return NoCuda(); }
#endif

}  // namespace zero::testing

// CudaDevice: the Device interface over the CUDA runtime (never the driver library, so binaries load and report
// Unavailable on machines without a driver). Allocation only; streams and events come with the stream protocol.
#include "device.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#endif

namespace zero {

#if defined(ZERO_WITH_CUDA)
namespace {

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int ordinal) : ordinal_(ordinal) {}
  Backend backend() const override { return Backend::kCuda; }

 protected:
  // Zero-filled like CpuDevice: padding must be zero. Allocation is never on the step path, so the synchronous
  // memset costs nothing that matters.
  void* RawAllocate(int64_t bytes, MemoryKind kind) override {
    if (cudaSetDevice(ordinal_) != cudaSuccess) return nullptr;
    void* p = nullptr;
    const auto n = static_cast<size_t>(bytes);
    switch (kind) {
      case MemoryKind::kDevice:
        if (cudaMalloc(&p, n) != cudaSuccess) return nullptr;
        if (cudaMemset(p, 0, n) != cudaSuccess) {
          cudaFree(p);
          return nullptr;
        }
        return p;
      case MemoryKind::kPinnedHost:
        if (cudaHostAlloc(&p, n, cudaHostAllocPortable) != cudaSuccess) return nullptr;
        std::memset(p, 0, n);
        return p;
      case MemoryKind::kPageableHost:
        p = std::calloc(1, n);
        return p;
    }
    return nullptr;
  }
  void RawFree(void* ptr, int64_t, MemoryKind kind) override {
    switch (kind) {
      case MemoryKind::kDevice: cudaFree(ptr); break;
      case MemoryKind::kPinnedHost: cudaFreeHost(ptr); break;
      case MemoryKind::kPageableHost: std::free(ptr); break;
    }
  }

 private:
  int ordinal_;
};

}  // namespace

Status NewCudaDevice(int ordinal, std::unique_ptr<Device>* device) {
  device->reset();
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later runtime calls are not poisoned by it
    return Status::Unavailable(std::string("no usable CUDA device: ") + cudaGetErrorString(rc) +
                               "; use Backend::kCpu on machines without a GPU");
  }
  if (ordinal < 0 || ordinal >= count) {
    return Status::InvalidArgument("CUDA device " + std::to_string(ordinal) + " does not exist; this machine has " +
                                   std::to_string(count));
  }
  rc = cudaSetDevice(ordinal);
  size_t free_bytes = 0, total_bytes = 0;
  if (rc == cudaSuccess) rc = cudaMemGetInfo(&free_bytes, &total_bytes);
  if (rc != cudaSuccess) {
    return Status::Unavailable("CUDA device " + std::to_string(ordinal) + " cannot be used: " + cudaGetErrorString(rc));
  }
  auto d = std::make_unique<CudaDevice>(ordinal);
  d->set_capacity(static_cast<int64_t>(total_bytes));
  *device = std::move(d);
  return Status::Ok();
}

#else

Status NewCudaDevice(int ordinal, std::unique_ptr<Device>* device) {
  device->reset();
  return Status::Unavailable("CUDA device " + std::to_string(ordinal) +
                             ": this build of zero has no CUDA support (configured with ZERO_WITH_CUDA=OFF or no "
                             "CUDA toolkit); use Backend::kCpu");
}

#endif

}  // namespace zero

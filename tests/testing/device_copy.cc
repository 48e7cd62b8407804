#include "testing/device_copy.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace zero::testing {

#if defined(ZERO_WITH_CUDA)
namespace {
Status Copy(void* dst, const void* src, int64_t bytes) {
  const cudaError_t rc = cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault);
  return rc == cudaSuccess ? Status::Ok() : Status::Internal(std::string("cudaMemcpy: ") + cudaGetErrorString(rc));
}
}  // namespace
Status CopyFromDevice(void* host_dst, const void* device_src, int64_t bytes) { return Copy(host_dst, device_src, bytes); }
Status CopyToDevice(void* device_dst, const void* host_src, int64_t bytes) { return Copy(device_dst, host_src, bytes); }
#else
Status CopyFromDevice(void*, const void*, int64_t) { return Status::Unavailable("this build has no CUDA"); }
Status CopyToDevice(void*, const void*, int64_t) { return Status::Unavailable("this build has no CUDA"); }
#endif

}  // namespace zero::testing

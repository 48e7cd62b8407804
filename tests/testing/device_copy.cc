#include "testing/device_copy.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace zero::testing {

#if defined(ZERO_WITH_CUDA)
namespace {
Status Check(const char* what, cudaError_t rc) {
  if (rc == cudaSuccess) return Status::Ok();
  cudaGetLastError();  // no sticky last error for an unrelated launch check
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(rc));
}
}  // namespace
// A copy to the host is complete when cudaMemcpy returns.
Status CopyFromDevice(void* host_dst, const void* device_src, int64_t bytes) {
  return Check("cudaMemcpy", cudaMemcpy(host_dst, device_src, static_cast<size_t>(bytes), cudaMemcpyDefault));
}
// One from pageable memory is not: cudaMemcpy returns once the bytes are staged, "but the DMA to final destination
// may not have completed", on the legacy stream, which the engine's (and a test's) non-blocking streams do not
// wait for. A test that fills a buffer here and then works on it on such a stream would race the fill (the
// StagedComm suite's stream case read the zero-fill landing after its memset): wait for the legacy stream, as
// CudaDevice::CopyToDevice does.
Status CopyToDevice(void* device_dst, const void* host_src, int64_t bytes) {
  ZERO_RETURN_IF_ERROR(
      Check("cudaMemcpy", cudaMemcpy(device_dst, host_src, static_cast<size_t>(bytes), cudaMemcpyDefault)));
  return Check("cudaStreamSynchronize after cudaMemcpy", cudaStreamSynchronize(nullptr));
}
#else
Status CopyFromDevice(void*, const void*, int64_t) { return Status::Unavailable("this build has no CUDA"); }
Status CopyToDevice(void*, const void*, int64_t) { return Status::Unavailable("this build has no CUDA"); }
#endif

}  // namespace zero::testing

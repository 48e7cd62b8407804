// The CUDA runtime's last-error state, kept clean by the CUDA backend (CudaDevice, NcclComm).
//
// Kernel launches are checked with cudaGetLastError() right after the launch (kernels/*.cu, the LoRA example's
// model). That check reports the last error of ANY earlier runtime call of the thread that nobody cleared: a
// cudaMalloc that ran out of memory, a refused cudaHostRegister, a failed cudaEventRecord. Whenever the backend
// turns a failed call into a Status it clears the error here, so that the next launch check reports only its own
// launch. Sticky errors (a kernel fault that corrupts the context) stay whatever is done: every later call returns
// them. Include only where ZERO_WITH_CUDA is defined.
#pragma once

#include <cuda_runtime.h>

namespace zero::internal {

// `rc` after it has been reported through a Status: no longer the thread's last error.
inline cudaError_t Reported(cudaError_t rc) {
  if (rc != cudaSuccess) (void)cudaGetLastError();
  return rc;
}

// The result of cudaStreamQuery/cudaEventQuery. cudaErrorNotReady is an answer, not a failure: the CUDA runtime is
// not documented to record it as the last error (HIP does, and PyTorch clears it after every query for that
// reason). Were it recorded, the next launch check of this thread would fail with "device not ready"; clearing a
// recorded NotReady, and nothing else, costs nobody an error of their own.
inline cudaError_t Queried(cudaError_t rc) {
  if (rc == cudaErrorNotReady && cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
  return rc;
}

}  // namespace zero::internal

// CUDA instantiation of the toy model's work items (toy_math.cuh): one grid-stride kernel per op, launched on the
// trainer's stream, which is the engine's compute stream on CUDA (Options::cuda_stream; by default the legacy
// default stream). Built with --fmad=false so that the items give the CPU loop's bits.
#include <cuda_runtime.h>

#include <string>

#include "kernels/launch.cuh"
#include "testing/toy_kernels_cuda.h"

namespace zero::testing {
namespace {

__global__ void ToyOpKernel(ToyOp op, ToyArgs args, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    RunToyOpItem(op, args, i);
  }
}

}  // namespace

std::string LaunchToyOpCuda(ToyOp op, const ToyArgs& args, void* stream) {
  const int64_t n = ToyOpCount(op, args);
  if (n == 0) return "";
  // A null stream is the legacy default stream: this build does not use --default-stream per-thread.
  ToyOpKernel<<<kernels::BlocksFor(n), kernels::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(op, args, n);
  const cudaError_t rc = cudaGetLastError();
  return rc == cudaSuccess ? std::string() : std::string("toy op kernel launch: ") + cudaGetErrorString(rc);
}

}  // namespace zero::testing

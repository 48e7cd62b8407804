// CUDA instantiation of the written-once device math (see optimizer.cuh): grid-stride launchers.
// Compiled for sm_80 and sm_90 with warnings as errors whenever CUDA is on; never run on machines without a GPU.
#include <cuda_runtime.h>

#include "kernels/cuda_kernels.h"
#include "kernels/launch.cuh"

namespace zero::kernels {
namespace {

__global__ void AdamWKernel(AdamWElement f, float* p, float* m, float* v, const float* g, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(p[i], m[i], v[i], g[i]);
  }
}

__global__ void SgdKernel(SgdElement f, float* p, float* buf, const float* g, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(p[i], buf[i], g[i]);
  }
}

__global__ void AccumulateKernel(float* acc, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    acc[i] += x[i];
  }
}

}  // namespace

int AdamWCuda(const AdamWCoeffs& c, float* p, float* m, float* v, const float* g, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  AdamWKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(AdamWElement{c}, p, m, v, g, n);
  return static_cast<int>(cudaGetLastError());
}

int SgdCuda(const SgdCoeffs& c, float* p, float* buf, const float* g, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  SgdKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(SgdElement{c}, p, buf, g, n);
  return static_cast<int>(cudaGetLastError());
}

int AccumulateCuda(float* acc, const float* x, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  AccumulateKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(acc, x, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace zero::kernels

// CUDA instantiation of the written-once device math (see optimizer.cuh): grid-stride launchers.
// Compiled for sm_80 and sm_90 with warnings as errors whenever CUDA is on; never run on machines without a GPU.
#include <cuda_runtime.h>

#include "kernels/cast.cuh"
#include "kernels/cuda_kernels.h"
#include "kernels/launch.cuh"

namespace zero::kernels {
namespace {

// The low-precision copy of the updated master, written in the same pass (or not at all).
struct NoCopy {
  __device__ void operator()(int64_t, float) const {}
};
struct Bf16Copy {
  Bf16Bits* out;
  __device__ void operator()(int64_t i, float p) const { out[i] = FloatToBf16(p); }
};
struct F16Copy {
  F16Bits* out;
  __device__ void operator()(int64_t i, float p) const { out[i] = FloatToF16(p); }
};

template <typename Copy>
__global__ void AdamWKernel(AdamWElement f, float* p, float* m, float* v, const float* g, int64_t n, Copy copy) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(p[i], m[i], v[i], g[i]);
    copy(i, p[i]);
  }
}

template <typename Copy>
__global__ void SgdKernel(SgdElement f, float* p, float* buf, const float* g, int64_t n, Copy copy) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(p[i], buf[i], g[i]);
    copy(i, p[i]);
  }
}

// Launches `kernel` with the copy functor `kind` asks for.
template <typename Launch>
int WithCopy(void* copy, CopyKind kind, Launch launch) {
  switch (kind) {
    case CopyKind::kNone: launch(NoCopy{}); break;
    case CopyKind::kBf16: launch(Bf16Copy{static_cast<Bf16Bits*>(copy)}); break;
    case CopyKind::kF16: launch(F16Copy{static_cast<F16Bits*>(copy)}); break;
  }
  return static_cast<int>(cudaGetLastError());
}

__global__ void AccumulateKernel(float* acc, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    acc[i] += x[i];
  }
}

}  // namespace

int AdamWCuda(const AdamWCoeffs& c, float* p, float* m, float* v, const float* g, void* copy, CopyKind kind,
              int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return WithCopy(copy, kind, [&](auto f) {
    AdamWKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(AdamWElement{c}, p, m, v, g, n, f);
  });
}

int SgdCuda(const SgdCoeffs& c, float* p, float* buf, const float* g, void* copy, CopyKind kind, int64_t n,
            void* stream) {
  if (n == 0) return cudaSuccess;
  return WithCopy(copy, kind, [&](auto f) {
    SgdKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(SgdElement{c}, p, buf, g, n, f);
  });
}

int AccumulateCuda(float* acc, const float* x, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  AccumulateKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(acc, x, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace zero::kernels

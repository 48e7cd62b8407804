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

// Gradient loads, widening exactly to fp32.
struct LoadF32 {
  const float* g;
  __device__ float operator()(int64_t i) const { return g[i]; }
};
struct LoadBf16 {
  const Bf16Bits* g;
  __device__ float operator()(int64_t i) const { return Bf16ToFloat(g[i]); }
};
struct LoadF16 {
  const F16Bits* g;
  __device__ float operator()(int64_t i) const { return F16ToFloat(g[i]); }
};

template <typename Load, typename Copy>
__global__ void AdamWKernel(AdamWElement f, float* p, float* m, float* v, Load g, int64_t n, Copy copy) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(p[i], m[i], v[i], g(i));
    copy(i, p[i]);
  }
}

template <typename Load, typename Copy>
__global__ void SgdKernel(SgdElement f, float* p, float* buf, Load g, int64_t n, Copy copy) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(p[i], buf[i], g(i));
    copy(i, p[i]);
  }
}

// Calls launch(load, copy) with the functors `gk` and `kind` ask for.
template <typename Launch>
int WithLoadAndCopy(const void* g, GradKind gk, void* copy, CopyKind kind, Launch launch) {
  auto with_copy = [&](auto load) {
    switch (kind) {
      case CopyKind::kNone: launch(load, NoCopy{}); break;
      case CopyKind::kBf16: launch(load, Bf16Copy{static_cast<Bf16Bits*>(copy)}); break;
      case CopyKind::kF16: launch(load, F16Copy{static_cast<F16Bits*>(copy)}); break;
    }
  };
  switch (gk) {
    case GradKind::kF32: with_copy(LoadF32{static_cast<const float*>(g)}); break;
    case GradKind::kBf16: with_copy(LoadBf16{static_cast<const Bf16Bits*>(g)}); break;
    case GradKind::kF16: with_copy(LoadF16{static_cast<const F16Bits*>(g)}); break;
  }
  return static_cast<int>(cudaGetLastError());
}

__global__ void AccumulateKernel(float* acc, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    acc[i] += x[i];
  }
}

template <float (*Widen)(uint16_t), uint16_t (*Narrow)(float)>
__global__ void AccumulateHalfKernel(uint16_t* acc, const uint16_t* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    acc[i] = Narrow(Widen(acc[i]) + Widen(x[i]));
  }
}

}  // namespace

int AdamWCuda(const AdamWCoeffs& c, float* p, float* m, float* v, const void* g, GradKind gk, void* copy,
              CopyKind kind, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return WithLoadAndCopy(g, gk, copy, kind, [&](auto load, auto f) {
    AdamWKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(AdamWElement{c}, p, m, v, load, n,
                                                                                 f);
  });
}

int SgdCuda(const SgdCoeffs& c, float* p, float* buf, const void* g, GradKind gk, void* copy, CopyKind kind,
            int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return WithLoadAndCopy(g, gk, copy, kind, [&](auto load, auto f) {
    SgdKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(SgdElement{c}, p, buf, load, n, f);
  });
}

int AccumulateCuda(void* acc, const void* x, GradKind gk, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  switch (gk) {
    case GradKind::kF32:
      AccumulateKernel<<<BlocksFor(n), kThreads, 0, s>>>(static_cast<float*>(acc), static_cast<const float*>(x), n);
      break;
    case GradKind::kBf16:
      AccumulateHalfKernel<Bf16ToFloat, FloatToBf16><<<BlocksFor(n), kThreads, 0, s>>>(
          static_cast<uint16_t*>(acc), static_cast<const uint16_t*>(x), n);
      break;
    case GradKind::kF16:
      AccumulateHalfKernel<F16ToFloat, FloatToF16><<<BlocksFor(n), kThreads, 0, s>>>(
          static_cast<uint16_t*>(acc), static_cast<const uint16_t*>(x), n);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace zero::kernels

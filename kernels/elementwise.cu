// CUDA instantiation of the written-once element-wise math: casts (kernels/cast.cuh) and scale. Grid-stride
// launchers; compiled for sm_80 and sm_90 with warnings as errors whenever CUDA is on.
#include <cuda_runtime.h>

#include "kernels/cast.cuh"
#include "kernels/cuda_kernels.h"
#include "kernels/launch.cuh"

namespace zero::kernels {
namespace {

template <typename From, typename To, typename Fn>
__global__ void ConvertKernel(const From* in, To* out, int64_t n, Fn fn) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = fn(in[i]);
  }
}

__global__ void ScaleKernel(float* x, float s, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    x[i] *= s;
  }
}

struct ToBf16 {
  __device__ Bf16Bits operator()(float v) const { return FloatToBf16(v); }
};
struct ToF16 {
  __device__ F16Bits operator()(float v) const { return FloatToF16(v); }
};
struct FromBf16 {
  __device__ float operator()(Bf16Bits v) const { return Bf16ToFloat(v); }
};
struct FromF16 {
  __device__ float operator()(F16Bits v) const { return F16ToFloat(v); }
};

template <typename Fn, typename From, typename To>
int Launch(const From* src, To* dst, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  ConvertKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(src, dst, n, Fn{});
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int ScaleCuda(float* x, float s, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  ScaleKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, s, n);
  return static_cast<int>(cudaGetLastError());
}

int CastF32ToBf16Cuda(const float* src, Bf16Bits* dst, int64_t n, void* stream) {
  return Launch<ToBf16>(src, dst, n, stream);
}
int CastF32ToF16Cuda(const float* src, F16Bits* dst, int64_t n, void* stream) {
  return Launch<ToF16>(src, dst, n, stream);
}
int CastBf16ToF32Cuda(const Bf16Bits* src, float* dst, int64_t n, void* stream) {
  return Launch<FromBf16>(src, dst, n, stream);
}
int CastF16ToF32Cuda(const F16Bits* src, float* dst, int64_t n, void* stream) {
  return Launch<FromF16>(src, dst, n, stream);
}

}  // namespace zero::kernels

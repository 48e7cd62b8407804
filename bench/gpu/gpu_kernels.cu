// The GPU benchmarks' reference and helper kernels (gpu_kernels.h). Grid-stride loops over groups of four
// elements with vector accesses, so that the references are what the hardware gives (not what a scalar loop
// gives): zero's kernels are measured against these.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bench/gpu/gpu_kernels.h"

namespace zero::bench::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

int Blocks(int64_t items) { return static_cast<int>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, kMaxBlocks)); }

__device__ __forceinline__ float Bf16Widen(uint32_t bits16) { return __uint_as_float(bits16 << 16); }
__device__ __forceinline__ uint32_t TopHalf(float f) { return __float_as_uint(f) >> 16; }

// Four bf16 values in a uint2 (little endian: element 0 in the low half of x).
__device__ __forceinline__ float4 WidenBf16x4(uint2 b) {
  return make_float4(Bf16Widen(b.x & 0xffffu), Bf16Widen(b.x >> 16), Bf16Widen(b.y & 0xffffu), Bf16Widen(b.y >> 16));
}

__device__ __forceinline__ float4 AddZero(float4 a, float zero) {
  return make_float4(a.x + zero, a.y + zero, a.z + zero, a.w + zero);
}

template <bool kBf16Grad, bool kTwoStates, bool kCopy>
__global__ void StreamOptimizerKernel(float* p, float* s0, float* s1, const void* g, uint16_t* copy, int64_t n,
                                      float zero) {
  const int64_t quads = n / 4;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  for (int64_t q = first; q < quads; q += stride) {
    const float4 gv = kBf16Grad ? WidenBf16x4(static_cast<const uint2*>(g)[q]) : static_cast<const float4*>(g)[q];
    float4 pv = reinterpret_cast<float4*>(p)[q];
    pv = make_float4(pv.x + gv.x * zero, pv.y + gv.y * zero, pv.z + gv.z * zero, pv.w + gv.w * zero);
    reinterpret_cast<float4*>(p)[q] = pv;
    reinterpret_cast<float4*>(s0)[q] = AddZero(reinterpret_cast<float4*>(s0)[q], zero);
    if (kTwoStates) reinterpret_cast<float4*>(s1)[q] = AddZero(reinterpret_cast<float4*>(s1)[q], zero);
    if (kCopy) {
      reinterpret_cast<uint2*>(copy)[q] =
          make_uint2(TopHalf(pv.x) | (TopHalf(pv.y) << 16), TopHalf(pv.z) | (TopHalf(pv.w) << 16));
    }
  }
  // The n % 4 tail, one element per thread of the first threads.
  const int64_t i = quads * 4 + first;
  if (i < n) {
    const float gi = kBf16Grad ? Bf16Widen(static_cast<const uint16_t*>(g)[i]) : static_cast<const float*>(g)[i];
    p[i] = p[i] + gi * zero;
    s0[i] = s0[i] + zero;
    if (kTwoStates) s1[i] = s1[i] + zero;
    if (kCopy) copy[i] = static_cast<uint16_t>(TopHalf(p[i]));
  }
}

template <bool kBf16>
__global__ void StreamSumSquaresKernel(const void* x, int64_t n, float* out) {
  const int64_t quads = n / 4;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  float acc = 0.0f;
  for (int64_t q = first; q < quads; q += stride) {
    const float4 v = kBf16 ? WidenBf16x4(static_cast<const uint2*>(x)[q]) : static_cast<const float4*>(x)[q];
    acc += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  const int64_t i = quads * 4 + first;
  if (i < n) {
    const float v = kBf16 ? Bf16Widen(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
    acc += v * v;
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  __shared__ float warp_sums[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
    atomicAdd(out, s);
  }
}

__device__ __forceinline__ float HashUniform(uint64_t seed, int64_t i) {
  uint64_t z = static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull + seed * 0xbf58476d1ce4e5b9ull + 1;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) * 0x1p-23 - 1.0);
}

__global__ void FillKernel(void* x, bool bf16, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float v = scale * HashUniform(seed, i);
    if (bf16) {
      const uint32_t u = __float_as_uint(v);
      static_cast<uint16_t*>(x)[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
      static_cast<float*>(x)[i] = v;
    }
  }
}

}  // namespace

int StreamLikeOptimizer(float* p, float* s0, float* s1, const void* g, bool g_bf16, uint16_t* copy, int64_t n,
                        float zero, void* stream) {
  if (n <= 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  const int grid = Blocks(n / 4 + 1);
  const bool two = s1 != nullptr, cp = copy != nullptr;
  // Eight instantiations: gradient dtype x one or two states x copy.
#define ZERO_STREAM_CASE(B, T, C)                                                              \
  if (g_bf16 == (B) && two == (T) && cp == (C)) {                                              \
    StreamOptimizerKernel<B, T, C><<<grid, kThreads, 0, s>>>(p, s0, s1, g, copy, n, zero);     \
  }
  ZERO_STREAM_CASE(false, false, false)
  ZERO_STREAM_CASE(false, false, true)
  ZERO_STREAM_CASE(false, true, false)
  ZERO_STREAM_CASE(false, true, true)
  ZERO_STREAM_CASE(true, false, false)
  ZERO_STREAM_CASE(true, false, true)
  ZERO_STREAM_CASE(true, true, false)
  ZERO_STREAM_CASE(true, true, true)
#undef ZERO_STREAM_CASE
  return static_cast<int>(cudaGetLastError());
}

int StreamSumSquares(const void* x, bool bf16, int64_t n, float* out, void* stream) {
  if (n <= 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  const int grid = Blocks(n / 4 + 1);
  if (bf16) {
    StreamSumSquaresKernel<true><<<grid, kThreads, 0, s>>>(x, n, out);
  } else {
    StreamSumSquaresKernel<false><<<grid, kThreads, 0, s>>>(x, n, out);
  }
  return static_cast<int>(cudaGetLastError());
}

int FillPattern(void* x, bool bf16, int64_t n, uint64_t seed, float scale, void* stream) {
  if (n <= 0) return cudaSuccess;
  FillKernel<<<Blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, bf16, n, seed, scale);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace zero::bench::gpu

// CUDA instantiation of the blockwise quantization (kernels/quantize.cuh). Quantizing: one CUDA block of
// kQuantBlock / 2 threads per quantization block (grid-stride over blocks), each thread owning a pair of elements
// like the CPU loop's pairs; the block's maximum is a shared-memory tree (a maximum is exact in any order, so the
// scale equals the CPU's). Everything else: grid-stride over elements. Compiled for sm_80 and sm_90 with warnings
// as errors whenever CUDA is on; it runs only where a GPU is.
#include <cuda_runtime.h>

#include "kernels/launch.cuh"
#include "kernels/quantize.h"

namespace zero::kernels {
namespace {

constexpr int kPairThreads = static_cast<int>(kQuantBlock / 2);

__global__ void QuantizeKernel(const void* src, QuantElem kind, int64_t n, int bits, float* scales, uint8_t* codes,
                               int64_t code_bytes, int64_t padded_code_bytes) {
  __shared__ float amax[kPairThreads];
  __shared__ int finite[kPairThreads];
  const int t = static_cast<int>(threadIdx.x);
  const int64_t blocks = QuantBlocks(n);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t i0 = b * kQuantBlock + 2 * t;
    const bool first = i0 < n, second = i0 + 1 < n;
    const float x0 = first ? LoadAsFloat(src, i0, kind) : 0.0f;
    const float x1 = second ? LoadAsFloat(src, i0 + 1, kind) : 0.0f;
    float m = 0.0f;
    if (QuantFinite(x0)) m = fabsf(x0);
    if (QuantFinite(x1)) m = fmaxf(m, fabsf(x1));
    amax[t] = m;
    finite[t] = QuantFinite(x0) && QuantFinite(x1);
    __syncthreads();
    for (int stride = kPairThreads / 2; stride > 0; stride /= 2) {
      if (t < stride) {
        amax[t] = fmaxf(amax[t], amax[t + stride]);
        finite[t] = finite[t] && finite[t + stride];
      }
      __syncthreads();
    }
    const float scale = QuantScale(amax[0], finite[0] != 0, bits);
    if (t == 0) scales[b] = scale;
    if (first) {
      QuantEncodePair(QuantEncode(x0, scale, bits), second ? QuantEncode(x1, scale, bits) : 0, second, bits, codes, i0);
    }
    __syncthreads();  // amax[0] is read above before the next block overwrites it
  }
  // The padding after the codes travels with the payload: keep it defined.
  for (int64_t i = code_bytes + blockIdx.x * int64_t{blockDim.x} + t; i < padded_code_bytes;
       i += int64_t{gridDim.x} * blockDim.x) {
    codes[i] = 0;
  }
}

__global__ void DequantizeKernel(const uint8_t* codes, const float* scales, int64_t n, int bits, void* dst,
                                 QuantElem kind) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    StoreFromFloat(dst, i, QuantDecode(codes, scales, i, bits), kind);
  }
}

__global__ void DequantizeAddKernel(const uint8_t* codes, const float* scales, int64_t n, int bits, float* acc) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    acc[i] += QuantDecode(codes, scales, i, bits);
  }
}

__global__ void WidenAddKernel(const void* src, QuantElem kind, int64_t n, float* acc) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    acc[i] += LoadAsFloat(src, i, kind);
  }
}

__global__ void ConvertKernel(const void* src, QuantElem src_kind, void* dst, QuantElem dst_kind, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    StoreFromFloat(dst, i, LoadAsFloat(src, i, src_kind), dst_kind);
  }
}

const uint8_t* CodesOf(const void* payload, int64_t n) {
  return static_cast<const uint8_t*>(payload) + 4 * QuantBlocks(n);
}

}  // namespace

int QuantizeCuda(const void* src, QuantElem kind, int64_t n, int bits, void* payload, void* stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = QuantBlocks(n);
  const int grid = static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
  auto* scales = static_cast<float*>(payload);
  auto* codes = static_cast<uint8_t*>(payload) + 4 * blocks;
  QuantizeKernel<<<grid, kPairThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      src, kind, n, bits, scales, codes, QuantCodeBytes(n, bits), QuantPayloadBytes(n, bits) - 4 * blocks);
  return static_cast<int>(cudaGetLastError());
}

int DequantizeCuda(const void* payload, int64_t n, int bits, void* dst, QuantElem kind, void* stream) {
  if (n == 0) return cudaSuccess;
  DequantizeKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      CodesOf(payload, n), static_cast<const float*>(payload), n, bits, dst, kind);
  return static_cast<int>(cudaGetLastError());
}

int DequantizeAddCuda(const void* payload, int64_t n, int bits, float* acc, void* stream) {
  if (n == 0) return cudaSuccess;
  DequantizeAddKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      CodesOf(payload, n), static_cast<const float*>(payload), n, bits, acc);
  return static_cast<int>(cudaGetLastError());
}

int WidenAddCuda(const void* src, QuantElem kind, int64_t n, float* acc, void* stream) {
  if (n == 0) return cudaSuccess;
  WidenAddKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(src, kind, n, acc);
  return static_cast<int>(cudaGetLastError());
}

int ConvertCuda(const void* src, QuantElem src_kind, void* dst, QuantElem dst_kind, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  ConvertKernel<<<BlocksFor(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(src, src_kind, dst, dst_kind, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace zero::kernels

// The blockwise quantization's CUDA kernels (kernels/quantize.cuh's format on a GPU), in a header so that nvcc
// (kernels/quantize.cu, which launches them) and the CPU emulation test (tests/cuda_emulation_test.cc, through
// tests/testing/cuda_emulation.h) compile the same source.
//
// defines: kPairThreads, QuantizeGrid, QuantizeKernel, DequantizeKernel, DequantizeAddKernel, WidenAddKernel,
//          ConvertKernel
//
// Quantizing: one CUDA block of kPairThreads = kQuantBlock / 2 threads per quantization block (grid-stride over
// blocks), each thread owning a pair of elements like the CPU loop's pairs; the block's maximum is a shared-memory
// tree (a maximum is exact in any order, so the scale equals the CPU's). Everything else: grid-stride over
// elements.
//
// Everything is in an unnamed namespace: each includer (one .cu, one test) gets its own copy, and the test's
// emulated kernels never share a symbol with libzero's nvcc-built ones.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/launch.cuh"
#include "kernels/quantize.cuh"

#if !defined(__CUDACC__) && !defined(ZERO_CUDA_EMULATION)
#error "kernel source: compile it with nvcc, or include tests/testing/cuda_emulation.h first"
#endif

namespace zero::kernels {
namespace {

constexpr int kPairThreads = static_cast<int>(kQuantBlock / 2);
// QuantizeKernel's maximum is a halving tree over kPairThreads slots: a power of two, or a slot is never read.
static_assert((kPairThreads & (kPairThreads - 1)) == 0 && kPairThreads % 32 == 0 && kPairThreads <= kMaxBlockThreads,
              "QuantizeKernel's block: a power of two of whole warps, within the runtime's block limit");

// QuantizeKernel's grid for n > 0 elements: a CUDA block per quantization block, grid-stride beyond; its block is
// kPairThreads threads (the kernel's shared arrays and pair indexing assume exactly that).
inline int QuantizeGrid(int64_t n) { return static_cast<int>(std::min<int64_t>(kMaxBlocks, QuantBlocks(n))); }

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

}  // namespace
}  // namespace zero::kernels

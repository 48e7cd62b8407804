// CUDA instantiation of the blockwise quantization (kernels/quantize.cuh): the launchers of
// kernels/quantize_kernels.cuh's kernels (shared with the CPU emulation test). Compiled for sm_80 and sm_90 with
// warnings as errors whenever CUDA is on; it runs only where a GPU is.
#include <cuda_runtime.h>

#include "kernels/launch.cuh"
#include "kernels/quantize.h"
#include "kernels/quantize_kernels.cuh"

namespace zero::kernels {
namespace {

const uint8_t* CodesOf(const void* payload, int64_t n) {
  return static_cast<const uint8_t*>(payload) + 4 * QuantBlocks(n);
}

}  // namespace

int QuantizeCuda(const void* src, QuantElem kind, int64_t n, int bits, void* payload, void* stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = QuantBlocks(n);
  const int grid = QuantizeGrid(n);
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

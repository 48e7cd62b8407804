// The CPU and CUDA instantiations of the blockwise quantization in kernels/quantize.cuh (format, error bound).
// CPU functions run on the calling thread with up to `threads` OpenMP threads and give the same result for any
// thread count; CUDA functions only enqueue on `stream` (a cudaStream_t) and return the launch status as a
// cudaError_t value (0 = success). No CUDA or public zero header here: nvcc compiles quantize.cu as C++17.
#pragma once

#include <cstdint>

#include "kernels/quantize.cuh"

namespace zero::kernels {

// payload (QuantPayloadBytes(n, bits) bytes) = the quantized n elements of src.
void QuantizeCpu(const void* src, QuantElem kind, int64_t n, int bits, void* payload, int threads);
// dst (n elements of `kind`) = the dequantized payload, rounded to `kind`.
void DequantizeCpu(const void* payload, int64_t n, int bits, void* dst, QuantElem kind, int threads);
// acc[i] += the dequantized payload element i (fp32).
void DequantizeAddCpu(const void* payload, int64_t n, int bits, float* acc, int threads);
// acc[i] += src[i] widened exactly to fp32.
void WidenAddCpu(const void* src, QuantElem kind, int64_t n, float* acc, int threads);
// dst[i] = src[i] converted (widened exactly, or rounded to nearest, ties to even).
void ConvertCpu(const void* src, QuantElem src_kind, void* dst, QuantElem dst_kind, int64_t n, int threads);

int QuantizeCuda(const void* src, QuantElem kind, int64_t n, int bits, void* payload, void* stream);
int DequantizeCuda(const void* payload, int64_t n, int bits, void* dst, QuantElem kind, void* stream);
int DequantizeAddCuda(const void* payload, int64_t n, int bits, float* acc, void* stream);
int WidenAddCuda(const void* src, QuantElem kind, int64_t n, float* acc, void* stream);
int ConvertCuda(const void* src, QuantElem src_kind, void* dst, QuantElem dst_kind, int64_t n, void* stream);

}  // namespace zero::kernels

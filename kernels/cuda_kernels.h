// CUDA instantiations of zero's device math (kernels/optimizer.cuh): thin grid-stride launchers. Streams are
// passed as void* (a cudaStream_t) so that this header needs no CUDA headers. Each call only enqueues work on
// the stream and returns the launch status as a cudaError_t value (0 = success). nvcc compiles these as C++17
// (CMake 3.25 cannot ask nvcc 13 for C++20), so this header includes no public zero header.
#pragma once

#include <cstdint>

#include "kernels/cast.cuh"
#include "kernels/optimizer.cuh"
#include "kernels/sum_squares.cuh"

namespace zero::kernels {

// The low-precision copy an optimizer step writes of the updated fp32 parameters (DType without the public
// header, which nvcc's C++17 cannot read).
enum class CopyKind : int { kNone, kBf16, kF16 };
// The element type of a gradient (widened exactly to fp32 where it is read).
enum class GradKind : int { kF32, kBf16, kF16 };
int AdamWCuda(const AdamWCoeffs& c, float* p, float* m, float* v, const void* g, GradKind gk, void* copy,
              CopyKind kind, int64_t n, void* stream);
int SgdCuda(const SgdCoeffs& c, float* p, float* buf, const void* g, GradKind gk, void* copy, CopyKind kind,
            int64_t n, void* stream);
// acc[i] += x[i] in the gradient's dtype (16-bit: add in fp32, round to nearest even).
int AccumulateCuda(void* acc, const void* x, GradKind gk, int64_t n, void* stream);
int ScaleCuda(float* x, float s, int64_t n, void* stream);
// The conversions CastCpu supports, one function each.
int CastF32ToBf16Cuda(const float* src, Bf16Bits* dst, int64_t n, void* stream);
int CastF32ToF16Cuda(const float* src, F16Bits* dst, int64_t n, void* stream);
int CastBf16ToF32Cuda(const Bf16Bits* src, float* dst, int64_t n, void* stream);
int CastF16ToF32Cuda(const F16Bits* src, float* dst, int64_t n, void* stream);

// Sums of squares of `count` ranges (device memory, all of one element type) on `stream`: copies the task table
// into `scratch` (device memory of SumSquaresScratchBytes(sizes, count) bytes, sum_squares.cuh), runs the block
// and range passes and copies the per-range totals to host_totals[0, count) (host memory; pageable makes the
// copy wait for the kernels, so the caller's one stream synchronization follows an already drained stream).
// Each total is bitwise equal to SumSquaresCpu over the same range.
int SumSquaresCuda(const SumSquaresRange* ranges, int64_t count, GradKind gk, void* scratch, SumSquares* host_totals,
                   void* stream);

}  // namespace zero::kernels

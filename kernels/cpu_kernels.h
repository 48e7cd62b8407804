// CPU instantiations of zero's device math (kernels/optimizer.cuh) and the gradient helpers the engine
// runs on host memory. Loops are vectorizable; large ranges are split over `threads` OpenMP threads. Every
// function is deterministic: results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "kernels/cast.cuh"
#include "kernels/optimizer.cuh"
#include "kernels/sum_squares.cuh"
#include "zero/types.h"

namespace zero::kernels {

// p, m, v, g: n floats. Updates p, m, v in place.
void AdamWCpu(const AdamWCoeffs& c, float* p, float* m, float* v, const float* g, int64_t n, int threads);
// p, buf, g: n floats. Updates p and buf in place.
void SgdCpu(const SgdCoeffs& c, float* p, float* buf, const float* g, int64_t n, int threads);

// The same with a bf16/fp16/fp32 gradient, widened exactly to fp32. Returns false for another dtype.
bool SgdCpu(const SgdCoeffs& c, float* p, float* buf, const void* g, DType g_dtype, int64_t n, int threads);

// acc[i] += x[i].
void AccumulateCpu(float* acc, const float* x, int64_t n, int threads);
// The same in f32, bf16 or f16 (16-bit: widen both exactly, add in fp32, round to nearest even, as a
// 16-bit reduction hop does). Returns false for another dtype.
bool AccumulateCpu(void* acc, const void* x, DType dtype, int64_t n, int threads);
// x[i] *= s.
void ScaleCpu(float* x, float s, int64_t n, int threads);
// dst[i] = src[i] converted (round to nearest even when narrowing). Supported pairs: f32 -> {f32, bf16, f16}
// and {bf16, f16} -> f32. Returns false (and writes nothing) for any other pair.
bool CastCpu(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, int threads);

// Sums fixed blocks of kSumBlock elements sequentially in fp64, then the block sums in order
// (kernels/sum_squares.cuh): the result is the same for any thread count, so it can be mirrored by a reference.
SumSquares SumSquaresCpu(const float* x, int64_t n, int threads);
// The same over bf16 or fp16 elements (each widened exactly to fp32 first); f32 forwards to the above.
// REQUIRES: dtype is kF32, kBF16 or kF16.
SumSquares SumSquaresCpu(const void* x, DType dtype, int64_t n, int threads);
// The same for `count` ranges at once (the blocks of all of them in one parallel loop), out[r] for ranges[r]: each
// bitwise what the single-range call gives, and what SumSquaresCuda computes. Returns false (and writes nothing)
// for a dtype other than kF32, kBF16 or kF16.
bool SumSquaresCpu(const SumSquaresRange* ranges, int64_t count, DType dtype, int threads, SumSquares* out);

}  // namespace zero::kernels

// Sum of squares (fp64) and non-finite count over fixed blocks, written once for the CPU (g++) and CUDA (nvcc).
//
// defines: SumSquares, kSumBlock, SumSquaresBlock
//
// A range is cut into blocks of kSumBlock elements; each block is summed sequentially in fp64, then the block
// sums are added in block order. Both instantiations (cpu_kernels.cc: blocks over OpenMP threads; reduce.cu: one
// GPU thread per block, then one thread over the block sums) therefore give the same bits for any thread count,
// and a single-process reference can mirror the order.
#pragma once

#include <cstdint>

#include "kernels/optimizer.cuh"  // ZERO_HD

namespace zero::kernels {

struct SumSquares {
  double sum = 0.0;        // sum of squares of the finite elements, in fp64
  int64_t nonfinite = 0;   // count of inf/nan elements
};

inline constexpr int64_t kSumBlock = 4096;

// Elements [begin, end) of a range, each read through load(i) as a float.
template <typename Load>
ZERO_HD SumSquares SumSquaresBlock(int64_t begin, int64_t end, Load load) {
  SumSquares r;
  for (int64_t i = begin; i < end; ++i) {
    const float e = load(i);
    if (e - e == 0.0f) {  // finite: inf - inf and nan - nan are nan
      r.sum += static_cast<double>(e) * static_cast<double>(e);
    } else {
      ++r.nonfinite;
    }
  }
  return r;
}

}  // namespace zero::kernels

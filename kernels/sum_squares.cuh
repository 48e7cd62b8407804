// Sum of squares (fp64) and non-finite count over fixed blocks, written once for the CPU (g++) and CUDA (nvcc).
//
// defines: SumSquares, kSumBlock, AddSquare, SumSquaresBlock, SumSquaresRange, SumBlocks, SumSquaresTask,
//          BuildSumSquaresTasks, SumSquaresScratchBytes
//
// A range is cut into blocks of kSumBlock elements; each block is summed sequentially in fp64, then the block
// sums are added in block order. That order is fixed (it is what a single-process reference mirrors, and the
// engine's results depend on its bits), so the parallelism is across blocks and across ranges, never inside one
// block's chain. Both instantiations compute every block's partial the same way and add them in the same order:
// cpu_kernels.cc over OpenMP threads, reduce.cu with one GPU thread per block (its elements staged through shared
// memory so that global reads are coalesced) and then one GPU thread per range over that range's partials. A
// batch of ranges (all trainable buckets of a step) is one pass over every block and one wait, not one per range.
#pragma once

#include <cstdint>

#include "kernels/optimizer.cuh"  // ZERO_HD

namespace zero::kernels {

struct SumSquares {
  double sum = 0.0;        // sum of squares of the finite elements, in fp64
  int64_t nonfinite = 0;   // count of inf/nan elements
};

inline constexpr int64_t kSumBlock = 4096;

// One element's step of a block's chain (the square of a float is exact in fp64, so only the add rounds).
ZERO_HD void AddSquare(float e, SumSquares* r) {
  if (e - e == 0.0f) {  // finite: inf - inf and nan - nan are nan
    r->sum += static_cast<double>(e) * static_cast<double>(e);
  } else {
    ++r->nonfinite;
  }
}

// Elements [begin, end) of a range, each read through load(i) as a float.
template <typename Load>
ZERO_HD SumSquares SumSquaresBlock(int64_t begin, int64_t end, Load load) {
  SumSquares r;
  for (int64_t i = begin; i < end; ++i) AddSquare(load(i), &r);
  return r;
}

// One range of a batched sum of squares: n elements at x (device memory for the CUDA instantiation).
struct SumSquaresRange {
  const void* x = nullptr;
  int64_t n = 0;
};

// Blocks of kSumBlock elements in a range of n elements (the last one may be short).
ZERO_HD int64_t SumBlocks(int64_t n) { return (n + kSumBlock - 1) / kSumBlock; }

// A range as the CUDA kernels read it from scratch memory: its elements and the index of its first block among
// all blocks of the batch (ranges' blocks are numbered consecutively, in range order). 32 bytes, so the
// partials after the table stay 16-byte aligned.
struct SumSquaresTask {
  const void* x;
  int64_t n;
  int64_t first_block;
  int64_t unused;
};

// The task table of a batch (`count` ranges into table[0..count)): each range's blocks numbered after the previous
// ranges'. Returns the number of blocks of the batch. Host code (the launcher, kernels/reduce.cu, and its
// emulation in tests/testing/fake_cuda/emulated_kernels.cc).
inline int64_t BuildSumSquaresTasks(const SumSquaresRange* ranges, int64_t count, SumSquaresTask* table) {
  int64_t blocks = 0;
  for (int64_t r = 0; r < count; ++r) {
    table[r] = SumSquaresTask{ranges[r].x, ranges[r].n, blocks, 0};
    blocks += SumBlocks(ranges[r].n);
  }
  return blocks;
}

// Device scratch of the batched CUDA sum of squares over `count` ranges of sizes[0..count) elements: the task
// table, one partial per block and one total per range, in that order. The one rule for its size: the CUDA
// device and the engine's buffer plan (src/buffer_plan.cc) both call this.
inline int64_t SumSquaresScratchBytes(const int64_t* sizes, int64_t count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i) blocks += SumBlocks(sizes[i]);
  return count * static_cast<int64_t>(sizeof(SumSquaresTask) + sizeof(SumSquares)) +
         blocks * static_cast<int64_t>(sizeof(SumSquares));
}

}  // namespace zero::kernels

// The batched sum of squares' CUDA kernels (kernels/sum_squares.cuh's blocks and ranges on a GPU), in a header so
// that nvcc (kernels/reduce.cu, which launches them) and the CPU emulation test (tests/cuda_emulation_test.cc,
// through tests/testing/cuda_emulation.h) compile the same source.
//
// defines: kRows, kChunk, kWarps, kRowsPerWarp, kRounds, F32Elem, Bf16Elem, F16Elem, FindTask,
//          BlockPartialsKernel, SumSquaresGrid, RangeTotalsKernel (BuildSumSquaresTasks, the table they read, is
//          in kernels/sum_squares.cuh)
//
// Coalescing: a CUDA block takes kRows consecutive blocks of kSumBlock elements (one per thread) and walks them
// together in rounds of kChunk elements. In a round, each warp loads kChunk consecutive elements of one row per
// instruction (128 contiguous bytes for fp32) into shared memory, then every thread adds its own row's kChunk
// values in order. The next round's loads are issued before this round's adds (a register stage), so a
// thread's add chain overlaps its memory latency; with many blocks per SM, loads from other blocks fill the rest.
//
// Everything is in an unnamed namespace: each includer (one .cu, one test) gets its own copy, and the test's
// emulated kernels never share a symbol with libzero's nvcc-built ones.
#pragma once

#include <cstdint>

#include "kernels/cast.cuh"
#include "kernels/launch.cuh"
#include "kernels/sum_squares.cuh"

#if !defined(__CUDACC__) && !defined(ZERO_CUDA_EMULATION)
#error "kernel source: compile it with nvcc, or include tests/testing/cuda_emulation.h first"
#endif

namespace zero::kernels {
namespace {

// Blocks of kSumBlock elements per CUDA block, one per thread. Each row is its own partial, so the grouping changes
// no bits; it sets how many CUDA blocks a step's gradient gives: one thread per 4096 elements, so a 100M-element
// shard is 24k rows, 96 CUDA blocks of 256 (under one wave on an H200's 132 SMs, 36 of them idle) or 382 of 64
// (every SM busy, several blocks each). Each warp stages the same 32 rows per round either way.
constexpr int kRows = 64;
constexpr int kChunk = 32;  // elements of each row per round: one warp-wide load
constexpr int kWarps = kRows / 32;
constexpr int kRowsPerWarp = kRows / kWarps;  // rows each warp stages per round, one element per lane of each
constexpr int kRounds = static_cast<int>(kSumBlock / kChunk);
static_assert(kSumBlock % kChunk == 0 && kChunk == 32, "a round is one element per lane of every row");
static_assert(kRows % 32 == 0 && kRows <= kMaxBlockThreads, "whole warps, within the runtime's block limit");
// A layout host and device compilers agree on (the host builds the table, the kernels read it): SumSquaresTask's
// comment promises 32 bytes, so the partials after the table stay aligned for their fp64 / int64 members.
static_assert(sizeof(SumSquaresTask) == 32 && sizeof(SumSquares) == 16 && alignof(SumSquares) == 8,
              "the scratch layout of kernels/sum_squares.cuh");

struct F32Elem {
  using T = float;
  static __device__ float Widen(float v) { return v; }
};
struct Bf16Elem {
  using T = Bf16Bits;
  static __device__ float Widen(Bf16Bits v) { return Bf16ToFloat(v); }
};
struct F16Elem {
  using T = F16Bits;
  static __device__ float Widen(F16Bits v) { return F16ToFloat(v); }
};

// The task holding global block g (0 <= g < all blocks): the last task whose first_block <= g. Empty ranges share
// their successor's first_block, so the last such task is the non-empty one that contains g.
__device__ __forceinline__ int64_t FindTask(const SumSquaresTask* tasks, int64_t count, int64_t g) {
  int64_t lo = 0, hi = count;  // tasks[lo].first_block <= g; tasks[hi].first_block > g (hi == count: past the end)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tasks[mid].first_block <= g) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename E>
__global__ void __launch_bounds__(kRows)
    BlockPartialsKernel(const SumSquaresTask* tasks, int64_t count, int64_t blocks, SumSquares* partials) {
  using T = typename E::T;
  static_assert(sizeof(float) * kRows * (kChunk + 1) + (sizeof(const T*) + sizeof(int)) * kRows <=
                    kMaxStaticSharedBytes,
                "static shared memory beyond 48 KiB fails the launch");
  __shared__ float tile[kRows][kChunk + 1];  // +1: thread t reads row t, column i: bank (t + i) % 32, no conflict
  __shared__ const T* row_x[kRows];
  __shared__ int row_len[kRows];
  const int t = static_cast<int>(threadIdx.x), lane = t % 32, warp = t / 32;
  for (int64_t first = int64_t{blockIdx.x} * kRows; first < blocks; first += int64_t{gridDim.x} * kRows) {
    const int64_t g = first + t;
    if (g < blocks) {
      const SumSquaresTask task = tasks[FindTask(tasks, count, g)];
      const int64_t begin = (g - task.first_block) * kSumBlock;
      row_x[t] = static_cast<const T*>(task.x) + begin;
      row_len[t] = static_cast<int>(task.n - begin < kSumBlock ? task.n - begin : kSumBlock);
    } else {
      row_x[t] = nullptr;
      row_len[t] = 0;
    }
    __syncthreads();
    // Warp w stages rows w, w + 8, ...: one element per lane of each (consecutive lanes, consecutive addresses).
    float staged[kRowsPerWarp];
    const auto load = [&](int round) {
      const int i = round * kChunk + lane;
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const int r = warp + k * kWarps;
        staged[k] = i < row_len[r] ? E::Widen(row_x[r][i]) : 0.0f;
      }
    };
    SumSquares acc;
    const int len = row_len[t];
    load(0);
    for (int round = 0; round < kRounds; ++round) {
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) tile[warp + k * kWarps][lane] = staged[k];
      __syncthreads();
      if (round + 1 < kRounds) load(round + 1);
      const int base = round * kChunk;
      const int here = len - base < kChunk ? len - base : kChunk;  // this row's elements in the round (may be <= 0)
      for (int i = 0; i < here; ++i) AddSquare(tile[t][i], &acc);
      __syncthreads();
    }
    if (g < blocks) partials[g] = acc;
    __syncthreads();  // row_x / row_len are rewritten for the next tile
  }
}

// BlockPartialsKernel's grid for `blocks` > 0 blocks of the batch: one row per thread, a grid-stride loop beyond.
inline int SumSquaresGrid(int64_t blocks) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, (blocks + kRows - 1) / kRows));
}

// One thread per range: its partials in block order, from zero (SumSquaresCpu's order).
__global__ void RangeTotalsKernel(const SumSquaresTask* tasks, int64_t count, const SumSquares* partials,
                                  SumSquares* totals) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < count; r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t begin = tasks[r].first_block, end = begin + SumBlocks(tasks[r].n);
    SumSquares total;
    for (int64_t b = begin; b < end; ++b) {
      total.sum += partials[b].sum;
      total.nonfinite += partials[b].nonfinite;
    }
    totals[r] = total;
  }
}

}  // namespace
}  // namespace zero::kernels

// CUDA instantiation of the written-once sum of squares (kernels/sum_squares.cuh): one thread per kSumBlock
// block writes its block's partial, then one thread adds the partials in block order, so the result has the
// same bits as SumSquaresCpu. The per-block pass reads with a stride of kSumBlock between threads (poorly
// coalesced); it runs once per step over a gradient shard, and bitwise agreement with the CPU instantiation is
// worth more here than the last factor of bandwidth.
#include <cuda_runtime.h>

#include "kernels/cast.cuh"
#include "kernels/cuda_kernels.h"
#include "kernels/launch.cuh"
#include "kernels/sum_squares.cuh"

namespace zero::kernels {
namespace {

struct LoadF32 {
  const float* x;
  __device__ float operator()(int64_t i) const { return x[i]; }
};
struct LoadBf16 {
  const Bf16Bits* x;
  __device__ float operator()(int64_t i) const { return Bf16ToFloat(x[i]); }
};
struct LoadF16 {
  const F16Bits* x;
  __device__ float operator()(int64_t i) const { return F16ToFloat(x[i]); }
};

template <typename Load>
__global__ void BlockSumsKernel(Load x, int64_t n, int64_t blocks, SumSquares* partials) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < blocks; b += int64_t{gridDim.x} * blockDim.x) {
    const int64_t end = (b + 1) * kSumBlock < n ? (b + 1) * kSumBlock : n;
    partials[b] = SumSquaresBlock(b * kSumBlock, end, x);
  }
}

__global__ void OrderedTotalKernel(const SumSquares* partials, int64_t blocks, SumSquares* out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  SumSquares total;
  for (int64_t b = 0; b < blocks; ++b) {
    total.sum += partials[b].sum;
    total.nonfinite += partials[b].nonfinite;
  }
  *out = total;
}

}  // namespace

int64_t SumSquaresScratchCount(int64_t n) { return (n + kSumBlock - 1) / kSumBlock + 1; }

int SumSquaresCuda(const void* x, GradKind gk, int64_t n, SumSquares* scratch, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  if (blocks > 0) {
    const int grid = BlocksFor(blocks);
    switch (gk) {
      case GradKind::kF32:
        BlockSumsKernel<<<grid, kThreads, 0, s>>>(LoadF32{static_cast<const float*>(x)}, n, blocks, scratch + 1);
        break;
      case GradKind::kBf16:
        BlockSumsKernel<<<grid, kThreads, 0, s>>>(LoadBf16{static_cast<const Bf16Bits*>(x)}, n, blocks, scratch + 1);
        break;
      case GradKind::kF16:
        BlockSumsKernel<<<grid, kThreads, 0, s>>>(LoadF16{static_cast<const F16Bits*>(x)}, n, blocks, scratch + 1);
        break;
    }
  }
  OrderedTotalKernel<<<1, 1, 0, s>>>(scratch + 1, blocks, scratch);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace zero::kernels

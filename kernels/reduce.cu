// CUDA instantiation of the written-once sum of squares (kernels/sum_squares.cuh), batched over ranges: one pass
// computes every block partial of every range, a second adds each range's partials in block order, and one copy
// brings all the totals back, so a step's gradient norm costs one wait however many buckets it has. The result
// has the same bits as SumSquaresCpu: each block is one GPU thread's sequential fp64 chain in element order, and
// each range's partials are one thread's chain in block order.
//
// The kernels are in kernels/sum_squares_kernels.cuh (shared with the CPU emulation test).
#include <cuda_runtime.h>

#include <vector>

#include "kernels/cuda_kernels.h"
#include "kernels/launch.cuh"
#include "kernels/sum_squares.cuh"
#include "kernels/sum_squares_kernels.cuh"

namespace zero::kernels {

int SumSquaresCuda(const SumSquaresRange* ranges, int64_t count, GradKind gk, void* scratch, SumSquares* host_totals,
                   void* stream) {
  if (count <= 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  std::vector<SumSquaresTask> table(static_cast<size_t>(count));
  const int64_t blocks = BuildSumSquaresTasks(ranges, count, table.data());
  // Scratch layout (SumSquaresScratchBytes): the task table, the partials, the totals.
  auto* tasks = static_cast<SumSquaresTask*>(scratch);
  auto* partials = reinterpret_cast<SumSquares*>(tasks + count);
  SumSquares* totals = partials + blocks;
  // From pageable memory: the runtime stages the table before returning, so `table` may go out of scope.
  cudaError_t rc =
      cudaMemcpyAsync(tasks, table.data(), table.size() * sizeof(SumSquaresTask), cudaMemcpyHostToDevice, s);
  if (rc != cudaSuccess) return static_cast<int>(rc);
  if (blocks > 0) {
    const int grid = SumSquaresGrid(blocks);
    switch (gk) {
      case GradKind::kF32:
        BlockPartialsKernel<F32Elem><<<grid, kRows, 0, s>>>(tasks, count, blocks, partials);
        break;
      case GradKind::kBf16:
        BlockPartialsKernel<Bf16Elem><<<grid, kRows, 0, s>>>(tasks, count, blocks, partials);
        break;
      case GradKind::kF16:
        BlockPartialsKernel<F16Elem><<<grid, kRows, 0, s>>>(tasks, count, blocks, partials);
        break;
    }
  }
  RangeTotalsKernel<<<BlocksFor(count), kThreads, 0, s>>>(tasks, count, partials, totals);
  rc = cudaGetLastError();
  if (rc != cudaSuccess) return static_cast<int>(rc);
  return static_cast<int>(
      cudaMemcpyAsync(host_totals, totals, static_cast<size_t>(count) * sizeof(SumSquares), cudaMemcpyDeviceToHost, s));
}

}  // namespace zero::kernels

// The rows of zero_bench_gpu (issue 16's table), registered as Google Benchmark cases by two groups:
//   kernel_rows.cc  Optimizer/...  AdamW/SGD device kernels against a same-bytes streaming kernel (goal >= 0.90)
//                   Norm/...       a step's gradient norm against one streaming read of its bytes (goal <= 1.5x)
//                   OffloadCopy/...  zero's pinned offload copies against cudaMemcpyAsync (goal >= 0.85)
//   engine_rows.cc  OffloadStep/... an offloaded step against max(copy time, CPU AdamW time) (goal <= 1.15x)
//                   EngineOverhead/...  stages 0-3 at one rank against a plain loop (goal <= 1.05x)
//                   Prefetch/...   stage-3 exposed gather time with prefetch against forced-exposed gathers
// Every ratio is measured side by side in the same iteration; the counters are medians over iterations.
#pragma once

namespace zero::bench::gpu {

void RegisterKernelRows();
void RegisterEngineRows();
// Frees what the engine rows keep between cases (models, the NCCL communicator); before MPI_Finalize.
void ReleaseEngineRows();

}  // namespace zero::bench::gpu

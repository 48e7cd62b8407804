// zero_bench_gpu: zero on one GPU against the hardware's limits, measured side by side in one run (the rows of
// issue 16: rows.h lists them, kernel_rows.cc and engine_rows.cc define them).
//
//   zero_bench_gpu [--quick] [--out=DIR] [Google Benchmark flags, e.g. --benchmark_filter=Norm]
//
// Writes DIR/zero_bench_gpu.json (default DIR: bench/results/gpu; Google Benchmark's JSON with the machine, GPU,
// driver, CUDA, cuBLAS and NCCL versions, clocks before and after, and the commit in its context), which
// bench/report.py renders into docs/BENCHMARKS.md. Runs as one MPI process (the engine rows open an NCCL
// communicator over MPI_COMM_WORLD); without a GPU every case is skipped, saying why, and the exit status is 0.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/gpu/gpu_bench_util.h"
#include "bench/gpu/rows.h"

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  std::vector<std::string> storage;
  std::vector<char*> args;
  if (!zero::bench::gpu::StartGpuBenchmark(&argc, argv, &storage, &args, "every case will be skipped")) {
    MPI_Finalize();
    return 1;
  }
  zero::bench::gpu::RegisterKernelRows();
  zero::bench::gpu::RegisterEngineRows();
  const auto t0 = std::chrono::steady_clock::now();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  zero::bench::gpu::ReleaseEngineRows();
  zero::bench::gpu::AddClocksAfter(zero::bench::gpu::Config().json_path);
  std::printf("zero_bench_gpu: %s mode, %.0f s, results in %s\n", zero::bench::gpu::Config().quick ? "quick" : "full",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              zero::bench::gpu::Config().json_path.c_str());
  MPI_Finalize();
  return 0;
}

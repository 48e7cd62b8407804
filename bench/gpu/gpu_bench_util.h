// Shared pieces of the GPU benchmarks (zero_bench_gpu, zero_bench_gpu_card24): their flags, the machine context
// written into every result file (GPU, driver, CUDA, cuBLAS and NCCL versions, clocks before and after, host, the
// commit built), named LLaMA shapes, and small timing helpers.
//
// Flags every GPU benchmark takes besides Google Benchmark's:
//   --quick      every row at a small size and few iterations (the one-command GPU run: all rows together in
//                under 3 minutes on an H200); default: the full sizes
//   --out=DIR    where the JSON goes (default bench/results/gpu): DIR/<program>.json, Google Benchmark's format
//                with this context; --benchmark_out=FILE overrides the file
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "zero/zero.h"

namespace zero::bench::gpu {

struct GpuBenchConfig {
  bool quick = false;
  std::string out_dir = "bench/results/gpu";
  std::string program;    // argv[0]'s base name
  std::string json_path;  // the Google Benchmark JSON written (--benchmark_out)
};
const GpuBenchConfig& Config();

// Takes --quick and --out from argv (before benchmark::Initialize), adds --benchmark_out/--benchmark_out_format
// unless given, and creates the output directory. `storage` keeps the added strings alive.
void ParseGpuFlags(int* argc, char** argv, std::vector<std::string>* storage, std::vector<char*>* args);

// The start of a GPU benchmark's main() after MPI_Init_thread: ParseGpuFlags, benchmark::Initialize, device 0 and
// its context made current before anything is timed (without a usable device it prints "<program>: no usable CUDA
// device; <without_device>" and the cases skip themselves), then AddGpuContext. False (after Google Benchmark said
// why) on an unrecognized flag. `storage` and `args` must outlive the run.
bool StartGpuBenchmark(int* argc, char** argv, std::vector<std::string>* storage, std::vector<char*>* args,
                       const char* without_device);

// Adds the machine context to Google Benchmark's JSON (benchmark::AddCustomContext). Call once before running;
// AddClocksAfter(Config().json_path) after running adds the clocks and temperature at the end to that file.
void AddGpuContext();
void AddClocksAfter(const std::string& json_path);

// A /proc/meminfo line in bytes ("MemAvailable", "MemTotal"), or -1 when absent. The GPU machine's host memory
// starts lower than its 128 GiB and grows: the host-heavy rows record what was there when they started.
int64_t MemInfoBytes(const char* key);

// "nvidia-smi --query-gpu=<fields> --format=csv,noheader" or "" when it is missing.
std::string NvidiaSmi(const std::string& fields);

// Named LLaMA shapes: "smollm2-135m", "tinyllama-1.1b", "llama-1b" (16 layers, 2048), "open-llama-3b",
// "llama-7b", "llama-13b". False for another name.
bool ShapeByName(const std::string& name, TransformerShape* shape);

// Wall seconds of fn() followed by cudaDeviceSynchronize (every stream of the device drained).
template <typename Fn>
double SyncedSeconds(Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  cudaDeviceSynchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A CUDA error as text, or "" for success.
std::string CudaErrorText(int rc, const char* what);

}  // namespace zero::bench::gpu

// The GPU benchmarks' flags, machine context and named shapes (gpu_bench_util.h).
#include "bench/gpu/gpu_bench_util.h"

#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <nccl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string_view>
#include <thread>

#include "gpu_bench_commit.h"  // generated: ZERO_BENCH_COMMIT

namespace zero::bench::gpu {
namespace {

GpuBenchConfig g_config;

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) s.pop_back();
  size_t b = 0;
  while (b < s.size() && s[b] == ' ') ++b;
  return s.substr(b);
}

std::string Capture(const std::string& cmd) {
  FILE* f = popen((cmd + " 2>/dev/null").c_str(), "r");
  if (f == nullptr) return "";
  std::string out;
  char buf[512];
  while (std::fgets(buf, sizeof(buf), f) != nullptr) out += buf;
  pclose(f);
  return Trim(out);
}

std::string FirstMatch(const char* path, const char* key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? line : Trim(line.substr(colon + 1));
    }
  }
  return "";
}

std::string Version(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

}  // namespace

const GpuBenchConfig& Config() { return g_config; }

void ParseGpuFlags(int* argc, char** argv, std::vector<std::string>* storage, std::vector<char*>* args) {
  const std::string_view arg0 = argv[0];
  g_config.program = std::string(arg0.substr(arg0.find_last_of('/') == std::string_view::npos ? 0
                                                                                              : arg0.find_last_of('/') + 1));
  bool have_out = false;
  storage->clear();
  storage->reserve(static_cast<size_t>(*argc) + 2);
  std::vector<int> keep;
  for (int i = 1; i < *argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--quick") {
      g_config.quick = true;
    } else if (a.substr(0, 6) == "--out=") {
      g_config.out_dir = std::string(a.substr(6));
    } else {
      if (a.substr(0, 16) == "--benchmark_out=") {
        have_out = true;
        g_config.json_path = std::string(a.substr(16));
      }
      keep.push_back(i);
    }
  }
  args->clear();
  args->push_back(argv[0]);
  for (int i : keep) args->push_back(argv[i]);
  if (!have_out) {
    std::error_code ec;
    std::filesystem::create_directories(g_config.out_dir, ec);
    g_config.json_path = g_config.out_dir + "/" + g_config.program + ".json";
    storage->push_back("--benchmark_out=" + g_config.json_path);
    storage->push_back("--benchmark_out_format=json");
    for (std::string& s : *storage) args->push_back(s.data());
  }
  *argc = static_cast<int>(args->size());
}

bool StartGpuBenchmark(int* argc, char** argv, std::vector<std::string>* storage, std::vector<char*>* args,
                       const char* without_device) {
  ParseGpuFlags(argc, argv, storage, args);
  char** av = args->data();
  benchmark::Initialize(argc, av);
  if (benchmark::ReportUnrecognizedArguments(*argc, av)) return false;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();  // leave no error behind for an unrelated check
    std::printf("%s: no usable CUDA device; %s\n", g_config.program.c_str(), without_device);
  } else {
    cudaSetDevice(0);
    cudaFree(nullptr);  // the context exists before anything is timed or the memory baseline is read
  }
  AddGpuContext();
  return true;
}

int64_t MemInfoBytes(const char* key) {
  const std::string v = FirstMatch("/proc/meminfo", (std::string(key) + ":").c_str());  // "123456 kB"
  if (v.empty()) return -1;
  return std::atoll(v.c_str()) * (v.find("kB") != std::string::npos ? 1024 : 1);
}

std::string NvidiaSmi(const std::string& fields) {
  return Capture("nvidia-smi --query-gpu=" + fields + " --format=csv,noheader -i 0");
}

void AddGpuContext() {
  benchmark::AddCustomContext("mode", g_config.quick ? "quick" : "full");
  benchmark::AddCustomContext("commit", std::getenv("ZERO_BENCH_COMMIT") != nullptr ? std::getenv("ZERO_BENCH_COMMIT")
                                                                                    : ZERO_BENCH_COMMIT);
  int device = 0, driver = 0, runtime = 0;
  cudaGetDevice(&device);
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
    benchmark::AddCustomContext("gpu", prop.name);
    benchmark::AddCustomContext("gpu_sms", std::to_string(prop.multiProcessorCount));
    benchmark::AddCustomContext("gpu_memory_bytes", std::to_string(prop.totalGlobalMem));
    benchmark::AddCustomContext("gpu_l2_bytes", std::to_string(prop.l2CacheSize));
    benchmark::AddCustomContext("gpu_cc", std::to_string(prop.major) + "." + std::to_string(prop.minor));
  } else {
    cudaGetLastError();
    benchmark::AddCustomContext("gpu", "none visible");
  }
  int clock_khz = 0, mem_clock_khz = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device) == cudaSuccess) {
    benchmark::AddCustomContext("gpu_max_sm_clock_mhz", std::to_string(clock_khz / 1000));
  }
  if (cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, device) == cudaSuccess) {
    benchmark::AddCustomContext("gpu_max_mem_clock_mhz", std::to_string(mem_clock_khz / 1000));
  }
  cudaGetLastError();
  benchmark::AddCustomContext("cuda_driver_api", Version(driver));
  benchmark::AddCustomContext("cuda_runtime", Version(runtime));
  benchmark::AddCustomContext("driver", NvidiaSmi("driver_version"));
  int nccl = 0;
  if (ncclGetVersion(&nccl) == ncclSuccess) {
    benchmark::AddCustomContext("nccl", std::to_string(nccl / 10000) + "." + std::to_string(nccl / 100 % 100) + "." +
                                            std::to_string(nccl % 100));
  }
  // The cuBLAS loaded at run time (cublasGetProperty needs no handle), beside the headers built against.
  int blas_major = -1, blas_minor = -1, blas_patch = -1;
  cublasGetProperty(MAJOR_VERSION, &blas_major);
  cublasGetProperty(MINOR_VERSION, &blas_minor);
  cublasGetProperty(PATCH_LEVEL, &blas_patch);
  benchmark::AddCustomContext("cublas", std::to_string(blas_major) + "." + std::to_string(blas_minor) + "." +
                                            std::to_string(blas_patch) + " (built against " +
                                            std::to_string(CUBLAS_VER_MAJOR) + "." + std::to_string(CUBLAS_VER_MINOR) +
                                            ", cudart " + std::to_string(cublasGetCudartVersion()) + ")");
  benchmark::AddCustomContext("clocks_before", NvidiaSmi("clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
                                                         "temperature.gpu,power.draw,pstate"));
  benchmark::AddCustomContext("cpu", FirstMatch("/proc/cpuinfo", "model name"));
  benchmark::AddCustomContext("cpu_cores", std::to_string(std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("host_memory", FirstMatch("/proc/meminfo", "MemTotal"));
  utsname u{};
  if (uname(&u) == 0) benchmark::AddCustomContext("kernel", u.release);
  benchmark::AddCustomContext("os", Capture(". /etc/os-release && echo $PRETTY_NAME"));
}

void AddClocksAfter(const std::string& json_path) {
  // Google Benchmark writes its context before the runs; the state at the end goes into the same object after.
  std::ifstream in(json_path);
  if (!in) return;
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  const std::string key = "\"context\": {";
  const size_t at = text.find(key);
  if (at == std::string::npos) return;
  std::string value = NvidiaSmi("clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw,pstate");
  for (char& c : value) {
    if (c == '"' || c == '\\') c = '\'';
  }
  text.insert(at + key.size(), "\n    \"clocks_after\": \"" + value + "\",\n    \"host_memory_after\": \"" +
                                    FirstMatch("/proc/meminfo", "MemTotal") + "\",");
  std::ofstream(json_path) << text;
}

bool ShapeByName(const std::string& name, TransformerShape* s) {
  // {layers, hidden, heads, kv_heads, ffn, vocab, tied, frozen}
  if (name == "smollm2-135m") *s = {30, 576, 9, 3, 1536, 49152, true, false};
  else if (name == "tinyllama-1.1b") *s = {22, 2048, 32, 4, 5632, 32000, false, false};
  else if (name == "llama-1b") *s = {16, 2048, 32, 8, 8192, 32000, false, false};
  else if (name == "open-llama-3b") *s = {26, 3200, 32, 32, 8640, 32000, false, false};
  else if (name == "llama-7b") *s = {32, 4096, 32, 32, 11008, 32000, false, false};
  else if (name == "llama-13b") *s = {40, 5120, 40, 40, 13824, 32000, false, false};
  else return false;
  return true;
}

std::string CudaErrorText(int rc, const char* what) {
  if (rc == 0) return "";
  return std::string(what) + ": " + cudaGetErrorString(static_cast<cudaError_t>(rc));
}

}  // namespace zero::bench::gpu

// zero_bench_gpu_card24: the users' guides' "24 GB card" on the H200. The largest LLaMA shape whose configuration
// fits the host's memory is opened with device_capacity_bytes = 24 GiB and Stage::kAuto; it trains a few steps
// of BenchModel (bench_model.h) and reports what Open chose, tokens/s, and the peak device bytes the CUDA runtime
// saw (cudaMemGetInfo, sampled every millisecond from the CUDA context's creation on: the engine, NCCL, cuBLAS
// and the model's activations, everything this process allocated), against the 24 GiB.
//
//   zero_bench_gpu_card24 [--quick] [--out=DIR] [--shape=auto|NAME] [--tokens=T] [--steps=N]
//                         [--capacity_gib=24] [--host_gib=128] [Google Benchmark flags]
//
// --shape=auto (the default) tries llama-13b, llama-7b, open-llama-3b, llama-1b (--quick: llama-1b alone, which
// stays on the device; pass --shape=open-llama-3b for an offloading choice in a short run) and takes the first
// whose automatic choice (zero::ChooseConfiguration with this run's options)
// fits the device and whose host bytes fit in 85% of --host_gib (the machine's memory as the device's notes give
// it: the VM's MemTotal starts lower and grows). Defaults: 2048 tokens per step (--quick: 1024), 3 timed steps
// after one warm-up (--quick: 2). Writes DIR/zero_bench_gpu_card24.json (context as zero_bench_gpu's).
//
// Counters: tokens_per_s, step_s, peak_device_bytes_runtime (max over samples of used - used at start),
// within_capacity (1 when that is <= the capacity), engine_device_bytes (the engine's own accounting),
// trainer_device_bytes (BenchModel's activations), reserved_bytes (what Options::reserved_bytes told kAuto),
// host_bytes, params, capacity_bytes; the label is the configuration chosen.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "bench/gpu/bench_model.h"
#include "bench/gpu/gpu_bench_util.h"
#include "zero/zero.h"

namespace zero::bench::gpu {
namespace {

struct CardFlags {
  std::string shape = "auto";
  int64_t tokens = 0;  // 0: by mode
  int steps = 0;       // 0: by mode
  double capacity_gib = 24;
  double host_gib = 128;
};
CardFlags g_flags;

// Takes this program's flags out of argv (the rest goes to ParseGpuFlags and Google Benchmark).
bool TakeCardFlags(int* argc, char** argv) {
  int kept = 1;
  for (int i = 1; i < *argc; ++i) {
    const std::string_view a = argv[i];
    const auto value = [&](std::string_view key) -> const char* {
      return a.substr(0, key.size()) == key ? argv[i] + key.size() : nullptr;
    };
    if (const char* v = value("--shape=")) {
      g_flags.shape = v;
    } else if (const char* v = value("--tokens=")) {
      g_flags.tokens = std::atoll(v);
    } else if (const char* v = value("--steps=")) {
      g_flags.steps = std::atoi(v);
    } else if (const char* v = value("--capacity_gib=")) {
      g_flags.capacity_gib = std::atof(v);
    } else if (const char* v = value("--host_gib=")) {
      g_flags.host_gib = std::atof(v);
    } else {
      argv[kept++] = argv[i];
    }
  }
  *argc = kept;
  return g_flags.tokens >= 0 && g_flags.steps >= 0 && g_flags.capacity_gib > 0 && g_flags.host_gib > 0;
}

// The lowest free device memory seen since Start, sampled every millisecond on its own thread.
class FreeMemorySampler {
 public:
  void Start() {
    stop_ = false;
    min_free_ = Free();
    thread_ = std::thread([this] {
      cudaSetDevice(0);
      while (!stop_) {
        Sample();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  }
  void Sample() {
    const int64_t f = Free();
    int64_t cur = min_free_.load();
    while (f < cur && !min_free_.compare_exchange_weak(cur, f)) {
    }
  }
  int64_t Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    Sample();
    return min_free_;
  }
  static int64_t Free() {
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return INT64_MAX;
    return static_cast<int64_t>(free_bytes);
  }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> min_free_{INT64_MAX};
  std::thread thread_;
};

Options CardOptions(int64_t capacity, int64_t reserved) {
  Options o;
  o.stage = Stage::kAuto;
  o.backend = Backend::kCuda;
  o.param_dtype = DType::kBF16;
  o.grad_dtype = DType::kBF16;
  o.clip_norm = 1.0;
  o.device_capacity_bytes = capacity;
  o.reserved_bytes = reserved;
  return o;
}

// Device bytes BenchModel will allocate for `specs` at `tokens` (its activations), and what this process needs on
// the device besides the engine: those plus NCCL's and cuBLAS's buffers (a generous 1 GiB at one rank).
int64_t TrainerBytes(const std::vector<ParamSpec>& specs, int64_t tokens) {
  int64_t max_in = 1, max_out = 1;
  for (const ParamSpec& s : specs) {
    if (s.shape.size() != 2) continue;
    max_out = std::max(max_out, s.shape[0]);
    max_in = std::max(max_in, s.shape[1]);
  }
  return 2 * tokens * (max_in + max_out) * 2;
}
constexpr int64_t kLibraryAllowance = int64_t{1} << 30;

void Fill(int param, int64_t off, int64_t n, float* dst) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = static_cast<uint64_t>(off + i) * 2654435761u + static_cast<uint64_t>(param) * 40503u;
    dst[i] = 0.02f * (static_cast<float>(k % 2001) / 1000.0f - 1.0f);
  }
}

void BM_Card24(benchmark::State& state, std::string shape_name) {
  const bool quick = Config().quick;
  const int64_t tokens = g_flags.tokens > 0 ? g_flags.tokens : (quick ? 1024 : 2048);
  const int steps = g_flags.steps > 0 ? g_flags.steps : (quick ? 2 : 3);
  const auto capacity = static_cast<int64_t>(g_flags.capacity_gib * (1 << 30));
  const auto host_budget = static_cast<int64_t>(0.85 * g_flags.host_gib * (1 << 30));
  // Which shape: the named one, or the largest whose choice fits the device and the host.
  std::vector<std::string> names;
  if (shape_name == "auto") {
    // Quick: the 1.1B shape only (about 18 GiB: kAuto keeps it on the device), so that the one-command run stays
    // short; the full mode walks down from 13B (the 128 GiB host allows 7B with stage 3 + parameter offload).
    names = quick ? std::vector<std::string>{"llama-1b"}
                  : std::vector<std::string>{"llama-13b", "llama-7b", "open-llama-3b", "llama-1b"};
  } else {
    names = {shape_name};
  }
  std::vector<ParamSpec> specs;
  std::string chosen_name, why;
  int64_t reserved = 0;
  for (const std::string& n : names) {
    TransformerShape shape;
    if (!ShapeByName(n, &shape)) {
      state.SkipWithError(("unknown shape " + n).c_str());
      return;
    }
    std::vector<ParamSpec> s;
    if (Status st = TransformerSpecs(shape, &s); !st.ok()) {
      state.SkipWithError(st.ToString().c_str());
      return;
    }
    const int64_t r = TrainerBytes(s, tokens) + kLibraryAllowance;
    AutoChoice choice;
    if (Status st = ChooseConfiguration(ModelDescription::FromSpecs(s), 1, CardOptions(capacity, r), capacity, &choice);
        !st.ok()) {
      state.SkipWithError(st.ToString().c_str());
      return;
    }
    const bool device_fits = choice.chosen >= 0;
    const bool host_fits = device_fits && choice.candidates[static_cast<size_t>(choice.chosen)].host_bytes <= host_budget;
    why += n + ": " + (device_fits ? (host_fits ? "fits" : "host does not fit") : "device does not fit") + "; ";
    if (host_fits || shape_name != "auto") {
      specs = std::move(s);
      chosen_name = n;
      reserved = r;
      break;
    }
  }
  std::printf("card24: %s-> %s\n", why.c_str(), chosen_name.empty() ? "nothing fits" : chosen_name.c_str());
  if (chosen_name.empty()) {
    state.SkipWithError(("no shape fits: " + why).c_str());
    return;
  }
  FreeMemorySampler sampler;
  const int64_t free_at_start = FreeMemorySampler::Free();
  sampler.Start();
  std::unique_ptr<Comm> comm;
  std::unique_ptr<BenchModel> model;
  std::unique_ptr<Engine> engine;
  TransformerShape shape;
  ShapeByName(chosen_name, &shape);
  Status s = Comm::OpenNccl(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &comm);
  if (s.ok()) s = BenchModel::Create(shape, tokens, &model);
  if (s.ok()) s = Engine::Open(CardOptions(capacity, reserved), comm.get(), model->specs(), &engine);
  if (s.ok()) std::printf("card24: %s\n", engine->auto_choice().c_str());
  if (s.ok()) s = engine->InitParams(Fill);
  if (s.ok()) s = EngineStep(*model, *engine);  // warm-up
  cudaDeviceSynchronize();
  std::vector<double> times;
  for (auto _ : state) {
    for (int i = 0; s.ok() && i < steps; ++i) {
      const double t = SyncedSeconds([&] { s = EngineStep(*model, *engine); });
      times.push_back(t);
    }
    state.SetIterationTime(times.empty() ? 0.0 : Median(times));
  }
  const int64_t min_free = sampler.Stop();
  if (!s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    engine.reset();
    model.reset();
    comm.reset();
    return;
  }
  const double step = Median(times);
  const int64_t peak = free_at_start - min_free;
  const Options& o = engine->options();
  state.counters["tokens_per_s"] = static_cast<double>(tokens) / step;
  state.counters["step_s"] = step;
  state.counters["peak_device_bytes_runtime"] = static_cast<double>(peak);
  state.counters["within_capacity"] = peak <= capacity ? 1 : 0;
  state.counters["engine_device_bytes"] = static_cast<double>(engine->Memory().device.peak_total);
  state.counters["trainer_device_bytes"] = static_cast<double>(model->activation_bytes());
  state.counters["reserved_bytes"] = static_cast<double>(reserved);
  state.counters["host_bytes"] = static_cast<double>(engine->Memory().host.peak_total);
  state.counters["params"] = static_cast<double>(model->params());
  state.counters["capacity_bytes"] = static_cast<double>(capacity);
  state.counters["tokens"] = static_cast<double>(tokens);
  state.counters["tflops"] = model->flops_per_step() / step * 1e-12;
  state.SetLabel(chosen_name + ": " + ConfigurationName(o.stage, o.offload_optimizer, o.offload_params));
  engine.reset();
  model.reset();
  comm.reset();
}

}  // namespace
}  // namespace zero::bench::gpu

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  if (!zero::bench::gpu::TakeCardFlags(&argc, argv)) {
    std::fprintf(stderr, "zero_bench_gpu_card24: bad flag value (see the comment at the top of bench/gpu/card24.cc)\n");
    MPI_Finalize();
    return 2;
  }
  std::vector<std::string> storage;
  std::vector<char*> args;
  if (!zero::bench::gpu::StartGpuBenchmark(&argc, argv, &storage, &args, "the case will be skipped")) {
    MPI_Finalize();
    return 1;
  }
  const std::string label = "Card24/shape:" + zero::bench::gpu::g_flags.shape + "/capacity_gib:" +
                            std::to_string(static_cast<int>(zero::bench::gpu::g_flags.capacity_gib));
  benchmark::RegisterBenchmark(label.c_str(), zero::bench::gpu::BM_Card24, zero::bench::gpu::g_flags.shape)
      ->UseManualTime()
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  zero::bench::gpu::AddClocksAfter(zero::bench::gpu::Config().json_path);
  MPI_Finalize();
  return 0;
}

// zero_bench_gpu's engine-level rows (rows.h), at one rank on one GPU (Comm::OpenNccl over a one-process MPI
// world), with BenchModel (bench_model.h) as the trainer's model.
//
// OffloadStep/stage:{2,3}/shape:S
//   Stage 2 or 3 with the optimizer offloaded (bf16 parameters and gradients, fp32 master and AdamW state in
//   pinned host memory, AdamW on every core): Engine::Step until its work has drained, after a backward that
//   only fills the gradients (GradFillStep). The reference, measured in the same run for the same bytes: the
//   gradient shard down and the bf16 parameters up by cudaMemcpyAsync on two streams at once (copy_s; one after
//   the other: copy_serial_s) and kernels::AdamWStepCpu over the same number of parameters on the same cores
//   (cpu_adamw_s). ratio = step_s / max(copy_s, cpu_adamw_s) (goal <= 1.15); ratio_serial uses copy_serial_s.
// EngineOverhead/stage:{0,1,2,3}/shape:S/tokens:T
//   A training step (forward, backward, Step, drained) of BenchModel through zero against the same model trained
//   by PlainTrainer (the same products, the same fused AdamW kernel, no zero), alternating, same grad dtype (fp32)
//   and bf16 parameters. ratio = engine_s / plain_s (goal <= 1.05). zero always computes the gradient norm (one
//   wait per step; see Norm/...) and clips at 1.0 here; the plain loop does neither.
// Prefetch/offload_params:{0,1}/shape:S/tokens:T
//   Stage 3 (with offload_params: the optimizer and parameter shards on the host, so every gather starts with a
//   host-to-device copy) with the default prefetch against the same engine options with prefetch_bytes = 0
//   (every gather issued at its Acquire: forced exposed). From CUDA events on the compute stream: exposed_s (the
//   stream's stall at the Acquires of one step), exposed_forced_s, hidden = 1 - exposed_s / exposed_forced_s
//   (goal >= 0.8 when compute per unit exceeds its gather time), compute_per_unit_s and gather_per_unit_s (the
//   median product time per Acquire and the median forced stall).
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench/bench_util.h"
#include "bench/gpu/bench_model.h"
#include "bench/gpu/gpu_bench_util.h"
#include "bench/gpu/gpu_kernels.h"
#include "bench/gpu/rows.h"
#include "kernels/cpu_adamw.h"
#include "zero/zero.h"

namespace zero::bench::gpu {

namespace {

// The one-rank NCCL communicator every engine of the run shares (each engine duplicates it for its own work).
std::unique_ptr<Comm>& SharedComm() {
  static std::unique_ptr<Comm> comm;
  return comm;
}

Comm* GetComm(benchmark::State& state) {
  std::unique_ptr<Comm>& comm = SharedComm();
  if (comm == nullptr) {
    if (Status s = Comm::OpenNccl(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &comm); !s.ok()) {
      state.SkipWithError(("Comm::OpenNccl: " + s.ToString()).c_str());
      return nullptr;
    }
  }
  return comm.get();
}

bool Check(benchmark::State& state, const Status& s, const char* what) {
  if (s.ok()) return true;
  state.SkipWithError((std::string(what) + ": " + s.ToString()).c_str());
  return false;
}

// Small deterministic parameter values (the benchmarks time, they do not learn). On every core for large
// fragments: InitParams calls this serially over every parameter, and the engine rows fill about 6 billion values
// in quick mode (a 64-bit modulo each: seconds on one core, time the run's budget does not have).
void Fill(int param, int64_t off, int64_t n, float* dst) {
#pragma omp parallel for schedule(static) if (n >= (int64_t{1} << 16))
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = static_cast<uint64_t>(off + i) * 2654435761u + static_cast<uint64_t>(param) * 40503u;
    dst[i] = 0.02f * (static_cast<float>(k % 2001) / 1000.0f - 1.0f);
  }
}

int64_t FreeDeviceBytes() {
  size_t free_bytes = 0, total = 0;
  cudaDeviceSynchronize();
  if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
  return static_cast<int64_t>(free_bytes);
}

Options GpuOptions(Stage stage) {
  Options o;
  o.stage = stage;
  o.backend = Backend::kCuda;
  o.param_dtype = DType::kBF16;
  o.grad_dtype = DType::kF32;
  o.clip_norm = 1.0;
  return o;
}

Status OpenEngine(const Options& o, Comm* comm, const std::vector<ParamSpec>& specs, std::unique_ptr<Engine>* out) {
  ZERO_RETURN_IF_ERROR(Engine::Open(o, comm, specs, out));
  return (*out)->InitParams(Fill);
}

TransformerShape Shape(const std::string& name, int layers) {
  TransformerShape s;
  ShapeByName(name, &s);
  if (layers > 0) s.layers = layers;
  return s;
}

std::string ShapeLabel(const std::string& name, int layers) {
  return layers > 0 ? name + "-" + std::to_string(layers) + "l" : name;
}

// ---------------------------------------------------------------------------------------------------- offload

struct OffloadCase {
  Stage stage;
  std::string shape;
  int layers;  // 0: the shape's own
  int iterations;
};

// Seconds of AdamWStepCpu over n parameters (bf16 gradient, bf16 copy) on `threads` threads, over a window of at
// most 2^27 parameters reused (past every cache: 2 GiB of state per call).
double CpuAdamWSeconds(int64_t n, int threads) {
  const int64_t w = std::min<int64_t>(n, int64_t{1} << 27);
  std::vector<float> master(static_cast<size_t>(w)), m(static_cast<size_t>(w)), v(static_cast<size_t>(w));
  std::vector<uint16_t> g(static_cast<size_t>(w)), copy(static_cast<size_t>(w));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < w; ++i) {  // first touch on the threads that will use them
    master[static_cast<size_t>(i)] = 0.01f;
    m[static_cast<size_t>(i)] = 0.0f;
    v[static_cast<size_t>(i)] = 0.0f;
    g[static_cast<size_t>(i)] = 0x3c00;  // bf16 0.0078
    copy[static_cast<size_t>(i)] = 0;
  }
  const auto c = kernels::MakeAdamWCoeffs(1e-4, 0.9, 0.999, 1e-8, 0.01, 1, 1.0);
  const auto pass = [&] {
    for (int64_t done = 0; done < n; done += w) {
      const int64_t k = std::min(w, n - done);
      (void)kernels::AdamWStepCpu(c, master.data(), m.data(), v.data(), g.data(), DType::kBF16, copy.data(),
                                  DType::kBF16, k, threads);
    }
  };
  pass();  // warm: pages, threads
  return Seconds(pass);
}

// Seconds to move `bytes` down and `bytes` up through a 256 MiB window of pinned host memory: both directions at
// once on two streams (duplex) and one after the other (serial).
void CopySeconds(int64_t bytes, double* duplex, double* serial) {
  const int64_t w = std::min<int64_t>(bytes, int64_t{256} << 20);
  void *dev_down = nullptr, *dev_up = nullptr, *host_down = nullptr, *host_up = nullptr;
  cudaMalloc(&dev_down, static_cast<size_t>(w));
  cudaMalloc(&dev_up, static_cast<size_t>(w));
  cudaHostAlloc(&host_down, static_cast<size_t>(w), cudaHostAllocPortable);
  cudaHostAlloc(&host_up, static_cast<size_t>(w), cudaHostAllocPortable);
  cudaStream_t down, up;
  cudaStreamCreateWithFlags(&down, cudaStreamNonBlocking);
  cudaStreamCreateWithFlags(&up, cudaStreamNonBlocking);
  const auto issue = [&](bool d, bool u) {
    for (int64_t done = 0; done < bytes; done += w) {
      const auto k = static_cast<size_t>(std::min(w, bytes - done));
      if (d) cudaMemcpyAsync(host_down, dev_down, k, cudaMemcpyDeviceToHost, down);
      if (u) cudaMemcpyAsync(dev_up, host_up, k, cudaMemcpyHostToDevice, up);
    }
    cudaStreamSynchronize(down);
    cudaStreamSynchronize(up);
  };
  issue(true, true);  // warm
  *duplex = Seconds([&] { issue(true, true); });
  *serial = Seconds([&] { issue(true, false); }) + Seconds([&] { issue(false, true); });
  cudaStreamDestroy(down);
  cudaStreamDestroy(up);
  cudaFree(dev_down);
  cudaFree(dev_up);
  cudaFreeHost(host_down);
  cudaFreeHost(host_up);
}

void BM_OffloadStep(benchmark::State& state, OffloadCase c) {
  Comm* comm = GetComm(state);
  if (comm == nullptr) return;
  std::vector<ParamSpec> specs;
  const TransformerShape shape = Shape(c.shape, c.layers);
  if (!Check(state, TransformerSpecs(shape, &specs), "TransformerSpecs")) return;
  int units = 0;
  int64_t params = 0;
  for (const ParamSpec& s : specs) {
    units = std::max(units, s.unit + 1);
    params += s.numel();
  }
  Options o = GpuOptions(c.stage);
  o.grad_dtype = DType::kBF16;
  o.offload_optimizer = true;
  const int64_t host_available = MemInfoBytes("MemAvailable");  // before the ~18 GB of pinned state
  std::unique_ptr<Engine> engine;
  const std::string opening = "opening the engine (host MemAvailable before: " +
                              std::to_string(host_available >> 20) + " MiB)";
  if (!Check(state, OpenEngine(o, comm, specs, &engine), opening.c_str())) return;
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  double copy_duplex = 0, copy_serial = 0;
  CopySeconds(params * 2, &copy_duplex, &copy_serial);
  const double cpu = CpuAdamWSeconds(params, threads);
  if (!Check(state, GradFillStep(specs, units, *engine), "warm-up step")) return;
  cudaDeviceSynchronize();
  std::vector<double> steps;
  for (auto _ : state) {
    // The backward (gradient fills) is not timed: the row is the optimizer step with its copies.
    if (!Check(state, engine->BeginMicroStep(0, true), "BeginMicroStep")) return;
    for (int u = 0; u < units; ++u) {
      if (!Check(state, engine->Acquire(u, Pass::kForward), "Acquire") ||
          !Check(state, engine->Release(u, Pass::kForward), "Release")) {
        return;
      }
    }
    for (int u = units - 1; u >= 0; --u) {
      if (!Check(state, engine->Acquire(u, Pass::kBackward), "Acquire")) return;
      for (size_t p = 0; p < specs.size(); ++p) {
        if (specs[p].unit != u) continue;
        const TensorView g = engine->Grad(static_cast<int>(p));
        FillPattern(g.data, true, g.numel, 11 + p, 1e-3f, nullptr);
      }
      if (!Check(state, engine->GradsReady(u), "GradsReady") ||
          !Check(state, engine->Release(u, Pass::kBackward), "Release")) {
        return;
      }
    }
    cudaDeviceSynchronize();
    Status s;
    const double t = SyncedSeconds([&] {
      StepResult r;
      s = engine->Step(StepArgs{}, &r);
    });
    if (!Check(state, s, "Step")) return;
    state.SetIterationTime(t);
    steps.push_back(t);
  }
  const double step = Median(steps);
  state.counters["step_s"] = step;
  state.counters["copy_s"] = copy_duplex;
  state.counters["copy_serial_s"] = copy_serial;
  state.counters["cpu_adamw_s"] = cpu;
  state.counters["ratio"] = step / std::max(copy_duplex, cpu);
  state.counters["ratio_serial"] = step / std::max(copy_serial, cpu);
  state.counters["params"] = static_cast<double>(params);
  state.counters["host_bytes"] = static_cast<double>(engine->Memory().host.peak_total);
  state.counters["device_bytes"] = static_cast<double>(engine->Memory().device.peak_total);
  state.counters["cpu_threads"] = threads;
  state.counters["host_available_bytes"] = static_cast<double>(host_available);
  state.SetLabel(ConfigurationName(c.stage, true, false));
}

// ---------------------------------------------------------------------------------------------------- overhead

struct ModelKey {
  std::string shape;
  int layers;
  int64_t tokens;
  bool operator<(const ModelKey& o) const {
    return std::tie(shape, layers, tokens) < std::tie(o.shape, o.layers, o.tokens);
  }
};

// Models (and the plain trainer) shared by the cases of one shape: created once, freed by ReleaseShared.
std::map<ModelKey, std::unique_ptr<BenchModel>>& Models() {
  static std::map<ModelKey, std::unique_ptr<BenchModel>> models;
  return models;
}
std::map<ModelKey, std::unique_ptr<PlainTrainer>>& Plains() {
  static std::map<ModelKey, std::unique_ptr<PlainTrainer>> plains;
  return plains;
}

BenchModel* GetModel(benchmark::State& state, const ModelKey& key) {
  std::unique_ptr<BenchModel>& m = Models()[key];
  if (m == nullptr && !Check(state, BenchModel::Create(Shape(key.shape, key.layers), key.tokens, &m), "BenchModel")) {
    return nullptr;
  }
  return m.get();
}

struct OverheadCase {
  Stage stage;
  ModelKey model;
  int iterations;
};

void BM_EngineOverhead(benchmark::State& state, OverheadCase c) {
  Comm* comm = GetComm(state);
  if (comm == nullptr) return;
  BenchModel* model = GetModel(state, c.model);
  if (model == nullptr) return;
  std::unique_ptr<PlainTrainer>& plain = Plains()[c.model];
  if (plain == nullptr && !Check(state, PlainTrainer::Create(model, DType::kF32, &plain), "PlainTrainer")) return;
  std::unique_ptr<Engine> engine;
  const int64_t free_before = FreeDeviceBytes();
  if (!Check(state, OpenEngine(GpuOptions(c.stage), comm, model->specs(), &engine), "opening the engine")) return;
  const int64_t engine_runtime_bytes = free_before - FreeDeviceBytes();
  MemoryEstimate estimate;
  if (!Check(state, Estimate(ModelDescription::FromSpecs(model->specs()), 1, GpuOptions(c.stage), &estimate),
             "zero::Estimate")) {
    return;
  }
  // Warm both (cuBLAS heuristics, NCCL's first collectives, the engine's first-step traces).
  for (int i = 0; i < 2; ++i) {
    if (!Check(state, EngineStep(*model, *engine), "engine step") || !Check(state, plain->Step(), "plain step")) return;
  }
  cudaDeviceSynchronize();
  std::vector<double> te, tp, ratio;
  int it = 0;
  for (auto _ : state) {
    Status se, sp;
    double a = 0, b = 0;
    const auto eng = [&] { a = SyncedSeconds([&] { se = EngineStep(*model, *engine); }); };
    const auto pl = [&] { b = SyncedSeconds([&] { sp = plain->Step(); }); };
    if (it++ % 2 == 0) {
      eng();
      pl();
    } else {
      pl();
      eng();
    }
    if (!Check(state, se, "engine step") || !Check(state, sp, "plain step")) return;
    state.SetIterationTime(a);
    te.push_back(a);
    tp.push_back(b);
    ratio.push_back(a / b);
  }
  state.counters["engine_s"] = Median(te);
  state.counters["plain_s"] = Median(tp);
  state.counters["ratio"] = Median(ratio);
  state.counters["tflops"] = model->flops_per_step() / Median(te) * 1e-12;
  state.counters["plain_tflops"] = model->flops_per_step() / Median(tp) * 1e-12;
  state.counters["params"] = static_cast<double>(model->params());
  state.counters["tokens"] = static_cast<double>(model->tokens());
  // Memory by category: the engine's accounting (peak per category), zero::Estimate for the same options, and
  // what the CUDA runtime saw Open + InitParams take (cudaMemGetInfo; includes the engine's NCCL duplicate).
  const MemoryReport mem = engine->Memory();
  static const char* kCategory[] = {"params", "grads", "optimizer", "buffers"};
  for (int k = 0; k < kNumMemoryCategories; ++k) {
    state.counters[std::string("dev_") + kCategory[k]] = static_cast<double>(mem.device.peak[k]);
    state.counters[std::string("est_") + kCategory[k]] = static_cast<double>(estimate.device[k]);
  }
  state.counters["device_bytes"] = static_cast<double>(mem.device.peak_total);
  state.counters["estimate_bytes"] = static_cast<double>(estimate.DeviceTotal());
  state.counters["runtime_open_bytes"] = static_cast<double>(engine_runtime_bytes);
  state.counters["plain_device_bytes"] = static_cast<double>(plain->device_bytes());
}

// ---------------------------------------------------------------------------------------------------- prefetch

struct PrefetchCase {
  bool offload_params;
  ModelKey model;
};

void BM_Prefetch(benchmark::State& state, PrefetchCase c) {
  Comm* comm = GetComm(state);
  if (comm == nullptr) return;
  BenchModel* model = GetModel(state, c.model);
  if (model == nullptr) return;
  Options o = GpuOptions(Stage::kParameters);
  o.offload_optimizer = c.offload_params;
  o.offload_params = c.offload_params;
  Options forced = o;
  forced.prefetch_bytes = 0;
  std::unique_ptr<Engine> prefetch, exposed;
  if (!Check(state, OpenEngine(o, comm, model->specs(), &prefetch), "opening the prefetching engine") ||
      !Check(state, OpenEngine(forced, comm, model->specs(), &exposed), "opening the forced-exposed engine")) {
    return;
  }
  StepTimeline tl_prefetch(2 * model->num_units()), tl_exposed(2 * model->num_units());
  for (int i = 0; i < 2; ++i) {
    if (!Check(state, EngineStep(*model, *prefetch), "step") || !Check(state, EngineStep(*model, *exposed), "step")) {
      return;
    }
  }
  cudaDeviceSynchronize();
  std::vector<double> ex, ex_forced, hidden, step, step_forced, compute, gather;
  const auto sum = [](const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return s;
  };
  for (auto _ : state) {
    Status s1, s2;
    const double a = SyncedSeconds([&] { s1 = EngineStep(*model, *prefetch, &tl_prefetch); });
    const double b = SyncedSeconds([&] { s2 = EngineStep(*model, *exposed, &tl_exposed); });
    if (!Check(state, s1, "step") || !Check(state, s2, "step")) return;
    const double e = sum(tl_prefetch.Stalls()), f = sum(tl_exposed.Stalls());
    state.SetIterationTime(a);
    step.push_back(a);
    step_forced.push_back(b);
    ex.push_back(e);
    ex_forced.push_back(f);
    hidden.push_back(f > 0 ? 1.0 - e / f : 0.0);
    const std::vector<double> cp = tl_prefetch.Computes(), st = tl_exposed.Stalls();
    compute.push_back(Median(cp));
    gather.push_back(Median(st));
  }
  state.counters["exposed_s"] = Median(ex);
  state.counters["exposed_forced_s"] = Median(ex_forced);
  state.counters["hidden"] = Median(hidden);
  state.counters["step_s"] = Median(step);
  state.counters["step_forced_s"] = Median(step_forced);
  state.counters["compute_per_unit_s"] = Median(compute);
  state.counters["gather_per_unit_s"] = Median(gather);
  state.counters["tokens"] = static_cast<double>(model->tokens());
  state.counters["params"] = static_cast<double>(model->params());
  state.SetLabel(c.offload_params ? "stage 3 + parameter offload (gathers start with a host-to-device copy)"
                                  : "stage 3 (one-rank gathers are device copies)");
}

}  // namespace

void ReleaseEngineRows() {
  Plains().clear();
  Models().clear();
  SharedComm().reset();
}

void RegisterEngineRows() {
  const bool quick = Config().quick;
  // Offloaded step: the 1.1B shape in both modes (issue 16's row is about >= 1B parameters: 8 layers, 0.6B, would
  // not measure it; about 18 GB of pinned host memory and half a second of CPU AdamW per step); full adds a 3B one.
  std::vector<std::pair<std::string, int>> offload_shapes = {{"llama-1b", 0}};
  if (!quick) offload_shapes.push_back({"open-llama-3b", 0});
  for (const auto& [shape, layers] : offload_shapes) {
    for (const Stage st : {Stage::kGradients, Stage::kParameters}) {
      const OffloadCase c{st, shape, layers, quick ? 2 : 5};
      const std::string n = "OffloadStep/stage:" + std::to_string(static_cast<int>(st)) + "/shape:" + ShapeLabel(shape, layers);
      benchmark::RegisterBenchmark(n.c_str(), BM_OffloadStep, c)->UseManualTime()->Iterations(c.iterations)->Unit(
          benchmark::kMillisecond);
    }
  }
  // Engine overhead: quick, 4 layers of the 1B shape on 2048 tokens; full, TinyLlama-1.1B on 8192 tokens.
  const ModelKey overhead = quick ? ModelKey{"llama-1b", 4, 2048} : ModelKey{"tinyllama-1.1b", 0, 8192};
  for (int st = 0; st <= 3; ++st) {
    const OverheadCase c{static_cast<Stage>(st), overhead, quick ? 5 : 20};
    const std::string n = "EngineOverhead/stage:" + std::to_string(st) + "/shape:" +
                          ShapeLabel(overhead.shape, overhead.layers) + "/tokens:" + std::to_string(overhead.tokens);
    benchmark::RegisterBenchmark(n.c_str(), BM_EngineOverhead, c)->UseManualTime()->Iterations(c.iterations)->Unit(
        benchmark::kMillisecond);
  }
  // Prefetch: units of the 1B shape (61M parameters, 122 MB in bf16: within the default 256 MiB budget). Device
  // gathers hide behind any real compute; host-to-device gathers need about 12k tokens per unit to be covered.
  const ModelKey dev_model = quick ? ModelKey{"llama-1b", 6, 4096} : ModelKey{"llama-1b", 0, 4096};
  const ModelKey host_model = quick ? ModelKey{"llama-1b", 6, 16384} : ModelKey{"llama-1b", 0, 16384};
  for (const bool off : {false, true}) {
    const PrefetchCase c{off, off ? host_model : dev_model};
    const std::string n = std::string("Prefetch/offload_params:") + (off ? "1" : "0") + "/shape:" +
                          ShapeLabel(c.model.shape, c.model.layers) + "/tokens:" + std::to_string(c.model.tokens);
    benchmark::RegisterBenchmark(n.c_str(), BM_Prefetch, c)->UseManualTime()->Iterations(quick ? 3 : 8)->Unit(
        benchmark::kMillisecond);
  }
}

}  // namespace zero::bench::gpu

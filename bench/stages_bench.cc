// zero_bench_stages: ZeRO stages 0-3 against each other and against the closed forms of DESIGN.md, run under
// mpiexec (the world size is mpiexec's -n).
//
// Model: a synthetic decoder of Ψ ≈ 2^k parameters (k = --sizes) laid out as a trainer would: unit 0 the token
// embedding (V, d), units 1..L blocks (qkv (d, 3d), o (d, d), two norms (d), MLP (d, 4d) and (4d, d)), unit L+1
// the final norm and the head (d, V). No frozen, tied or persistent units and one micro-step, so the formulas
// reduce to the paper's: 2Ψ elements communicated per step in stages 0-2 and 3Ψ in stage 3.
//
// Per configuration (stage × offload × dtype): one engine, InitParams, one warm-up step, then --iterations
// iterations of two steps each, in the same iteration: one with the trainer's compute (a sleep per unit of
// --compute_ns_per_param × its parameters, a third in forward, two thirds in backward) and one without it. The
// CPU backend has no accelerator to compute on, so the compute is a sleeping task: it leaves the cores to the
// engine's communication and stream threads, which is what a GPU's kernels do. What this measures is the
// protocol: how much of the engine's work (reductions, gathers, the optimizer, copies) runs while the trainer
// computes. Real overlap numbers need a GPU.
//
// Counters (rank 0 reports; times are the slowest rank's, medians over iterations):
//   step_time_s       a step with compute
//   nocompute_step_s  a step without compute: the engine's own time (collectives, optimizer, protocol)
//   compute_s         the sleeps of one step
//   hidden_comm_s     median of (nocompute + compute − step): engine time hidden behind the compute
//                     (on the CPU: protocol overlap with a sleeping compute, not GPU overlap)
//   exposed_s         median of (step − compute): what the engine adds to the trainer's compute
//   comm_elements_per_step  data elements per step, CommCounters::Volume() (all-reduce counted twice)
//   comm_ratio        comm_elements_per_step / Ψ (Ψ: the plan's padded trainable elements)
//   peak_device_bytes the engine's device high-water mark (largest rank); dev_<category> per category
//   formula_device_bytes, memory_formula_ratio   DESIGN.md's per-rank bytes with this plan's padding, buffers
//                     and pool, and measured / formula (1.0 = the allocator matches the formula exactly)
//   peak_host_bytes, formula_host_bytes, host_formula_ratio, host_<category>   the same for host memory (offload)
//
// Flags (besides Google Benchmark's): --sizes=22,24 (log2 Ψ), --stages=0,1,2,3, --offloads=none,optimizer,params,
// --dtypes=f32,bf16,bf16g (param/grad: f32/f32, bf16/f32, bf16/bf16), --iterations=N, --compute_ns_per_param=X.
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_mpi.h"
#include "partition_plan.h"
#include "zero/zero.h"

namespace zero::bench {
namespace {

struct Settings {
  int iterations = 5;
  double compute_ns_per_param = 6.0;
};
Settings g_settings;
Comm* g_comm = nullptr;

// A decoder of about 2^log2 parameters: three quarters in L blocks of width d, a quarter in embedding + head.
struct Model {
  int d = 0, layers = 0, vocab = 0;
  std::vector<ParamSpec> specs;
  std::vector<int64_t> unit_params;  // parameters per unit
  int64_t params = 0;
};

Model Transformer(int log2) {
  Model m;
  m.d = 256 << std::max(0, (log2 - 22) / 2);
  const double target = std::ldexp(1.0, log2);
  const double block = 12.0 * m.d * m.d + 2.0 * m.d;
  m.layers = std::max(1, static_cast<int>(std::lround(0.75 * target / block)));
  m.vocab = std::max(64, static_cast<int>(std::lround(0.25 * target / (2.0 * m.d) / 64.0)) * 64);
  const int64_t d = m.d, v = m.vocab;
  auto add = [&](std::string name, std::vector<int64_t> shape, int unit, float wd) {
    ParamSpec s;
    s.name = std::move(name);
    s.shape = std::move(shape);
    s.unit = unit;
    s.wd_mult = wd;
    if (static_cast<int>(m.unit_params.size()) <= unit) m.unit_params.resize(static_cast<size_t>(unit) + 1, 0);
    m.unit_params[static_cast<size_t>(unit)] += s.numel();
    m.params += s.numel();
    m.specs.push_back(std::move(s));
  };
  add("embed", {v, d}, 0, 1.0f);
  for (int l = 0; l < m.layers; ++l) {
    const std::string p = "block" + std::to_string(l) + ".";
    add(p + "ln1", {d}, l + 1, 0.0f);
    add(p + "qkv", {d, 3 * d}, l + 1, 1.0f);
    add(p + "o", {d, d}, l + 1, 1.0f);
    add(p + "ln2", {d}, l + 1, 0.0f);
    add(p + "mlp_up", {d, 4 * d}, l + 1, 1.0f);
    add(p + "mlp_down", {4 * d, d}, l + 1, 1.0f);
  }
  add("ln_f", {d}, m.layers + 1, 0.0f);
  add("head", {d, v}, m.layers + 1, 1.0f);
  return m;
}

enum class Offload { kNone, kOptimizer, kParams };
const char* OffloadName(Offload o) {
  return o == Offload::kNone ? "none" : o == Offload::kOptimizer ? "optimizer" : "optimizer+params";
}

struct Config {
  Stage stage;
  Offload offload;
  DType param_dtype, grad_dtype;
  int log2;
};

// DESIGN.md's per-rank bytes for this plan: p, g bytes per parameter and gradient element, K per trainable
// parameter for AdamW (m, v; + the fp32 master when parameters are 16-bit). Ψ is the padded trainable count;
// the stage-2/3 pool holds grad_pool_buffers of the largest unit, stage 3 gather_slots of the largest unit;
// offload moves the optimizer (K, plus a 4-byte fp32 master for fp32 parameters) to the host with two staging
// buffers of the largest bucket shard for gradients and, unless the shards are on the host, for parameters.
struct Formula {
  int64_t device = 0, host = 0;
};
Formula FormulaBytes(const Config& c, const Options& o, const PartitionPlan& plan) {
  const int64_t n = plan.world_size, psi = plan.trainable_padded;
  const int64_t p = static_cast<int64_t>(DTypeSize(c.param_dtype)), g = static_cast<int64_t>(DTypeSize(c.grad_dtype));
  const int64_t k = 8 + (c.param_dtype == DType::kF32 ? 0 : 4);
  int64_t max_unit = 0, max_bucket = 0;
  for (const UnitPlan& u : plan.units) max_unit = std::max(max_unit, u.trainable_padded + u.frozen_padded);
  for (const Bucket& b : plan.buckets) max_bucket = std::max(max_bucket, b.padded);
  const bool off = c.offload != Offload::kNone, off_params = c.offload == Offload::kParams;
  const int64_t opt = off ? 0 : k;
  const int64_t pool = g * o.grad_pool_buffers * max_unit;
  Formula f;
  switch (c.stage) {
    case Stage::kDataParallel: f.device = (p + g + k) * psi; break;
    case Stage::kOptimizerStates: f.device = (p + g) * psi + opt * psi / n; break;
    case Stage::kGradients: f.device = p * psi + (g + opt) * psi / n + pool; break;
    default:
      f.device = (off_params ? 0 : p) * psi / n + (g + opt) * psi / n + p * o.gather_slots * max_unit + pool;
      break;
  }
  if (off) {
    f.host = 12 * psi / n + 2 * g * max_bucket / n + (off_params ? p * psi / n : 2 * p * max_bucket / n);
  }
  return f;
}

#define BENCH_RETURN_IF_ERROR(expr)  \
  do {                               \
    Status s_ = (expr);              \
    if (!s_.ok()) return s_;         \
  } while (false)

Status RunStep(Engine& engine, const std::vector<int64_t>& unit_params, double ns_per_param) {
  const auto nap = [&](int u, double share) {
    const double ns = ns_per_param * share * static_cast<double>(unit_params[static_cast<size_t>(u)]);
    if (ns > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(static_cast<int64_t>(ns)));
  };
  const int units = static_cast<int>(unit_params.size());
  BENCH_RETURN_IF_ERROR(engine.BeginMicroStep(0, true));
  for (int u = 0; u < units; ++u) {
    BENCH_RETURN_IF_ERROR(engine.Acquire(u, Pass::kForward));
    nap(u, 1.0 / 3);
    BENCH_RETURN_IF_ERROR(engine.Release(u, Pass::kForward));
  }
  for (int u = units - 1; u >= 0; --u) {
    BENCH_RETURN_IF_ERROR(engine.Acquire(u, Pass::kBackward));
    nap(u, 2.0 / 3);
    BENCH_RETURN_IF_ERROR(engine.GradsReady(u));
    BENCH_RETURN_IF_ERROR(engine.Release(u, Pass::kBackward));
  }
  StepResult result;
  return engine.Step(StepArgs(), &result);
}

void BM_Stage(benchmark::State& state, Config cfg) {
  const Model model = Transformer(cfg.log2);
  Options o;
  o.stage = cfg.stage;
  o.param_dtype = cfg.param_dtype;
  o.grad_dtype = cfg.grad_dtype;
  o.offload_optimizer = cfg.offload != Offload::kNone;
  o.offload_params = cfg.offload == Offload::kParams;
  o.adamw.lr = 1e-4f;
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, g_comm, model.specs, &engine);
  if (s.ok()) {
    s = engine->InitParams([](int param, int64_t off, int64_t count, float* dst) {
      for (int64_t i = 0; i < count; ++i) dst[i] = 0.01f * static_cast<float>(((off + i + param) % 17) - 8);
    });
  }
  const double ns = g_settings.compute_ns_per_param;
  if (s.ok()) s = RunStep(*engine, model.unit_params, ns);  // warm-up: stage 3 records its trace here
  std::vector<double> t_step, t_bare, hidden, exposed;
  CommCounters before, per_step;
  double compute = 0;
  for (int64_t u : model.unit_params) compute += ns * 1e-9 * static_cast<double>(u);
  for (auto _ : state) {
    if (!s.ok()) break;
    std::vector<double> t(2);
    MPI_Barrier(MPI_COMM_WORLD);
    before = engine->comm_counters();
    t[0] = Seconds([&] { s = RunStep(*engine, model.unit_params, ns); });
    const CommCounters& after = engine->comm_counters();
    per_step.reduce_scatter = after.reduce_scatter - before.reduce_scatter;
    per_step.all_gather = after.all_gather - before.all_gather;
    per_step.all_reduce = after.all_reduce - before.all_reduce;
    MPI_Barrier(MPI_COMM_WORLD);
    if (s.ok()) t[1] = Seconds([&] { s = RunStep(*engine, model.unit_params, 0.0); });
    MaxOverRanks(&t);
    state.SetIterationTime(t[0]);
    t_step.push_back(t[0]);
    t_bare.push_back(t[1]);
    hidden.push_back(std::max(0.0, t[1] + compute - t[0]));
    exposed.push_back(t[0] - compute);
  }
  if (!s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  PartitionPlan plan;
  if (Status ps = PartitionPlan::Build(model.specs, g_comm->world_size(), o.bucket_elements, &plan); !ps.ok()) {
    state.SkipWithError(ps.ToString().c_str());
    return;
  }
  const Formula f = FormulaBytes(cfg, o, plan);
  const MemoryReport mem = engine->Memory();
  // Every rank holds the same shard sizes; the largest rank's bytes are what a capacity must cover.
  std::vector<double> bytes = {static_cast<double>(mem.device.peak_total), static_cast<double>(mem.host.peak_total)};
  for (int c = 0; c < kNumMemoryCategories; ++c) bytes.push_back(static_cast<double>(mem.device.peak[c]));
  for (int c = 0; c < kNumMemoryCategories; ++c) bytes.push_back(static_cast<double>(mem.host.peak[c]));
  MaxOverRanks(&bytes);
  const double psi = static_cast<double>(plan.trainable_padded);
  auto& k = state.counters;
  k["stage"] = static_cast<double>(cfg.stage);
  k["world"] = g_comm->world_size();
  k["params"] = static_cast<double>(model.params);
  k["params_padded"] = psi;
  k["units"] = static_cast<double>(model.unit_params.size());
  k["d_model"] = model.d;
  k["step_time_s"] = Median(t_step);
  k["nocompute_step_s"] = Median(t_bare);
  k["compute_s"] = compute;
  k["hidden_comm_s"] = Median(hidden);
  k["exposed_s"] = Median(exposed);
  k["comm_elements_per_step"] = static_cast<double>(per_step.Volume());
  k["comm_ratio"] = static_cast<double>(per_step.Volume()) / psi;
  k["reduce_scatter_elements"] = static_cast<double>(per_step.reduce_scatter);
  k["all_gather_elements"] = static_cast<double>(per_step.all_gather);
  k["all_reduce_elements"] = static_cast<double>(per_step.all_reduce);
  k["peak_device_bytes"] = bytes[0];
  k["formula_device_bytes"] = static_cast<double>(f.device);
  k["memory_formula_ratio"] = f.device > 0 ? bytes[0] / static_cast<double>(f.device) : 0.0;
  k["peak_host_bytes"] = bytes[1];
  k["formula_host_bytes"] = static_cast<double>(f.host);
  k["host_formula_ratio"] = f.host > 0 ? bytes[1] / static_cast<double>(f.host) : (bytes[1] == 0 ? 1.0 : 0.0);
  for (int c = 0; c < kNumMemoryCategories; ++c) {
    const std::string name = MemoryCategoryName(static_cast<MemoryCategory>(c));
    k["dev_" + name] = bytes[2 + static_cast<size_t>(c)];
    k["host_" + name] = bytes[2 + kNumMemoryCategories + static_cast<size_t>(c)];
  }
  state.SetLabel(std::string(OffloadName(cfg.offload)) + " " + DTypeName(cfg.param_dtype) + "/" +
                 DTypeName(cfg.grad_dtype));
}

bool RegisterAll(const std::vector<int>& sizes, const std::vector<int>& stages,
                 const std::vector<std::string>& offloads, const std::vector<std::string>& dtypes) {
  for (const int log2 : sizes) {
    for (const std::string& dt : dtypes) {
      DType pd, gd;
      if (dt == "f32") pd = gd = DType::kF32;
      else if (dt == "bf16") pd = DType::kBF16, gd = DType::kF32;
      else if (dt == "bf16g") pd = gd = DType::kBF16;
      else return false;
      for (const int st : stages) {
        if (st < 0 || st > 3) return false;
        for (const std::string& off : offloads) {
          Offload offload;
          if (off == "none") offload = Offload::kNone;
          else if (off == "optimizer") offload = Offload::kOptimizer;
          else if (off == "params") offload = Offload::kParams;
          else return false;
          if (offload != Offload::kNone && st == 0) continue;       // offload needs a partitioned optimizer
          if (offload == Offload::kParams && st != 3) continue;     // parameter shards exist in stage 3 only
          const Config cfg{static_cast<Stage>(st), offload, pd, gd, log2};
          const std::string name = "Stages/stage:" + std::to_string(st) + "/offload:" + off + "/dtype:" + dt +
                                   "/params:2^" + std::to_string(log2) + "/world:" + std::to_string(WorldSize());
          benchmark::RegisterBenchmark(name.c_str(), BM_Stage, cfg)
              ->UseManualTime()
              ->Iterations(g_settings.iterations)
              ->Unit(benchmark::kMillisecond);
        }
      }
    }
  }
  return true;
}

int Main(int argc, char** argv) {
  StripOutputFlagsOnPeers(&argc, argv);
  benchmark::Initialize(&argc, argv);
  std::string sizes = "22", stages = "0,1,2,3", offloads = "none,optimizer,params", dtypes = "f32,bf16";
  std::string iterations = "5", compute = "6";
  if (!ParseFlags(argc, argv, {{"sizes", &sizes}, {"stages", &stages}, {"offloads", &offloads},
                               {"dtypes", &dtypes}, {"iterations", &iterations},
                               {"compute_ns_per_param", &compute}})) {
    return 2;
  }
  g_settings.iterations = std::max(1, std::atoi(iterations.c_str()));
  g_settings.compute_ns_per_param = std::atof(compute.c_str());
  std::unique_ptr<Comm> comm;
  if (Status s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &comm); !s.ok()) {
    std::fprintf(stderr, "zero_bench_stages: %s\n", s.ToString().c_str());
    return 1;
  }
  g_comm = comm.get();
  if (!RegisterAll(ParseInts(sizes), ParseInts(stages), ParseWords(offloads), ParseWords(dtypes))) {
    if (WorldRank() == 0) std::fprintf(stderr, "zero_bench_stages: bad --stages, --offloads or --dtypes\n");
    return 2;
  }
  benchmark::AddCustomContext("compute", "a sleep of " + compute + " ns per parameter and unit (CPU backend: hidden time is "
                                         "protocol overlap with a sleeping compute, not GPU overlap)");
  if (WorldRank() == 0) {
    std::printf("zero_bench_stages: %d ranks, CPU backend: per-unit compute is a sleep of %g ns per parameter; "
                "hidden time is the protocol's overlap with it, not GPU overlap\n",
                WorldSize(), g_settings.compute_ns_per_param);
  }
  RunOnEveryRank();
  benchmark::Shutdown();
  g_comm = nullptr;
  return 0;
}

}  // namespace
}  // namespace zero::bench

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  const int rc = zero::bench::Main(argc, argv);
  MPI_Finalize();
  return rc;
}

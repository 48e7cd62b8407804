// zero_bench_stages: ZeRO stages 0-3 against each other and against the closed forms of DESIGN.md, run under
// mpiexec (the world size is mpiexec's -n).
//
// Model: a synthetic decoder of Ψ ≈ 2^k parameters (k = --sizes) laid out as a trainer would: unit 0 the token
// embedding (V, d), units 1..L blocks (qkv (d, 3d), o (d, d), two norms (d), MLP (d, 4d) and (4d, d)), unit L+1
// the final norm and the head (d, V). No frozen, tied or persistent units and one micro-step, so the formulas
// reduce to the paper's: 2Ψ elements communicated per step in stages 0-2 and 3Ψ in stage 3.
//
// The configurations of one (Ψ, dtype) (stage × offload) are measured together, so that comparing them is fair on
// a noisy machine: every engine is opened at once (InitParams, one warm-up step), then each of --iterations
// iterations steps every configuration in turn (the first one rotating), each twice: with the trainer's compute
// (a sleep per unit of --compute_ns_per_param × its parameters, a third in forward, two thirds in backward) and
// without it. A step is timed from BeginMicroStep until its work has completed, post-step all-gathers included
// (a training loop would overlap those with the next forward in stages 1-2; here they are charged to the step, so
// that no configuration's work leaks into the next one's time). The
// CPU backend has no accelerator to compute on, so the compute is a sleeping task: it leaves the cores to the
// engine's communication and stream threads, which is what a GPU's kernels do. What this measures is the
// protocol: how much of the engine's work (reductions, gathers, the optimizer, copies) runs while the trainer
// computes. Real overlap numbers need a GPU.
//
// Counters (rank 0 reports; times are the slowest rank's, medians over iterations):
//   step_time_s       a step with compute
//   nocompute_step_s  a step without compute: the engine's own time (collectives, optimizer, protocol)
//   compute_s         the sleeps of one step, as measured (a sleep overshoots its request by tens of µs)
//   hidden_comm_s     median of (nocompute + compute − step): engine time hidden behind the compute
//                     (on the CPU: protocol overlap with a sleeping compute, not GPU overlap)
//   exposed_s         median of (step − compute): what the engine adds to the trainer's compute
//   step_vs_stage0, nocompute_vs_stage0   medians of the per-iteration ratios to stage 0 of the same group
//   in_begin_s, in_acquire_fwd_s, in_acquire_bwd_s, in_grads_ready_s, in_release_s, in_step_s, in_drain_s
//                     the trainer thread's time inside each kind of engine call during a step with compute
//                     (in_drain_s: waiting for the step's post-step all-gathers)
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
#include <cstring>
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

// A decoder of about 2^log2 parameters: three quarters in L blocks of width d, a quarter in embedding + head.
struct Model {
  int d = 0, layers = 0, vocab = 0;
  std::vector<ParamSpec> specs;
  std::vector<int64_t> unit_params;  // parameters per unit
  int64_t params = 0;
};

Model Transformer(int log2) {
  Model m;
  // d = 256 at 2^22 and doubles every factor of 4 either way, so that every size has the same shape (4 blocks at
  // even sizes): a quick run at 2^20 measures the structure the full runs do, not one block beside the head.
  const int shift = log2 >= 22 ? (log2 - 22) / 2 : -((23 - log2) / 2);
  m.d = shift >= 0 ? 256 << shift : 256 >> -shift;
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
  int64_t max_bucket = 0;
  std::vector<int64_t> unit_sizes;
  for (const UnitPlan& u : plan.units) unit_sizes.push_back(u.trainable_padded + u.frozen_padded);
  for (const Bucket& b : plan.buckets) max_bucket = std::max(max_bucket, b.padded);
  // The pool and the gather slots hold one unit per buffer, in two sizes (README, "Per-rank bytes"): of m buffers
  // for units s1 >= s2 >= ..., k are as large as s1 and m - k as large as s(k+1), k in 1..m the fewest bytes.
  std::sort(unit_sizes.rbegin(), unit_sizes.rend());
  const auto two_sizes = [&](int count) {
    const int m = std::min<int>(count, static_cast<int>(unit_sizes.size()));
    int64_t best = 0;
    for (int j = 1; j <= m; ++j) {
      const int64_t regular = j < static_cast<int>(unit_sizes.size()) ? unit_sizes[static_cast<size_t>(j)] : 0;
      const int64_t total = j * unit_sizes[0] + (m - j) * regular;
      if (j == 1 || total < best) best = total;
    }
    return best;
  };
  const bool off = c.offload != Offload::kNone, off_params = c.offload == Offload::kParams;
  const int64_t opt = off ? 0 : k;
  const int64_t pool = g * two_sizes(o.grad_pool_buffers);
  Formula f;
  switch (c.stage) {
    case Stage::kDataParallel: f.device = (p + g + k) * psi; break;
    case Stage::kOptimizerStates: f.device = (p + g) * psi + opt * psi / n; break;
    case Stage::kGradients: f.device = p * psi + (g + opt) * psi / n + pool; break;
    default:
      f.device = (off_params ? 0 : p) * psi / n + (g + opt) * psi / n + p * two_sizes(o.gather_slots) + pool;
      break;
  }
  if (off) {
    f.host = 12 * psi / n + 2 * g * max_bucket / n + (off_params ? p * psi / n : 2 * p * max_bucket / n);
  }
  return f;
}

// Where the trainer's thread spends a step: the compute sleeps and each kind of engine call. On the CPU backend
// the calls' time is the protocol's cost to the trainer (waits for gathers or pool buffers, zeroing a pool buffer,
// the optimizer inside Step), which a GPU backend would mostly enqueue instead.
struct Breakdown {
  double slept = 0, begin = 0, acquire_fwd = 0, acquire_bwd = 0, grads_ready = 0, release = 0, step = 0, drain = 0;
};

// One optimizer step of one micro-step, adding its times to `b` (optional). The sleeps are measured, since they
// overshoot their request by tens of microseconds each (far more on a loaded machine).
Status RunStep(Engine& engine, const std::vector<int64_t>& unit_params, double ns_per_param,
               Breakdown* b = nullptr) {
  Breakdown local;
  Breakdown& t = b != nullptr ? *b : local;
  const auto nap = [&](int u, double share) {
    const double ns = ns_per_param * share * static_cast<double>(unit_params[static_cast<size_t>(u)]);
    if (ns > 0) t.slept += Seconds([&] { std::this_thread::sleep_for(std::chrono::nanoseconds(int64_t(ns))); });
  };
  // Runs an engine call, adding its time to `into`.
  Status s;
  const auto call = [&](double* into, auto&& fn) {
    *into += Seconds([&] { s = fn(); });
    return s.ok();
  };
  const int units = static_cast<int>(unit_params.size());
  if (!call(&t.begin, [&] { return engine.BeginMicroStep(0, true); })) return s;
  for (int u = 0; u < units; ++u) {
    if (!call(&t.acquire_fwd, [&] { return engine.Acquire(u, Pass::kForward); })) return s;
    nap(u, 1.0 / 3);
    if (!call(&t.release, [&] { return engine.Release(u, Pass::kForward); })) return s;
  }
  for (int u = units - 1; u >= 0; --u) {
    if (!call(&t.acquire_bwd, [&] { return engine.Acquire(u, Pass::kBackward); })) return s;
    nap(u, 2.0 / 3);
    if (!call(&t.grads_ready, [&] { return engine.GradsReady(u); })) return s;
    if (!call(&t.release, [&] { return engine.Release(u, Pass::kBackward); })) return s;
  }
  StepResult result;
  call(&t.step, [&] { return engine.Step(StepArgs(), &result); });
  return s;
}

Options MakeOptions(const Config& cfg) {
  Options o;
  o.stage = cfg.stage;
  o.param_dtype = cfg.param_dtype;
  o.grad_dtype = cfg.grad_dtype;
  o.offload_optimizer = cfg.offload != Offload::kNone;
  o.offload_params = cfg.offload == Offload::kParams;
  o.adamw.lr = 1e-4f;
  return o;
}

// What one configuration measured. Times are per iteration, the slowest rank's.
struct Result {
  Status status;
  std::vector<double> t_step, t_bare, slept;  // with compute, without, the compute sleeps
  std::vector<Breakdown> calls;               // the step with compute, per iteration (the slowest rank's)
  std::vector<double> vs_stage0, bare_vs_stage0;  // paired with the group's stage 0 in the same iteration
  CommCounters per_step;
  std::vector<double> bytes;  // device peak, host peak, device peak per category, host peak per category
  Formula formula;
  int64_t params_padded = 0;
};

// The configurations of one (Ψ, dtype): measured together, so that their step times are paired.
struct Group {
  int log2 = 0;
  std::vector<Config> configs;
  std::vector<Result> results;
  bool measured = false;
  int reported = 0;
};
std::vector<Group> g_groups;

// One timed step: from BeginMicroStep until its work is complete, post-step all-gathers included
// (comm_counters() drains the communication stream). In a training loop stages 1-2 overlap those gathers with the
// next forward; here every step starts and ends drained, so that configurations stepped in turn do not leak work
// into each other's times: stage 1-2 times are upper bounds.
Status TimedStep(Engine& engine, const Model& model, double ns, double* seconds, Breakdown* b,
                 CommCounters* delta) {
  const CommCounters before = engine.comm_counters();
  Status s;
  double drain = 0;
  *seconds = Seconds([&] {
    s = RunStep(engine, model.unit_params, ns, b);
    drain = Seconds([&] { (void)engine.comm_counters(); });
  });
  if (b != nullptr) b->drain += drain;
  const CommCounters& after = engine.comm_counters();
  if (delta != nullptr) {
    delta->reduce_scatter = after.reduce_scatter - before.reduce_scatter;
    delta->all_gather = after.all_gather - before.all_gather;
    delta->all_reduce = after.all_reduce - before.all_reduce;
  }
  return s;
}

// Opens every configuration of the group at once (each engine with its own communicator: an engine's collectives
// may still be in flight when Step returns), then, per iteration, steps each in turn (the starting one rotating)
// with and without compute. Results are agreed: every rank computes the same statuses.
void MeasureGroup(Group& g) {
  const Model model = Transformer(g.log2);
  const size_t n = g.configs.size();
  const double ns = g_settings.compute_ns_per_param;
  g.results.assign(n, Result());
  std::vector<std::unique_ptr<Comm>> comms(n);
  std::vector<std::unique_ptr<Engine>> engines(n);
  int ref = -1;  // stage 0, the baseline
  for (size_t i = 0; i < n; ++i) {
    const Config& cfg = g.configs[i];
    Result& r = g.results[i];
    r.status = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &comms[i]);
    if (r.status.ok()) r.status = Engine::Open(MakeOptions(cfg), comms[i].get(), model.specs, &engines[i]);
    if (r.status.ok()) {
      r.status = engines[i]->InitParams([](int param, int64_t off, int64_t count, float* dst) {
        for (int64_t j = 0; j < count; ++j) dst[j] = 0.01f * static_cast<float>(((off + j + param) % 17) - 8);
      });
    }
    double t = 0;
    // Warm-up: pages touched, threads started, and stage 3 records its trace.
    if (r.status.ok()) r.status = TimedStep(*engines[i], model, ns, &t, nullptr, nullptr);
    if (r.status.ok() && cfg.stage == Stage::kDataParallel) ref = static_cast<int>(i);
  }
  for (int it = 0; it < g_settings.iterations; ++it) {
    // Per configuration: step, no-compute step, then the step's breakdown (kBreakdown fields).
    constexpr size_t kBreakdown = sizeof(Breakdown) / sizeof(double);
    constexpr size_t kPer = 2 + kBreakdown;
    std::vector<double> t(kPer * n, 0.0);
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (k + static_cast<size_t>(it)) % n;
      Result& r = g.results[i];
      if (!r.status.ok()) continue;
      Breakdown b;
      MPI_Barrier(MPI_COMM_WORLD);
      r.status = TimedStep(*engines[i], model, ns, &t[kPer * i], &b, &r.per_step);
      MPI_Barrier(MPI_COMM_WORLD);
      if (r.status.ok()) r.status = TimedStep(*engines[i], model, 0.0, &t[kPer * i + 1], nullptr, nullptr);
      std::memcpy(&t[kPer * i + 2], &b, sizeof(b));
    }
    MaxOverRanks(&t);
    for (size_t i = 0; i < n; ++i) {
      Result& r = g.results[i];
      Breakdown b;
      std::memcpy(static_cast<void*>(&b), &t[kPer * i + 2], sizeof(b));  // b is doubles only
      r.calls.push_back(b);
      r.t_step.push_back(t[kPer * i]);
      r.t_bare.push_back(t[kPer * i + 1]);
      r.slept.push_back(b.slept);
      if (ref >= 0) {
        r.vs_stage0.push_back(t[kPer * i] / t[kPer * static_cast<size_t>(ref)]);
        r.bare_vs_stage0.push_back(t[kPer * i + 1] / t[kPer * static_cast<size_t>(ref) + 1]);
      }
    }
  }
  PartitionPlan plan;
  const Status plan_status =
      PartitionPlan::Build(model.specs, WorldSize(), MakeOptions(g.configs[0]).bucket_elements, &plan);
  for (size_t i = 0; i < n; ++i) {
    Result& r = g.results[i];
    if (r.status.ok()) r.status = plan_status;
    // Every rank holds the same shard sizes; the largest rank's bytes are what a capacity must cover.
    r.bytes.assign(2 + 2 * kNumMemoryCategories, 0.0);
    if (r.status.ok()) {
      const MemoryReport mem = engines[i]->Memory();
      r.bytes[0] = static_cast<double>(mem.device.peak_total);
      r.bytes[1] = static_cast<double>(mem.host.peak_total);
      for (int c = 0; c < kNumMemoryCategories; ++c) {
        r.bytes[2 + static_cast<size_t>(c)] = static_cast<double>(mem.device.peak[c]);
        r.bytes[2 + kNumMemoryCategories + static_cast<size_t>(c)] = static_cast<double>(mem.host.peak[c]);
      }
      r.formula = FormulaBytes(g.configs[i], MakeOptions(g.configs[i]), plan);
      r.params_padded = plan.trainable_padded;
    }
    MaxOverRanks(&r.bytes);
  }
  for (size_t i = n; i-- > 0;) engines[i].reset();  // before their communicators
  g.measured = true;
}

void BM_Stage(benchmark::State& state, size_t group, size_t index) {
  Group& g = g_groups[group];
  if (!g.measured) MeasureGroup(g);
  const Config& cfg = g.configs[index];
  Result& r = g.results[index];
  if (r.status.ok()) {
    size_t i = 0;
    for (auto _ : state) state.SetIterationTime(r.t_step[i++ % r.t_step.size()]);
  }
  if (++g.reported == static_cast<int>(g.configs.size())) g.measured = false;  // the next group may reuse memory
  if (!r.status.ok()) {
    state.SkipWithError(r.status.ToString().c_str());
    return;
  }
  const Model model = Transformer(cfg.log2);
  std::vector<double> hidden, exposed;
  for (size_t i = 0; i < r.t_step.size(); ++i) {
    hidden.push_back(std::max(0.0, r.t_bare[i] + r.slept[i] - r.t_step[i]));
    exposed.push_back(r.t_step[i] - r.slept[i]);
  }
  const double psi = static_cast<double>(r.params_padded);
  const Formula& f = r.formula;
  const std::vector<double>& bytes = r.bytes;
  auto& k = state.counters;
  k["stage"] = static_cast<double>(cfg.stage);
  k["world"] = WorldSize();
  k["params"] = static_cast<double>(model.params);
  k["params_padded"] = psi;
  k["units"] = static_cast<double>(model.unit_params.size());
  k["d_model"] = model.d;
  k["step_time_s"] = Median(r.t_step);
  k["nocompute_step_s"] = Median(r.t_bare);
  k["compute_s"] = Median(r.slept);
  k["hidden_comm_s"] = Median(hidden);
  k["exposed_s"] = Median(exposed);
  if (!r.vs_stage0.empty()) {
    k["step_vs_stage0"] = Median(r.vs_stage0);
    k["nocompute_vs_stage0"] = Median(r.bare_vs_stage0);
  }
  // The trainer thread's time per kind of call in a step with compute (each the median over iterations).
  const auto median_of = [&](double Breakdown::*field) {
    std::vector<double> x;
    for (const Breakdown& b : r.calls) x.push_back(b.*field);
    return Median(x);
  };
  k["in_begin_s"] = median_of(&Breakdown::begin);
  k["in_acquire_fwd_s"] = median_of(&Breakdown::acquire_fwd);
  k["in_acquire_bwd_s"] = median_of(&Breakdown::acquire_bwd);
  k["in_grads_ready_s"] = median_of(&Breakdown::grads_ready);
  k["in_release_s"] = median_of(&Breakdown::release);
  k["in_step_s"] = median_of(&Breakdown::step);
  k["in_drain_s"] = median_of(&Breakdown::drain);
  k["comm_elements_per_step"] = static_cast<double>(r.per_step.Volume());
  k["comm_ratio"] = static_cast<double>(r.per_step.Volume()) / psi;
  k["reduce_scatter_elements"] = static_cast<double>(r.per_step.reduce_scatter);
  k["all_gather_elements"] = static_cast<double>(r.per_step.all_gather);
  k["all_reduce_elements"] = static_cast<double>(r.per_step.all_reduce);
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
      g_groups.push_back(Group());
      g_groups.back().log2 = log2;
      const size_t group = g_groups.size() - 1;
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
          g_groups[group].configs.push_back(cfg);
          benchmark::RegisterBenchmark(name.c_str(), BM_Stage, group, g_groups[group].configs.size() - 1)
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
  if (!RegisterAll(ParseInts(sizes), ParseInts(stages), ParseWords(offloads), ParseWords(dtypes))) {
    if (WorldRank() == 0) std::fprintf(stderr, "zero_bench_stages: bad --stages, --offloads or --dtypes\n");
    return 2;
  }
  benchmark::AddCustomContext("compute", "a sleep of " + compute +
                                             " ns per parameter and unit (CPU backend: hidden time is protocol "
                                             "overlap with a sleeping compute, not GPU overlap)");
  if (WorldRank() == 0) {
    std::printf("zero_bench_stages: %d ranks, CPU backend: per-unit compute is a sleep of %g ns per parameter; "
                "hidden time is the protocol's overlap with it, not GPU overlap\n",
                WorldSize(), g_settings.compute_ns_per_param);
  }
  RunOnEveryRank();
  benchmark::Shutdown();
  g_groups.clear();
  return 0;
}

}  // namespace
}  // namespace zero::bench

int main(int argc, char** argv) { return zero::bench::MpiMain(argc, argv, zero::bench::Main); }

// zero_bench_zeropp: ZeRO++ (hpZ, qwZ, qgZ; Options::zeropp) against plain stage 3, run under mpiexec on several
// nodes: "nodes" of --ranks_per_node ranks on one machine (CommOptions::ranks_per_node), or the real hosts with
// --ranks_per_node=0, as on the namespace cluster of scripts/netns_cluster.sh, whose tc limit makes the link
// between hosts the scarce resource.
//
// Model: a synthetic decoder of about 2^k parameters (--sizes): unit 0 the embedding (V, d), units 1..L blocks
// (qkv, o, two norms, MLP up and down), a last unit with the final norm and the head; bf16 parameters and gradients
// (the ZeRO++ paper's setting), stage 3, one micro-step, nothing frozen or persistent. Each unit is gathered in
// forward and again in backward and each trainable bucket reduced once, so per step and per node (N ranks on n nodes
// of L, each node's ranks consecutive, rings in rank order, s_b a bucket's shard, Pq = kernels::QuantPayloadBytes):
//   bytes to other nodes = gathers: 2 (N - 1) Σ_b s_b p, hpZ: half of it, qwZ: s_b p -> Pq(s_b, 8)
//                        + reductions: (N - 1) Σ_b s_b g, qgZ: L (n - 1) Σ_b Pq(s_b, bits)
// (src/engine_zeropp.cc derives it; engine_zeropp_test checks it on the toy model's logged collectives).
//
// The configurations of one size are measured together: all engines opened at once, then each iteration steps each
// configuration in turn (the first one rotating), so that timing ratios are paired. A step is timed from
// BeginMicroStep until its work has completed (the communication stream drained), the slowest rank's.
//
// Counters (rank 0 reports; bytes are per step, summed over the ranks of every node and divided by the nodes):
//   inter_node_bytes, intra_node_bytes   what a node sent to other nodes / inside itself, counted by the Comms
//   formula_inter_bytes, inter_formula_ratio   the formula above, and counted / formula (1 when they agree)
//   inter_psi_equiv   inter_node_bytes / (2 Ψ): bf16 elements' worth that crossed a node's link, per parameter
//   inter_vs_stage3   inter_node_bytes / plain stage 3's
//   paper_equiv       3 × inter_vs_stage3: the ZeRO++ paper's accounting, in which plain stage 3 moves 3Ψ
//   volume_ratio      CommCounters::Volume() / Ψ of the engine's Comm (the ZeRO paper's 3 for plain stage 3)
//   step_time_s, time_vs_stage3   a step's time, and its ratio to plain stage 3's in the same iteration (median)
//   nodes, ranks_per_node, world, params_padded
// At the end rank 0 prints, per node, the bytes its ranks counted to other nodes over the whole run, so that a run
// on the namespace cluster can compare them with what the host's link carried (tests/multihost_test.sh does).
//
// Flags (besides Google Benchmark's): --sizes=20,22 (log2 Ψ), --ranks_per_node=2 (0: the hosts), --iterations=N,
// --configs=stage3,hpz,qwz,qgz4,qgz8,zeropp4,zeropp8 (zeroppB: hpz + qwz + qgz of B bits).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_mpi.h"
#include "kernels/quantize.cuh"
#include "partition_plan.h"
#include "zero/zero.h"

namespace zero::bench {
namespace {

struct Settings {
  int iterations = 3;
  int ranks_per_node = 2;
};
Settings g_settings;

struct Model {
  std::vector<ParamSpec> specs;
  int units = 0;
  int64_t params = 0;
};

// About 2^log2 parameters: three quarters in blocks of width d, a quarter in the embedding and the head.
Model Decoder(int log2) {
  Model m;
  const int64_t d = int64_t{256} << std::max(0, (log2 - 22) / 2);
  const double target = std::ldexp(1.0, log2);
  const int layers = std::max(1, static_cast<int>(std::lround(0.75 * target / (12.0 * d * d))));
  const int64_t vocab = std::max<int64_t>(64, std::llround(0.25 * target / (2.0 * d) / 64.0) * 64);
  auto add = [&](std::string name, std::vector<int64_t> shape, int unit) {
    ParamSpec s;
    s.name = std::move(name);
    s.shape = std::move(shape);
    s.unit = unit;
    m.params += s.numel();
    m.specs.push_back(std::move(s));
  };
  add("embed", {vocab, d}, 0);
  for (int l = 0; l < layers; ++l) {
    const std::string p = "block" + std::to_string(l) + ".";
    add(p + "ln1", {d}, l + 1);
    add(p + "qkv", {d, 3 * d}, l + 1);
    add(p + "o", {d, d}, l + 1);
    add(p + "ln2", {d}, l + 1);
    add(p + "mlp_up", {d, 4 * d}, l + 1);
    add(p + "mlp_down", {4 * d, d}, l + 1);
  }
  add("ln_f", {d}, layers + 1);
  add("head", {d, vocab}, layers + 1);
  m.units = layers + 2;
  return m;
}

struct Config {
  std::string name;
  bool hpz = false, qwz = false;
  int qgz_bits = 0;
};

bool ParseConfig(const std::string& word, Config* c) {
  c->name = word;
  if (word == "stage3") return true;
  if (word == "hpz") return c->hpz = true;
  if (word == "qwz") return c->qwz = true;
  if (word == "qgz4" || word == "qgz8") return (c->qgz_bits = word.back() - '0') > 0;
  if (word == "zeropp4" || word == "zeropp8") {
    c->hpz = c->qwz = true;
    c->qgz_bits = word.back() - '0';
    return true;
  }
  return false;
}

Options MakeOptions(const Config& c) {
  Options o;
  o.stage = Stage::kParameters;
  o.param_dtype = DType::kBF16;
  o.grad_dtype = DType::kBF16;
  o.adamw.lr = 1e-4f;
  o.zeropp.hpz = c.hpz;
  o.zeropp.qwz = c.qwz;
  o.zeropp.qgz_bits = c.qgz_bits;
  return o;
}

// The formula of the file comment, per node and step.
double FormulaInterBytes(const Config& c, const PartitionPlan& plan, int nodes) {
  if (nodes < 2) return 0;
  const double N = plan.world_size, n = nodes, L = N / n, p = 2, g = 2;
  double bytes = 0;
  for (const Bucket& b : plan.buckets) {
    const double s = static_cast<double>(b.shard);
    const double gather = c.qwz ? static_cast<double>(kernels::QuantPayloadBytes(b.shard, 8)) : s * p;
    bytes += (c.hpz ? 1 : 2) * (N - 1) * gather;
    if (!b.trainable) continue;
    bytes += c.qgz_bits > 0 ? L * (n - 1) * static_cast<double>(kernels::QuantPayloadBytes(b.shard, c.qgz_bits))
                            : (N - 1) * s * g;
  }
  return bytes;
}

// One step of one micro-step, every unit acquired in forward and backward order.
Status RunStep(Engine& engine, int units) {
  ZERO_RETURN_IF_ERROR(engine.BeginMicroStep(0, true));
  for (int u = 0; u < units; ++u) {
    ZERO_RETURN_IF_ERROR(engine.Acquire(u, Pass::kForward));
    ZERO_RETURN_IF_ERROR(engine.Release(u, Pass::kForward));
  }
  for (int u = units - 1; u >= 0; --u) {
    ZERO_RETURN_IF_ERROR(engine.Acquire(u, Pass::kBackward));
    ZERO_RETURN_IF_ERROR(engine.GradsReady(u));
    ZERO_RETURN_IF_ERROR(engine.Release(u, Pass::kBackward));
  }
  StepResult result;
  ZERO_RETURN_IF_ERROR(engine.Step(StepArgs(), &result));
  (void)engine.comm_counters();  // drains the communication stream: the step's work is complete
  return Status::Ok();
}

struct Result {
  Status status;
  std::vector<double> time, vs_stage3;
  double intra = 0, inter = 0, volume = 0;  // per step: bytes per node, elements of the engine's Comm
  double formula = 0;
};

struct Group {
  int log2 = 0;
  std::vector<Config> configs;
  std::vector<Result> results;
  int64_t params_padded = 0;
  int nodes = 1, per_node = 1;
  bool measured = false;
  int reported = 0;
};
std::vector<Group> g_groups;
std::vector<double> g_node_inter;  // per node: bytes its ranks counted to other nodes, whole run

void MeasureGroup(Group& g) {
  const Model model = Decoder(g.log2);
  const size_t n = g.configs.size();
  g.results.assign(n, Result());
  std::vector<std::unique_ptr<Comm>> comms(n);
  std::vector<std::unique_ptr<Engine>> engines(n);
  CommOptions co;
  co.ranks_per_node = g_settings.ranks_per_node;
  int stage3 = -1;
  for (size_t i = 0; i < n; ++i) {
    Result& r = g.results[i];
    r.status = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), co, &comms[i]);
    if (r.status.ok()) r.status = Engine::Open(MakeOptions(g.configs[i]), comms[i].get(), model.specs, &engines[i]);
    if (r.status.ok()) {
      r.status = engines[i]->InitParams([](int param, int64_t off, int64_t count, float* dst) {
        for (int64_t j = 0; j < count; ++j) dst[j] = 0.01f * static_cast<float>(((off + j + param) % 17) - 8);
      });
    }
    if (r.status.ok()) r.status = RunStep(*engines[i], model.units);  // warm-up; stage 3 records its trace
    if (r.status.ok() && !g.configs[i].hpz && !g.configs[i].qwz && g.configs[i].qgz_bits == 0) {
      stage3 = static_cast<int>(i);
    }
  }
  const NodeTopology& t = comms[0]->topology();
  g.nodes = t.nodes;
  g.per_node = t.local_size;
  std::vector<CommCounters> before(n), after(n);
  for (size_t i = 0; i < n; ++i) {
    if (engines[i] != nullptr) before[i] = engines[i]->comm_counters();
  }
  for (int it = 0; it < g_settings.iterations; ++it) {
    std::vector<double> times(n, 0.0);
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (k + static_cast<size_t>(it)) % n;
      Result& r = g.results[i];
      if (!r.status.ok()) continue;
      MPI_Barrier(MPI_COMM_WORLD);
      times[i] = Seconds([&] { r.status = RunStep(*engines[i], model.units); });
    }
    MaxOverRanks(&times);
    for (size_t i = 0; i < n; ++i) {
      g.results[i].time.push_back(times[i]);
      if (stage3 >= 0) g.results[i].vs_stage3.push_back(times[i] / times[static_cast<size_t>(stage3)]);
    }
  }
  PartitionPlan plan;
  const Status plan_status = PartitionPlan::Build(model.specs, WorldSize(), Options().bucket_elements, &plan);
  g.params_padded = plan.trainable_padded;
  // Per step, summed over the ranks, divided by the nodes.
  std::vector<double> sums(3 * n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    if (engines[i] == nullptr) continue;
    after[i] = engines[i]->comm_counters();
    sums[3 * i] = static_cast<double>(after[i].intra_node_bytes - before[i].intra_node_bytes);
    sums[3 * i + 1] = static_cast<double>(after[i].inter_node_bytes - before[i].inter_node_bytes);
  }
  MPI_Allreduce(MPI_IN_PLACE, sums.data(), static_cast<int>(sums.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  // Per node, over the whole run (every configuration, warm-up and InitParams included).
  if (g_node_inter.size() < static_cast<size_t>(g.nodes)) g_node_inter.resize(static_cast<size_t>(g.nodes), 0.0);
  std::vector<double> mine(static_cast<size_t>(g.nodes), 0.0);
  for (size_t i = 0; i < n; ++i) {
    if (engines[i] != nullptr) mine[static_cast<size_t>(t.node)] += static_cast<double>(after[i].inter_node_bytes);
  }
  MPI_Allreduce(MPI_IN_PLACE, mine.data(), g.nodes, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  for (int j = 0; j < g.nodes; ++j) g_node_inter[static_cast<size_t>(j)] += mine[static_cast<size_t>(j)];
  const double steps = g_settings.iterations;
  for (size_t i = 0; i < n; ++i) {
    Result& r = g.results[i];
    if (r.status.ok()) r.status = plan_status;
    r.intra = sums[3 * i] / steps / g.nodes;
    r.inter = sums[3 * i + 1] / steps / g.nodes;
    // The engine's own Comm: its volume per step (the node Comms' are ZeRO++'s own collectives).
    r.volume = engines[i] != nullptr ? static_cast<double>(after[i].Volume() - before[i].Volume()) / steps : 0.0;
    r.formula = FormulaInterBytes(g.configs[i], plan, g.nodes);
  }
  for (size_t i = n; i-- > 0;) engines[i].reset();  // before their communicators
  g.measured = true;
}

void BM_ZeroPP(benchmark::State& state, size_t group, size_t index) {
  Group& g = g_groups[group];
  if (!g.measured) MeasureGroup(g);
  Result& r = g.results[index];
  if (r.status.ok()) {
    size_t i = 0;
    for (auto _ : state) state.SetIterationTime(r.time[i++ % r.time.size()]);
  }
  if (++g.reported == static_cast<int>(g.configs.size())) g.measured = false;
  if (!r.status.ok()) {
    state.SkipWithError(r.status.ToString().c_str());
    return;
  }
  double stage3_inter = 0;
  for (size_t i = 0; i < g.configs.size(); ++i) {
    const Config& c = g.configs[i];
    if (!c.hpz && !c.qwz && c.qgz_bits == 0) stage3_inter = g.results[i].inter;
  }
  const double psi = static_cast<double>(g.params_padded);
  auto& k = state.counters;
  k["world"] = WorldSize();
  k["nodes"] = g.nodes;
  k["ranks_per_node"] = g.per_node;
  k["params_padded"] = psi;
  k["step_time_s"] = Median(r.time);
  if (!r.vs_stage3.empty()) k["time_vs_stage3"] = Median(r.vs_stage3);
  k["inter_node_bytes"] = r.inter;
  k["intra_node_bytes"] = r.intra;
  k["formula_inter_bytes"] = r.formula;
  k["inter_formula_ratio"] = r.formula > 0 ? r.inter / r.formula : (r.inter == 0 ? 1.0 : 0.0);
  k["inter_psi_equiv"] = r.inter / (2.0 * psi);
  if (stage3_inter > 0) {
    k["inter_vs_stage3"] = r.inter / stage3_inter;
    k["paper_equiv"] = 3.0 * r.inter / stage3_inter;
  }
  k["volume_ratio"] = r.volume / psi;
  state.SetLabel(g.configs[index].name);
}

int Main(int argc, char** argv) {
  StripOutputFlagsOnPeers(&argc, argv);
  benchmark::Initialize(&argc, argv);
  std::string sizes = "20", iterations = "3", rpn = "2", configs = "stage3,hpz,qwz,qgz4,qgz8,zeropp8,zeropp4";
  if (!ParseFlags(argc, argv, {{"sizes", &sizes}, {"iterations", &iterations}, {"ranks_per_node", &rpn},
                               {"configs", &configs}})) {
    return 2;
  }
  g_settings.iterations = std::max(1, std::atoi(iterations.c_str()));
  g_settings.ranks_per_node = std::max(0, std::atoi(rpn.c_str()));
  std::vector<Config> list;
  for (const std::string& w : ParseWords(configs)) {
    Config c;
    if (!ParseConfig(w, &c)) {
      if (WorldRank() == 0) std::fprintf(stderr, "zero_bench_zeropp: unknown configuration %s\n", w.c_str());
      return 2;
    }
    list.push_back(c);
  }
  for (int log2 : ParseInts(sizes)) {
    Group g;
    g.log2 = log2;
    g.configs = list;
    g_groups.push_back(g);
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string name = "ZeroPP/config:" + list[i].name + "/params:2^" + std::to_string(log2) +
                               "/world:" + std::to_string(WorldSize()) + "/ranks_per_node:" + rpn;
      benchmark::RegisterBenchmark(name.c_str(), BM_ZeroPP, g_groups.size() - 1, i)
          ->UseManualTime()
          ->Iterations(g_settings.iterations)
          ->Unit(benchmark::kMillisecond);
    }
  }
  if (WorldRank() == 0) {
    std::printf("zero_bench_zeropp: %d ranks, ranks_per_node %s (0: the hosts); bf16 stage 3, bytes per node per "
                "step\n", WorldSize(), rpn.c_str());
  }
  RunOnEveryRank();
  if (WorldRank() == 0) {
    for (size_t j = 0; j < g_node_inter.size(); ++j) {
      std::printf("zero_bench_zeropp: node %zu counted %.0f bytes sent to other nodes over the run\n", j,
                  g_node_inter[j]);
    }
  }
  benchmark::Shutdown();
  g_groups.clear();
  return 0;
}

}  // namespace
}  // namespace zero::bench

int main(int argc, char** argv) { return zero::bench::MpiMain(argc, argv, zero::bench::Main); }

// The engine with ZeRO++ (Options::zeropp) on the toy model, at 1-4 ranks. "Nodes" come from
// CommOptions::ranks_per_node (2 ranks per node at even world sizes, 1 otherwise) or, on the namespace cluster
// (tests/multihost_test.sh sets ZERO_TEST_NODES), from the hosts.
//  * hpZ alone changes no value: every parameter after training equals plain stage 3's bit for bit.
//  * qwZ: one gather's per-element error against the exact parameters stays within max|block| / 254 (+ fp32 slack,
//    + half an ulp of bf16 parameters), and every rank computes with the same values.
//  * Traffic: the bytes every rank's Comms sent inside and across nodes, summed over ranks, equal the formula of
//    engine_zeropp.cc applied to the gathers and reductions the engine logged (primary gathers: the first of each
//    unit after a parameter change with hpZ, every one without), for every combination of hpZ, qwZ and qgZ.
//  * Quantized training (qwZ + qgZ, 8 and 4 bits) stays close to full precision and is reproducible bit for bit.
//  * The memory each configuration allocates equals zero::Estimate's for its ranks per node; bad combinations are
//    refused with the reason.
#include <mpi.h>

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kernels/quantize.cuh"
#include "testing/backend_comm.h"
#include "testing/engine_harness.h"
#include "testing/mpi_env.h"
#include "zero/estimate.h"

namespace zero::testing {
namespace {

constexpr int kGlobalBatch = 24;  // tokens per micro-step: divisible by 1-4 ranks

// The ranks_per_node this job's nodes come from (0: detected, on the namespace cluster).
int RanksPerNode() {
  if (std::getenv("ZERO_TEST_NODES") != nullptr) return 0;
  return WorldSize() % 2 == 0 ? 2 : 1;
}

std::unique_ptr<Comm> NodeComm(int ranks_per_node = RanksPerNode()) {
  CommOptions options;
  options.timeout = std::chrono::milliseconds(20'000);
  options.ranks_per_node = ranks_per_node;
  std::unique_ptr<Comm> comm;
  const Status s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return comm;
}

Options ZeroPP(bool hpz, bool qwz, int qgz_bits, Stage stage = Stage::kParameters) {
  Options o = SmallToyOptions(stage);
  o.zeropp.hpz = hpz;
  o.zeropp.qwz = qwz;
  o.zeropp.qgz_bits = qgz_bits;
  return o;
}

std::string Name(const Options& o) {
  return std::string("stage ") + std::to_string(static_cast<int>(o.stage)) + (o.zeropp.hpz ? " hpz" : "") +
         (o.zeropp.qwz ? " qwz" : "") + (o.zeropp.qgz_bits ? " qgz" + std::to_string(o.zeropp.qgz_bits) : "") +
         " " + DTypeName(o.param_dtype);
}

// The loss of a fixed eval batch, averaged over the ranks.
double EvalLoss(Engine& engine, Comm& comm) {
  ZERO_EXPECT_OK(engine.BeginEval());
  EngineAccess access(&engine);
  double loss = ToyForward(access, ToyMicroBatch(1000, 0, comm.rank(), comm.world_size(), kGlobalBatch)), sum = 0;
  ZERO_EXPECT_OK(engine.EndEval());
  ZERO_EXPECT_OK(comm.AllReduce(&loss, &sum, 1, DType::kF64, ReduceOp::kSum));
  return sum / comm.world_size();
}

// Trains `steps` steps; `losses` (when given) gets the eval loss before and after.
std::vector<std::vector<float>> Train(const Options& o, Comm* comm, int steps, int micros,
                                      std::vector<double>* losses = nullptr) {
  auto engine = OpenToyEngine(o, comm);
  if (engine == nullptr) return {};
  if (losses != nullptr) losses->push_back(EvalLoss(*engine, *comm));
  for (int s = 0; s < steps; ++s) TrainToyStep(*engine, *comm, s, micros, kGlobalBatch);
  if (losses != nullptr) losses->push_back(EvalLoss(*engine, *comm));
  return GatherToyParams(*engine);
}

double MeanDiff(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double sum = 0;
  int64_t n = 0;
  for (size_t p = 0; p < a.size(); ++p) {
    for (size_t i = 0; i < a[p].size(); ++i, ++n) sum += std::fabs(double{a[p][i]} - b[p][i]);
  }
  return n > 0 ? sum / static_cast<double>(n) : 0.0;
}

TEST(EngineZeroPPTest, HpzAloneChangesNoValue) {
  auto comm = NodeComm();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    Options plain = ZeroPP(false, false, 0), hpz = ZeroPP(true, false, 0);
    plain.param_dtype = hpz.param_dtype = dtype;
    const auto want = Train(plain, comm.get(), 3, 2);
    const auto got = Train(hpz, comm.get(), 3, 2);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(got, want) << Name(hpz) << ": the node's pieces must give the primary gather's values exactly";
  }
}

// Element i of a unit's gathered layout -> the parameters' exact values, for every bucket of the unit.
TEST(EngineZeroPPTest, QwzGatherErrorWithinTheBound) {
  auto comm = NodeComm();
  const int n = comm->world_size();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    Options o = ZeroPP(false, true, 0);
    o.param_dtype = dtype;
    SCOPED_TRACE(Name(o));
    auto engine = OpenToyEngine(o, comm.get());
    ASSERT_NE(engine, nullptr);
    const auto& st = EngineTestPeer::State(*engine);
    const std::vector<std::vector<float>> exact = ToyInitialParams();
    ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
    int64_t checked = 0, beyond = 0;
    double worst = 0;
    std::vector<double> all_values;  // this rank's gathered values, to compare across ranks
    for (int u = 0; u < engine->num_units(); ++u) {
      ZERO_ASSERT_OK(engine->Acquire(u, Pass::kForward));
      const UnitPlan& up = st.plan.units[static_cast<size_t>(u)];
      std::vector<int> all(up.trainable_buckets);
      all.insert(all.end(), up.frozen_buckets.begin(), up.frozen_buckets.end());
      for (int bi : all) {
        const Bucket& b = st.plan.buckets[static_cast<size_t>(bi)];
        // The bucket's exact layout (padding zero) as param_dtype holds it, then each owner's block maxima.
        std::vector<float> layout(static_cast<size_t>(b.padded), 0.0f);
        for (const ParamPlacement& pl : b.params) {
          for (int64_t i = 0; i < pl.numel; ++i) {
            float v = exact[static_cast<size_t>(pl.param)][static_cast<size_t>(i)];
            if (dtype == DType::kBF16) v = kernels::Bf16ToFloat(kernels::FloatToBf16(v));
            layout[static_cast<size_t>(pl.offset + i)] = v;
          }
        }
        for (const ParamPlacement& pl : b.params) {
          std::vector<float> got;
          ZERO_ASSERT_OK(ReadWidened(engine->Param(pl.param), &got));
          for (int64_t i = 0; i < pl.numel; ++i) {
            const int64_t at = pl.offset + i, owner = at / b.shard, start = owner * b.shard;
            const int64_t block = start + (at - start) / kernels::kQuantBlock * kernels::kQuantBlock;
            const int64_t end = std::min(start + b.shard, block + kernels::kQuantBlock);
            double amax = 0;
            for (int64_t j = block; j < end; ++j) amax = std::max(amax, std::fabs(double{layout[static_cast<size_t>(j)]}));
            const double g = got[static_cast<size_t>(i)], x = layout[static_cast<size_t>(at)];
            const double ulp = dtype == DType::kBF16 ? std::fabs(g) * 0x1p-8 : 0.0;
            const double bound = amax / 254.0 + amax * 0x1p-22 + ulp;
            beyond += std::fabs(g - x) > bound;
            worst = std::max(worst, std::fabs(g - x) / std::max(amax, 1e-30));
            all_values.push_back(g);
            ++checked;
          }
        }
      }
      ZERO_ASSERT_OK(engine->Release(u, Pass::kForward));
    }
    EXPECT_GT(checked, 300);
    EXPECT_EQ(beyond, 0) << "gathered parameters beyond max|block| / 254 of the exact ones";
    EXPECT_GT(worst, 0.0) << "the gathered values were not quantized";
    // Every rank computes with the same values.
    std::vector<double> rank0(all_values);
    ZERO_ASSERT_OK(comm->Broadcast(rank0.data(), static_cast<int64_t>(rank0.size()), DType::kF64, 0));
    EXPECT_EQ(rank0, all_values);
    (void)n;
    // Leave the engine consistent: finish the micro-step's protocol.
    for (int u = engine->num_units() - 1; u >= 0; --u) ZERO_ASSERT_OK(engine->GradsReady(u));
    StepResult r;
    ZERO_ASSERT_OK(engine->Step(StepArgs(), &r));
  }
}

// The bytes sent per link kind, summed over the ranks, for the logged gathers and reductions (engine_zeropp.cc).
struct Traffic {
  double intra = 0, inter = 0;
};

Traffic Expected(const Engine& engine, const std::vector<Engine::Event>& events, const NodeTopology& t) {
  const auto& st = EngineTestPeer::State(const_cast<Engine&>(engine));
  const Options& o = engine.options();
  const int N = static_cast<int>(t.node_of.size()), n = t.nodes, L = N / n;
  const double p = static_cast<double>(DTypeSize(o.param_dtype)), g = static_cast<double>(DTypeSize(o.grad_dtype));
  const double inter_senders = n > 1 ? n : 0, intra_senders = N - inter_senders;  // rings in rank order
  Traffic e;
  // hpZ: a unit's first gather after a parameter change comes from the primary shards, later ones from the pieces.
  std::vector<bool> fresh(static_cast<size_t>(engine.num_units()), false);  // gathered since the last Step
  bool from_pieces = false;  // the gather whose bucket events are being read
  for (const Engine::Event& ev : events) {
    if (ev.kind == Engine::Event::kStep) std::fill(fresh.begin(), fresh.end(), false);
    if (ev.kind != Engine::Event::kGather && ev.kind != Engine::Event::kReduce) continue;
    const Bucket& b = st.plan.buckets[static_cast<size_t>(ev.bucket)];
    const double s = static_cast<double>(b.shard);
    if (ev.kind == Engine::Event::kGather) {
      const UnitPlan& up = st.plan.units[static_cast<size_t>(ev.unit)];
      const int first = up.trainable_buckets.empty() ? up.frozen_buckets.front() : up.trainable_buckets.front();
      if (ev.bucket == first) {  // a gather of the unit starts: its buckets follow, in order
        from_pieces = o.zeropp.hpz && fresh[static_cast<size_t>(ev.unit)];
        fresh[static_cast<size_t>(ev.unit)] = true;
      }
      if (from_pieces) {
        e.intra += N * (L - 1) * (static_cast<double>(b.padded) / L) * p;  // the node's pieces, a ring of L
        continue;
      }
      const double payload = o.zeropp.qwz ? static_cast<double>(kernels::QuantPayloadBytes(b.shard, 8)) : s * p;
      e.inter += inter_senders * (N - 1) * payload;
      e.intra += intra_senders * (N - 1) * payload;
    } else if (o.zeropp.qgz_bits > 0) {
      const double pq = static_cast<double>(kernels::QuantPayloadBytes(b.shard, o.zeropp.qgz_bits));
      e.intra += static_cast<double>(N) * (L - 1) * n * pq;
      e.inter += static_cast<double>(N) * (n - 1) * pq;
    } else {
      e.inter += inter_senders * (N - 1) * s * g;
      e.intra += intra_senders * (N - 1) * s * g;
    }
  }
  return e;
}

TEST(EngineZeroPPTest, TrafficPerLinkKindEqualsTheFormula) {
  auto comm = NodeComm();
  const NodeTopology& t = comm->topology();
  std::vector<double> inter_by_config;
  for (int config = 0; config < 8; ++config) {
    Options o = ZeroPP(config & 1, config & 2, config & 4 ? 8 : 0);
    o.param_dtype = DType::kBF16;
    o.grad_dtype = DType::kBF16;
    SCOPED_TRACE(Name(o) + ", " + t.ToString());
    auto engine = OpenToyEngine(o, comm.get());
    ASSERT_NE(engine, nullptr);
    EngineTestPeer::Hooks(*engine).log_events = true;
    const CommCounters before = engine->comm_counters();
    for (int s = 0; s < 2; ++s) TrainToyStep(*engine, *comm, s, 2, kGlobalBatch);
    const CommCounters after = engine->comm_counters();
    double sent[2] = {static_cast<double>(after.intra_node_bytes - before.intra_node_bytes),
                      static_cast<double>(after.inter_node_bytes - before.inter_node_bytes)};
    double total[2];
    ZERO_ASSERT_OK(comm->AllReduce(sent, total, 2, DType::kF64, ReduceOp::kSum));
    const Traffic want = Expected(*engine, engine->TEST_events(), t);
    EXPECT_EQ(total[0], want.intra) << "bytes sent inside nodes, all ranks";
    EXPECT_EQ(total[1], want.inter) << "bytes sent across nodes, all ranks";
    inter_by_config.push_back(total[1]);
  }
  if (t.nodes > 1) {
    EXPECT_LT(inter_by_config[1], inter_by_config[0]) << "hpZ moves backward gathers inside the node";
    EXPECT_LT(inter_by_config[2], inter_by_config[0]) << "qwZ's gathers are smaller";
    EXPECT_LT(inter_by_config[4], inter_by_config[0]) << "qgZ's reductions are smaller";
    EXPECT_LT(inter_by_config[7], inter_by_config[3]);
  }
}

// AdamW's update is about lr per element whatever the gradient's scale, so quantization noise shows as a fraction of
// the distance training moved the parameters, and as a fraction of the loss it gained. Measured at 2-4 ranks
// (mean |p - p_ref| / mean |p_ref - p_0|, 10 steps at lr 1e-2): 0.1-0.3% with 8 bits, 2.0-3.3% with 4 bits (7 levels
// per sign); the eval loss within 0.1% / 1% of what training gained. The bounds below leave 5-20x room.
TEST(EngineZeroPPTest, QuantizedTrainingStaysCloseAndIsReproducible) {
  auto comm = NodeComm();
  auto with_lr = [](Options o) {
    o.adamw.lr = 1e-2f;
    return o;
  };
  std::vector<double> loss_plain;
  const auto plain = Train(with_lr(ZeroPP(false, false, 0)), comm.get(), 10, 2, &loss_plain);
  const std::vector<std::vector<float>> init = ToyInitialParams();
  const double moved = MeanDiff(plain, init), gained = loss_plain[0] - loss_plain[1];
  ASSERT_GT(moved, 1e-3);
  ASSERT_GT(gained, 0.05) << "the full-precision run must learn something to compare against";
  for (int bits : {8, 4}) {
    for (Stage stage : {Stage::kGradients, Stage::kParameters}) {
      const Options o = with_lr(ZeroPP(stage == Stage::kParameters, stage == Stage::kParameters, bits, stage));
      SCOPED_TRACE(Name(o));
      std::vector<double> loss;
      const auto got = Train(o, comm.get(), 10, 2, &loss);
      const auto again = Train(o, comm.get(), 10, 2);
      EXPECT_EQ(got, again) << "the same run twice must give the same bits";
      const double diff = MeanDiff(got, plain);
      EXPECT_LT(diff, (bits == 8 ? 0.02 : 0.15) * moved) << "mean movement " << moved;
      EXPECT_NEAR(loss[1], loss_plain[1], (bits == 8 ? 0.05 : 0.25) * gained);
      if (WorldSize() > 1) {
        EXPECT_GT(diff, 0.0) << "quantized gradients or gathers should change something";
      }
      if (comm->rank() == 0) {
        std::printf("%s: mean |p - p_ref| = %.2f%% of the movement, eval loss %.5f vs %.5f (from %.5f)\n",
                    Name(o).c_str(), 100 * diff / moved, loss[1], loss_plain[1], loss_plain[0]);
      }
    }
  }
}

// Parameter shards on the NVMe tier (nvme_params) reach qwZ's and hpZ's gathers through the tier's reads: the same
// bits as with the shards in host memory.
TEST(EngineZeroPPTest, ShardsOnTheNvmeTierGiveTheSameBits) {
  auto comm = NodeComm();
  // Under the working directory: the tier refuses tmpfs, which the system's temporary directory may be.
  const std::string dir = MakeSharedDir(std::filesystem::current_path(), "zeropp_nvme");
  ASSERT_FALSE(dir.empty());
  Options host = ZeroPP(true, true, 8);
  host.offload_optimizer = host.offload_params = true;
  Options tier = host;
  tier.nvme_path = dir;
  tier.nvme_params = true;
  tier.nvme_block_bytes = 4096;
  const auto want = Train(host, comm.get(), 3, 2);
  const auto got = Train(tier, comm.get(), 3, 2);
  EXPECT_EQ(got, want);
  RemoveSharedDir(dir);
}

TEST(EngineZeroPPTest, MemoryEqualsTheEstimate) {
  auto comm = NodeComm();
  const int L = comm->topology().local_size;
  for (int config = 1; config < 8; ++config) {
    for (Stage stage : {Stage::kGradients, Stage::kParameters}) {
      if (stage != Stage::kParameters && (config & 3) != 0) continue;
      Options o = ZeroPP(config & 1, config & 2, config & 4 ? 4 : 0, stage);
      if (!o.zeropp.hpz && !o.zeropp.qwz && o.zeropp.qgz_bits == 0) continue;
      SCOPED_TRACE(Name(o));
      std::unique_ptr<Engine> engine;
      ZERO_ASSERT_OK(Engine::Open(o, comm.get(), ToySpecs(), &engine));
      MemoryEstimate e;
      ZERO_ASSERT_OK(Estimate(ModelDescription::FromSpecs(ToySpecs()), comm->world_size(), L, o, &e));
      const MemoryReport m = engine->Memory();
      for (int c = 0; c < kNumMemoryCategories; ++c) {
        EXPECT_EQ(m.device.current[c], e.device[c]) << MemoryCategoryName(static_cast<MemoryCategory>(c));
      }
      // hpZ's partition: p bytes per element of every bucket over the node's L ranks.
      Options without = o;
      without.zeropp = ZeroPlusPlusOptions();
      MemoryEstimate base;
      ZERO_ASSERT_OK(Estimate(ModelDescription::FromSpecs(ToySpecs()), comm->world_size(), L, without, &base));
      const auto& st = EngineTestPeer::State(*engine);
      const int64_t secondary = o.zeropp.hpz ? (st.plan.trainable_padded + st.plan.frozen_padded) / L * 4 : 0;
      EXPECT_EQ(e.Device(MemoryCategory::kParams) - base.Device(MemoryCategory::kParams), secondary);
    }
  }
}

TEST(EngineZeroPPTest, RefusesWhatCannotWork) {
  auto comm = NodeComm();
  auto open = [&](const Options& o) {
    std::unique_ptr<Engine> engine;
    return Engine::Open(o, comm.get(), ToySpecs(), &engine);
  };
  Status s = open(ZeroPP(true, false, 0, Stage::kGradients));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "hpz shapes stage 3's parameter gathers")) << s.ToString();
  s = open(ZeroPP(false, false, 8, Stage::kDataParallel));
  EXPECT_TRUE(Contains(s, "stage 0 all-reduces")) << s.ToString();
  s = open(ZeroPP(false, false, 3));
  EXPECT_TRUE(Contains(s, "qgz_bits must be 0 (off), 4 or 8")) << s.ToString();
  Options a = ZeroPP(false, true, 0, Stage::kAuto);
  a.reserved_bytes = 0;
  s = open(a);
  EXPECT_TRUE(Contains(s, "ZeRO++ needs an explicit stage")) << s.ToString();
  EXPECT_TRUE(comm->health().ok());
}

// The same engine on the GPU (Backend::kCuda over NcclComm, or StagedComm where ranks share the GPU and NCCL refuses
// it), so that a GPU run covers NcclComm's Split and AllToAll, the CUDA quantization kernels inside HierarchicalComm
// and hpZ's device-side pieces: hpZ changes no value, and hpZ + qwZ + qgZ stays within the CPU test's bounds of the
// unquantized GPU run and gives the same bits twice. Skipped, saying why, where no GPU is usable.
// The CUDA cases' Comm over the world (nodes of RanksPerNode()); `skip` is set only where no GPU is usable
// (OpenCudaTestComm's one reason to return null with a reason), and the case then skips saying so.
#define ZERO_GPU_COMM(var)                                                                                      \
  std::string var##_skip;                                                                                       \
  auto var = OpenCudaTestComm(MPI_COMM_WORLD, std::chrono::milliseconds(60'000), &var##_skip, RanksPerNode()); \
  if (var == nullptr && !var##_skip.empty()) GTEST_SKIP() << var##_skip; /* no usable GPU */                    \
  ASSERT_NE(var, nullptr)

TEST(EngineZeroPPCudaTest, HpzExactAndQuantizedCloseOnTheGpu) {
  ZERO_GPU_COMM(comm);
  auto on_gpu = [](Options o) {
    o.backend = Backend::kCuda;
    o.adamw.lr = 1e-2f;
    return o;
  };
  const auto plain = Train(on_gpu(ZeroPP(false, false, 0)), comm.get(), 4, 2);
  const auto hpz = Train(on_gpu(ZeroPP(true, false, 0)), comm.get(), 4, 2);
  ASSERT_FALSE(plain.empty());
  EXPECT_EQ(hpz, plain) << "the node's pieces must give the primary gather's values exactly";
  const double moved = MeanDiff(plain, ToyInitialParams());
  ASSERT_GT(moved, 1e-4);
  for (int bits : {8, 4}) {
    const Options o = on_gpu(ZeroPP(true, true, bits));
    SCOPED_TRACE(Name(o));
    const auto got = Train(o, comm.get(), 4, 2);
    const auto again = Train(o, comm.get(), 4, 2);
    ASSERT_EQ(got.size(), plain.size());
    EXPECT_EQ(got, again) << "the same run twice must give the same bits";
    // The bounds of QuantizedTrainingStaysCloseAndIsReproducible (measured there 10-20x below them).
    const double diff = MeanDiff(got, plain);
    EXPECT_LT(diff, (bits == 8 ? 0.02 : 0.15) * moved) << "mean movement " << moved;
    if (WorldSize() > 1) {
      EXPECT_GT(diff, 0.0) << "quantized gradients or gathers should change something";
    }
    if (comm->rank() == 0) {
      std::printf("%s on the GPU: mean |p - p_ref| = %.2f%% of the movement\n", Name(o).c_str(), 100 * diff / moved);
    }
  }
  EXPECT_TRUE(comm->health().ok()) << comm->health().ToString();
}

// qwZ with the parameter shards in pinned host memory (offload_params) on the GPU: the quantization kernel reads the
// shard, so it must read a device copy of it (as the plain gather does): handed the host shard it faults on a GPU
// wherever the registration is not mapped for the device or fell back to pageable memory, and the emulated launcher
// refuses it (an operand outside device memory). Where the shards live changes no bit.
TEST(EngineZeroPPCudaTest, QwzWithOffloadedShardsOnTheGpu) {
  ZERO_GPU_COMM(comm);
  Options o = ZeroPP(false, true, 0);
  o.backend = Backend::kCuda;
  o.offload_optimizer = true;
  const auto want = Train(o, comm.get(), 3, 2);
  ASSERT_FALSE(want.empty());
  o.offload_params = true;
  EXPECT_EQ(Train(o, comm.get(), 3, 2), want) << Name(o) << " with offload_params";
  EXPECT_TRUE(comm->health().ok()) << comm->health().ToString();
}

// Nodes of N-1 and 1 ranks (at 3 and 4 ranks): hpZ and qgZ need equal nodes and say so on every rank; qwZ alone
// does not. At 2 ranks no split is unequal: there the same options over 2 nodes of 1 must open and train (the check
// is about equal nodes, not about how many there are).
TEST(EngineZeroPPPeerTest, UnequalNodesAreRefusedOnEveryRank) {
  const int n = WorldSize();
  const bool unequal = n >= 3;
  auto comm = NodeComm(unequal ? n - 1 : 1);
  std::unique_ptr<Engine> engine;
  for (const Options& o : {ZeroPP(true, false, 0), ZeroPP(false, false, 8)}) {
    SCOPED_TRACE(Name(o));
    Status s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
    if (unequal) {
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
      EXPECT_TRUE(Contains(s, "same number of ranks on every node")) << s.ToString();
    } else {
      ZERO_EXPECT_OK(s);
      if (engine != nullptr) TrainToyStep(*engine, *comm, 0, 1, kGlobalBatch);
      engine.reset();
    }
  }
  engine = OpenToyEngine(ZeroPP(false, true, 0), comm.get());
  ASSERT_NE(engine, nullptr);
  TrainToyStep(*engine, *comm, 0, 1, kGlobalBatch);
}

}  // namespace
}  // namespace zero::testing

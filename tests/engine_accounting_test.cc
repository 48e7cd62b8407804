// Memory and communication accounting of every stage against the ZeRO closed forms (fp32: p = g = 4 bytes,
// K = 8 for AdamW's m and v, 4 for SGD's momentum; the fp32 parameters are their own master copy. bf16
// parameters: p = 2 and K grows by the 4-byte fp32 master, the paper's mixed-precision K = 12 for Adam).
//
// Toy model sizes (see testing/toy_model.h) with one bucket per unit and set, R(x) = x rounded up to 64 * N:
//   unit 0  embed 77                               -> R(77)
//   unit 1  w1 91 @0, b1 13 @96, w2 91 @112 (8-aligned starts), used 203 -> R(203)
//   unit 2  frozen 49                              -> R(49)  (frozen)
//   unit 3  w3 49 @0, gain 1 @56, used 57          -> R(57)
//   Ψt = R(77) + R(203) + R(57), Ψf = R(49)
// Per-rank bytes (N ranks, Ψp the persistent units' padded elements; stages 2-3's gradient pool and stage 3's
// gather slots hold one unit per buffer, in two sizes: of n buffers for units s1 >= s2 >= ..., k are as large as s1
// and n - k as large as s(k+1), with k in 1..n the count of fewest bytes, the largest among equals; no more buffers
// than units. P: the pool's elements (2 buffers for the trainable units), S: the slots' (3 for the gathered ones)):
//   stage 0: params 4(Ψt+Ψf)         grads 4Ψt    optimizer KΨt    buffers 0
//   stage 1: params 4(Ψt+Ψf)         grads 4Ψt    optimizer KΨt/N  buffers 0
//   stage 2: params 4(Ψt+Ψf)         grads 4Ψt/N  optimizer KΨt/N  buffers 4P
//   stage 3: params 4(Ψt+Ψf)/N+4Ψp   grads 4Ψt/N  optimizer KΨt/N  buffers 4P + 4S
// Communication per step, in elements (M micro-steps; all-reduce counted twice in Volume()):
//   stage 0: all-reduce Ψt;  stage 1: reduce-scatter Ψt + all-gather Ψt;  stage 2: M·Ψt + Ψt
//   stage 3: all-gather 2M(Ψt+Ψf−Ψp) + 2M·Ψ0 (the tied unit 0 is acquired twice per pass) − 2M·Ψ0 when unit 0
//            is kept gathered (from its first forward Acquire to its backward Release: 2 gathers per micro-step
//            instead of 4), + the persistent trainable elements after the step;
//            reduce-scatter M·Ψt.
#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "partition_plan.h"
#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

// Elements of `count` buffers that hold one of the units of `sizes` elements at a time (the rule above).
int64_t SlotElements(std::vector<int64_t> sizes, int gather_slots) {
  std::sort(sizes.rbegin(), sizes.rend());
  const int g = std::min<int>(gather_slots, static_cast<int>(sizes.size()));
  int64_t best = 0;
  for (int k = 1; k <= g; ++k) {
    const int64_t regular = k < static_cast<int>(sizes.size()) ? sizes[static_cast<size_t>(k)] : 0;
    const int64_t total = k * sizes[0] + (g - k) * regular;
    if (k == 1 || total < best) best = total;
  }
  return best;
}

int64_t R(int64_t x, int world) {
  const int64_t q = 64 * world;
  return (x + q - 1) / q * q;
}

struct Sizes {
  int64_t t, f, unit0, unit1, unit2, unit3;
};

Sizes ToySizes(int n) {
  Sizes s;
  s.unit0 = R(77, n);
  s.unit1 = R(203, n);
  s.unit2 = R(49, n);
  s.unit3 = R(57, n);
  s.t = s.unit0 + s.unit1 + s.unit3;
  s.f = s.unit2;
  return s;
}

// CUDA: the batched sum of squares' scratch (kernels/sum_squares.cuh): a 32-byte task and a 16-byte total per
// trainable bucket (one per trainable unit here) and 16 bytes per started 4096-element block of its shard.
int64_t NormScratch(const Sizes& s, int n) {
  int64_t bytes = 0;
  for (int64_t u : {s.unit0, s.unit1, s.unit3}) bytes += 48 + (u / n + 4095) / 4096 * 16;
  return bytes;
}

Options Base(Stage stage, OptimizerKind opt) {
  Options o;
  o.stage = stage;
  o.optimizer = opt;
  o.bucket_elements = 1 << 20;
  o.cpu_threads = 1;
  return o;
}

TEST(AccountingTest, PlanMatchesHandComputedSizes) {
  const int n = WorldSize();
  PartitionPlan plan;
  ASSERT_TRUE(PartitionPlan::Build(ToySpecs(), n, 1 << 20, &plan).ok());
  const Sizes s = ToySizes(n);
  EXPECT_EQ(plan.trainable_padded, s.t);
  EXPECT_EQ(plan.frozen_padded, s.f);
}

class MemoryTest : public ::testing::TestWithParam<Backend> {};

TEST_P(MemoryTest, MemoryMatchesClosedFormPerStage) {
  ZERO_BACKEND_COMM(comm, GetParam());
  const int n = comm->world_size();
  const Sizes s = ToySizes(n);
  const std::pair<DType, DType> dtypes[] = {{DType::kF32, DType::kF32}, {DType::kBF16, DType::kF32},
                                             {DType::kF16, DType::kF16}};
  for (const auto& [dt, gd] : dtypes) {
  // pb: bytes per compute parameter (a low-precision param_dtype adds a 4-byte fp32 master to the optimizer);
  // gb: bytes per gradient element (gradient buffers and the pool).
  const int64_t pb = static_cast<int64_t>(DTypeSize(dt)), gb = static_cast<int64_t>(DTypeSize(gd));
  for (OptimizerKind opt : {OptimizerKind::kAdamW, OptimizerKind::kSgdMomentum}) {
    const int64_t k = (opt == OptimizerKind::kAdamW ? 8 : 4) + (dt == DType::kF32 ? 0 : 4);
    for (int st = 0; st <= 3; ++st) {
      SCOPED_TRACE("stage " + std::to_string(st) + (opt == OptimizerKind::kAdamW ? " adamw " : " sgd ") +
                   DTypeName(dt) + " params, " + DTypeName(gd) + " grads");
      Options o = Base(static_cast<Stage>(st), opt);
      o.backend = GetParam();
      o.param_dtype = dt;
      o.grad_dtype = gd;
      o.grad_pool_buffers = 2;
      o.gather_slots = 3;
      o.persist_bytes = st == 3 ? R(57, n) * 4 : 0;  // stage 3: units 2 and 3 (each R(57) = R(49)) persist
      auto engine = OpenToyEngine(o, comm.get());
      ASSERT_NE(engine, nullptr);
      int64_t params = pb * (s.t + s.f), grads = gb * s.t, optimizer = k * s.t, buffers = 0;
      if (st >= 1) optimizer = k * s.t / n;
      if (st >= 2) {
        grads = gb * s.t / n;
        buffers = gb * SlotElements({s.unit0, s.unit1, s.unit3}, 2);
      }
      if (st == 3) {
        // A unit persists when its full padded bytes fit persist_bytes = 4 R(57): units 2 and 3 always, units 0
        // and 1 at the world sizes where their rounding reaches R(57).
        int64_t persistent = 0;
        std::vector<int64_t> gathered;
        for (int64_t u : {s.unit0, s.unit1, s.unit2, s.unit3}) {
          if (u * pb <= o.persist_bytes) persistent += u; else gathered.push_back(u);
        }
        params = pb * (s.t + s.f) / n + pb * persistent;
        buffers += gathered.empty() ? 0 : pb * SlotElements(gathered, 3);
      }
      if (GetParam() == Backend::kCuda) buffers += NormScratch(s, n);
      auto check = [&](const char* when) {
        const MemoryReport m = engine->Memory();
        SCOPED_TRACE(when);
        EXPECT_EQ(m.device.Current(MemoryCategory::kParams), params);
        EXPECT_EQ(m.device.Current(MemoryCategory::kGrads), grads);
        EXPECT_EQ(m.device.Current(MemoryCategory::kOptimizer), optimizer);
        EXPECT_EQ(m.device.Current(MemoryCategory::kBuffers), buffers);
        EXPECT_EQ(m.device.peak_total, params + grads + optimizer + buffers);  // nothing beyond the arenas
        EXPECT_EQ(m.host.Total(), 0);
      };
      check("after Open");
      TrainToyStep(*engine, *comm, 0, 2, 24);
      check("after a step (no allocation on the step path)");
    }
  }
  }
}

// CPU offload moves the fp32 master and the optimizer state (and, with offload_params, the stage-3 parameter
// shards) from device to host bytes, and adds two host staging buffers of the largest trainable bucket shard
// for gradients (gb bytes per element) and, unless the shards are on the host already, for parameters (pb).
//   device: params as without offload (0 with offload_params, stage 3) | grads, buffers unchanged | optimizer 0
//   host:   optimizer (K + 4) Ψt/N | grads 2 gb max_t/N | buffers 2 pb max_t/N | params pb(Ψt+Ψf)/N
TEST_P(MemoryTest, OffloadMovesOptimizerAndShardsToHostBytes) {
  ZERO_BACKEND_COMM(comm, GetParam());
  const int n = comm->world_size();
  const Sizes s = ToySizes(n);
  const int64_t max_t = std::max({s.unit0, s.unit1, s.unit3});
  const int64_t slots = SlotElements({s.unit0, s.unit1, s.unit2, s.unit3}, Options().gather_slots);
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const int64_t pb = static_cast<int64_t>(DTypeSize(dt)), gb = 4;
    for (int st = 1; st <= 3; ++st) {
      for (bool params_too : {false, true}) {
        if (params_too && st != 3) continue;
        SCOPED_TRACE("stage " + std::to_string(st) + " " + DTypeName(dt) + (params_too ? " offload_params" : ""));
        Options o = Base(static_cast<Stage>(st), OptimizerKind::kAdamW);
        o.backend = GetParam();
        o.param_dtype = dt;
        o.offload_optimizer = true;
        o.offload_params = params_too;
        auto engine = OpenToyEngine(o, comm.get());
        ASSERT_NE(engine, nullptr);
        int64_t d_params = st == 3 ? pb * (s.t + s.f) / n : pb * (s.t + s.f);
        if (params_too) d_params = 0;
        const int64_t d_grads = st == 1 ? gb * s.t : gb * s.t / n;
        int64_t d_buffers = st >= 2 ? gb * SlotElements({s.unit0, s.unit1, s.unit3}, 2) : 0;
        if (st == 3) d_buffers += pb * slots;
        if (GetParam() == Backend::kCuda) d_buffers += NormScratch(s, n);
        const int64_t h_opt = (8 + 4) * s.t / n, h_grads = 2 * gb * max_t / n;
        const int64_t h_buffers = params_too ? 0 : 2 * pb * max_t / n;
        const int64_t h_params = params_too ? pb * (s.t + s.f) / n : 0;
        auto check = [&](const char* when) {
          SCOPED_TRACE(when);
          const MemoryReport m = engine->Memory();
          EXPECT_EQ(m.device.Current(MemoryCategory::kParams), d_params);
          EXPECT_EQ(m.device.Current(MemoryCategory::kGrads), d_grads);
          EXPECT_EQ(m.device.Current(MemoryCategory::kOptimizer), 0);
          EXPECT_EQ(m.device.Current(MemoryCategory::kBuffers), d_buffers);
          EXPECT_EQ(m.host.Current(MemoryCategory::kOptimizer), h_opt);
          EXPECT_EQ(m.host.Current(MemoryCategory::kGrads), h_grads);
          EXPECT_EQ(m.host.Current(MemoryCategory::kBuffers), h_buffers);
          EXPECT_EQ(m.host.Current(MemoryCategory::kParams), h_params);
          EXPECT_EQ(m.host.peak_total, h_opt + h_grads + h_buffers + h_params);
        };
        check("after Open");
        TrainToyStep(*engine, *comm, 0, 2, 24);
        check("after a step");
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, MemoryTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); });

struct CommCase {
  Stage stage;
  int micros;
  int64_t prefetch_bytes;
  bool persist;  // stage 3: units 2 and 3 persistent
  bool keep0;    // stage 3: unit 0 kept across the turn
};

void PrintTo(const CommCase& c, std::ostream* os) {
  *os << "stage " << static_cast<int>(c.stage) << " M=" << c.micros << " prefetch=" << c.prefetch_bytes
      << " persist=" << c.persist << " keep0=" << c.keep0;
}

class CommFormulaTest : public ::testing::TestWithParam<std::tuple<CommCase, Backend>> {};

TEST_P(CommFormulaTest, CountersMatchFormula) {
  const CommCase c = std::get<0>(GetParam());
  ZERO_BACKEND_COMM(comm, std::get<1>(GetParam()));
  const int n = comm->world_size();
  const Sizes s = ToySizes(n);
  Options o = Base(c.stage, OptimizerKind::kAdamW);
  o.backend = std::get<1>(GetParam());
  o.prefetch_bytes = c.prefetch_bytes;
  o.persist_bytes = c.persist ? R(57, n) * 4 : 0;
  if (c.keep0) o.keep_gathered_units = {0};
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  // Two steps: the first records the stage-3 trace, the second prefetches from it.
  for (int step = 0; step < 2; ++step) {
    const CommCounters before = engine->comm_counters();
    TrainToyStep(*engine, *comm, step, c.micros, 24);
    const CommCounters& after = engine->comm_counters();
    const int64_t rs = after.reduce_scatter - before.reduce_scatter;
    const int64_t ag = after.all_gather - before.all_gather;
    const int64_t ar = after.all_reduce - before.all_reduce;
    const int64_t m = c.micros;
    int64_t want_rs = 0, want_ag = 0, want_ar = 0;
    switch (c.stage) {
      case Stage::kDataParallel: want_ar = s.t; break;
      case Stage::kOptimizerStates: want_rs = s.t; want_ag = s.t; break;
      case Stage::kGradients: want_rs = m * s.t; want_ag = s.t; break;
      case Stage::kParameters: {
        // Persistent: units whose padded size fits persist_bytes = 4 R(57) (see the memory test).
        auto persists = [&](int64_t u) { return c.persist && u <= R(57, n); };
        int64_t persistent = 0, persistent_trainable = 0;
        for (int64_t u : {s.unit0, s.unit1, s.unit3}) persistent_trainable += persists(u) ? u : 0;
        persistent = persistent_trainable + (persists(s.unit2) ? s.unit2 : 0);
        const int64_t tied = persists(s.unit0) ? 0 : s.unit0;
        want_rs = m * s.t;
        want_ag = 2 * m * (s.t + s.f - persistent) + 2 * m * tied - (c.keep0 ? 2 * m * tied : 0) + persistent_trainable;
        break;
      }
      case Stage::kAuto: FAIL() << "no case opens Stage::kAuto here"; break;
    }
    SCOPED_TRACE("step " + std::to_string(step));
    EXPECT_EQ(rs, want_rs);
    EXPECT_EQ(ag, want_ag);
    EXPECT_EQ(ar, want_ar);
    if (c.stage != Stage::kParameters && m == 1) {
      EXPECT_EQ(after.Volume() - before.Volume(), 2 * s.t);  // the paper's 2Ψ for stages 0-2 at M = 1
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllStages, CommFormulaTest,
    ::testing::Combine(
    ::testing::Values(CommCase{Stage::kDataParallel, 1, 0, false, false}, CommCase{Stage::kDataParallel, 3, 0, false, false},
                      CommCase{Stage::kOptimizerStates, 1, 0, false, false}, CommCase{Stage::kOptimizerStates, 3, 0, false, false},
                      CommCase{Stage::kGradients, 1, 0, false, false}, CommCase{Stage::kGradients, 3, 0, false, false},
                      CommCase{Stage::kParameters, 1, 0, false, false}, CommCase{Stage::kParameters, 2, 1 << 20, false, false},
                      CommCase{Stage::kParameters, 2, 1 << 20, true, false}, CommCase{Stage::kParameters, 2, 1 << 20, true, true},
                      CommCase{Stage::kParameters, 2, 0, false, true}),
                      ::testing::Values(Backend::kCpu, Backend::kCuda)),
    [](const ::testing::TestParamInfo<std::tuple<CommCase, Backend>>& info) {
      const CommCase& c = std::get<0>(info.param);
      return "stage" + std::to_string(static_cast<int>(c.stage)) + "_M" + std::to_string(c.micros) +
             (c.prefetch_bytes > 0 ? "_prefetch" : "") + (c.persist ? "_persist" : "") + (c.keep0 ? "_keep0" : "") +
             "_" + BackendName(std::get<1>(info.param));
    });

}  // namespace
}  // namespace zero::testing

namespace zero::testing {
namespace {

// Stage-3 prefetch, asserted on the engine's event log (what was issued before what), never on time: with
// prefetch on, the second step gathers unit 1 before unit 0's first Release; with it off, only after.
TEST(PrefetchTest, NextUnitIsGatheredBeforeCurrentRelease) {
  auto comm = WorldComm();
  for (int64_t prefetch : {int64_t{1} << 20, int64_t{0}}) {
    SCOPED_TRACE("prefetch_bytes " + std::to_string(prefetch));
    Options o = Base(Stage::kParameters, OptimizerKind::kAdamW);
    o.prefetch_bytes = prefetch;
    auto engine = OpenToyEngine(o, comm.get());
    ASSERT_NE(engine, nullptr);
    EngineTestPeer::Hooks(*engine).log_events = true;
    TrainToyStep(*engine, *comm, 0, 1, 24);  // records the order
    const size_t from = engine->TEST_events().size();
    TrainToyStep(*engine, *comm, 1, 1, 24);
    const auto& ev = engine->TEST_events();
    size_t first_release0 = 0, first_gather1 = 0;
    for (size_t i = ev.size(); i-- > from;) {
      if (ev[i].kind == Engine::Event::kRelease && ev[i].unit == 0) first_release0 = i;
      if (ev[i].kind == Engine::Event::kGather && ev[i].unit == 1) first_gather1 = i;
    }
    ASSERT_GT(first_release0, from);
    ASSERT_GT(first_gather1, from);
    if (prefetch > 0) {
      EXPECT_LT(first_gather1, first_release0);
    } else {
      EXPECT_GT(first_gather1, first_release0);
    }
  }
}

}  // namespace
}  // namespace zero::testing

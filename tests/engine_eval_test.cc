// Eval passes in any order (README "The contract", Eval) and checked views.
//
// Stage 3 gathers inside eval passes: a generation loop sweeps the units once per token for a varying number of
// tokens, an early exit stops part-way, beam search repeats sweeps, all inside one BeginEval/EndEval. Every
// Acquire must give the unit's true parameters (compared with the values gathered by GatherFull), in every
// stage, with prefetch on or off and with few gather slots. A rank that acquires another unit than its peers, or
// leaves the pass while they acquire, gets an error on every rank (kMismatch), never a hang. Views used outside
// their window give a status naming the call, the unit and the window.
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

constexpr int kSteps = 2, kMicros = 2, kGlobalBatch = 24;

// Units of the toy model's parameters (toy_model.h).
std::vector<int> ParamsOf(const Engine& engine, int unit) {
  std::vector<int> out;
  for (size_t p = 0; p < engine.specs().size(); ++p) {
    if (engine.specs()[p].unit == unit) out.push_back(static_cast<int>(p));
  }
  return out;
}

// The sequences of one eval pass, identical on every rank: sweeps of growing length (generation), early exits, a
// reversed sweep, repeats of one unit and a seeded random walk.
std::vector<int> EvalSequence() {
  std::vector<int> seq;
  for (int tokens = 1; tokens <= 5; ++tokens) {
    for (int t = 0; t < tokens; ++t) {
      for (int u : {0, 1, 2, 3, 0}) seq.push_back(u);  // the tied unit 0 twice, as ToyForward does
    }
  }
  for (int exit_at = 1; exit_at <= 3; ++exit_at) {
    for (int u = 0; u < exit_at; ++u) seq.push_back(u);
  }
  for (int u : {3, 2, 1, 0, 0, 0, 2, 2, 1}) seq.push_back(u);
  std::mt19937 rng(1234);
  for (int i = 0; i < 60; ++i) seq.push_back(static_cast<int>(rng() % kToyUnits));
  return seq;
}

struct Config {
  Stage stage;
  int64_t prefetch_bytes;
  int gather_slots;
  DType param_dtype;
  Backend backend = Backend::kCpu;
};

std::string Name(const ::testing::TestParamInfo<Config>& info) {
  const Config& c = info.param;
  const std::string prefetch = c.prefetch_bytes == 0               ? "_no_prefetch"
                               : c.prefetch_bytes < (int64_t{1} << 20) ? "_prefetch" + std::to_string(c.prefetch_bytes)
                                                                       : "_prefetch";
  return "stage" + std::to_string(static_cast<int>(c.stage)) + prefetch +
         "_slots" + std::to_string(c.gather_slots) + (c.param_dtype == DType::kBF16 ? "_bf16" : "_f32") +
         (c.backend == Backend::kCuda ? "_cuda" : "");
}

class EvalOrderTest : public ::testing::TestWithParam<Config> {};

// Trains two steps (so that parameters differ from their initial values), then runs EvalSequence() in one eval
// pass, and twice more in later passes (the prediction learned in the first one prefetches there), comparing
// every parameter of every acquired unit with GatherFull's values.
TEST_P(EvalOrderTest, AnySequenceOfUnitsSeesTheTrueParameters) {
  const Config c = GetParam();
  ZERO_BACKEND_COMM(comm, c.backend);
  Options o = SmallToyOptions(c.stage);
  o.backend = c.backend;
  o.prefetch_bytes = c.prefetch_bytes;
  o.gather_slots = c.gather_slots;
  o.param_dtype = c.param_dtype;
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  for (int step = 0; step < kSteps; ++step) TrainToyStep(*engine, *comm, step, kMicros, kGlobalBatch);
  const std::vector<std::vector<float>> truth = GatherToyParams(*engine);
  const std::vector<int> seq = EvalSequence();
  for (int pass = 0; pass < 3; ++pass) {
    ZERO_ASSERT_OK(engine->BeginEval());
    for (size_t i = 0; i < seq.size(); ++i) {
      const int unit = seq[i];
      ZERO_ASSERT_OK(engine->Acquire(unit, Pass::kForward));
      for (int p : ParamsOf(*engine, unit)) {
        TensorView v;
        ZERO_ASSERT_OK(engine->Param(p, &v));
        std::vector<float> got;
        ZERO_ASSERT_OK(ReadWidened(v, &got));
        ASSERT_EQ(got, truth[static_cast<size_t>(p)]) << "pass " << pass << ", acquire " << i << " (unit " << unit
                                                        << "), param " << p;
      }
      ZERO_ASSERT_OK(engine->Release(unit, Pass::kForward));
    }
    ZERO_ASSERT_OK(engine->EndEval());
  }
  // Training goes on after the passes, with the same results as without them: evaluation changed nothing.
  TrainToyStep(*engine, *comm, kSteps, kMicros, kGlobalBatch);
  auto reference = OpenToyEngine(o, comm.get());
  ASSERT_NE(reference, nullptr);
  for (int step = 0; step <= kSteps; ++step) TrainToyStep(*reference, *comm, step, kMicros, kGlobalBatch);
  EXPECT_EQ(GatherToyParams(*engine), GatherToyParams(*reference));
}

INSTANTIATE_TEST_SUITE_P(
    Stages, EvalOrderTest,
    ::testing::Values(Config{Stage::kDataParallel, int64_t{256} << 20, 3, DType::kF32},
                      Config{Stage::kGradients, int64_t{256} << 20, 3, DType::kF32},
                      Config{Stage::kParameters, int64_t{256} << 20, 3, DType::kF32},
                      Config{Stage::kParameters, int64_t{256} << 20, 2, DType::kF32},
                      Config{Stage::kParameters, 0, 1, DType::kF32},
                      Config{Stage::kParameters, 600, 2, DType::kF32},  // a budget of about one unit
                      Config{Stage::kParameters, int64_t{256} << 20, 4, DType::kBF16},
                      // Backend::kCuda: the gathers on the communication stream, the views device memory.
                      Config{Stage::kDataParallel, int64_t{256} << 20, 3, DType::kF32, Backend::kCuda},
                      Config{Stage::kParameters, int64_t{256} << 20, 3, DType::kF32, Backend::kCuda},
                      Config{Stage::kParameters, 0, 1, DType::kF32, Backend::kCuda},
                      Config{Stage::kParameters, 600, 2, DType::kF32, Backend::kCuda},
                      Config{Stage::kParameters, int64_t{256} << 20, 4, DType::kBF16, Backend::kCuda}),
    Name);

// Prefetch follows the order once it repeats: in the second of two identical passes, most gathers are issued
// ahead of their Acquire (logged before it), not inside it.
TEST(EvalPrefetchTest, RepeatedSweepsArePrefetched) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  auto engine = OpenToyEngine(SmallToyOptions(Stage::kParameters), comm.get());
  ASSERT_NE(engine, nullptr);
  EngineTestPeer::Hooks(*engine).log_events = true;
  auto sweep = [&] {
    ZERO_ASSERT_OK(engine->BeginEval());
    for (int token = 0; token < 4; ++token) {
      for (int u : {0, 1, 2, 3}) {
        ZERO_ASSERT_OK(engine->Acquire(u, Pass::kForward));
        ZERO_ASSERT_OK(engine->Release(u, Pass::kForward));
      }
    }
    ZERO_ASSERT_OK(engine->EndEval());
  };
  sweep();
  const size_t first_pass_events = engine->TEST_events().size();
  sweep();
  // In the second pass: a gather of unit u logged before the Acquire of u that uses it is a prefetch.
  int prefetched = 0, on_demand = 0;
  const auto& ev = engine->TEST_events();
  std::vector<int> pending(kToyUnits, 0);
  for (size_t i = first_pass_events; i < ev.size(); ++i) {
    if (ev[i].kind == Engine::Event::kAcquire) {
      // A gather logged right after this Acquire (before the next Acquire) for the same unit is on demand.
      bool demand = false;
      for (size_t j = i + 1; j < ev.size() && ev[j].kind != Engine::Event::kAcquire; ++j) {
        demand = demand || (ev[j].kind == Engine::Event::kGather && ev[j].unit == ev[i].unit);
      }
      if (demand) {
        ++on_demand;
      } else if (pending[static_cast<size_t>(ev[i].unit)] > 0) {
        ++prefetched;
      }
      pending[static_cast<size_t>(ev[i].unit)] = 0;
    } else if (ev[i].kind == Engine::Event::kGather) {
      pending[static_cast<size_t>(ev[i].unit)] = 1;
    }
  }
  EXPECT_GE(prefetched, 12) << "of 16 acquisitions, " << on_demand << " were gathered on demand";
}

// Ranks that acquire different units in an eval pass: every rank gets kMismatch (naming the argument, the unit),
// at the Acquire that diverged or at the next call that waits, never a hang or exchanged shards.
TEST(EvalDivergencePeerTest, ADifferentUnitOnOneRankFailsEveryRank) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  auto engine = OpenToyEngine(SmallToyOptions(Stage::kParameters), comm.get());
  ASSERT_NE(engine, nullptr);
  TrainToyStep(*engine, *comm, 0, 1, kGlobalBatch);
  ZERO_ASSERT_OK(engine->BeginEval());
  Status first;
  const std::vector<int> seq = {0, 1, 2, 3, 0, 1, 2, 3};
  for (size_t i = 0; i < seq.size() && first.ok(); ++i) {
    // Units 1 and 3 have the same kind of call; on the last rank the sixth Acquire takes unit 3 instead of 1.
    const int unit = (i == 5 && comm->rank() == comm->world_size() - 1) ? 3 : seq[i];
    first = engine->Acquire(unit, Pass::kForward);
    if (first.ok()) first = engine->Release(unit, Pass::kForward);
  }
  if (first.ok()) first = engine->EndEval();
  EXPECT_EQ(first.code(), StatusCode::kMismatch) << first.ToString();
  EXPECT_TRUE(Contains(first, "ranks disagree on the argument")) << first.ToString();
  EXPECT_FALSE(engine->healthy().ok()) << "the engine must stay unusable after exchanging different units";
}

// One rank ends the pass while the others still acquire: kMismatch on every rank, naming the call.
TEST(EvalDivergencePeerTest, LeavingThePassEarlyFailsEveryRank) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  auto engine = OpenToyEngine(SmallToyOptions(Stage::kParameters), comm.get());
  ASSERT_NE(engine, nullptr);
  ZERO_ASSERT_OK(engine->BeginEval());
  Status first;
  const int tokens = comm->rank() == 0 ? 2 : 3;  // rank 0 stops generating one token early
  for (int t = 0; t < tokens && first.ok(); ++t) {
    for (int u = 0; u < kToyUnits && first.ok(); ++u) {
      first = engine->Acquire(u, Pass::kForward);
      if (first.ok()) first = engine->Release(u, Pass::kForward);
    }
  }
  if (first.ok()) first = engine->EndEval();
  EXPECT_EQ(first.code(), StatusCode::kMismatch) << first.ToString();
  EXPECT_TRUE(Contains(first, "ranks disagree on the call")) << first.ToString();
}

// --- Views ---------------------------------------------------------------------------------------------------

TEST(ViewsTest, OutsideTheirWindowTheyAreStatusesNamingTheWindow) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  auto engine = OpenToyEngine(SmallToyOptions(Stage::kParameters), comm.get());
  ASSERT_NE(engine, nullptr);
  TensorView v;
  // Unknown index.
  Status s = engine->Param(99, &v);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "unknown parameter; parameters are 0..6"));
  EXPECT_EQ(engine->Grad(-1, &v).code(), StatusCode::kInvalidArgument);
  // Stage 3, unit 1 not acquired: the view would be a null pointer.
  s = engine->Param(1, &v);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_TRUE(Contains(s, "Param(1) ('b1.w1', unit 1)")) << s.ToString();
  EXPECT_TRUE(Contains(s, "valid while its unit is acquired")) << s.ToString();
  EXPECT_EQ(v.data, nullptr);
  EXPECT_EQ(engine->Param(1).data, nullptr);  // the unchecked view says the same with a null pointer
  // Gradients outside a micro-step; of a frozen parameter.
  s = engine->Grad(1, &v);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_TRUE(Contains(s, "from the unit's first Acquire(1, kBackward) of a micro-step to GradsReady(1)"))
      << s.ToString();
  EXPECT_TRUE(Contains(s, "call BeginMicroStep first")) << s.ToString();
  s = engine->Grad(4, &v);  // frozen.f
  EXPECT_TRUE(Contains(s, "frozen parameter (trainable = false) has no gradient")) << s.ToString();

  // Inside the windows they are valid; after Release / GradsReady they are statuses again.
  ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
  for (int u = 0; u < kToyUnits; ++u) {
    ZERO_ASSERT_OK(engine->Acquire(u, Pass::kForward));
    for (int p : ParamsOf(*engine, u)) ZERO_EXPECT_OK(engine->Param(p, &v));
    ZERO_ASSERT_OK(engine->Release(u, Pass::kForward));
  }
  EXPECT_EQ(engine->Param(1, &v).code(), StatusCode::kFailedPrecondition) << "a released unit's view";
  for (int u = kToyUnits - 1; u >= 0; --u) {
    ZERO_ASSERT_OK(engine->Acquire(u, Pass::kBackward));
    for (int p : ParamsOf(*engine, u)) {
      if (engine->specs()[static_cast<size_t>(p)].trainable) ZERO_EXPECT_OK(engine->Grad(p, &v));
    }
    ZERO_ASSERT_OK(engine->GradsReady(u));
    if (u == 1) {
      s = engine->Grad(1, &v);
      EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << "a gradient after GradsReady: " << s.ToString();
    }
    ZERO_ASSERT_OK(engine->Release(u, Pass::kBackward));
  }
  StepResult r;
  ZERO_ASSERT_OK(engine->Step(StepArgs(), &r));
  // In an eval pass, gradients are never valid.
  ZERO_ASSERT_OK(engine->BeginEval());
  ZERO_ASSERT_OK(engine->Acquire(1, Pass::kForward));
  ZERO_EXPECT_OK(engine->Param(1, &v));
  s = engine->Grad(1, &v);
  EXPECT_TRUE(Contains(s, "eval passes have no gradients")) << s.ToString();
  ZERO_ASSERT_OK(engine->Release(1, Pass::kForward));
  ZERO_ASSERT_OK(engine->EndEval());
}

TEST(ViewsTest, StagesZeroToTwoKeepParametersValidAlways) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  for (Stage stage : {Stage::kDataParallel, Stage::kOptimizerStates, Stage::kGradients}) {
    auto engine = OpenToyEngine(SmallToyOptions(stage), comm.get());
    ASSERT_NE(engine, nullptr);
    TensorView v;
    for (int p = 0; p < kToyParams; ++p) ZERO_EXPECT_OK(engine->Param(p, &v));
    TrainToyStep(*engine, *comm, 0, 1, kGlobalBatch);
    for (int p = 0; p < kToyParams; ++p) ZERO_EXPECT_OK(engine->Param(p, &v));  // after the post-step gather
  }
}

}  // namespace
}  // namespace zero::testing

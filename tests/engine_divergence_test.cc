// Ranks that diverge (different specs, micro-step counts, unit orders) get an error on every rank, never a
// hang. Runs with 2 and 3 ranks; the last rank is the one that diverges.
#include <chrono>
#include <string>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

TEST(DivergenceTest, SpecsThatDifferFailOpenOnEveryRankNamingTheDifference) {
  auto comm = WorldComm();
  ASSERT_GE(comm->world_size(), 2);
  const bool odd = comm->rank() == comm->world_size() - 1;
  auto specs = ToySpecs();
  if (odd) specs[3].shape = {7, 13};  // b1.w2 transposed on one rank
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(SmallToyOptions(Stage::kGradients), comm.get(), specs, &engine);
  EXPECT_EQ(s.code(), StatusCode::kMismatch) << s.ToString();
  EXPECT_TRUE(Contains(s, "b1.w2")) << s.ToString();
  EXPECT_TRUE(Contains(s, "[13,7]")) << s.ToString();
  EXPECT_TRUE(Contains(s, "[7,13]")) << s.ToString();
  EXPECT_TRUE(Contains(s, "rank " + std::to_string(comm->world_size() - 1))) << s.ToString();

  Options o = SmallToyOptions(Stage::kGradients);
  if (odd) o.clip_norm = 1.0;
  s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_EQ(s.code(), StatusCode::kMismatch) << s.ToString();
  EXPECT_TRUE(Contains(s, "clip_norm")) << s.ToString();
}

TEST(DivergenceTest, MicroStepCountsThatDifferFailEveryRank) {
  auto comm = WorldComm();
  const bool odd = comm->rank() == comm->world_size() - 1;
  for (Stage st : {Stage::kDataParallel, Stage::kGradients, Stage::kParameters}) {
    SCOPED_TRACE(StageName(st));
    auto engine = OpenToyEngine(SmallToyOptions(st), comm.get());
    ASSERT_NE(engine, nullptr);
    // The odd rank thinks micro-step 0 is the last one.
    Status s = engine->BeginMicroStep(0, odd);
    EXPECT_EQ(s.code(), StatusCode::kMismatch) << s.ToString();
    EXPECT_TRUE(Contains(s, "is_last")) << s.ToString();
    // Nothing diverged yet: the ranks can agree and go on.
    ZERO_EXPECT_OK(engine->healthy());
    ZERO_ASSERT_OK(engine->BeginMicroStep(0, false));
    EngineAccess access(engine.get());
    ToyForwardBackward(access, ToyMicroBatch(0, 0, comm->rank(), comm->world_size(), 24));
    // The odd rank steps while the others run a second micro-step.
    StepResult r;
    s = odd ? engine->Step(StepArgs(), &r) : engine->BeginMicroStep(1, true);
    EXPECT_NE(s.code(), StatusCode::kOk);
    if (!odd) {
      EXPECT_EQ(s.code(), StatusCode::kMismatch) << s.ToString();
      EXPECT_TRUE(Contains(s, "call")) << s.ToString();
    }
  }
}

TEST(DivergenceTest, UnitOrderThatDiffersFailsEveryRank) {
  auto comm = WorldComm(std::chrono::milliseconds(5000));
  const bool odd = comm->rank() == comm->world_size() - 1;
  // Stage 1: no collective inside a non-last micro-step, so the divergence is found by the next check.
  auto engine = OpenToyEngine(SmallToyOptions(Stage::kOptimizerStates), comm.get());
  ASSERT_NE(engine, nullptr);
  ZERO_ASSERT_OK(engine->BeginMicroStep(0, false));
  for (int u = 0; u < 4; ++u) {
    if (odd && u == 2) continue;  // skips the frozen unit's forward
    ZERO_ASSERT_OK(engine->Acquire(u, Pass::kForward));
    ZERO_ASSERT_OK(engine->Release(u, Pass::kForward));
  }
  for (int u = 3; u >= 0; --u) ZERO_ASSERT_OK(engine->GradsReady(u));
  Status s = engine->BeginMicroStep(1, true);
  EXPECT_EQ(s.code(), StatusCode::kMismatch) << s.ToString();
  EXPECT_TRUE(Contains(s, "units used so far")) << s.ToString();
  EXPECT_FALSE(engine->healthy().ok()) << "diverged units poison the engine";
}

TEST(DivergenceTest, Stage3AcquireOffTheRecordedTraceAbortsEveryRank) {
  auto comm = WorldComm(std::chrono::milliseconds(10000));
  const bool odd = comm->rank() == comm->world_size() - 1;
  auto engine = OpenToyEngine(SmallToyOptions(Stage::kParameters), comm.get());
  ASSERT_NE(engine, nullptr);
  TrainToyStep(*engine, *comm, 0, 1, 24);  // records the trace
  const auto start = std::chrono::steady_clock::now();
  // The odd rank may finish its part of the micro-step's agreement check before its peers do, and abort
  // while they are still in it: for them the abort can surface in any of the calls below.
  Status s = engine->BeginMicroStep(0, true);
  if (odd) {
    ZERO_ASSERT_OK(s);
    s = engine->Acquire(1, Pass::kForward);  // the odd rank skips the embedding
    EXPECT_EQ(s.code(), StatusCode::kMismatch) << s.ToString();
    EXPECT_TRUE(Contains(s, "recorded stage-3 order")) << s.ToString();
  } else {
    // The others are in the embedding's gather, which the odd rank never joins: its abort reaches them.
    if (s.ok()) s = engine->Acquire(0, Pass::kForward);
    if (s.ok()) s = engine->Release(0, Pass::kForward);
    if (s.ok()) s = engine->Acquire(1, Pass::kForward);
    EXPECT_EQ(s.code(), StatusCode::kAborted) << s.ToString();
    EXPECT_TRUE(Contains(s, "recorded stage-3 order")) << s.ToString();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(8)) << "found by the abort, not a timeout";
  EXPECT_FALSE(engine->healthy().ok());
}

}  // namespace
}  // namespace zero::testing

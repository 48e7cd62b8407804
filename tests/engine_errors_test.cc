// Bad input that every rank makes alike: each gets a clear status, and the engine either stays usable (and
// a following step works) or says it is not. Parameterised on the backend (the CUDA cases skip without a GPU),
// except StepWithUnitNotReady, whose second half is about how MpiComm's abort channel reaches the peers.
#include <string>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

class EngineErrorsTest : public ::testing::TestWithParam<Backend> {
 protected:
  Options Opts(Stage stage) const {
    Options o = SmallToyOptions(stage);
    o.backend = GetParam();
    return o;
  }
};

TEST_P(EngineErrorsTest, InvalidOptionsFailOpenOnEveryRank) {
  ZERO_BACKEND_COMM(comm, GetParam());
  std::unique_ptr<Engine> engine;
  Options o = Opts(Stage::kGradients);
  o.bucket_elements = 0;
  Status s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "bucket_elements")) << s.ToString();
  EXPECT_TRUE(Contains(s, "rank " + std::to_string(comm->rank()))) << s.ToString();
  EXPECT_EQ(engine, nullptr);

  o = Opts(Stage::kGradients);
  o.keep_gathered_units = {7};
  s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "keep_gathered_units")) << s.ToString();

  o = Opts(Stage::kGradients);
  o.backend = GetParam() == Backend::kCpu ? Backend::kCuda : Backend::kCpu;  // the other kind of memory
  s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "Comm::OpenNccl")) << s.ToString();

  auto specs = ToySpecs();
  specs[2].shape = {-1};
  s = Engine::Open(Opts(Stage::kGradients), comm.get(), specs, &engine);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "b1.b1")) << s.ToString();
  // The communicator is still healthy: a correct Open works.
  EXPECT_NE(OpenToyEngine(Opts(Stage::kGradients), comm.get()), nullptr);
}

TEST_P(EngineErrorsTest, CapacityExceededReportsBreakdown) {
  ZERO_BACKEND_COMM(comm, GetParam());
  for (Stage st : {Stage::kDataParallel, Stage::kParameters}) {
    Options o = Opts(st);
    o.device_capacity_bytes = 2000;
    std::unique_ptr<Engine> engine;
    Status s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
    EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
    EXPECT_TRUE(Contains(s, "capacity")) << s.ToString();
    EXPECT_TRUE(Contains(s, "params")) << s.ToString();
    EXPECT_TRUE(Contains(s, StageName(st))) << s.ToString();
  }
}

TEST_P(EngineErrorsTest, UnknownUnitAndGradsReadyTwiceLeaveEngineUsable) {
  ZERO_BACKEND_COMM(comm, GetParam());
  for (Stage st : {Stage::kDataParallel, Stage::kGradients, Stage::kParameters}) {
    SCOPED_TRACE(StageName(st));
    auto engine = OpenToyEngine(Opts(st), comm.get());
    ASSERT_NE(engine, nullptr);
    ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
    Status s = engine->Acquire(99, Pass::kForward);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(s, "unknown unit")) << s.ToString();
    s = engine->Release(1, Pass::kForward);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
    EXPECT_TRUE(Contains(s, "without a matching Acquire")) << s.ToString();
    EngineAccess access(engine.get());
    ToyForwardBackward(access, ToyMicroBatch(0, 0, comm->rank(), comm->world_size(), 24));
    s = engine->GradsReady(0);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
    EXPECT_TRUE(Contains(s, "twice")) << s.ToString();
    ZERO_EXPECT_OK(engine->healthy());
    StepResult r;
    s = engine->Step(StepArgs(), &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(r.step, 1);
  }
}

TEST(EngineErrorsCpuTest, StepWithUnitNotReady) {
  for (Stage st : {Stage::kOptimizerStates, Stage::kGradients}) {
    SCOPED_TRACE(StageName(st));
    auto comm = WorldComm();  // the second half aborts it
    Options o = SmallToyOptions(st);
    o.grad_pool_buffers = 3;  // units 1 and 0 hold their buffers while unit 3, first in reduction order, waits
    auto engine = OpenToyEngine(o, comm.get());
    ASSERT_NE(engine, nullptr);
    // Unit 3 comes first in reduction order: without its GradsReady nothing was reduced, so every rank
    // reports the error, nothing changes, and the step can be completed afterwards.
    ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
    for (int u = 0; u < 4; ++u) {
      ZERO_ASSERT_OK(engine->Acquire(u, Pass::kForward));
      ZERO_ASSERT_OK(engine->Release(u, Pass::kForward));
    }
    for (int u : {1, 2, 0}) ZERO_ASSERT_OK(engine->GradsReady(u));
    StepResult r;
    Status s = engine->Step(StepArgs(), &r);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
    EXPECT_TRUE(Contains(s, "unit 3")) << s.ToString();
    ZERO_EXPECT_OK(engine->healthy());
    ZERO_ASSERT_OK(engine->GradsReady(3));
    s = engine->Step(StepArgs(), &r);
    EXPECT_TRUE(s.ok()) << s.ToString();

    // Unit 0 comes last: units 3 and 1 were already reduced, so the step cannot be finished consistently;
    // the engine aborts the communicator and stays unusable. Reductions are asynchronous, so a fast rank can
    // reach Step and abort while a slower one is still finishing BeginMicroStep's agreement check or a
    // reduction: the first error may come from any of these calls, as kAborted carrying the peer's reason.
    s = engine->BeginMicroStep(0, true);
    for (int u : {3, 2, 1}) {
      if (s.ok()) s = engine->GradsReady(u);
    }
    if (s.ok()) s = engine->Step(StepArgs(), &r);
    EXPECT_TRUE(s.code() == StatusCode::kFailedPrecondition || s.code() == StatusCode::kAborted) << s.ToString();
    EXPECT_TRUE(Contains(s, "unit 0")) << s.ToString();
    EXPECT_FALSE(engine->healthy().ok());
    EXPECT_FALSE(engine->BeginMicroStep(0, true).ok());
  }
}

TEST_P(EngineErrorsTest, ProtocolOrderErrors) {
  ZERO_BACKEND_COMM(comm, GetParam());
  auto engine = OpenToyEngine(Opts(Stage::kGradients), comm.get());
  ASSERT_NE(engine, nullptr);
  StepResult r;
  Status s = engine->Step(StepArgs(), &r);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(s, "BeginMicroStep")) << s.ToString();
  s = engine->BeginMicroStep(1, false);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(s, "expected micro-step 0")) << s.ToString();
  s = engine->Acquire(0, Pass::kForward);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  ZERO_ASSERT_OK(engine->BeginMicroStep(0, false));
  EngineAccess access(engine.get());
  ToyForwardBackward(access, ToyMicroBatch(0, 0, comm->rank(), comm->world_size(), 24));
  s = engine->Step(StepArgs(), &r);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(s, "is_last")) << s.ToString();
  EXPECT_EQ(engine->BeginEval().code(), StatusCode::kFailedPrecondition);
  // Finish the step properly: still usable.
  ZERO_ASSERT_OK(engine->BeginMicroStep(1, true));
  ToyForwardBackward(access, ToyMicroBatch(0, 1, comm->rank(), comm->world_size(), 24));
  ZERO_EXPECT_OK(engine->Step(StepArgs(), &r));
  EXPECT_FALSE(access.failed());
}

TEST_P(EngineErrorsTest, EvalIsForwardOnlyAndMatchesTraining) {
  ZERO_BACKEND_COMM(comm, GetParam());
  for (Stage st : {Stage::kDataParallel, Stage::kParameters}) {
    SCOPED_TRACE(StageName(st));
    auto engine = OpenToyEngine(Opts(st), comm.get());
    ASSERT_NE(engine, nullptr);
    EngineAccess access(engine.get());
    float losses[3];
    for (int i = 0; i < 3; ++i) {  // the second and third eval passes use the recorded stage-3 eval trace
      ZERO_ASSERT_OK(engine->BeginEval());
      losses[i] = ToyForward(access, ToyMicroBatch(0, 0, comm->rank(), comm->world_size(), 24));
      EXPECT_EQ(engine->Acquire(1, Pass::kBackward).code(), StatusCode::kFailedPrecondition);
      ZERO_ASSERT_OK(engine->EndEval());
    }
    EXPECT_EQ(losses[0], losses[1]);
    EXPECT_EQ(losses[1], losses[2]);
    const StepResult r = TrainToyStep(*engine, *comm, 0, 1, 24);
    EXPECT_EQ(r.step, 1);
    ZERO_ASSERT_OK(engine->BeginEval());
    const float after = ToyForward(access, ToyMicroBatch(0, 0, comm->rank(), comm->world_size(), 24));
    ZERO_ASSERT_OK(engine->EndEval());
    EXPECT_LT(after, losses[0]) << "one AdamW step on the same batch should lower its loss";
    EXPECT_FALSE(access.failed());
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, EngineErrorsTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); });

}  // namespace
}  // namespace zero::testing

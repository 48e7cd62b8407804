// Dynamic loss scaling (fp16 parameters), with DeepSpeed's semantics and the test setting growth interval 4,
// hysteresis 2: an inf injected into one rank's gradient makes every rank skip the step; the first overflow
// leaves the scale, the second in a row halves it, four clean steps since the last overflow double it. Skipped
// steps change nothing: parameters, fp32 master, Adam state and the step count stay bit for bit.
// Parameterised on the backend: on CUDA (`*cuda*`) the overflow comes from the kernel trainer's gradient on the
// device and the engine's non-finite check runs there; without a GPU those cases skip, saying why.
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "testing/device_copy.h"
#include "testing/device_memory.h"
#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

// The engine's optimizer-side state, as bytes: fp32 master and both Adam moments on this rank (copied from the
// device on CUDA, after the device has finished: this reads the engine's internals, which nothing orders).
std::vector<char> OptimizerState(Engine& engine) {
  const auto& impl = EngineTestPeer::State(engine);
  std::vector<char> out;
  if (engine.options().backend == Backend::kCuda) {
    EXPECT_TRUE(DeviceSynchronize().ok());
  }
  for (const DeviceBuffer* b : {&impl.master, &impl.state0, &impl.state1}) {
    const size_t at = out.size();
    out.resize(at + static_cast<size_t>(b->bytes()));
    if (b->bytes() == 0) continue;
    if (engine.options().backend == Backend::kCuda && b->kind() == MemoryKind::kDevice) {
      EXPECT_TRUE(CopyFromDevice(out.data() + at, b->data(), b->bytes()).ok());
    } else {
      std::memcpy(out.data() + at, b->data(), static_cast<size_t>(b->bytes()));
    }
  }
  return out;
}

Options ScaledOptions(Stage stage, Backend backend) {
  Options o = SmallToyOptions(stage);
  o.backend = backend;
  o.param_dtype = DType::kF16;
  o.loss_scale.growth_interval = 4;
  o.loss_scale.hysteresis = 2;
  return o;
}

constexpr int kB2W3 = 5;  // b2.w3, whose gradient overflows when asked

// One step of one micro-step; with `inject`, +inf in b2.w3's gradient on the last rank only.
StepResult RunStep(Engine& engine, Comm& comm, int step, bool inject) {
  ToyStepOptions o;
  o.poison_param = inject && comm.rank() == comm.world_size() - 1 ? kB2W3 : -1;
  return TrainToyStep(engine, comm, step, 1, 24, o);
}

class LossScaleTest : public ::testing::TestWithParam<std::tuple<Stage, Backend>> {};

TEST_P(LossScaleTest, OverflowsSkipEveryRankAndDriveTheScale) {
  ZERO_BACKEND_COMM(comm, std::get<1>(GetParam()));
  auto engine = OpenToyEngine(ScaledOptions(std::get<0>(GetParam()), std::get<1>(GetParam())), comm.get());
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->LossScale(), 65536.0f);  // fp16 defaults to the dynamic scaler at 2^16

  const auto params0 = GatherToyParams(*engine);
  const auto state0 = OptimizerState(*engine);
  // One overflow (on one rank only): every rank skips, the scale stays (hysteresis 2).
  StepResult r = RunStep(*engine, *comm, 0, /*inject=*/true);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.step, 0);
  EXPECT_EQ(r.loss_scale, 65536.0f);
  EXPECT_EQ(engine->LossScale(), 65536.0f);
  EXPECT_EQ(GatherToyParams(*engine), params0) << "a skipped step changed parameters";
  EXPECT_EQ(OptimizerState(*engine), state0) << "a skipped step changed the master or Adam state";
  // The second in a row halves it.
  r = RunStep(*engine, *comm, 1, /*inject=*/true);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.step, 0);
  EXPECT_EQ(engine->LossScale(), 32768.0f);
  EXPECT_EQ(GatherToyParams(*engine), params0);
  EXPECT_EQ(OptimizerState(*engine), state0);
  // Four clean steps since the last overflow double it (after the fourth).
  for (int i = 0; i < 4; ++i) {
    r = RunStep(*engine, *comm, 2 + i, /*inject=*/false);
    EXPECT_FALSE(r.skipped);
    EXPECT_EQ(r.step, i + 1) << "skipped steps must not count";
    EXPECT_EQ(r.loss_scale, 32768.0f);
    EXPECT_TRUE(std::isfinite(r.grad_norm));
    EXPECT_EQ(engine->LossScale(), i < 3 ? 32768.0f : 65536.0f) << "after clean step " << i + 1;
  }
  EXPECT_NE(GatherToyParams(*engine), params0) << "clean steps must train";
  // The hysteresis was restored with the growth: one overflow is tolerated again.
  r = RunStep(*engine, *comm, 6, /*inject=*/true);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(engine->LossScale(), 65536.0f);
}

INSTANTIATE_TEST_SUITE_P(Stages, LossScaleTest,
                         ::testing::Combine(::testing::Values(Stage::kDataParallel, Stage::kGradients,
                                                              Stage::kParameters),
                                            ::testing::Values(Backend::kCpu, Backend::kCuda)),
                         [](const ::testing::TestParamInfo<std::tuple<Stage, Backend>>& info) {
                           return "stage" + std::to_string(static_cast<int>(std::get<0>(info.param))) + "_" +
                                  BackendName(std::get<1>(info.param));
                         });

class LossScaleEdgeTest : public ::testing::TestWithParam<Backend> {};

// At the minimum scale an overflow cannot be cured: Step says so on every rank, skips, and the engine goes on.
TEST_P(LossScaleEdgeTest, OverflowAtTheMinimumScaleIsReported) {
  ZERO_BACKEND_COMM(comm, GetParam());
  Options o = ScaledOptions(Stage::kGradients, GetParam());
  o.loss_scale.initial = 2.0f;
  o.loss_scale.min_scale = 1.0f;
  o.loss_scale.hysteresis = 1;
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  StepResult r;
  ToyStepOptions overflow;
  overflow.poison_param = comm->rank() == 0 ? kB2W3 : -1;
  for (int step = 0; step < 2; ++step) {
    RunToyMicroSteps(*engine, *comm, step, 1, 24, overflow);
    const Status s = engine->Step(StepArgs(), &r);
    EXPECT_TRUE(r.skipped);
    if (step == 0) {
      ZERO_EXPECT_OK(s);  // 2 -> 1
      EXPECT_EQ(engine->LossScale(), 1.0f);
    } else {
      EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
      EXPECT_TRUE(Contains(s, "minimum loss scale")) << s.ToString();
      EXPECT_TRUE(Contains(s, "rank " + std::to_string(comm->rank()))) << s.ToString();
    }
  }
  ZERO_EXPECT_OK(engine->healthy());
  r = TrainToyStep(*engine, *comm, 2, 1, 24);
  EXPECT_FALSE(r.skipped);
  EXPECT_EQ(r.step, 1);
}

TEST_P(LossScaleEdgeTest, ScaleOptionsAreValidated) {
  ZERO_BACKEND_COMM(comm, GetParam());
  Options o = ScaledOptions(Stage::kGradients, GetParam());
  o.loss_scale.initial = 1000.0f;  // not a power of two: unscaling would not be exact
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "powers of two")) << s.ToString();
  o = ScaledOptions(Stage::kGradients, GetParam());
  o.param_dtype = DType::kI64;
  s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "param_dtype")) << s.ToString();
  // bf16 and fp32 train with a fixed scale of 1 unless asked otherwise.
  o = SmallToyOptions(Stage::kGradients);
  o.backend = GetParam();
  o.param_dtype = DType::kBF16;
  auto bf16 = OpenToyEngine(o, comm.get());
  ASSERT_NE(bf16, nullptr);
  EXPECT_EQ(bf16->LossScale(), 1.0f);
}

INSTANTIATE_TEST_SUITE_P(Backends, LossScaleEdgeTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); });

}  // namespace
}  // namespace zero::testing

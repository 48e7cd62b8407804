// The stream/event protocol (src/engine_impl.h's table), asserted on the engine's event log and on the
// communication thread itself, not on time: reductions overlap backward (or wait for its end when overlap is
// off), GradsReady does not wait for its reduction, the in-flight bound and overlap setting do not change any
// bit of the result, and a stalled collective ends in a timeout status on every rank.
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

using Kind = Engine::Event::Kind;

struct Config {
  Stage stage;
  bool overlap;
};

std::string Name(const ::testing::TestParamInfo<Config>& info) {
  return std::string("stage") + std::to_string(static_cast<int>(info.param.stage)) +
         (info.param.overlap ? "_overlap" : "_no_overlap");
}

class OverlapTest : public ::testing::TestWithParam<Config> {};

// With overlap on, each reduction is issued inside its unit's GradsReady, before the next unit's GradsReady;
// with overlap off, only after the micro-step's last GradsReady. Stages 0-1 reduce on the last micro-step only.
TEST_P(OverlapTest, ReductionsAreIssuedWhereTheSettingSays) {
  const Config c = GetParam();
  auto comm = WorldComm();
  Options o = SmallToyOptions(c.stage);
  o.overlap_reductions = c.overlap;
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  EngineTestPeer::Hooks(*engine).log_events = true;
  constexpr int kMicros = 2;
  for (int step = 0; step < 2; ++step) TrainToyStep(*engine, *comm, step, kMicros, 24);

  int grads_ready = 0, last_ready_unit = -1, reductions = 0;
  for (const Engine::Event& e : engine->TEST_events()) {
    if (e.kind == Kind::kGradsReady) {
      ++grads_ready;
      last_ready_unit = e.unit;
    } else if (e.kind == Kind::kReduce) {
      ++reductions;
      if (c.overlap) {
        EXPECT_EQ(e.unit, last_ready_unit) << "bucket " << e.bucket << " was not reduced inside its GradsReady";
      } else {
        EXPECT_EQ(grads_ready % kToyUnits, 0) << "bucket " << e.bucket << " was reduced before the last GradsReady";
      }
    }
  }
  const bool every_micro = c.stage == Stage::kGradients || c.stage == Stage::kParameters;
  EXPECT_GT(reductions, 0);
  // Every trainable bucket once per reducing micro-step: the log has as many reductions either way.
  int buckets = 0;
  for (const Engine::Event& e : engine->TEST_events()) buckets += e.kind == Kind::kReduce;
  EXPECT_EQ(buckets % (2 * (every_micro ? kMicros : 1)), 0);
}

INSTANTIATE_TEST_SUITE_P(AllStages, OverlapTest,
                         ::testing::Values(Config{Stage::kDataParallel, true}, Config{Stage::kDataParallel, false},
                                           Config{Stage::kOptimizerStates, true},
                                           Config{Stage::kOptimizerStates, false}, Config{Stage::kGradients, true},
                                           Config{Stage::kGradients, false}, Config{Stage::kParameters, true},
                                           Config{Stage::kParameters, false}),
                         Name);

// Holds the communication thread at a gate while a unit's GradsReady runs: GradsReady must return while its
// reduction sits, started, on the communication thread (a synchronous reduction would never return).
class GateAtGradsReady : public EngineAccess {
 public:
  GateAtGradsReady(Engine* engine, int unit) : EngineAccess(engine), engine_(engine), unit_(unit) {}
  void GradsReady(int unit) override {
    if (unit != unit_ || done_) {
      EngineAccess::GradsReady(unit);
      return;
    }
    done_ = true;
    EngineTestHooks& hooks = EngineTestPeer::Hooks(*engine_);
    hooks.gate = &gate_;
    hooks.gate_waiting = &waiting_;
    EngineAccess::GradsReady(unit);  // launches the unit's reductions behind the closed gate
    hooks.gate = nullptr;
    hooks.gate_waiting = nullptr;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!waiting_.load(std::memory_order_relaxed) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    held_ = waiting_.load(std::memory_order_relaxed);
    gate_.store(true, std::memory_order_relaxed);
  }
  bool held() const { return held_; }

 private:
  Engine* engine_;
  int unit_;
  bool done_ = false;
  bool held_ = false;
  std::atomic<bool> gate_{false};
  std::atomic<bool> waiting_{false};
};

class AsyncTest : public ::testing::TestWithParam<Stage> {};

TEST_P(AsyncTest, GradsReadyReturnsWhileItsReductionIsHeldOnTheCommunicationThread) {
  auto comm = WorldComm();
  Options o = SmallToyOptions(GetParam());
  o.reductions_in_flight = 64;  // never wait for an earlier reduction in this test
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
  GateAtGradsReady access(engine.get(), /*unit=*/3);  // the first unit backward reaches with trainables
  ToyForwardBackward(access, ToyMicroBatch(0, 0, comm->rank(), comm->world_size(), 24));
  EXPECT_TRUE(access.held()) << "the reduction never started on the communication thread";
  StepResult r;
  ZERO_ASSERT_OK(engine->Step(StepArgs(), &r));
}

INSTANTIATE_TEST_SUITE_P(AllStages, AsyncTest,
                         ::testing::Values(Stage::kDataParallel, Stage::kOptimizerStates, Stage::kGradients,
                                           Stage::kParameters),
                         [](const ::testing::TestParamInfo<Stage>& info) {
                           return std::string("stage") + std::to_string(static_cast<int>(info.param));
                         });

// Where reductions are issued and how many may be in flight changes when work happens, never its result.
TEST(ProtocolTest, OverlapAndInFlightBoundLeaveEveryBitUnchanged) {
  auto comm = WorldComm();
  for (Stage st : {Stage::kDataParallel, Stage::kOptimizerStates, Stage::kGradients, Stage::kParameters}) {
    SCOPED_TRACE(StageName(st));
    std::vector<std::vector<std::vector<float>>> results;
    for (int variant = 0; variant < 3; ++variant) {
      Options o = SmallToyOptions(st);
      o.overlap_reductions = variant != 1;
      o.reductions_in_flight = variant == 2 ? 1 : 4;
      auto engine = OpenToyEngine(o, comm.get());
      ASSERT_NE(engine, nullptr);
      for (int step = 0; step < 3; ++step) TrainToyStep(*engine, *comm, step, 2, 24);
      results.push_back(GatherToyParams(*engine));
    }
    EXPECT_EQ(results[0], results[1]) << "overlap off changed the result";
    EXPECT_EQ(results[0], results[2]) << "reductions_in_flight = 1 changed the result";
  }
}

// A rank whose reduction stalls past the communicator's timeout: every rank's next waiting call returns the
// timeout (the stalled rank as the abort its peer sent), naming the reduction, its bucket and the step.
TEST(ProtocolPeerTest, StalledReductionEndsInTheTimeoutStatusOnEveryRank) {
  auto comm = WorldComm(std::chrono::milliseconds(400));
  const int stalled = comm->world_size() - 1;
  auto engine = OpenToyEngine(SmallToyOptions(Stage::kGradients), comm.get());
  ASSERT_NE(engine, nullptr);
  TrainToyStep(*engine, *comm, 0, 1, 24);  // a healthy step first
  ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
  EngineTestHooks& hooks = EngineTestPeer::Hooks(*engine);
  hooks.stall_rank = stalled;
  hooks.stall = std::chrono::milliseconds(2000);  // the next collective this rank issues: the first reduction
  // Forward launches nothing on stage 2, so the stall lands on the first reduction of backward. Calls may fail
  // from here on (the failure surfaces at the first call that waits); keep going like a trainer would.
  class Lenient : public ToyAccess {
   public:
    explicit Lenient(Engine* e) : e_(e), scratch_(4096, 0.0f) {}
    void Acquire(int u, bool b) override { (void)e_->Acquire(u, b ? Pass::kBackward : Pass::kForward); }
    void Release(int u, bool b) override { (void)e_->Release(u, b ? Pass::kBackward : Pass::kForward); }
    void GradsReady(int u) override { (void)e_->GradsReady(u); }
    float* Param(int p) override { return Or(e_->Param(p).as<float>()); }
    float* Grad(int p) override { return Or(e_->Grad(p).as<float>()); }

   private:
    float* Or(float* p) { return p != nullptr ? p : scratch_.data(); }
    Engine* e_;
    std::vector<float> scratch_;
  } access(engine.get());
  ToyForwardBackward(access, ToyMicroBatch(1, 0, comm->rank(), comm->world_size(), 24));
  StepResult r;
  const Status s = engine->Step(StepArgs(), &r);
  ASSERT_FALSE(s.ok());
  // The stalled rank learns of the timeout from a peer's abort notice; a peer may also get the notice of
  // another peer whose timeout fired first. Either way the status carries the timeout and where it happened.
  if (comm->rank() == stalled) {
    EXPECT_EQ(s.code(), StatusCode::kAborted) << s.ToString();
  } else {
    EXPECT_TRUE(s.code() == StatusCode::kTimeout || s.code() == StatusCode::kAborted) << s.ToString();
  }
  EXPECT_TRUE(Contains(s, "did not complete within 400 ms")) << s.ToString();
  EXPECT_TRUE(Contains(s, "reduction of bucket")) << s.ToString();
  EXPECT_TRUE(Contains(s, "step 1")) << s.ToString();
  EXPECT_FALSE(engine->healthy().ok());
}

}  // namespace
}  // namespace zero::testing

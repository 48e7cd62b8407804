// A trainer's own collectives on the Comm it gave the engine (comm.h, "A trainer and its Engine"): loss
// averaging, metrics and agreement between every pair of engine calls, in every stage, with offload and
// overlapped reductions, and from a second thread while the main thread trains. The engine works on a private
// duplicate of the Comm, so none of these interleave with its queued reductions and gathers: each trainer
// collective returns the right value, and the training result is bitwise the one of a trainer that issues none.
// (Before, the first all-reduce after Step met the post-step all-gathers on the same communicator and failed with
// kMismatch or waited out the timeout.)
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

// Issues one of four kinds of collective on `comm` in turn and checks its result: all-reduce (sum of rank + 1
// and of the call count), all-gather of the ranks, broadcast from a rotating root, barrier.
class Chatter {
 public:
  explicit Chatter(Comm* comm) : comm_(comm) {}

  void Talk() {
    const int n = comm_->world_size(), r = comm_->rank();
    const int64_t k = calls_++;
    Status s;
    switch (k % 4) {
      case 0: {
        const int64_t mine[2] = {r + 1, k};
        int64_t sum[2] = {0, 0};
        s = comm_->AllReduce(mine, sum, 2, DType::kI64, ReduceOp::kSum);
        if (s.ok() && (sum[0] != int64_t{n} * (n + 1) / 2 || sum[1] != k * n)) Wrong("AllReduce", k);
        break;
      }
      case 1: {
        const double mine = r + 0.5;
        std::vector<double> all(static_cast<size_t>(n), -1.0);
        s = comm_->AllGather(&mine, all.data(), 1, DType::kF64);
        for (int i = 0; s.ok() && i < n; ++i) {
          if (all[static_cast<size_t>(i)] != i + 0.5) Wrong("AllGather", k);
        }
        break;
      }
      case 2: {
        const int root = static_cast<int>(k / 4 % n);
        int64_t v = r == root ? 1000 + k : -1;
        s = comm_->Broadcast(&v, 1, DType::kI64, root);
        if (s.ok() && v != 1000 + k) Wrong("Broadcast", k);
        break;
      }
      default:
        s = comm_->Barrier();
    }
    if (!s.ok()) {
      ++failures_;
      ADD_FAILURE() << "trainer collective " << k << " on rank " << r << ": " << s.ToString();
    }
  }
  int64_t calls() const { return calls_; }
  int failures() const { return failures_; }

 private:
  void Wrong(const char* what, int64_t k) {
    ++failures_;
    ADD_FAILURE() << "trainer " << what << " " << k << " on rank " << comm_->rank() << " returned a wrong value";
  }
  Comm* comm_;
  int64_t calls_ = 0;
  int failures_ = 0;
};

// EngineAccess that talks on the trainer's Comm before and after every engine call the toy model makes.
class ChattyAccess : public EngineAccess {
 public:
  ChattyAccess(Engine* engine, Chatter* chat) : EngineAccess(engine), chat_(chat) {}
  void Acquire(int unit, bool backward) override {
    chat_->Talk();
    EngineAccess::Acquire(unit, backward);
    chat_->Talk();
  }
  void Release(int unit, bool backward) override {
    chat_->Talk();
    EngineAccess::Release(unit, backward);
    chat_->Talk();
  }
  void GradsReady(int unit) override {
    chat_->Talk();
    EngineAccess::GradsReady(unit);
    chat_->Talk();
  }

 private:
  Chatter* chat_;
};

struct Config {
  Stage stage;
  bool offload;         // offload_optimizer (stages 1-3)
  bool offload_params;  // stage 3
  bool overlap;
  Backend backend = Backend::kCpu;
};

std::string Name(const ::testing::TestParamInfo<Config>& info) {
  const Config& c = info.param;
  return "stage" + std::to_string(static_cast<int>(c.stage)) + (c.offload ? "_offload" : "") +
         (c.offload_params ? "_params" : "") + (c.overlap ? "_overlap" : "_no_overlap") +
         (c.backend == Backend::kCuda ? "_cuda" : "");
}

Options ConfigOptions(const Config& c) {
  Options o = SmallToyOptions(c.stage);
  o.backend = c.backend;
  o.offload_optimizer = c.offload;
  o.offload_params = c.offload_params;
  o.overlap_reductions = c.overlap;
  o.reductions_in_flight = 2;  // more queued work on the engine's side while the trainer talks
  return o;
}

constexpr int kSteps = 3, kMicros = 2, kGlobalBatch = 24;

// Trains kSteps steps; with `chat`, talks between every pair of engine calls (micro-steps, Step, an eval pass and a
// GatherFull scope included). Returns every parameter's final values.
std::vector<std::vector<float>> Train(const Config& c, Comm* comm, Chatter* chat) {
  auto engine = OpenToyEngine(ConfigOptions(c), comm);
  if (engine == nullptr) return {};
  auto talk = [&] {
    if (chat != nullptr) chat->Talk();
  };
  for (int step = 0; step < kSteps; ++step) {
    for (int m = 0; m < kMicros; ++m) {
      talk();
      ZERO_EXPECT_OK(engine->BeginMicroStep(m, m == kMicros - 1));
      talk();
      const ToyBatch batch = ToyMicroBatch(step, m, comm->rank(), comm->world_size(), kGlobalBatch);
      if (chat != nullptr) {
        ChattyAccess access(engine.get(), chat);
        ToyForwardBackward(access, batch, engine->LossScale());
      } else {
        EngineAccess access(engine.get());
        ToyForwardBackward(access, batch, engine->LossScale());
      }
    }
    talk();
    StepResult r;
    ZERO_EXPECT_OK(engine->Step(StepArgs(), &r));
    talk();  // right after Step: stages 1-2 (and 3's persistent units) are gathering on the engine's side
    // An eval pass in the middle of training.
    ZERO_EXPECT_OK(engine->BeginEval());
    talk();
    if (chat != nullptr) {
      ChattyAccess access(engine.get(), chat);
      ToyForward(access, ToyMicroBatch(100 + step, 0, comm->rank(), comm->world_size(), kGlobalBatch));
    } else {
      EngineAccess access(engine.get());
      ToyForward(access, ToyMicroBatch(100 + step, 0, comm->rank(), comm->world_size(), kGlobalBatch));
    }
    talk();
    ZERO_EXPECT_OK(engine->EndEval());
    talk();
  }
  auto params = GatherToyParams(*engine);
  talk();
  return params;
}

class TrainerCollectivesTest : public ::testing::TestWithParam<Config> {};

TEST_P(TrainerCollectivesTest, BetweenEveryPairOfEngineCallsWithoutChangingABit) {
  ZERO_BACKEND_COMM(comm, GetParam().backend);
  Chatter chat(comm.get());
  const auto chatty = Train(GetParam(), comm.get(), &chat);
  const auto quiet = Train(GetParam(), comm.get(), nullptr);
  EXPECT_EQ(chat.failures(), 0);
  EXPECT_GT(chat.calls(), 100);
  ASSERT_EQ(chatty.size(), quiet.size());
  for (size_t p = 0; p < quiet.size(); ++p) {
    ASSERT_EQ(chatty[p].size(), quiet[p].size());
    for (size_t i = 0; i < quiet[p].size(); ++i) {
      ASSERT_EQ(chatty[p][i], quiet[p][i]) << "param " << p << " element " << i;  // fp32: bitwise
    }
  }
  // The engine's counters are its own: the trainer's collectives are not in them.
  EXPECT_TRUE(comm->health().ok());
}

INSTANTIATE_TEST_SUITE_P(
    AllStages, TrainerCollectivesTest,
    ::testing::Values(Config{Stage::kDataParallel, false, false, true}, Config{Stage::kDataParallel, false, false, false},
                      Config{Stage::kOptimizerStates, false, false, true},
                      Config{Stage::kOptimizerStates, true, false, true}, Config{Stage::kGradients, false, false, true},
                      Config{Stage::kGradients, false, false, false}, Config{Stage::kGradients, true, false, true},
                      Config{Stage::kParameters, false, false, true}, Config{Stage::kParameters, true, false, true},
                      Config{Stage::kParameters, true, true, true},
                      // Backend::kCuda: the trainer's collectives on host memory through the Comm the CUDA cases
                      // use (NcclComm stages them; StagedComm copies), while the engine's work is queued on its
                      // streams.
                      Config{Stage::kDataParallel, false, false, true, Backend::kCuda},
                      Config{Stage::kOptimizerStates, true, false, true, Backend::kCuda},
                      Config{Stage::kGradients, false, false, true, Backend::kCuda},
                      Config{Stage::kParameters, true, true, true, Backend::kCuda}),
    Name);

// A second thread owns the trainer's Comm (a data loader agreeing on batches, a metrics logger) while the main
// thread drives the engine: both make progress and neither sees the other's messages. On CUDA the second thread
// calls the runtime (its Comm's copies) while the main thread's kernels and the engine's copies are queued.
class TrainerCollectivesThreadTest : public ::testing::TestWithParam<Backend> {};

TEST_P(TrainerCollectivesThreadTest, ASecondThreadTalksWhileTheMainThreadTrains) {
  // comm.h: over NCCL the kernels of a Comm and its duplicates (the engine's) run in host issue order, so a trainer
  // issues its collectives from the thread that drives the engine; two threads issuing in different orders on
  // different ranks deadlock there by design (seen on the NCCL stand-in). The one-thread cases above cover NCCL;
  // this one runs its CUDA case over StagedComm (MPI between device buffers), which the contract allows.
  const char* forced = std::getenv("ZERO_TEST_STAGED_COMM");
  const std::string saved = forced == nullptr ? "" : forced;
  setenv("ZERO_TEST_STAGED_COMM", "1", 1);
  ZERO_BACKEND_COMM(comm, GetParam());
  if (forced == nullptr) {
    unsetenv("ZERO_TEST_STAGED_COMM");
  } else {
    setenv("ZERO_TEST_STAGED_COMM", saved.c_str(), 1);
  }
  ASSERT_FALSE(IsNcclComm(*comm));
  for (Stage stage : {Stage::kOptimizerStates, Stage::kGradients, Stage::kParameters}) {
    SCOPED_TRACE(std::to_string(static_cast<int>(stage)));
    const Config c{stage, stage != Stage::kGradients, false, true, GetParam()};
    const auto quiet = Train(c, comm.get(), nullptr);
    Chatter chat(comm.get());
    std::thread loader([&] {
      for (int i = 0; i < 400; ++i) chat.Talk();  // the same count on every rank, whatever the main thread does
    });
    auto engine = OpenToyEngine(ConfigOptions(c), comm.get());
    ASSERT_NE(engine, nullptr);
    for (int step = 0; step < kSteps; ++step) TrainToyStep(*engine, *comm, step, kMicros, kGlobalBatch);
    loader.join();
    EXPECT_EQ(chat.failures(), 0);
    EXPECT_EQ(chat.calls(), 400);
    const auto params = GatherToyParams(*engine);
    ASSERT_EQ(params.size(), quiet.size());
    // Train() evaluates between steps; evaluation changes no parameter, so the results are the same bits.
    for (size_t p = 0; p < quiet.size(); ++p) EXPECT_EQ(params[p], quiet[p]) << "param " << p;
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, TrainerCollectivesThreadTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); });

}  // namespace
}  // namespace zero::testing

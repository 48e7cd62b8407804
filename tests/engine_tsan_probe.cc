// Proof that the tsan phase would catch a missing wait in the engine's stream/event protocol: each test removes
// one wait through a test hook and ctest passes it only if ThreadSanitizer reports the data race that wait
// prevents. Built only with ZERO_SANITIZE=thread (tests/CMakeLists.txt); the same flows with the waits in place
// run clean in engine_protocol_test and the other suites of the tsan label.
//
//   SlotReadyEdge  (2 ranks, stage 3): Acquire returns without waiting for its gather; the trainer reads the
//                  slot that MPI then writes (an MPI-written edge: visible to TSan only through the range the
//                  communication thread reports after each MPI completion).
//   PoolFreeEdge   (1 rank, stage 2): BindPool zeroes a gradient buffer without waiting for the reduction that
//                  still reads it (a CPU-kernel edge: AccumulateCpu on the communication thread).
//
// The accesses are made unordered by synchronization on every schedule: the communication thread holds at a
// gate (relaxed atomics, which order nothing for TSan) until the trainer has made its access, and the trainer
// takes no lock between its access and opening the gate.
#include <atomic>
#include <chrono>
#include <thread>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

class Gate {
 public:
  void Close(EngineTestHooks& hooks) {
    hooks.gate = &open_;
    hooks.gate_waiting = &waiting_;
  }
  // Waits until a gated task holds the communication thread, then lets it go.
  void Open(EngineTestHooks& hooks) {
    hooks.gate = nullptr;
    hooks.gate_waiting = nullptr;
    while (!waiting_.load(std::memory_order_relaxed)) std::this_thread::yield();
    open_.store(true, std::memory_order_relaxed);
  }

 private:
  std::atomic<bool> open_{false};
  std::atomic<bool> waiting_{false};
};

volatile float g_sink = 0.0f;

class SlotReadyProbe : public EngineAccess {
 public:
  explicit SlotReadyProbe(Engine* e) : EngineAccess(e), e_(e) {}
  void Acquire(int unit, bool backward) override {
    if (unit != 1 || backward || done_) return EngineAccess::Acquire(unit, backward);
    done_ = true;
    EngineTestHooks& hooks = EngineTestPeer::Hooks(*e_);
    gate_.Close(hooks);
    hooks.skip_wait = EngineTestHooks::SkipWait::kSlotReady;
    EngineAccess::Acquire(unit, backward);  // the gather is queued behind the gate; nothing waits for it
    hooks.skip_wait = EngineTestHooks::SkipWait::kNone;
    float sum = 0.0f;
    for (int p : {1, 2, 3}) {  // unit 1's parameters: the whole slot, including the peer's shard
      const TensorView v = e_->Param(p);
      for (int64_t i = 0; i < v.numel; ++i) sum += v.as<float>()[i];
    }
    g_sink = sum;
    gate_.Open(hooks);
  }

 private:
  Engine* e_;
  Gate gate_;
  bool done_ = false;
};

TEST(EngineTsanProbe, SlotReadyEdge) {
  auto comm = WorldComm();
  Options o = SmallToyOptions(Stage::kParameters);
  o.prefetch_bytes = 0;
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  // The first step records the stage-3 order (its Acquires run an agreement check, which the gate would hold).
  TrainToyStep(*engine, *comm, 0, 1, 24);
  ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
  SlotReadyProbe access(engine.get());
  ToyForwardBackward(access, ToyMicroBatch(1, 0, comm->rank(), comm->world_size(), 24));
  StepResult r;
  ZERO_EXPECT_OK(engine->Step(StepArgs(), &r));
}

class PoolFreeProbe : public EngineAccess {
 public:
  explicit PoolFreeProbe(Engine* e) : EngineAccess(e), e_(e) {}
  void GradsReady(int unit) override {
    if (unit == 3) gate_.Close(EngineTestPeer::Hooks(*e_));  // unit 3's reduction waits at the gate
    EngineAccess::GradsReady(unit);
  }
  void Acquire(int unit, bool backward) override {
    if (unit != 1 || !backward) return EngineAccess::Acquire(unit, backward);
    EngineTestHooks& hooks = EngineTestPeer::Hooks(*e_);
    hooks.skip_wait = EngineTestHooks::SkipWait::kPoolFree;
    // Binds unit 3's buffer without waiting for its reduction (and the zeroing after it, on the communication
    // thread): unit 1's backward then adds into it while that thread still reads and zeroes it.
    EngineAccess::Acquire(unit, backward);
    hooks.skip_wait = EngineTestHooks::SkipWait::kNone;
    gate_.Open(hooks);
  }

 private:
  Engine* e_;
  Gate gate_;
};

TEST(EngineTsanProbe, PoolFreeEdge) {
  auto comm = WorldComm();
  Options o = SmallToyOptions(Stage::kGradients);
  o.reductions_in_flight = 64;
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  ZERO_ASSERT_OK(engine->BeginMicroStep(0, true));
  PoolFreeProbe access(engine.get());
  ToyForwardBackward(access, ToyMicroBatch(0, 0, comm->rank(), comm->world_size(), 24));
  StepResult r;
  ZERO_EXPECT_OK(engine->Step(StepArgs(), &r));
}

}  // namespace
}  // namespace zero::testing

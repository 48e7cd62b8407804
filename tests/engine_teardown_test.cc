// Teardown and long runs: an engine gives back everything it took, and running it does not grow the process.
//  * Every byte: destroying an Engine brings the process's device and host allocations (LiveBytes, every Device)
//    back to where they were, after training, a GatherFull scope, a checkpoint and its load.
//  * 100 engines opened and destroyed in one process: resident memory grows by less than 1 MiB after a warm-up
//    (the warm-up lets glibc's per-thread arenas and Open MPI's caches reach their steady size).
//  * Soak (release build only; SoakPeerTest, 3 ranks): 1,000 steps of stage 3 with optimizer and parameter offload and fp16
//    gradients under the dynamic loss scaler, whose growth keeps overflowing fp16 (skipped steps, scale halved);
//    resident memory after step 100 and after step 1,000 differ by less than 1 MiB, and the parameters equal a
//    stage-2 run without offload bitwise (same reductions per micro-step; stage 0 reduces the accumulated fp16
//    gradient once per step instead, which rounds differently).
// The first two are parameterised on the backend: on CUDA (`*cuda*`) every byte of device, pinned and pageable
// memory comes back too, and 50 engines with their streams, events and kernel-trained steps do not grow the
// process; without a GPU they skip, saying why. The soak stays on the CPU: 2,000 steps would take a GPU visit's
// whole time budget.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "device.h"
#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

[[maybe_unused]] int64_t ResidentBytes() {  // (unused in sanitizer builds)
  std::ifstream in("/proc/self/statm");
  int64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

Options Config(Stage stage, int offload, DType grad_dtype = DType::kF32, Backend backend = Backend::kCpu) {
  Options o = SmallToyOptions(stage);
  o.backend = backend;
  o.offload_optimizer = offload >= 1;
  o.offload_params = offload >= 2;
  o.grad_dtype = grad_dtype;
  return o;
}

class TeardownTest : public ::testing::TestWithParam<Backend> {};

TEST_P(TeardownTest, EveryByteIsReturned) {
  const Backend b = GetParam();
  ZERO_BACKEND_COMM(comm, b);
  for (const Options& o : {Config(Stage::kParameters, 2, DType::kF32, b),
                           Config(Stage::kDataParallel, 0, DType::kF32, b),
                           Config(Stage::kGradients, 1, DType::kBF16, b)}) {
    const int64_t device_before = LiveBytes(MemoryKind::kDevice);
    const int64_t pinned_before = LiveBytes(MemoryKind::kPinnedHost);
    const int64_t pageable_before = LiveBytes(MemoryKind::kPageableHost);
    {
      auto e = OpenToyEngine(o, comm.get());
      ASSERT_NE(e, nullptr);
      for (int s = 0; s < 2; ++s) TrainToyStep(*e, *comm, s, 2, 24);
      GatherToyParams(*e);  // a GatherFull scope allocates and frees its copies
      EXPECT_GT(LiveBytes(MemoryKind::kDevice), device_before);
      if (o.offload_optimizer) {
        EXPECT_GT(LiveBytes(MemoryKind::kPinnedHost), pinned_before);
      }
      ZERO_EXPECT_OK(e->healthy());
    }
    EXPECT_EQ(LiveBytes(MemoryKind::kDevice), device_before) << StageName(o.stage);
    EXPECT_EQ(LiveBytes(MemoryKind::kPinnedHost), pinned_before) << StageName(o.stage);
    EXPECT_EQ(LiveBytes(MemoryKind::kPageableHost), pageable_before) << StageName(o.stage);
  }
}

#if !ZERO_SANITIZED_BUILD  // ASan's quarantine of freed memory grows the resident set by design
TEST_P(TeardownTest, HundredEnginesDoNotGrowTheProcess) {
  ZERO_BACKEND_COMM(comm, GetParam());
  const Options o = Config(Stage::kParameters, 2, DType::kF32, GetParam());
  auto cycle = [&] {
    auto e = OpenToyEngine(o, comm.get());
    ASSERT_NE(e, nullptr);
    TrainToyStep(*e, *comm, 0, 2, 24);
  };
  // CUDA: half the engines (each opens streams, events and, over NCCL, a split communicator; a GPU visit is
  // short); the same 1 MiB bound still catches 20 KiB lost per engine.
  const int warm_up = GetParam() == Backend::kCuda ? 10 : 20, engines = GetParam() == Backend::kCuda ? 50 : 100;
  for (int i = 0; i < warm_up; ++i) cycle();  // warm-up: allocator arenas, MPI caches (and the CUDA runtime's)
  const int64_t before = ResidentBytes();
  for (int i = 0; i < engines; ++i) cycle();
  const int64_t growth = ResidentBytes() - before;
  EXPECT_LT(growth, int64_t{1} << 20) << "resident memory grew by " << growth << " bytes over " << engines
                                      << " engines";
}
#endif

INSTANTIATE_TEST_SUITE_P(Backends, TeardownTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); });

#if !ZERO_SANITIZED_BUILD  // ASan keeps freed memory in quarantine and TSan is 10x slower: release only
TEST(SoakPeerTest, ThousandStepsOfStage3OffloadFp16) {
  auto comm = WorldComm(std::chrono::milliseconds(60'000));
  Options o = Config(Stage::kParameters, 2, DType::kF16);
  o.bucket_elements = 40;
  o.loss_scale.initial = 1 << 20;      // above what the toy's fp16 gradients take: overflows at the start ...
  o.loss_scale.growth_interval = 25;   // ... and again whenever growth pushes the scale back up
  Options ref = o;
  ref.stage = Stage::kGradients;  // the same reduction schedule (every micro-step), no offload, no gathers
  ref.offload_optimizer = ref.offload_params = false;

  auto run = [&](const Options& opt, int64_t* rss100, int64_t* rss1000, int* skipped) {
    auto e = OpenToyEngine(opt, comm.get());
    EXPECT_NE(e, nullptr);
    for (int s = 0; s < 1000 && e != nullptr; ++s) {
      const StepResult r = TrainToyStep(*e, *comm, s % 50, 2, 24);  // 50 distinct batches, cycled
      *skipped += r.skipped ? 1 : 0;
      if (s == 99) *rss100 = ResidentBytes();
      if (s == 999) *rss1000 = ResidentBytes();
    }
    return e == nullptr ? std::vector<std::vector<float>>{} : GatherToyParams(*e);
  };
  int64_t a100 = 0, a1000 = 0, b100 = 0, b1000 = 0;
  int skipped = 0, ref_skipped = 0;
  const auto soak = run(o, &a100, &a1000, &skipped);
  const auto reference = run(ref, &b100, &b1000, &ref_skipped);
  EXPECT_GT(skipped, 10) << "the scaler should have overflowed repeatedly";
  EXPECT_EQ(skipped, ref_skipped);
  EXPECT_LT(std::abs(a1000 - a100), int64_t{1} << 20) << "resident memory: " << a100 << " after step 100, " << a1000
                                                       << " after step 1000";
  ASSERT_EQ(soak.size(), reference.size());
  for (size_t p = 0; p < soak.size(); ++p) {
    ASSERT_EQ(soak[p].size(), reference[p].size());
    for (size_t i = 0; i < soak[p].size(); ++i) {
      ASSERT_EQ(soak[p][i], reference[p][i]) << "param " << p << " element " << i;
    }
  }
  if (comm->rank() == 0) {
    std::printf("soak: %d of 1000 steps skipped on overflow; resident %lld -> %lld bytes (step 100 -> 1000)\n",
                skipped, static_cast<long long>(a100), static_cast<long long>(a1000));
  }
}
#endif

}  // namespace
}  // namespace zero::testing

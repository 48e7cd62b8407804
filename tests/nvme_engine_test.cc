// The engine with the NVMe tier (Options::nvme_path), with real MPI ranks (1-4):
//  * Equivalence: the toy model trained with the optimizer state (and stage-3 parameter shards) on the tier is bitwise
//    the run with that state in host memory: every step's norm, clip and loss scale, the final parameters, and the
//    saved master and optimizer state (this rank's checkpoint shard, byte for byte). Stages 1-3, AdamW and SGD, fp32,
//    bf16, fp16 with its loss scaler; 2, 3 and 4 bounce buffers; blocks of 4 KiB so that records span several.
//    Memory() equals zero::Estimate (device, host and NVMe bytes) and no optimizer byte is in host memory. On
//    Backend::kCuda too (three of the cases: in the cuda-emulated phase and in the GPU run, scripts/gpu).
//  * Checkpoints both ways: a tier run saved mid-way resumes without the tier (host offload, and on the device) and
//    the other way round, bitwise equal to the uninterrupted run.
//  * Faults, each seen on every rank with the file, bucket and fix: a full disk in the middle of a step (injected
//    ENOSPC), a short read, a flipped byte (checksum), a truncated and a removed file, a parameter read failing in
//    a stage-3 gather; at Open: a real full disk (a small loop-mounted ext4), an unwritable directory (read-only
//    mount), tmpfs. After any of them the engine refuses to go on: never a silently wrong update.
//  * Host budget: a budget the host-memory offload exceeds fails Open saying to use the tier; with the tier the same
//    model trains inside it; Stage::kAuto with a host budget and a directory picks the tier last.
// The tier's directory is under the working directory (the build tree: a real disk). A few seconds per rank count.
#include <fcntl.h>
#include <mpi.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"
#include "testing/small_fs.h"

namespace zero::testing {
namespace {

namespace fs = std::filesystem;

constexpr int kMicros = 2;
constexpr int kGlobalBatch = 24;  // divisible by 1, 2, 3 and 4 ranks
constexpr int kSteps = 8;

// A directory every rank sees (testing/mpi_env.h), under the working directory: the tier refuses tmpfs, which the
// system's temporary directory may be.
std::string SharedDir(const std::string& what) { return MakeSharedDir(fs::current_path(), "nvme_engine_" + what); }
void RemoveShared(const std::string& dir) { RemoveSharedDir(dir); }

struct Case {
  const char* name;
  Stage stage;
  OptimizerKind optimizer = OptimizerKind::kAdamW;
  DType param_dtype = DType::kF32;
  DType grad_dtype = DType::kF32;
  int offload = 1;           // 1: optimizer; 2: and the stage-3 parameter shards
  bool nvme_params = false;  // the shards on the tier too
  int buffers = 3;
  int64_t persist_bytes = 0;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

Options HostOffload(const Case& c) {
  Options o = StateCoverageOptions(c.stage, c.optimizer, c.param_dtype, c.grad_dtype, c.offload);
  o.persist_bytes = c.persist_bytes;
  return o;
}

Options WithTier(Options o, const Case& c, const std::string& dir) {
  o.nvme_path = dir;
  o.nvme_params = c.nvme_params;
  o.nvme_block_bytes = 4096;  // records of several blocks even for the toy model
  o.nvme_queue_depth = 2;
  o.nvme_buffers = c.buffers;
  return o;
}

struct TrainedRun {
  std::vector<StepResult> steps;
  std::vector<std::vector<float>> params;
  std::string shard;  // this rank's checkpoint shard: its parameters, master and optimizer state, raw
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Trains kSteps and saves; the engine is kept for further checks.
TrainedRun TrainAndSave(const Options& o, Comm& comm, const std::string& ckpt, std::unique_ptr<Engine>* keep = nullptr) {
  TrainedRun run;
  auto engine = OpenToyEngine(o, &comm);
  EXPECT_NE(engine, nullptr);
  if (engine == nullptr) return run;
  for (int s = 0; s < kSteps; ++s) run.steps.push_back(TrainToyStep(*engine, comm, s, kMicros, kGlobalBatch));
  run.params = GatherToyParams(*engine);
  const Status saved = engine->Save(ckpt, "final");
  EXPECT_TRUE(saved.ok()) << saved.ToString();
  char name[32];
  std::snprintf(name, sizeof(name), "shard-%05d.bin", comm.rank());
  run.shard = ReadFile(ckpt + "/final/" + name);
  if (keep != nullptr) *keep = std::move(engine);
  return run;
}

void ExpectBitwise(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  ASSERT_EQ(a.size(), b.size());
  int bad = 0;
  for (size_t p = 0; p < a.size(); ++p) {
    ASSERT_EQ(a[p].size(), b[p].size());
    for (size_t i = 0; i < a[p].size(); ++i) {
      if (std::memcmp(&a[p][i], &b[p][i], 4) != 0 && ++bad <= 5) {
        ADD_FAILURE() << "param " << p << " element " << i << ": " << a[p][i] << " vs " << b[p][i];
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Equivalence

class NvmeEquivalenceTest : public ::testing::TestWithParam<std::tuple<Case, Backend>> {};

TEST_P(NvmeEquivalenceTest, BitwiseEqualToTheStateInHostMemory) {
  const Case& c = std::get<0>(GetParam());
  const Backend backend = std::get<1>(GetParam());
  ZERO_BACKEND_COMM(comm, backend);
  const std::string dir = SharedDir(std::string("eq_") + c.name + "_" + BackendName(backend));
  Options host = HostOffload(c);
  host.backend = backend;
  const Options tier = WithTier(host, c, dir + "/nvme");
  const TrainedRun want = TrainAndSave(host, *comm, dir + "/host");
  std::unique_ptr<Engine> engine;
  const TrainedRun got = TrainAndSave(tier, *comm, dir + "/tier", &engine);
  ASSERT_NE(engine, nullptr);
  ASSERT_EQ(got.steps.size(), want.steps.size());
  int skipped = 0;
  for (size_t s = 0; s < want.steps.size(); ++s) {
    EXPECT_EQ(got.steps[s].grad_norm, want.steps[s].grad_norm) << "step " << s;
    EXPECT_EQ(got.steps[s].clip_coef, want.steps[s].clip_coef) << "step " << s;
    EXPECT_EQ(got.steps[s].loss_scale, want.steps[s].loss_scale) << "step " << s;
    EXPECT_EQ(got.steps[s].skipped, want.steps[s].skipped) << "step " << s;
    skipped += got.steps[s].skipped;
  }
  ExpectBitwise(got.params, want.params);
  if (comm->rank() == 0) {
    ASSERT_FALSE(want.shard.empty());  // (another rank may own nothing but padding at 3 ranks: an empty shard)
  }
  EXPECT_TRUE(got.shard == want.shard) << "the saved master and optimizer state differ";
  EXPECT_GT(engine->step(), kSteps / 2);  // trained (fp16 may skip a step or two while its scale settles)

  // Memory: exactly the estimate, the state on the tier and not in host memory.
  MemoryEstimate e;
  ZERO_ASSERT_OK(Estimate(ModelDescription::FromSpecs(ToySpecs()), comm->world_size(), tier, &e));
  const MemoryReport m = engine->Memory();
  for (int k = 0; k < kNumMemoryCategories; ++k) {
    const auto cat = static_cast<MemoryCategory>(k);
    EXPECT_EQ(m.device.Current(cat), e.Device(cat)) << MemoryCategoryName(cat);
    EXPECT_EQ(m.host.Current(cat), e.Host(cat)) << MemoryCategoryName(cat);
    EXPECT_EQ(m.nvme.Current(cat), e.Nvme(cat)) << MemoryCategoryName(cat);
  }
  EXPECT_EQ(m.host.Current(MemoryCategory::kOptimizer), 0);
  EXPECT_GT(m.nvme.Current(MemoryCategory::kOptimizer), 0);
  EXPECT_EQ(m.nvme.Current(MemoryCategory::kParams) > 0, c.nvme_params);
  if (c.nvme_params) {
    EXPECT_EQ(m.host.Current(MemoryCategory::kParams), 0);
  }
  EXPECT_EQ(e.NvmeBounceBytes() > 0, true);
  // A step reads and writes every optimizer record once (and, with the shards on the tier, the gathers read those).
  if (!c.nvme_params) {
    const NvmeStats before = engine->nvme_stats();
    const StepResult r = TrainToyStep(*engine, *comm, kSteps, kMicros, kGlobalBatch);
    const NvmeStats after = engine->nvme_stats();
    const int64_t file = EngineTestPeer::State(*engine).nvme->FileBytes(0);
    EXPECT_FALSE(r.skipped);
    EXPECT_EQ(after.bytes_read - before.bytes_read, file);
    EXPECT_EQ(after.bytes_written - before.bytes_written, file);
    EXPECT_GT(after.busy_seconds, before.busy_seconds);
  }
  // The files are the tier's: on the disk while the engine lives, gone with it.
  const std::string files = EngineTestPeer::State(*engine).nvme->dir();
  EXPECT_TRUE(fs::exists(files + "/optimizer.bin"));
  EXPECT_EQ(fs::exists(files + "/params.bin"), c.nvme_params);
  engine.reset();
  EXPECT_FALSE(fs::exists(files));
  if (comm->rank() == 0) std::printf("[ tier ] %s: %d steps bitwise equal, %d skipped\n", c.name, kSteps, skipped);
  RemoveShared(dir);
}

// The cases both backends run.
const Case kStage2Bf16FourBuffers{
    "stage2_adamw_bf16_four_buffers", Stage::kGradients, OptimizerKind::kAdamW, DType::kBF16, DType::kF32, 1, false, 4};
const Case kStage3ParamsOnNvmePersistent{"stage3_params_on_nvme_persistent",
                                         Stage::kParameters,
                                         OptimizerKind::kAdamW,
                                         DType::kF32,
                                         DType::kF32,
                                         2,
                                         true,
                                         3,
                                         512};
const Case kStage3SgdFp16ParamsOnNvme{"stage3_sgd_fp16_fp16grads_params_on_nvme",
                                      Stage::kParameters,
                                      OptimizerKind::kSgdMomentum,
                                      DType::kF16,
                                      DType::kF16,
                                      2,
                                      true,
                                      2};

std::string EquivalenceName(const ::testing::TestParamInfo<std::tuple<Case, Backend>>& i) {
  return std::string(std::get<0>(i.param).name) + "_" + BackendName(std::get<1>(i.param));
}

INSTANTIATE_TEST_SUITE_P(
    Configs, NvmeEquivalenceTest,
    ::testing::Combine(::testing::Values(Case{"stage1_adamw", Stage::kOptimizerStates},
                                         Case{"stage2_sgd_two_buffers", Stage::kGradients, OptimizerKind::kSgdMomentum,
                                              DType::kF32, DType::kF32, 1, false, 2},
                                         kStage2Bf16FourBuffers, Case{"stage3_adamw", Stage::kParameters},
                                         Case{"stage3_params_in_host_optimizer_on_nvme", Stage::kParameters,
                                              OptimizerKind::kAdamW, DType::kF32, DType::kF32, 2},
                                         kStage3ParamsOnNvmePersistent, kStage3SgdFp16ParamsOnNvme),
                       ::testing::Values(Backend::kCpu)),
    EquivalenceName);

// On the GPU the tier's bounce buffers are registered with CUDA (cudaHostRegister) and the device copies run on the
// engine's streams: the same bitwise claim against host offload on the same backend, for a stage-2 case, a stage-3
// case with the shards on the tier and a half-precision one. They run on the CUDA runtime's stand-in in the
// cuda-emulated phase of scripts/test.sh and on a GPU in the GPU run (scripts/gpu), at 1, 2 and 4 ranks; a plain
// build without a GPU skips them, saying why.
INSTANTIATE_TEST_SUITE_P(Cuda, NvmeEquivalenceTest,
                         ::testing::Combine(::testing::Values(kStage2Bf16FourBuffers, kStage3ParamsOnNvmePersistent,
                                                              kStage3SgdFp16ParamsOnNvme),
                                            ::testing::Values(Backend::kCuda)),
                         EquivalenceName);

// ---------------------------------------------------------------------------------------------------------------
// Checkpoints both ways

TEST(NvmeCheckpointTest, ATierCheckpointLoadsWithoutTheTierAndTheOtherWayRound) {
  auto comm = WorldComm();
  const std::string dir = SharedDir("ckpt");
  const Case c{"stage3", Stage::kParameters, OptimizerKind::kAdamW, DType::kF32, DType::kF32, 2, true};
  const Options host = HostOffload(c);
  const Options tier = WithTier(host, c, dir + "/nvme");
  Options device = host;  // no offload at all: fp32 results are bitwise the offloaded ones
  device.stage = Stage::kGradients;
  device.offload_optimizer = device.offload_params = false;
  auto resume = [&](const Options& o, const std::string& root) {
    std::unique_ptr<Engine> e;
    Status s = Engine::Open(o, comm.get(), ToySpecs(), &e);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (!s.ok()) return std::vector<std::vector<float>>();
    s = e->Load(root, "mid");
    EXPECT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(e->step(), kSteps / 2);
    for (int st = kSteps / 2; st < kSteps; ++st) TrainToyStep(*e, *comm, st, kMicros, kGlobalBatch);
    return GatherToyParams(*e);
  };
  // Saved with the tier, uninterrupted with the tier.
  std::vector<std::vector<float>> straight;
  {
    auto e = OpenToyEngine(tier, comm.get());
    ASSERT_NE(e, nullptr);
    for (int st = 0; st < kSteps / 2; ++st) TrainToyStep(*e, *comm, st, kMicros, kGlobalBatch);
    ZERO_ASSERT_OK(e->Save(dir + "/from_tier", "mid"));
    for (int st = kSteps / 2; st < kSteps; ++st) TrainToyStep(*e, *comm, st, kMicros, kGlobalBatch);
    straight = GatherToyParams(*e);
  }
  {
    SCOPED_TRACE("tier -> host offload");
    ExpectBitwise(resume(host, dir + "/from_tier"), straight);
  }
  {
    SCOPED_TRACE("tier -> device");
    ExpectBitwise(resume(device, dir + "/from_tier"), straight);
  }
  {
    SCOPED_TRACE("tier -> tier");
    ExpectBitwise(resume(tier, dir + "/from_tier"), straight);
  }
  // Saved in host memory, resumed on the tier (and on a stage-2 tier: optimizer state only).
  {
    auto e = OpenToyEngine(host, comm.get());
    ASSERT_NE(e, nullptr);
    for (int st = 0; st < kSteps / 2; ++st) TrainToyStep(*e, *comm, st, kMicros, kGlobalBatch);
    ZERO_ASSERT_OK(e->Save(dir + "/from_host", "mid"));
  }
  {
    SCOPED_TRACE("host offload -> tier");
    ExpectBitwise(resume(tier, dir + "/from_host"), straight);
  }
  // (Stage 2 accumulates micro-steps like stage 3 does, so its fp32 bits are the same; stage 1 adds them in
  // another order.)
  const Case s2{"stage2", Stage::kGradients};
  {
    SCOPED_TRACE("host offload -> stage-2 tier");
    ExpectBitwise(resume(WithTier(HostOffload(s2), s2, dir + "/nvme"), dir + "/from_host"), straight);
  }
  RemoveShared(dir);
}

// Export reads the master and the frozen shards from the tier, and stage-3 eval passes gather from it: the same
// bytes and the same loss as with the state in host memory.
TEST(NvmeCheckpointTest, ExportAndEvalReadTheTier) {
  auto comm = WorldComm();
  const std::string dir = SharedDir("export");
  const Case c{"stage3", Stage::kParameters, OptimizerKind::kAdamW, DType::kBF16, DType::kF32, 2, true};
  const Options host = HostOffload(c);
  const Options tier = WithTier(host, c, dir + "/nvme");
  std::string files[2];
  float losses[2];
  for (int k = 0; k < 2; ++k) {
    auto e = OpenToyEngine(k == 0 ? host : tier, comm.get());
    ASSERT_NE(e, nullptr);
    for (int st = 0; st < 3; ++st) TrainToyStep(*e, *comm, st, kMicros, kGlobalBatch);
    ZERO_ASSERT_OK(e->BeginEval());
    EngineAccess access(e.get());
    losses[k] = ToyForward(access, ToyMicroBatch(100, 0, comm->rank(), comm->world_size(), kGlobalBatch));
    ZERO_ASSERT_OK(e->EndEval());
    const std::string path = dir + "/export_" + std::to_string(k) + ".safetensors";
    ExportOptions eo;
    eo.dtype = DType::kF32;
    ZERO_ASSERT_OK(e->Export(path, eo));
    files[k] = ReadFile(path);
  }
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_FALSE(files[0].empty());
  EXPECT_TRUE(files[0] == files[1]) << "the exports differ";
  RemoveShared(dir);
}

// ---------------------------------------------------------------------------------------------------------------
// Faults: every rank gets a status naming the file, the bucket and the fix.

// ToyAccess that keeps going after a failed call (returning scratch memory) and remembers the first failure, so that
// a fault's status can be collected on every rank without failing the test.
class TolerantAccess : public ToyAccess {
 public:
  explicit TolerantAccess(Engine* e) : e_(e), scratch_(4096, 0.0f) {}
  void Acquire(int u, bool bwd) override { Note(e_->Acquire(u, bwd ? Pass::kBackward : Pass::kForward)); }
  void Release(int u, bool bwd) override { Note(e_->Release(u, bwd ? Pass::kBackward : Pass::kForward)); }
  void GradsReady(int u) override { Note(e_->GradsReady(u)); }
  float* Param(int p) override { return Or(e_->Param(p).as<float>()); }
  float* Grad(int p) override { return Or(e_->Grad(p).as<float>()); }
  void Note(const Status& s) {
    if (first.ok() && !s.ok()) first = s;
  }
  Status first;

 private:
  float* Or(float* p) { return p != nullptr ? p : scratch_.data(); }
  Engine* e_;
  std::vector<float> scratch_;
};

// One training step that does not stop at the first error; then healthy(), where a peer's abort shows. The first
// failure of all of it (OK when nothing failed).
Status StepUntilFailure(Engine& e, Comm& comm, int step) {
  TolerantAccess access(&e);
  for (int m = 0; m < kMicros && access.first.ok(); ++m) {
    access.Note(e.BeginMicroStep(m, m == kMicros - 1));
    if (!access.first.ok()) break;
    ToyForwardBackward(access, ToyMicroBatch(step, m, comm.rank(), comm.world_size(), kGlobalBatch), e.LossScale());
  }
  StepResult r;
  if (access.first.ok()) access.Note(e.Step(StepArgs(), &r));
  access.Note(e.healthy());
  // A peer's abort notice may still be on its way: a collective waits for it (a healthy run never gets here).
  if (access.first.ok()) access.Note(e.BeginMicroStep(0, true));
  return access.first;
}

// Every rank's status, checked on every rank.
void ExpectOnEveryRank(const Status& s, const std::vector<std::string>& texts, Comm& comm) {
  EXPECT_FALSE(s.ok()) << "rank " << comm.rank() << " saw nothing";
  for (const std::string& t : texts) EXPECT_TRUE(Contains(s, t)) << "rank " << comm.rank() << ": " << s.ToString();
  // And the engine refuses to go on: no later step can update from state that was not read.
  MPI_Barrier(MPI_COMM_WORLD);
}

class NvmeFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    comm_ = WorldComm(std::chrono::milliseconds(20'000));
    dir_ = SharedDir("fault");
  }
  void TearDown() override {
    engine_.reset();
    comm_.reset();
    RemoveShared(dir_);
  }
  // A trained engine (two steps) with the tier on the rank's disk.
  void Open(const Case& c) {
    engine_ = OpenToyEngine(WithTier(HostOffload(c), c, dir_ + "/nvme"), comm_.get());
    ASSERT_NE(engine_, nullptr);
    for (int s = 0; s < 2; ++s) TrainToyStep(*engine_, *comm_, s, kMicros, kGlobalBatch);
  }
  NvmeTier* Tier() { return EngineTestPeer::State(*engine_).nvme.get(); }
  int Victim() const { return comm_->world_size() - 1; }
  std::unique_ptr<Comm> comm_;
  std::string dir_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(NvmeFaultTest, AFullDiskInTheMiddleOfAStep) {
  Open(Case{"stage2", Stage::kGradients});
  if (comm_->rank() == Victim()) {
    Tier()->TEST_SetFault({IoFault::Op::kWrite, Tier()->TEST_fd(0), 1, ENOSPC, -1});
  }
  const Status s = StepUntilFailure(*engine_, *comm_, 2);
  ExpectOnEveryRank(s, {"No space left on device (ENOSPC)", "writing the optimizer state of bucket",
                        "optimizer.bin", "free space there", "rank " + std::to_string(Victim())},
                    *comm_);
  StepResult r;
  EXPECT_FALSE(engine_->Step(StepArgs(), &r).ok());
  EXPECT_FALSE(engine_->Save(dir_ + "/ckpt", "after").ok());
}

TEST_F(NvmeFaultTest, AShortRead) {
  Open(Case{"stage3", Stage::kParameters});
  if (comm_->rank() == Victim()) Tier()->TEST_SetFault({IoFault::Op::kRead, -1, 2, 0, 1024});
  Status s = StepUntilFailure(*engine_, *comm_, 2);
  ExpectOnEveryRank(s, {"short read", "the optimizer state of bucket", "truncated behind the engine's back"}, *comm_);
}

TEST_F(NvmeFaultTest, AFlippedByteFailsItsChecksum) {
  Open(Case{"stage1", Stage::kOptimizerStates});
  if (comm_->rank() == Victim()) {
    const std::string path = Tier()->Path(0);
    const int fd = ::open(path.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char c = 0;
    ASSERT_EQ(::pread(fd, &c, 1, 100), 1);  // the first record (bucket 0's master), its only block
    c = static_cast<char>(c ^ 1);
    ASSERT_EQ(::pwrite(fd, &c, 1, 100), 1);
    ::fsync(fd);
    ::close(fd);
  }
  const Status s = StepUntilFailure(*engine_, *comm_, 2);
  ExpectOnEveryRank(s, {"checksum mismatch in block 0", "the optimizer state of bucket 0", "Load the last checkpoint"},
                    *comm_);
}

TEST_F(NvmeFaultTest, ATruncatedAndARemovedFile) {
  Open(Case{"stage3", Stage::kParameters, OptimizerKind::kAdamW, DType::kF32, DType::kF32, 2, true});
  if (comm_->rank() == Victim()) {
    ASSERT_EQ(::truncate(Tier()->Path(0).c_str(), 4096), 0);
  }
  Status s = StepUntilFailure(*engine_, *comm_, 2);
  ExpectOnEveryRank(s, {"optimizer.bin (the optimizer state) was truncated to 4096 bytes", "Load the last checkpoint"},
                    *comm_);
  engine_.reset();
  Open(Case{"stage3", Stage::kParameters, OptimizerKind::kAdamW, DType::kF32, DType::kF32, 2, true});
  if (comm_->rank() == Victim()) {
    ASSERT_EQ(::unlink(Tier()->Path(1).c_str()), 0);
  }
  s = StepUntilFailure(*engine_, *comm_, 2);
  ExpectOnEveryRank(s, {"params.bin (the parameter shard) was removed behind the engine's back"}, *comm_);
}

TEST_F(NvmeFaultTest, AParameterReadFailingInAStage3Gather) {
  Open(Case{"stage3", Stage::kParameters, OptimizerKind::kAdamW, DType::kF32, DType::kF32, 2, true});
  if (comm_->rank() == Victim()) {
    Tier()->TEST_SetFault({IoFault::Op::kRead, Tier()->TEST_fd(1), 0, EIO, -1});
  }
  const Status s = StepUntilFailure(*engine_, *comm_, 2);
  ExpectOnEveryRank(s, {"Input/output error (EIO)", "reading the parameter shard of bucket", "params.bin"}, *comm_);
}

// Open on a disk too small for every rank's files: a real one (a loop-mounted ext4 of 1 MiB) when this process may
// mount, else a file-size limit (RLIMIT_FSIZE: EFBIG instead of ENOSPC). Every rank fails Open, the failing ones
// naming the disk, the others the failing rank.
TEST_F(NvmeFaultTest, ADiskTooSmallFailsOpenOnEveryRank) {
  std::unique_ptr<SmallFs> small;
  int mounted = 0;
  if (comm_->rank() == 0) mounted = SmallFs::Mount(dir_ + "/small", 1 << 20, false, &small).ok();
  MPI_Bcast(&mounted, 1, MPI_INT, 0, MPI_COMM_WORLD);
  Case c{"stage1", Stage::kOptimizerStates};
  Options o = WithTier(HostOffload(c), c, mounted ? dir_ + "/small" : dir_ + "/nvme");
  // The toy with a wide extra parameter: 512 Ki elements, 6 MiB of master, m and v over the world, at least
  // 1.5 MiB per rank at 4 ranks.
  std::vector<ParamSpec> specs = ToySpecs();
  specs.push_back(ParamSpec{"wide", {512 * 1024}, 3});
  o.bucket_elements = int64_t{1} << 20;
  rlimit old{};
  if (!mounted) {
    if (comm_->rank() == 0) std::printf("[ note ] no mount here: a file-size limit stands in for the full disk\n");
    std::signal(SIGXFSZ, SIG_IGN);
    getrlimit(RLIMIT_FSIZE, &old);
    rlimit small_limit{64 << 10, old.rlim_max};
    setrlimit(RLIMIT_FSIZE, &small_limit);
  }
  std::unique_ptr<Engine> e;
  const Status s = Engine::Open(o, comm_.get(), specs, &e);
  if (!mounted) setrlimit(RLIMIT_FSIZE, &old);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_TRUE(Contains(s, mounted ? "No space left on device (ENOSPC)" : "File too large (EFBIG)") ||
              Contains(s, "could not open its device or its NVMe tier"))
      << s.ToString();
  // A full disk names the bytes it lacked when preallocating a file; when another rank's files already filled it
  // before this rank could even create its directory, the ENOSPC of that step is what there is to say.
  if (Contains(s, "ENOSPC")) {
    EXPECT_TRUE(Contains(s, "bytes free") || Contains(s, "cannot create its directory")) << s.ToString();
  }
  MPI_Barrier(MPI_COMM_WORLD);
  small.reset();
}

TEST_F(NvmeFaultTest, AnUnwritableDirectoryAndTmpfsFailOpenOnEveryRank) {
  std::unique_ptr<SmallFs> ro;
  int mounted = 0;
  if (comm_->rank() == 0) mounted = SmallFs::Mount(dir_ + "/ro", 1 << 20, true, &ro).ok();
  MPI_Bcast(&mounted, 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::string root = dir_ + "/ro";
  if (!mounted) {
    root = geteuid() == 0 ? "/sys/fs" : dir_ + "/locked";
    if (comm_->rank() == 0 && geteuid() != 0) {
      fs::create_directories(root);
      fs::permissions(root, fs::perms::owner_read | fs::perms::owner_exec);
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  Case c{"stage2", Stage::kGradients};
  std::unique_ptr<Engine> e;
  Status s = Engine::Open(WithTier(HostOffload(c), c, root), comm_.get(), ToySpecs(), &e);
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_TRUE(Contains(s, "cannot create its directory in " + root)) << s.ToString();
  EXPECT_TRUE(Contains(s, "writable directory on a local disk")) << s.ToString();
  MPI_Barrier(MPI_COMM_WORLD);
  if (!mounted && geteuid() != 0 && comm_->rank() == 0) fs::permissions(root, fs::perms::owner_all);
  ro.reset();
  std::unique_ptr<TmpfsDir> tmp;
  ZERO_ASSERT_OK(TmpfsDir::Make(&tmp));
  s = Engine::Open(WithTier(HostOffload(c), c, tmp->dir()), comm_.get(), ToySpecs(), &e);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "is on tmpfs")) << s.ToString();
}

// ---------------------------------------------------------------------------------------------------------------
// The host budget and Stage::kAuto

// The toy with 24 more parameters of 16 Ki elements in its last unit (384 Ki elements, 4.5 MiB of master, m and v
// over the world): buckets of 16 Ki elements keep the bounce buffers small against the state. The extra parameters
// get no gradient from the toy's loss but go through the optimizer (weight decay) like any other.
constexpr int64_t kExtra = 16 * 1024;
std::vector<ParamSpec> BigToySpecs() {
  std::vector<ParamSpec> specs = ToySpecs();
  for (int i = 0; i < 24; ++i) specs.push_back(ParamSpec{"extra." + std::to_string(i), {kExtra}, 3});
  return specs;
}

Status InitBigToy(Engine& e) {
  return e.InitParams([](int p, int64_t off, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = p < kToyParams ? ToyInit(p, off + i) : 0.01f * static_cast<float>((off + i) % 7);
  });
}

TEST(NvmeBudgetTest, AModelWhoseStateExceedsTheHostBudgetTrainsOnTheTier) {
  auto comm = WorldComm();
  const std::string dir = SharedDir("budget");
  const std::vector<ParamSpec> specs = BigToySpecs();
  Case c{"stage2", Stage::kGradients};
  Options host = HostOffload(c);
  host.bucket_elements = kExtra;
  MemoryEstimate need;
  ZERO_ASSERT_OK(Estimate(ModelDescription::FromSpecs(specs), comm->world_size(), host, &need));
  const int64_t state = need.Host(MemoryCategory::kOptimizer);
  host.host_budget_bytes = state / 4;  // the optimizer state is 4x the budget
  std::unique_ptr<Engine> e;
  Status s = Engine::Open(host, comm.get(), specs, &e);
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  EXPECT_TRUE(Contains(s, "over Options::host_budget_bytes")) << s.ToString();
  EXPECT_TRUE(Contains(s, "Give Options::nvme_path")) << s.ToString();
  Options tier = WithTier(host, c, dir + "/nvme");
  tier.nvme_block_bytes = 64 << 10;
  s = Engine::Open(tier, comm.get(), specs, &e);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ZERO_ASSERT_OK(InitBigToy(*e));
  for (int st = 0; st < 3; ++st) TrainToyStep(*e, *comm, st, kMicros, kGlobalBatch);
  EXPECT_EQ(e->step(), 3);
  EXPECT_LE(e->Memory().host.peak_total, host.host_budget_bytes);
  EXPECT_GE(e->Memory().nvme.Current(MemoryCategory::kOptimizer), state);
  e.reset();
  RemoveShared(dir);
}

TEST(NvmeBudgetTest, StageAutoConsidersTheTierLast) {
  auto comm = WorldComm();
  const std::string dir = SharedDir("auto");
  Options o = HostOffload(Case{"auto", Stage::kGradients});
  o.stage = Stage::kAuto;
  o.offload_optimizer = o.offload_params = false;
  o.reserved_bytes = 0;
  o.nvme_path = dir + "/nvme";
  o.nvme_block_bytes = 64 << 10;
  o.bucket_elements = kExtra;
  AutoChoice all;
  const std::vector<ParamSpec> specs = BigToySpecs();
  const ModelDescription model = ModelDescription::FromSpecs(specs);
  ZERO_ASSERT_OK(ChooseConfiguration(model, comm->world_size(), o, std::numeric_limits<int64_t>::max(), &all));
  ASSERT_EQ(all.candidates.size(), 11u);  // the seven of before, then four with the tier
  for (size_t i = 0; i < 7; ++i) EXPECT_FALSE(all.candidates[i].nvme);
  for (size_t i = 7; i < 11; ++i) EXPECT_TRUE(all.candidates[i].nvme);
  EXPECT_EQ(ConfigurationName(all.candidates[10].stage, true, true, true, true), "stage 3 + parameter offload to NVMe");
  // The device fits only the offloaded configurations (the smallest of them exactly), the host budget only those
  // that keep the state on the tier: the first candidate that fits both, a tier one, is chosen, every rank alike.
  size_t smallest = 4;
  for (size_t i = 4; i < 7; ++i) {
    if (all.candidates[i].device_bytes < all.candidates[smallest].device_bytes) smallest = i;
  }
  o.device_capacity_bytes = all.candidates[smallest].device_bytes;
  o.host_budget_bytes = all.candidates[smallest + 3].host_bytes;  // the same configuration with the tier
  ASSERT_LT(o.host_budget_bytes, all.candidates[smallest].host_bytes);
  int expected = -1;
  for (size_t i = 0; i < all.candidates.size() && expected < 0; ++i) {
    const AutoCandidate& c = all.candidates[i];
    if (c.device_bytes <= o.device_capacity_bytes && c.host_bytes <= o.host_budget_bytes) expected = static_cast<int>(i);
  }
  ASSERT_GE(expected, 7) << "a configuration without the tier fits both budgets; the test's sizes need a look:\n"
                         << all.Explain();
  const AutoCandidate& want = all.candidates[static_cast<size_t>(expected)];
  std::unique_ptr<Engine> e;
  Status s = Engine::Open(o, comm.get(), specs, &e);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(e->options().stage, want.stage);
  EXPECT_EQ(e->options().offload_params, want.offload_params);
  EXPECT_EQ(e->options().nvme_params, want.nvme_params);
  EXPECT_TRUE(e->options().offload_optimizer);
  EXPECT_EQ(e->options().nvme_path, dir + "/nvme");
  EXPECT_NE(e->auto_choice().find("over the host budget"), std::string::npos) << e->auto_choice();
  EXPECT_LE(e->Memory().host.peak_total, o.host_budget_bytes);
  ZERO_ASSERT_OK(InitBigToy(*e));
  TrainToyStep(*e, *comm, 0, kMicros, kGlobalBatch);
  EXPECT_EQ(e->step(), 1);
  e.reset();
  // Without the directory nothing fits that budget.
  o.nvme_path.clear();
  s = Engine::Open(o, comm.get(), specs, &e);
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  EXPECT_TRUE(Contains(s, "give an NVMe directory")) << s.ToString();
  RemoveShared(dir);
}

// PlanTraining walks the same order: the tier's configurations last, each with and without recomputation.
TEST(NvmeBudgetTest, PlanTrainingConsidersTheTierLastToo) {
  TrainingRequest req;
  req.shape = TransformerShape{4, 256, 4, 4, 688, 1000, false, false};
  req.activations.seq_len = 64;
  req.world_size = 2;
  req.global_batch = 8;
  req.device_bytes = int64_t{1} << 40;
  req.options.nvme_path = "nvme";
  TrainingPlan plan;
  ZERO_ASSERT_OK(PlanTraining(req, &plan));
  ASSERT_EQ(plan.candidates.size(), 22u);  // 11 configurations x recompute off, on
  for (size_t i = 0; i < plan.candidates.size(); ++i) {
    EXPECT_EQ(plan.candidates[i].nvme, i >= 14) << i;
    if (plan.candidates[i].nvme) {
      EXPECT_GT(plan.candidates[i].nvme_bytes, 0) << i;
    }
  }
  ASSERT_GE(plan.chosen, 0);
  EXPECT_FALSE(plan.candidates[static_cast<size_t>(plan.chosen)].nvme);  // the device fits: never the tier
  EXPECT_TRUE(plan.options.nvme_path.empty());
}

}  // namespace
}  // namespace zero::testing

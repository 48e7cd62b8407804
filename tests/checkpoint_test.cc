// Engine::Save / Load / Export on the toy model, with real MPI ranks.
//  * Resume: 10 steps, save, 10 more equals 20 uninterrupted steps bitwise (same world and stage; every stage,
//    fp32/bf16/fp16 with the dynamic loss scaler, offload, SGD).
//  * Another world size (sub-communicators of this run: 4 -> 2, 1 -> 3, 2 -> 4, 3 -> 1, 2 -> 1, 1 -> 2 as far as
//    the run has ranks) and another stage (3 -> 1, 2 + offload -> 0, 0 -> 3): within the equivalence suite's
//    naive AdamW bound (1e-4 relative): the runs differ only in float summation order across ranks.
//  * Corruption (truncated file, flipped byte, missing rank file, wrong version, an index that does not match the
//    engine) fails with a clear status on every rank; an interrupted save leaves `latest` on the previous one.
//  * Export: the values written are the engine's fp32 parameters (the numpy check reads the file: ctest
//    checkpoint_export_numpy).
// Resume, reshard and corruption are parameterised on the backend: on CUDA (`*cuda*`) the same checks run with
// device memory, the toy model trained by kernels on the compute stream (testing/engine_harness.h) and the Comm
// of testing/backend_comm.h (NCCL, or a StagedComm when ranks share a GPU); they skip, saying why, without a GPU.
// Resharding on CUDA compares against the same naive bound: NCCL's sums differ from MPI's only in order.
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

namespace fs = std::filesystem;

constexpr int kMicros = 2;
constexpr int kGlobalBatch = 24;  // divisible by 1, 2, 3 and 4 ranks

struct Config {
  const char* name;
  Stage stage = Stage::kGradients;
  DType param_dtype = DType::kF32;
  DType grad_dtype = DType::kF32;
  int offload = 0;  // 1: optimizer; 2: and parameters (stage 3)
  OptimizerKind optimizer = OptimizerKind::kAdamW;
  bool own_stream = false;  // CUDA: the trainer computes on a non-blocking stream of its own (Options::cuda_stream)
};

void PrintTo(const Config& c, std::ostream* os) { *os << c.name; }

Options MakeOptions(const Config& c, Backend backend) {
  Options o = StateCoverageOptions(c.stage, c.optimizer, c.param_dtype, c.grad_dtype, c.offload);
  o.backend = backend;
  return o;
}

// A directory every rank sees (testing/mpi_env.h), under the system's temporary directory.
std::string SharedDir(const std::string& what) { return MakeSharedDir(fs::temp_directory_path(), "zero_ckpt_" + what); }
void RemoveShared(const std::string& dir) { RemoveSharedDir(dir); }

// A Comm for `backend` over the first n ranks of the world (null on the others). Collective over the world. The
// caller has made sure the backend runs here (every rank of a sub-communicator has a GPU if the world's do).
std::unique_ptr<Comm> SubComm(int n, Backend backend, MPI_Comm* raw) {
  const int color = WorldRank() < n ? 0 : MPI_UNDEFINED;
  MPI_Comm_split(MPI_COMM_WORLD, color, WorldRank(), raw);
  if (*raw == MPI_COMM_NULL) return nullptr;
  std::string skip;
  auto comm = BackendCommOver(*raw, backend, &skip);
  EXPECT_NE(comm, nullptr) << skip;
  return comm;
}

void FreeSub(std::unique_ptr<Comm>* comm, MPI_Comm* raw) {
  comm->reset();
  if (*raw != MPI_COMM_NULL) MPI_Comm_free(raw);
}

void Train(Engine& e, Comm& comm, int from, int to) {
  for (int s = from; s < to; ++s) TrainToyStep(e, comm, s, kMicros, kGlobalBatch);
}

double MaxRelDiff(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double worst = 0;
  for (size_t p = 0; p < a.size(); ++p) {
    for (size_t i = 0; i < a[p].size(); ++i) {
      const double d = std::fabs(static_cast<double>(a[p][i]) - b[p][i]) / std::max(1.0, std::fabs(double{b[p][i]}));
      worst = std::max(worst, d);
    }
  }
  return worst;
}

// ---------------------------------------------------------------------------------------------------------------
// Resume at the same world size and stage: bitwise.

class ResumeTest : public ::testing::TestWithParam<std::tuple<Config, Backend>> {};

TEST_P(ResumeTest, TenPlusTenEqualsTwentyBitwise) {
  const Config c = std::get<0>(GetParam());
  ZERO_BACKEND_COMM(comm, std::get<1>(GetParam()));
  Options o = MakeOptions(c, std::get<1>(GetParam()));
  TrainerStream own;  // outlives both engines
  if (c.own_stream) {
    ASSERT_TRUE(own.Create(*comm).ok());
    o.cuda_stream = own.get();  // Save and Load must wait for it: the optimizer's last writes are queued there
  }
  const std::string root = SharedDir("resume");

  auto a = OpenToyEngine(o, comm.get());
  ASSERT_NE(a, nullptr);
  Train(*a, *comm, 0, 10);
  ZERO_ASSERT_OK(a->Save(root, "step10", "data position 10"));
  Train(*a, *comm, 10, 20);
  const auto straight = GatherToyParams(*a);
  const float straight_scale = a->LossScale();
  EXPECT_TRUE(fs::exists(fs::path(root) / "step10" / "index.json"));
  EXPECT_FALSE(fs::exists(fs::path(root) / "step10.tmp"));

  std::unique_ptr<Engine> b;
  ZERO_ASSERT_OK(Engine::Open(o, comm.get(), ToySpecs(), &b));  // no InitParams: Load sets everything
  std::string meta;
  ZERO_ASSERT_OK(b->Load(root, "", &meta));  // latest
  EXPECT_EQ(meta, "data position 10");
  EXPECT_EQ(b->step(), 10);
  Train(*b, *comm, 10, 20);
  const auto resumed = GatherToyParams(*b);
  EXPECT_EQ(b->LossScale(), straight_scale);
  ASSERT_EQ(resumed.size(), straight.size());
  for (size_t p = 0; p < straight.size(); ++p) {
    ASSERT_EQ(resumed[p].size(), straight[p].size());
    for (size_t i = 0; i < straight[p].size(); ++i) {
      ASSERT_EQ(resumed[p][i], straight[p][i]) << "param " << p << " element " << i << " on rank " << comm->rank();
    }
  }
  RemoveShared(root);
}

INSTANTIATE_TEST_SUITE_P(
    Configs, ResumeTest,
    ::testing::Combine(
        ::testing::Values(Config{"stage0", Stage::kDataParallel}, Config{"stage1", Stage::kOptimizerStates},
                          Config{"stage2", Stage::kGradients}, Config{"stage3", Stage::kParameters},
                          Config{"stage1_sgd", Stage::kOptimizerStates, DType::kF32, DType::kF32, 0,
                                 OptimizerKind::kSgdMomentum},
                          Config{"stage0_bf16", Stage::kDataParallel, DType::kBF16, DType::kBF16},
                          Config{"stage2_bf16_offload", Stage::kGradients, DType::kBF16, DType::kF32, 1},
                          Config{"stage3_fp16_scaler", Stage::kParameters, DType::kF16, DType::kF16},
                          Config{"stage3_offload_params", Stage::kParameters, DType::kF32, DType::kF32, 2}),
        ::testing::Values(Backend::kCpu, Backend::kCuda)),
    [](const ::testing::TestParamInfo<std::tuple<Config, Backend>>& i) {
      return std::string(std::get<0>(i.param).name) + "_" + BackendName(std::get<1>(i.param));
    });

// The same on a trainer's own CUDA stream (CUDA only): stage 2 with optimizer offload (Save reads host moments
// the CPU AdamW wrote after the stream's copies), stage 3 with parameter offload.
INSTANTIATE_TEST_SUITE_P(
    TrainerStream, ResumeTest,
    ::testing::Combine(::testing::Values(Config{"stage2_offload_own_stream", Stage::kGradients, DType::kF32,
                                                DType::kF32, 1, OptimizerKind::kAdamW, true},
                                         Config{"stage3_own_stream", Stage::kParameters, DType::kF32, DType::kF32, 0,
                                                OptimizerKind::kAdamW, true},
                                         Config{"stage3_offload_params_own_stream", Stage::kParameters, DType::kF32,
                                                DType::kF32, 2, OptimizerKind::kAdamW, true}),
                       ::testing::Values(Backend::kCuda)),
    [](const ::testing::TestParamInfo<std::tuple<Config, Backend>>& i) {
      return std::string(std::get<0>(i.param).name) + "_" + BackendName(std::get<1>(i.param));
    });

// ---------------------------------------------------------------------------------------------------------------
// Another world size, another stage.

struct Reshard {
  int save_world, load_world;
  Config save, load;
  Backend backend;
};

// Saves after 10 steps on the first save_world ranks, loads on the first load_world ranks and trains 10 more;
// compares with 20 uninterrupted steps on the saving configuration (on world rank 0, which is in both).
void RunReshard(const Reshard& r) {
  const std::string root = SharedDir("reshard");
  std::vector<std::vector<float>> straight, resumed;
  {
    MPI_Comm raw;
    auto comm = SubComm(r.save_world, r.backend, &raw);
    if (comm != nullptr) {
      auto e = OpenToyEngine(MakeOptions(r.save, r.backend), comm.get());
      ASSERT_NE(e, nullptr);
      Train(*e, *comm, 0, 10);
      ZERO_ASSERT_OK(e->Save(root, "s"));
      Train(*e, *comm, 10, 20);
      straight = GatherToyParams(*e);
    }
    FreeSub(&comm, &raw);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  {
    MPI_Comm raw;
    auto comm = SubComm(r.load_world, r.backend, &raw);
    if (comm != nullptr) {
      std::unique_ptr<Engine> e;
      ZERO_ASSERT_OK(Engine::Open(MakeOptions(r.load, r.backend), comm.get(), ToySpecs(), &e));
      ZERO_ASSERT_OK(e->Load(root, "s"));
      EXPECT_EQ(e->step(), 10);
      Train(*e, *comm, 10, 20);
      resumed = GatherToyParams(*e);
    }
    FreeSub(&comm, &raw);
  }
  if (WorldRank() == 0) {
    ASSERT_EQ(straight.size(), resumed.size());
    // The naive AdamW bound of the equivalence suite (engine_equivalence_test.cc says why 1e-4).
    EXPECT_LT(MaxRelDiff(resumed, straight), 1e-4) << r.save.name << " x" << r.save_world << " -> " << r.load.name
                                                   << " x" << r.load_world;
  }
  RemoveShared(root);
}

class ReshardTest : public ::testing::TestWithParam<Backend> {
 protected:
  // Skips (on every rank) when the backend cannot run here; the probe Comm is dropped again.
  void SetUp() override {
    std::string skip;
    if (BackendComm(GetParam(), &skip) == nullptr && !skip.empty()) GTEST_SKIP() << skip;  // no GPU
  }
};

TEST_P(ReshardTest, OtherWorldSizes) {
  const int world = WorldSize();
  const Config s3{"stage3", Stage::kParameters};
  const Config s2{"stage2", Stage::kGradients};
  int ran = 0;
  for (auto [a, b] : {std::pair{4, 2}, std::pair{1, 3}, std::pair{2, 4}, std::pair{3, 1}, std::pair{2, 1},
                      std::pair{1, 2}}) {
    if (a > world || b > world) continue;
    RunReshard({a, b, s3, s2, GetParam()});
    ++ran;
  }
  if (world >= 2) {
    EXPECT_GE(ran, 2);
  }
}

TEST_P(ReshardTest, OtherStagesAndOffload) {
  const int w = WorldSize();
  const Backend b = GetParam();
  RunReshard({w, w, Config{"stage3", Stage::kParameters}, Config{"stage1", Stage::kOptimizerStates}, b});
  RunReshard({w, w, Config{"stage2_offload", Stage::kGradients, DType::kF32, DType::kF32, 1},
              Config{"stage0", Stage::kDataParallel}, b});
  RunReshard({w, w, Config{"stage0", Stage::kDataParallel},
              Config{"stage3_offload_params", Stage::kParameters, DType::kF32, DType::kF32, 2}, b});
}

// A bf16 engine's checkpoint loads into an fp32 engine as its fp32 master, exactly: the exported master (fp32)
// equals the fp32 engine's parameters bitwise.
TEST_P(ReshardTest, Bf16MasterLoadsIntoFp32Exactly) {
  ZERO_BACKEND_COMM(comm, GetParam());
  const std::string root = SharedDir("dtype");
  auto a = OpenToyEngine(MakeOptions({"bf16", Stage::kGradients, DType::kBF16, DType::kBF16}, GetParam()),
                         comm.get());
  ASSERT_NE(a, nullptr);
  Train(*a, *comm, 0, 5);
  ZERO_ASSERT_OK(a->Save(root, "bf16"));
  ZERO_ASSERT_OK(a->Export(root + "/master.safetensors"));
  std::unique_ptr<Engine> b;
  ZERO_ASSERT_OK(Engine::Open(MakeOptions({"fp32", Stage::kParameters}, GetParam()), comm.get(), ToySpecs(), &b));
  ZERO_ASSERT_OK(b->Load(root, "bf16"));
  const auto loaded = GatherToyParams(*b);
  // Read the export back: header JSON then raw little-endian fp32 in spec order.
  std::ifstream in(root + "/master.safetensors", std::ios::binary);
  uint64_t hlen = 0;
  in.read(reinterpret_cast<char*>(&hlen), 8);
  in.seekg(static_cast<std::streamoff>(8 + hlen));
  for (size_t p = 0; p < loaded.size(); ++p) {
    std::vector<float> v(loaded[p].size());
    in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
    ASSERT_TRUE(in.good());
    for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], loaded[p][i]) << "param " << p << " element " << i;
  }
  RemoveShared(root);
}

INSTANTIATE_TEST_SUITE_P(Backends, ReshardTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& i) { return BackendName(i.param); });

// ---------------------------------------------------------------------------------------------------------------
// Corruption and interrupted saves.

class CorruptionTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    std::string skip;
    comm_ = BackendComm(GetParam(), &skip);
    if (comm_ == nullptr && !skip.empty()) GTEST_SKIP() << skip;  // no GPU
    ASSERT_NE(comm_, nullptr);
    root_ = SharedDir("corrupt");
    engine_ = OpenToyEngine(Stage3(), comm_.get());
    ASSERT_NE(engine_, nullptr);
    // 256-byte blocks: the parameters and the optimizer state of a shard file are in different blocks.
    EngineTestPeer::Hooks(*engine_).checkpoint_block_bytes = 256;
    Train(*engine_, *comm_, 0, 3);
    ZERO_ASSERT_OK(engine_->Save(root_, "good"));
    before_ = GatherToyParams(*engine_);
  }
  void TearDown() override {
    if (!root_.empty()) RemoveShared(root_);
  }
  Options Opts(const Config& c) const { return MakeOptions(c, GetParam()); }
  Options Stage3() const { return Opts({"stage3", Stage::kParameters}); }

  // Runs `damage` on world rank 0 only, then loads "good" on every rank and expects `code` with `text` in the
  // message on every rank.
  Status LoadAfter(const std::function<void(const fs::path&)>& damage) {
    if (WorldRank() == 0) damage(fs::path(root_) / "good");
    MPI_Barrier(MPI_COMM_WORLD);
    return engine_->Load(root_, "good");
  }
  std::unique_ptr<Comm> comm_;
  std::string root_;
  std::unique_ptr<Engine> engine_;
  std::vector<std::vector<float>> before_;
};

void FlipByte(const fs::path& file, int64_t at) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(at);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(at);
  f.write(&c, 1);
}

std::string Slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST_P(CorruptionTest, TruncatedFile) {
  const Status s = LoadAfter([](const fs::path& d) {
    fs::resize_file(d / "shard-00000.bin", fs::file_size(d / "shard-00000.bin") - 1);
  });
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Contains(s, "shard-00000.bin")) << s.ToString();
  EXPECT_TRUE(Contains(s, "truncated")) << s.ToString();
  // Found before any state changed: the engine goes on with its parameters.
  ZERO_EXPECT_OK(engine_->healthy());
  EXPECT_EQ(MaxRelDiff(GatherToyParams(*engine_), before_), 0.0);
}

TEST_P(CorruptionTest, FlippedByteInParameters) {
  const Status s = LoadAfter([](const fs::path& d) { FlipByte(d / "shard-00000.bin", 3); });
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Contains(s, "checksum mismatch")) << s.ToString();
  EXPECT_TRUE(Contains(s, "shard-00000.bin")) << s.ToString();
  if (comm_->rank() != 0) {
    EXPECT_TRUE(Contains(s, "on rank 0")) << s.ToString();  // who found it
  }
  ZERO_EXPECT_OK(engine_->healthy());
  EXPECT_EQ(MaxRelDiff(GatherToyParams(*engine_), before_), 0.0);
}

TEST_P(CorruptionTest, FlippedByteInOptimizerStateNeedsAnotherLoad) {
  // The optimizer state is the file's tail: found after the parameters were placed. (Rank 0's file: with the
  // toy's small buckets, high ranks of a 4-rank world own nothing and write empty files.)
  const Status s = LoadAfter([&](const fs::path& d) {
    FlipByte(d / "shard-00000.bin", static_cast<int64_t>(fs::file_size(d / "shard-00000.bin")) - 2);
  });
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Contains(s, "checksum mismatch")) << s.ToString();
  const Status next = engine_->BeginMicroStep(0, true);
  EXPECT_EQ(next.code(), StatusCode::kDataLoss) << next.ToString();
  EXPECT_TRUE(Contains(next, "call Load (another checkpoint) or InitParams")) << next.ToString();
  // A good checkpoint makes it usable again.
  if (WorldRank() == 0) {
    fs::remove_all(fs::path(root_) / "good");
  }
  MPI_Barrier(MPI_COMM_WORLD);
  Status again = engine_->Load(root_, "good");
  EXPECT_FALSE(again.ok());  // gone now
  engine_.reset();
  auto fresh = OpenToyEngine(Stage3(), comm_.get());
  Train(*fresh, *comm_, 0, 3);
  ZERO_ASSERT_OK(fresh->Save(root_, "good2"));
  std::unique_ptr<Engine> e;
  ZERO_ASSERT_OK(Engine::Open(Stage3(), comm_.get(), ToySpecs(), &e));
  ZERO_ASSERT_OK(e->Load(root_, "good2"));
  EXPECT_EQ(MaxRelDiff(GatherToyParams(*e), before_), 0.0);
}

TEST_P(CorruptionTest, RecoversWithLoadAfterFailedStateRead) {
  ZERO_ASSERT_OK(engine_->Save(root_, "second"));
  const Status s = LoadAfter([&](const fs::path& d) {
    FlipByte(d / "shard-00000.bin", static_cast<int64_t>(fs::file_size(d / "shard-00000.bin")) - 1);
  });
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_FALSE(engine_->healthy().ok());
  ZERO_ASSERT_OK(engine_->Load(root_, "second"));
  ZERO_EXPECT_OK(engine_->healthy());
  EXPECT_EQ(engine_->step(), 3);
  EXPECT_EQ(MaxRelDiff(GatherToyParams(*engine_), before_), 0.0);
  Train(*engine_, *comm_, 3, 4);
  ZERO_EXPECT_OK(engine_->healthy());
}

TEST_P(CorruptionTest, MissingRankFile) {
  const Status s = LoadAfter([](const fs::path& d) { fs::remove(d / "shard-00000.bin"); });
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_TRUE(Contains(s, "shard-00000.bin")) << s.ToString();
  ZERO_EXPECT_OK(engine_->healthy());
}

TEST_P(CorruptionTest, WrongVersion) {
  const Status s = LoadAfter([](const fs::path& d) {
    std::string j = Slurp(d / "index.json");
    const size_t at = j.find("\"version\": 1");
    ASSERT_NE(at, std::string::npos);
    j.replace(at, 12, "\"version\": 7");
    std::ofstream(d / "index.json", std::ios::trunc) << j;
  });
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Contains(s, "format version 7")) << s.ToString();
  ZERO_EXPECT_OK(engine_->healthy());
}

TEST_P(CorruptionTest, MalformedIndex) {
  const Status s = LoadAfter([](const fs::path& d) {
    std::string j = Slurp(d / "index.json");
    std::ofstream(d / "index.json", std::ios::trunc) << j.substr(0, j.size() / 2);
  });
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Contains(s, "not valid JSON")) << s.ToString();
}

TEST_P(CorruptionTest, IndexDoesNotMatchTheEngine) {
  std::vector<ParamSpec> specs = ToySpecs();
  specs[1].name = "b1.renamed";
  std::unique_ptr<Engine> other;
  ZERO_ASSERT_OK(Engine::Open(Stage3(), comm_.get(), specs, &other));
  Status s = other->Load(root_, "good");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "no parameter 'b1.renamed'")) << s.ToString();

  specs = ToySpecs();
  specs[0].shape = {kDim, kVocab};  // same count, other shape
  ZERO_ASSERT_OK(Engine::Open(Stage3(), comm_.get(), specs, &other));
  s = other->Load(root_, "good");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "another shape")) << s.ToString();

  Config sgd{"sgd", Stage::kParameters};
  sgd.optimizer = OptimizerKind::kSgdMomentum;
  ZERO_ASSERT_OK(Engine::Open(Opts(sgd), comm_.get(), ToySpecs(), &other));
  s = other->Load(root_, "good");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "adamw state")) << s.ToString();
}

TEST_P(CorruptionTest, InterruptedSaveKeepsThePreviousCheckpoint) {
  // Rank 0's disk fails after 100 bytes of its shard (rank 0 owns data at every world size).
  EngineTestPeer::Hooks(*engine_).save_fail_rank = 0;
  EngineTestPeer::Hooks(*engine_).save_fail_after = 100;
  Train(*engine_, *comm_, 3, 5);
  const Status s = engine_->Save(root_, "broken");
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_TRUE(Contains(s, "injected fault")) << s.ToString();
  EXPECT_FALSE(fs::exists(fs::path(root_) / "broken"));
  EXPECT_EQ(Slurp(fs::path(root_) / "latest"), "good\n");
  ZERO_EXPECT_OK(engine_->healthy());
  // `latest` loads: the state of step 3.
  std::unique_ptr<Engine> e;
  ZERO_ASSERT_OK(Engine::Open(Stage3(), comm_.get(), ToySpecs(), &e));
  ZERO_ASSERT_OK(e->Load(root_));
  EXPECT_EQ(e->step(), 3);
  EXPECT_EQ(MaxRelDiff(GatherToyParams(*e), before_), 0.0);
  // The next save with the same tag replaces the leftover .tmp directory, all of it: a stray file and a nested
  // directory planted in it are gone, and a symbolic link in it is removed without following it (the directory it
  // points to keeps its file).
  const fs::path leftover = fs::path(root_) / "broken.tmp", outside = fs::path(root_) / "outside";
  if (WorldRank() == 0) {
    fs::create_directories(leftover / "nested" / "deeper");  // the failed save's .tmp, or a new one
    std::ofstream(leftover / "nested" / "deeper" / "stray") << "stray";
    std::ofstream(leftover / "stray") << "stray";
    fs::create_directories(outside);
    std::ofstream(outside / "keep") << "keep";
    fs::create_directory_symlink(outside, leftover / "link");
  }
  MPI_Barrier(MPI_COMM_WORLD);
  EngineTestPeer::Hooks(*engine_).save_fail_rank = -1;
  ZERO_EXPECT_OK(engine_->Save(root_, "broken"));
  EXPECT_EQ(Slurp(fs::path(root_) / "latest"), "broken\n");
  EXPECT_FALSE(fs::exists(leftover));
  const fs::path saved = fs::path(root_) / "broken";
  EXPECT_FALSE(fs::exists(saved / "stray") || fs::exists(saved / "nested") || fs::exists(saved / "link"));
  EXPECT_EQ(Slurp(outside / "keep"), "keep");
}

TEST_P(CorruptionTest, SaveRejectsBadCalls) {
  Status s = engine_->Save(root_, "good");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Contains(s, "never overwritten")) << s.ToString();
  s = engine_->Save(root_, "a/b");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  s = engine_->Save(root_, "latest");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  ZERO_ASSERT_OK(engine_->BeginMicroStep(0, true));
  s = engine_->Save(root_, "mid");
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_TRUE(Contains(s, "call Step first")) << s.ToString();
  s = engine_->Load(root_, "nothere");
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  ZERO_EXPECT_OK(engine_->healthy());
}

TEST_P(CorruptionTest, SmallBlocksVerifyEachReadBlock) {
  // 64-byte blocks (the smallest the format allows): the toy's shard files have tens of blocks, and fragments
  // straddle block boundaries.
  EngineTestPeer::Hooks(*engine_).checkpoint_block_bytes = 64;
  ZERO_ASSERT_OK(engine_->Save(root_, "blocks"));
  std::unique_ptr<Engine> e;
  ZERO_ASSERT_OK(Engine::Open(Opts({"stage1", Stage::kOptimizerStates}), comm_.get(), ToySpecs(), &e));
  ZERO_ASSERT_OK(e->Load(root_, "blocks"));
  EXPECT_EQ(MaxRelDiff(GatherToyParams(*e), before_), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Backends, CorruptionTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& i) { return BackendName(i.param); });

// ---------------------------------------------------------------------------------------------------------------
// Export for the numpy check (ctest fixture): ZERO_EXPORT_DIR receives model.safetensors, adapters.safetensors
// (trainable only) and ref/<name>.f32 with each parameter's values.

TEST(ExportFixture, WritesFilesForNumpy) {
  // Without the variable: a temporary directory, and only the file sizes are checked here.
  const char* dir_env = std::getenv("ZERO_EXPORT_DIR");
  const std::string dir = dir_env != nullptr ? std::string(dir_env) : SharedDir("exportfx");
  auto comm = WorldComm();
  auto e = OpenToyEngine(MakeOptions({"stage3_bf16", Stage::kParameters, DType::kBF16, DType::kF32}, Backend::kCpu),
                         comm.get());
  ASSERT_NE(e, nullptr);
  Train(*e, *comm, 0, 3);
  ExportOptions eo;
  for (const ParamSpec& s : e->specs()) eo.names.push_back("model." + s.name);
  eo.metadata = {{"format", "pt"}};
  ZERO_ASSERT_OK(e->Export(dir + "/model.safetensors", eo));
  eo.trainable_only = true;
  eo.dtype = DType::kBF16;
  ZERO_ASSERT_OK(e->Export(dir + "/adapters.safetensors", eo));
  // The reference: the frozen parameter's bf16 values and the trainable ones' fp32 masters (exported f32).
  std::unique_ptr<Engine> f32;
  const std::string root = SharedDir("export");
  ZERO_ASSERT_OK(e->Save(root, "x"));
  ZERO_ASSERT_OK(Engine::Open(MakeOptions({"f32", Stage::kParameters}, Backend::kCpu), comm.get(), ToySpecs(), &f32));
  ZERO_ASSERT_OK(f32->Load(root, "x"));
  const auto values = GatherToyParams(*f32);
  if (comm->rank() == 0) {
    fs::create_directories(dir + "/ref");
    for (size_t p = 0; p < values.size(); ++p) {
      std::ofstream out(dir + "/ref/model." + e->specs()[p].name + ".f32", std::ios::binary);
      out.write(reinterpret_cast<const char*>(values[p].data()), static_cast<std::streamsize>(values[p].size() * 4));
    }
  }
  RemoveShared(root);
  if (dir_env == nullptr) {
    int64_t all = 0, trainable = 0;
    for (const ParamSpec& s : e->specs()) {
      all += s.numel() * 4;
      trainable += s.trainable ? s.numel() * 2 : 0;
    }
    const auto data_bytes = [](const fs::path& p) {
      std::ifstream in(p, std::ios::binary);
      uint64_t h = 0;
      in.read(reinterpret_cast<char*>(&h), 8);
      return static_cast<int64_t>(fs::file_size(p)) - 8 - static_cast<int64_t>(h);
    };
    EXPECT_EQ(data_bytes(dir + "/model.safetensors"), all);
    EXPECT_EQ(data_bytes(dir + "/adapters.safetensors"), trainable);
    RemoveShared(dir);
  }
}

}  // namespace
}  // namespace zero::testing

// docs/ERRORS.md is the table of what zero checks and what it says. This test reads it and, for every row whose
// test column is `errors_table_test`, provokes the error here and requires the documented status code and the
// quoted text in the message (on every rank). A row without a case here, or a case without a row, fails: the
// table and the code cannot drift apart. Rows naming another test are checked to name one.
// Parameterised on the backend: every row checked here applies to CUDA too (options, specs, the protocol, Save,
// Load and Export of a device-memory engine; `open-backend-comm` is the mirror case there, a kCpu engine over a
// CUDA Comm), so the CUDA case (`*cuda*`) provokes every row again over NCCL or a StagedComm
// (testing/backend_comm.h). kCpuOnlyRows lists the rows that would not apply; none does today. Without a GPU the
// CUDA case skips, saying why.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

namespace fs = std::filesystem;

struct Row {
  std::string id, status, text, test;
};

std::vector<std::string> Cells(const std::string& line) {
  std::vector<std::string> cells;
  std::stringstream ss(line);
  std::string cell;
  std::getline(ss, cell, '|');  // before the first bar
  while (std::getline(ss, cell, '|')) {
    const size_t b = cell.find_first_not_of(' '), e = cell.find_last_not_of(' ');
    cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
  }
  if (!cells.empty() && cells.back().empty()) cells.pop_back();
  return cells;
}

std::string Unquote(const std::string& s) {
  return s.size() >= 2 && s.front() == '`' && s.back() == '`' ? s.substr(1, s.size() - 2) : s;
}

std::vector<Row> ReadTable() {
  std::ifstream in(ZERO_ERRORS_MD);
  EXPECT_TRUE(in.good()) << "cannot read " << ZERO_ERRORS_MD;
  std::vector<Row> rows;
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("| `", 0) != 0) continue;
    const std::vector<std::string> c = Cells(line);
    EXPECT_EQ(c.size(), 6u) << "a row of docs/ERRORS.md does not have 6 cells: " << line;
    if (c.size() != 6) continue;
    rows.push_back({Unquote(c[0]), c[3], Unquote(c[4]), c[5]});
  }
  return rows;
}

// Rows of docs/ERRORS.md checked on the CPU backend only, with the reason. Empty: every row applies to CUDA.
const std::map<std::string, std::string> kCpuOnlyRows = {};

// Each case provokes one row's error and returns the status.
class Cases {
 public:
  Cases(Comm* comm, Backend backend) : comm_(comm), backend_(backend) {}

  std::map<std::string, std::function<Status()>> All() {
    std::map<std::string, std::function<Status()>> m;
    auto opt = [&](std::function<void(Options&)> change, Stage stage = Stage::kGradients) {
      return [this, change, stage] {
        Options o = Small(stage);
        change(o);
        std::unique_ptr<Engine> e;
        return Engine::Open(o, comm_, ToySpecs(), &e);
      };
    };
    auto spec = [&](std::function<void(std::vector<ParamSpec>&)> change) {
      return [this, change] {
        std::vector<ParamSpec> specs = ToySpecs();
        change(specs);
        std::unique_ptr<Engine> e;
        return Engine::Open(Small(Stage::kGradients), comm_, specs, &e);
      };
    };
    m["open-comm-null"] = [] {
      std::unique_ptr<Engine> e;
      return Engine::Open(Options(), nullptr, ToySpecs(), &e);
    };
    m["open-bucket"] = opt([](Options& o) { o.bucket_elements = 0; });
    m["open-stage"] = opt([](Options& o) { o.stage = static_cast<Stage>(7); });
    m["open-auto-reserved"] = opt([](Options& o) { o.stage = Stage::kAuto; });
    m["open-auto-activations"] = opt([](Options& o) {
      o.stage = Stage::kAuto;
      o.activation_model = TransformerShape{2, 64, 0, 0, 128, 100, false, false};  // no heads
      o.activation_options.seq_len = 16;
    });
    m["open-auto-offload"] = opt([](Options& o) {
      o.stage = Stage::kAuto;
      o.reserved_bytes = 0;
      o.offload_optimizer = true;
    });
    m["open-reserved"] = opt([](Options& o) { o.reserved_bytes = -5; });
    m["open-clip"] = opt([](Options& o) { o.clip_norm = std::nan(""); });
    m["open-pool"] = opt([](Options& o) { o.grad_pool_buffers = 0; });
    m["open-slots"] = opt([](Options& o) { o.gather_slots = 0; });
    m["open-in-flight"] = opt([](Options& o) { o.reductions_in_flight = 0; });
    m["open-prefetch"] = opt([](Options& o) { o.prefetch_bytes = -1; });
    m["open-persist"] = opt([](Options& o) { o.persist_bytes = -1; });
    m["open-capacity-negative"] = opt([](Options& o) { o.device_capacity_bytes = -1; });
    m["open-threads"] = opt([](Options& o) { o.cpu_threads = -1; });
    m["open-param-dtype"] = opt([](Options& o) { o.param_dtype = DType::kF64; });
    m["open-grad-dtype"] = opt([](Options& o) { o.grad_dtype = DType::kU8; });
    m["open-scale-pow2"] = opt([](Options& o) { o.loss_scale.initial = 1000.0f; });
    m["open-scale-interval"] = opt([](Options& o) { o.loss_scale.hysteresis = 0; });
    m["open-offload-stage0"] = opt([](Options& o) { o.offload_optimizer = true; }, Stage::kDataParallel);
    m["open-offload-params"] = opt([](Options& o) { o.offload_params = true; }, Stage::kParameters);
    m["open-keep-gathered"] = opt([](Options& o) { o.keep_gathered_units = {7}; });
    m["open-nvme-offload"] = opt([](Options& o) { o.nvme_path = "nvme"; });
    m["open-nvme-params"] = opt([](Options& o) {
      o.offload_optimizer = true;
      o.nvme_params = true;
    }, Stage::kParameters);
    m["open-nvme-block"] = opt([](Options& o) { o.nvme_block_bytes = 5000; });
    m["open-nvme-queue"] = opt([](Options& o) { o.nvme_queue_depth = 0; });
    m["open-nvme-buffers"] = opt([](Options& o) { o.nvme_buffers = 1; });
    m["open-host-budget-negative"] = opt([](Options& o) { o.host_budget_bytes = -1; });
    m["open-host-budget"] = opt([](Options& o) {
      o.offload_optimizer = true;
      o.host_budget_bytes = 1;
    });
    m["open-zeropp-bits"] = opt([](Options& o) { o.zeropp.qgz_bits = 3; });
    m["open-zeropp-stage"] = opt([](Options& o) { o.zeropp.hpz = true; }, Stage::kGradients);
    m["open-zeropp-stage0"] = opt([](Options& o) { o.zeropp.qgz_bits = 8; }, Stage::kDataParallel);
    m["open-zeropp-auto"] = opt([](Options& o) {
      o.stage = Stage::kAuto;
      o.reserved_bytes = 0;
      o.zeropp.qwz = true;
    });
    m["open-adamw-lr"] = opt([](Options& o) { o.adamw.lr = -1; });
    m["open-adamw-betas"] = opt([](Options& o) { o.adamw.beta2 = 1.0f; });
    m["open-adamw-eps"] = opt([](Options& o) { o.adamw.eps = 0; });
    m["open-adamw-wd"] = opt([](Options& o) { o.adamw.weight_decay = -0.1f; });
    m["open-sgd-momentum"] = opt([](Options& o) {
      o.optimizer = OptimizerKind::kSgdMomentum;
      o.sgd.momentum = -1;
    });
    m["open-sgd-nesterov"] = opt([](Options& o) {
      o.optimizer = OptimizerKind::kSgdMomentum;
      o.sgd.nesterov = true;
      o.sgd.dampening = 0.5f;
    });
    // The backend the Comm does not move: a CUDA engine over an MPI Comm (host memory), a CPU engine over NCCL.
    m["open-backend-comm"] = opt([](Options& o) {
      o.backend = o.backend == Backend::kCpu ? Backend::kCuda : Backend::kCpu;
    });
    m["open-cuda-stream-cpu"] = opt([](Options& o) {  // on either backend's Comm: the options are checked first
      static int not_a_stream;
      o.backend = Backend::kCpu;
      o.cuda_stream = &not_a_stream;
    });
    m["spec-none"] = spec([](std::vector<ParamSpec>& s) { s.clear(); });
    m["spec-empty-name"] = spec([](std::vector<ParamSpec>& s) { s[1].name = ""; });
    m["spec-duplicate"] = spec([](std::vector<ParamSpec>& s) { s[2].name = s[1].name; });
    m["spec-negative-dim"] = spec([](std::vector<ParamSpec>& s) { s[2].shape = {-1}; });
    m["spec-unit-negative"] = spec([](std::vector<ParamSpec>& s) { s[0].unit = -1; });
    m["spec-unit-gap"] = spec([](std::vector<ParamSpec>& s) {
      for (ParamSpec& p : s) p.unit = p.unit == 3 ? 5 : p.unit;
    });
    m["open-oom"] = opt([](Options& o) { o.device_capacity_bytes = 2000; });
    m["init-null-fill"] = [this] { return Fresh()->InitParams(nullptr); };
    m["micro-order"] = [this] { return Fresh()->BeginMicroStep(1, false); };
    m["micro-in-eval"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginEval());
      return e->BeginMicroStep(0, true);
    };
    m["acquire-unknown"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginMicroStep(0, true));
      return e->Acquire(9, Pass::kForward);
    };
    m["acquire-outside"] = [this] { return Fresh()->Acquire(0, Pass::kForward); };
    m["acquire-slots"] = [this] {
      Options o = Small(Stage::kParameters);
      o.gather_slots = 1;
      o.prefetch_bytes = 0;
      auto e = Fresh(o);
      ZERO_RETURN_IF_ERROR(e->BeginMicroStep(0, true));
      ZERO_RETURN_IF_ERROR(e->Acquire(0, Pass::kForward));
      return e->Acquire(1, Pass::kForward);
    };
    m["release-unmatched"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginMicroStep(0, true));
      return e->Release(0, Pass::kForward);
    };
    m["grads-twice"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginMicroStep(0, true));
      ZERO_RETURN_IF_ERROR(e->Acquire(3, Pass::kBackward));
      ZERO_RETURN_IF_ERROR(e->GradsReady(3));
      return e->GradsReady(3);
    };
    m["grads-in-eval"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginEval());
      return e->GradsReady(0);
    };
    m["step-no-micro"] = [this] {
      StepResult r;
      return Fresh()->Step(StepArgs(), &r);
    };
    m["step-not-last"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginMicroStep(0, false));
      StepResult r;
      return e->Step(StepArgs(), &r);
    };
    m["step-null-result"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginMicroStep(0, true));
      return e->Step(StepArgs(), nullptr);
    };
    m["eval-twice"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginEval());
      return e->BeginEval();
    };
    m["eval-end-without-begin"] = [this] { return Fresh()->EndEval(); };
    m["gatherfull-null"] = [this] {
      const int all[] = {0};
      return Fresh()->GatherFull(all, nullptr);
    };
    m["gatherfull-twice"] = [this] {
      auto e = Fresh();
      const int all[] = {0};
      FullParamsScope a, b;
      ZERO_RETURN_IF_ERROR(e->GatherFull(all, &a));
      return e->GatherFull(all, &b);
    };
    m["save-exists"] = [this] {
      auto e = Fresh();
      const std::string dir = Dir();
      ZERO_RETURN_IF_ERROR(e->Save(dir, "a"));
      return e->Save(dir, "a");
    };
    m["save-tag"] = [this] { return Fresh()->Save(Dir(), "a/b"); };
    m["save-in-step"] = [this] {
      auto e = Fresh();
      ZERO_RETURN_IF_ERROR(e->BeginMicroStep(0, true));
      return e->Save(Dir(), "mid");
    };
    m["load-missing"] = [this] { return Fresh()->Load(Dir() + "/nothing"); };
    m["export-names"] = [this] {
      ExportOptions eo;
      eo.names = {"one"};
      return Fresh()->Export(Dir() + "/x.safetensors", eo);
    };
    m["export-dtype"] = [this] {
      ExportOptions eo;
      eo.dtype = DType::kI64;
      return Fresh()->Export(Dir() + "/x.safetensors", eo);
    };
    return m;
  }

 private:
  Options Small(Stage stage) const {
    Options o = SmallToyOptions(stage);
    o.backend = backend_;
    return o;
  }
  // A new engine over the toy model, initialized (each case starts from a clean one).
  std::unique_ptr<Engine> Fresh() { return OpenToyEngine(Small(Stage::kGradients), comm_); }
  std::unique_ptr<Engine> Fresh(const Options& o) { return OpenToyEngine(o, comm_); }
  // A directory every rank sees, fresh per call.
  std::string Dir() {
    const fs::path d = fs::temp_directory_path() / ("zero_errors_table_" + std::to_string(++dirs_));
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    char root[64] = {};
    if (rank == 0) std::snprintf(root, sizeof(root), "%d", static_cast<int>(getpid()));
    MPI_Bcast(root, sizeof(root), MPI_CHAR, 0, MPI_COMM_WORLD);
    const std::string dir = d.string() + "_" + root;
    if (rank == 0) {
      fs::remove_all(dir);
      fs::create_directories(dir);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    made_.push_back(dir);
    return dir;
  }

 public:
  ~Cases() {
    MPI_Barrier(MPI_COMM_WORLD);
    if (WorldRank() == 0) {
      for (const std::string& d : made_) fs::remove_all(d);
    }
  }

 private:
  Comm* comm_;
  Backend backend_;
  std::vector<std::string> made_;
  int dirs_ = 0;
};

class ErrorsTableTest : public ::testing::TestWithParam<Backend> {};

TEST_P(ErrorsTableTest, EveryDocumentedErrorIsWhatTheCodeSays) {
  ZERO_BACKEND_COMM(comm, GetParam());
  const std::vector<Row> rows = ReadTable();
  ASSERT_GT(rows.size(), 50u) << "docs/ERRORS.md lost its table";
  Cases cases(comm.get(), GetParam());
  auto all = cases.All();
  std::map<std::string, bool> used;
  int checked = 0;
  for (const Row& row : rows) {
    SCOPED_TRACE("docs/ERRORS.md row " + row.id);
    if (row.test != "errors_table_test") {
      EXPECT_FALSE(row.test.empty()) << "the row names no test";
      EXPECT_EQ(all.count(row.id), 0u) << "the row names another test, but this test has a case for it";
      continue;
    }
    auto it = all.find(row.id);
    ASSERT_NE(it, all.end()) << "no case in errors_table_test.cc for this row";
    used[row.id] = true;
    if (GetParam() == Backend::kCuda && kCpuOnlyRows.count(row.id) != 0) continue;
    ++checked;
    const Status s = it->second();
    EXPECT_EQ(StatusCodeName(s.code()), row.status) << s.ToString();
    EXPECT_NE(s.message().find(row.text), std::string::npos)
        << "the message does not contain \"" << row.text << "\": " << s.ToString();
  }
  for (const auto& [id, fn] : all) EXPECT_TRUE(used.count(id)) << "case " << id << " has no row in docs/ERRORS.md";
  for (const auto& [id, why] : kCpuOnlyRows) EXPECT_TRUE(used.count(id)) << "kCpuOnlyRows names no row: " << id;
  EXPECT_EQ(checked, static_cast<int>(used.size() - (GetParam() == Backend::kCuda ? kCpuOnlyRows.size() : 0)));
  if (comm->rank() == 0) std::printf("[ errors ] %s: %d rows provoked\n", BackendName(GetParam()), checked);
}

INSTANTIATE_TEST_SUITE_P(Backends, ErrorsTableTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); });

}  // namespace
}  // namespace zero::testing

// A rank dies (SIGKILL) in the middle of a step: what do the others see? Driven by tests/dead_rank_test.sh.
//
//   dead_rank_main train OUTDIR VICTIM   every rank trains the toy model at stage 3 with a 3 s communication
//                                         timeout, checkpoints after step 2 (OUTDIR/ckpt), and in step 4 rank VICTIM
//                                         kills itself in the middle of backward. Each survivor writes
//                                         OUTDIR/rank-R.txt with the first failing call's status and how long it
//                                         took to fail, then leaves with _exit (MPI_Finalize with a dead peer may
//                                         block: the job is broken, and the library must not be what exits).
//   dead_rank_main load OUTDIR            a fresh job loads the last complete checkpoint (OUTDIR/ckpt/latest) and
//                                         writes OUTDIR/load-R.txt with the status and the loaded step.
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "testing/toy_model.h"
#include "zero/zero.h"

namespace {

using zero::Status;
using Clock = std::chrono::steady_clock;

constexpr int kKillStep = 4;
constexpr int kTimeoutMs = 3000;

// ToyAccess over the engine that remembers the first failure and stops calling the engine after it.
class Access : public zero::testing::ToyAccess {
 public:
  Access(zero::Engine* e, int rank, int victim, int step) : e_(e), rank_(rank), victim_(victim), step_(step) {}
  void Acquire(int unit, bool backward) override {
    Note(e_->Acquire(unit, backward ? zero::Pass::kBackward : zero::Pass::kForward), "Acquire");
  }
  void Release(int unit, bool backward) override {
    Note(e_->Release(unit, backward ? zero::Pass::kBackward : zero::Pass::kForward), "Release");
  }
  void GradsReady(int unit) override {
    Note(e_->GradsReady(unit), "GradsReady");
    // The victim dies after its first reduction of the step was issued: its peers are inside that reduction.
    if (rank_ == victim_ && step_ == kKillStep) raise(SIGKILL);
  }
  float* Param(int p) override { return Or(e_->Param(p).as<float>()); }
  float* Grad(int p) override { return Or(e_->Grad(p).as<float>()); }
  void Note(const Status& s, const char* call) {
    if (!s.ok() && first.ok()) {
      first = s;
      first_call = call;
      failed_at = Clock::now();
    }
  }
  Status first;
  std::string first_call;
  Clock::time_point failed_at;

 private:
  float* Or(float* p) {
    if (p == nullptr) p = scratch_;
    return p;
  }
  zero::Engine* e_;
  int rank_, victim_, step_;
  float scratch_[4096] = {};
};

zero::Options MakeOptions() {
  zero::Options o;
  o.stage = zero::Stage::kParameters;
  o.bucket_elements = 40;
  o.cpu_threads = 1;
  return o;
}

void Write(const std::string& path, const std::string& text) {
  std::ofstream out(path + ".tmp");
  out << text;
  out.close();
  std::rename((path + ".tmp").c_str(), path.c_str());
}

std::string Escape(std::string s) {
  for (char& c : s) {
    if (c == '\n') c = ' ';
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: dead_rank_main train OUTDIR VICTIM | load OUTDIR\n");
    return 2;
  }
  const std::string mode = argv[1], out = argv[2];
  zero::CommOptions co;
  co.timeout = std::chrono::milliseconds(kTimeoutMs);
  std::unique_ptr<zero::Comm> comm;
  Status s = zero::Comm::OpenMpi(co, &comm);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  const int rank = comm->rank();
  const std::string root = out + "/ckpt";
  std::unique_ptr<zero::Engine> engine;
  s = zero::Engine::Open(MakeOptions(), comm.get(), zero::testing::ToySpecs(), &engine);

  if (mode == "load") {
    if (s.ok()) s = engine->Load(root);
    Write(out + "/load-" + std::to_string(rank) + ".txt",
          "code=" + std::string(zero::StatusCodeName(s.code())) + "\nstep=" + std::to_string(s.ok() ? engine->step() : -1) +
              "\nmessage=" + Escape(s.message()) + "\n");
    engine.reset();
    comm.reset();
    return s.ok() ? 0 : 1;
  }

  const int victim = argc > 3 ? std::atoi(argv[3]) : 1;
  if (s.ok()) {
    s = engine->InitParams([](int p, int64_t off, int64_t n, float* dst) {
      for (int64_t i = 0; i < n; ++i) dst[i] = zero::testing::ToyInit(p, off + i);
    });
  }
  std::string call = "Open/InitParams";
  Clock::time_point failed_at = Clock::now();
  for (int step = 0; step < 8 && s.ok(); ++step) {
    Access access(engine.get(), rank, victim, step);
    const Clock::time_point step_start = Clock::now();
    for (int m = 0; m < 2 && access.first.ok(); ++m) {
      access.Note(engine->BeginMicroStep(m, m == 1), "BeginMicroStep");
      if (access.first.ok()) {
        zero::testing::ToyForwardBackward(access, zero::testing::ToyMicroBatch(step, m, rank, comm->world_size(), 24));
      }
    }
    zero::StepResult r;
    if (access.first.ok()) access.Note(engine->Step(zero::StepArgs(), &r), "Step");
    if (!access.first.ok()) {
      s = access.first;
      call = access.first_call + " in step " + std::to_string(step);
      failed_at = access.failed_at;
      const double secs = std::chrono::duration<double>(failed_at - step_start).count();
      Write(out + "/rank-" + std::to_string(rank) + ".txt",
            "code=" + std::string(zero::StatusCodeName(s.code())) + "\ncall=" + call +
                "\nseconds=" + std::to_string(secs) + "\nmessage=" + Escape(s.message()) + "\n");
      break;
    }
    if (step == 2) {
      s = engine->Save(root, "step3");
      if (!s.ok()) call = "Save";
    }
  }
  if (s.ok()) {
    Write(out + "/rank-" + std::to_string(rank) + ".txt", "code=OK\ncall=none\nseconds=0\nmessage=\n");
  }
  std::fflush(nullptr);
  _exit(0);  // see the header: a broken job is left to the launcher
}

// GoogleTest main for every suite: initializes MPI, runs the tests on every rank, and prints the full
// report on rank 0 only (other ranks print just their failures, prefixed with the rank). In the
// ZERO_CUDA_EMULATION build it also fails a test that leaves CUDA streams, events or host registrations behind,
// or a runtime error nobody cleared.
#include <mpi.h>

#include <cstdint>
#include <cstdio>

#include <gtest/gtest.h>

#if defined(ZERO_FAKE_CUDA_RUNTIME)
#include "cuda_runtime.h"  // the stand-in (testing/fake_cuda)
#endif

namespace {

// Prints failed assertions of a non-zero rank, so a failure on any rank is visible.
class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.summary());
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

#if defined(ZERO_FAKE_CUDA_RUNTIME)
// Streams, events and host registrations alive after a test that were not before it: an engine, a device or a
// helper that does not give back what it made (each engine makes its streams and events; a long-running trainer
// that opens engines would run out of them). Device memory is left out: test helpers cache some on purpose.
class CudaHandleLeakCheck : public testing::EmptyTestEventListener {
 public:
  void OnTestStart(const testing::TestInfo&) override { before_ = Counts(); }
  void OnTestEnd(const testing::TestInfo& info) override {
    // The thread's last error: src/cuda_errors.h clears every failure zero turns into a Status, because the
    // trainer's next kernel launch check (cudaGetLastError) would report it as its own.
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
      std::fprintf(stderr, "[  LEAKED  ] %s.%s: the runtime's last error is still set: %s\n", info.test_suite_name(),
                   info.name(), cudaGetErrorString(e));
      leaked_ = true;
    }
    const Handles after = Counts();
    if (after.streams > before_.streams || after.events > before_.events ||
        after.registrations > before_.registrations) {
      std::fprintf(stderr, "[  LEAKED  ] %s.%s: %lld stream(s), %lld event(s), %lld host registration(s) more than "
                   "before it\n", info.test_suite_name(), info.name(),
                   static_cast<long long>(after.streams - before_.streams),
                   static_cast<long long>(after.events - before_.events),
                   static_cast<long long>(after.registrations - before_.registrations));
      leaked_ = true;
    }
  }
  bool leaked() const { return leaked_; }

 private:
  struct Handles {
    int64_t streams, events, registrations;
  };
  static Handles Counts() {
    return {fake_cuda::LiveStreams(), fake_cuda::LiveEvents(), fake_cuda::LiveRegistrations()};
  }
  Handles before_{};
  bool leaked_ = false;
};
#endif

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
#if defined(ZERO_FAKE_CUDA_RUNTIME)
  auto* leaks = new CudaHandleLeakCheck;  // owned by the listener list
  testing::UnitTest::GetInstance()->listeners().Append(leaks);
#endif
  int failed = RUN_ALL_TESTS();
#if defined(ZERO_FAKE_CUDA_RUNTIME)
  if (leaks->leaked()) failed = 1;
#endif
  // Every rank's verdict decides the exit code of every rank, so mpiexec fails when any rank failed.
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed ? 1 : 0;
}

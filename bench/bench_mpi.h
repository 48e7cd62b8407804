// Shared pieces of the benchmarks that run under mpiexec: every rank runs the same Google Benchmark cases with
// fixed iteration counts (so the collectives inside line up), and only rank 0 reports. Timings are per
// iteration, the slowest rank's, and the counters are medians of per-iteration values or of paired ratios
// measured in the same iteration, so drift (a noisy neighbour, frequency changes) cancels.
#pragma once

#include <benchmark/benchmark.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "bench/bench_util.h"

namespace zero::bench {

// Swallows everything: ranks other than 0 run the cases but print nothing.
class NullReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
  void Finalize() override {}
};

// Element-wise maximum over the ranks of MPI_COMM_WORLD (the slowest rank's times), in place.
inline void MaxOverRanks(std::vector<double>* values) {
  MPI_Allreduce(MPI_IN_PLACE, values->data(), static_cast<int>(values->size()), MPI_DOUBLE, MPI_MAX,
                MPI_COMM_WORLD);
}

// main() of a benchmark run under mpiexec: MPI initialised for threads (the engine's communication thread calls
// MPI too), `body`, then MPI_Finalize; returns body's exit code.
inline int MpiMain(int argc, char** argv, int (*body)(int, char**)) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  const int rc = body(argc, argv);
  MPI_Finalize();
  return rc;
}

inline int WorldRank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int WorldSize() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// "--name=value" flags after Google Benchmark has taken its own. Returns false (after printing why) on an
// unknown flag.
struct Flag {
  std::string_view name;
  std::string* value;
};
inline bool ParseFlags(int argc, char** argv, std::initializer_list<Flag> flags) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    bool known = false;
    for (const Flag& f : flags) {
      const std::string prefix = "--" + std::string(f.name) + "=";
      if (arg.substr(0, prefix.size()) == prefix) {
        *f.value = std::string(arg.substr(prefix.size()));
        known = true;
      }
    }
    if (!known) {
      if (WorldRank() == 0) std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return false;
    }
  }
  return true;
}

// "22,24" -> {22, 24}.
inline std::vector<int> ParseInts(const std::string& list) {
  std::vector<int> out;
  size_t pos = 0;
  while (pos < list.size()) {
    const size_t end = std::min(list.find(',', pos), list.size());
    out.push_back(std::atoi(list.substr(pos, end - pos).c_str()));
    pos = end + 1;
  }
  return out;
}

inline std::vector<std::string> ParseWords(const std::string& list) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < list.size()) {
    const size_t end = std::min(list.find(',', pos), list.size());
    out.push_back(list.substr(pos, end - pos));
    pos = end + 1;
  }
  return out;
}

// Before benchmark::Initialize: ranks other than 0 drop --benchmark_out* so that only rank 0 opens (and
// truncates) the output file.
inline void StripOutputFlagsOnPeers(int* argc, char** argv) {
  if (WorldRank() == 0) return;
  int kept = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::string_view(argv[i]).substr(0, 15) != "--benchmark_out") argv[kept++] = argv[i];
  }
  *argc = kept;
}

// Runs the registered cases: rank 0 with the usual reporters (console, --benchmark_out), the others silently.
inline void RunOnEveryRank() {
  if (WorldRank() == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    NullReporter display;
    benchmark::RunSpecifiedBenchmarks(&display);
  }
}

}  // namespace zero::bench

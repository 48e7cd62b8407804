// Test helpers for multi-rank suites: a Comm over MPI_COMM_WORLD with a short timeout, and directories that every
// rank sees.
#pragma once

#include <mpi.h>
#include <stdlib.h>  // mkdtemp

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "testing/backend_comm.h"
#include "zero/comm.h"

namespace zero::testing {

// A fresh Comm over MPI_COMM_WORLD (duplicated, so tests do not interfere). Tests use a short timeout so that
// a protocol bug fails fast instead of hanging ctest.
inline std::unique_ptr<Comm> WorldComm(std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000)) {
  CommOptions options;
  options.timeout = timeout;
  std::unique_ptr<Comm> comm;
  Status s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return comm;
}

// A Comm for `backend` over `mpi_comm` (collective over it): MPI for the CPU; for CUDA, NCCL or a StagedComm
// (backend_comm.h says which, and when). Returns null with *skip set to the reason when the backend cannot run
// on this machine (no GPU); the caller then GTEST_SKIP()s with that reason (CUDA only).
inline std::unique_ptr<Comm> BackendCommOver(MPI_Comm mpi_comm, Backend backend, std::string* skip,
                                             std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000)) {
  if (backend == Backend::kCuda) return OpenCudaTestComm(mpi_comm, timeout, skip);
  CommOptions options;
  options.timeout = timeout;
  std::unique_ptr<Comm> comm;
  Status s = Comm::FromMpiComm(MPI_Comm_c2f(mpi_comm), options, &comm);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return comm;
}

// BackendCommOver(MPI_COMM_WORLD, ...). Use through ZERO_BACKEND_COMM.
inline std::unique_ptr<Comm> BackendComm(Backend backend, std::string* skip,
                                         std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000)) {
  return BackendCommOver(MPI_COMM_WORLD, backend, skip, timeout);
}

inline const char* BackendName(Backend b) { return b == Backend::kCpu ? "cpu" : "cuda"; }

inline int WorldRank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int WorldSize() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// A new, empty directory every rank sees: made by world rank 0 under `parent` (prefix + a unique suffix), its name
// broadcast. Collective over MPI_COMM_WORLD. "" on every rank when it could not be made.
inline std::string MakeSharedDir(const std::filesystem::path& parent, const std::string& prefix) {
  char buf[1024] = {};
  if (WorldRank() == 0) {
    std::snprintf(buf, sizeof(buf), "%s", (parent / (prefix + "_XXXXXX")).string().c_str());
    if (mkdtemp(buf) == nullptr) buf[0] = '\0';
  }
  MPI_Bcast(buf, sizeof(buf), MPI_CHAR, 0, MPI_COMM_WORLD);
  return buf;
}

// Removes a MakeSharedDir directory once every rank is done with it. Collective over MPI_COMM_WORLD.
inline void RemoveSharedDir(const std::string& dir) {
  MPI_Barrier(MPI_COMM_WORLD);
  if (WorldRank() == 0 && !dir.empty()) std::filesystem::remove_all(dir);
}

}  // namespace zero::testing

// Declares `var`, a Comm for `backend`; skips the test (with the reason) when the backend cannot run here.
#define ZERO_BACKEND_COMM(var, backend)                                         \
  std::string var##_skip;                                                       \
  auto var = ::zero::testing::BackendComm((backend), &var##_skip);              \
  if (var == nullptr && !var##_skip.empty()) GTEST_SKIP() << var##_skip; /* no GPU */ \
  ASSERT_NE(var, nullptr)

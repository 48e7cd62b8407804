// Test helpers for multi-rank suites: a Comm over MPI_COMM_WORLD with a short timeout.
#pragma once

#include <mpi.h>

#include <chrono>
#include <memory>

#include <gtest/gtest.h>

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

}  // namespace zero::testing

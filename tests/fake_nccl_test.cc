// The NCCL stand-in's own contracts (testing/fake_nccl/nccl.h), hand-worked, at 2 and 4 ranks: non-blocking
// init and split that answer ncclInProgress and settle, collectives whose work reaches the stream only once the
// communicator's state is back to ncclSuccess, NCCL's in-place layouts, bf16 sums rounded after each addition in
// rank order, sends and receives in a group (to self too), host buffers refused, and a stalled peer that leaves
// the stream incomplete until ncclCommAbort ends it, after which the handle is refused. Each rank has its own
// stand-in device (ZERO_FAKE_CUDA_DEVICES=4 in the emulated build's test environment).
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "cuda_runtime.h"
#include "testing/fake_cuda/device_vectors.h"
#include "nccl.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

using Clock = std::chrono::steady_clock;

// Polls the asynchronous state until it leaves ncclInProgress (10 s at most: the test then fails, not hangs).
ncclResult_t Settle(ncclComm_t comm, ncclResult_t rc) {
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (rc == ncclInProgress && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    if (ncclCommGetAsyncError(comm, &rc) != ncclSuccess) return ncclInternalError;
  }
  return rc;
}

// A non-blocking communicator over MPI_COMM_WORLD on this rank's device.
ncclComm_t OpenWorld() {
  int devices = 0;
  EXPECT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  EXPECT_EQ(cudaSetDevice(WorldRank() % devices), cudaSuccess);
  ncclUniqueId id{};
  if (WorldRank() == 0) {
    EXPECT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  }
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t rc = ncclCommInitRankConfig(&comm, WorldSize(), id, WorldRank(), &config);
  // More than one rank: the init goes on on a helper thread, as NCCL's does.
  EXPECT_EQ(rc, ncclInProgress);
  EXPECT_NE(comm, nullptr);
  EXPECT_EQ(Settle(comm, rc), ncclSuccess);
  return comm;
}

TEST(FakeNcclTest, InitGivesEachRankItsPlace) {
  ncclComm_t comm = OpenWorld();
  int rank = -1, count = -1;
  EXPECT_EQ(ncclCommUserRank(comm, &rank), ncclSuccess);
  EXPECT_EQ(ncclCommCount(comm, &count), ncclSuccess);
  EXPECT_EQ(rank, WorldRank());
  EXPECT_EQ(count, WorldSize());
  // Finalize is non-blocking too; then destroy.
  EXPECT_EQ(Settle(comm, ncclCommFinalize(comm)), ncclSuccess);
  EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
}

// Rank r contributes (r + 1) * {1, 2, 3}: the sum is n(n+1)/2 * {1, 2, 3}, the max n * {1, 2, 3}, the average
// (n + 1) / 2 * {1, 2, 3} (exact in fp32: halves of small integers).
TEST(FakeNcclTest, AllReduceSumMaxAvg) {
  ncclComm_t comm = OpenWorld();
  const int n = WorldSize(), r = WorldRank();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const float k = static_cast<float>(r + 1);
  for (ncclRedOp_t op : {ncclSum, ncclMax, ncclAvg}) {
    float* x = ToDevice(std::vector<float>{k, 2 * k, 3 * k});
    ASSERT_EQ(Settle(comm, ncclAllReduce(x, x, 3, ncclFloat32, op, comm, stream)), ncclSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const float f = op == ncclSum ? n * (n + 1) / 2.0f : op == ncclMax ? static_cast<float>(n) : (n + 1) / 2.0f;
    EXPECT_EQ(ToHost(x, 3), (std::vector<float>{f, 2 * f, 3 * f})) << "op " << op;
    cudaFree(x);
  }
  cudaStreamDestroy(stream);
  ncclCommAbort(comm);
}

// bf16 has 8 significant bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 and rounds to even, 1. Rank 0 gives 1,
// every other rank 2^-8: rounded after each addition in rank order the sum stays 1 on every rank, where one
// rounding of the exact sum (1 + 3 * 2^-8 at four ranks) would give 1 + 2^-7.
TEST(FakeNcclTest, Bf16SumsRoundAfterEachAdditionInRankOrder) {
  ncclComm_t comm = OpenWorld();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const uint16_t one = 0x3f80, tiny = 0x3b80;  // 1.0 and 2^-8 in bf16
  uint16_t* x = ToDevice(std::vector<uint16_t>{WorldRank() == 0 ? one : tiny});
  ASSERT_EQ(Settle(comm, ncclAllReduce(x, x, 1, ncclBfloat16, ncclSum, comm, stream)), ncclSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(ToHost(x, 1)[0], one);
  cudaFree(x);
  cudaStreamDestroy(stream);
  ncclCommAbort(comm);
}

// In place, NCCL's layouts: reduce-scatter's receive buffer is send + rank * count, all-gather's send buffer is
// recv + rank * count. Element i of rank r's input is (r + 1) * i.
TEST(FakeNcclTest, InPlaceReduceScatterAllGatherAndBroadcast) {
  ncclComm_t comm = OpenWorld();
  const int n = WorldSize(), r = WorldRank();
  const int count = 5;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  std::vector<float> in(static_cast<size_t>(count * n));
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>((r + 1) * static_cast<int>(i));
  float* x = ToDevice(in);
  ASSERT_EQ(Settle(comm, ncclReduceScatter(x, x + r * count, count, ncclFloat32, ncclSum, comm, stream)), ncclSuccess);
  ASSERT_EQ(Settle(comm, ncclAllGather(x + r * count, x, count, ncclFloat32, comm, stream)), ncclSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const std::vector<float> got = ToHost(x, in.size());
  for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(got[i], n * (n + 1) / 2.0f * static_cast<float>(i)) << i;
  // Broadcast from the last rank, out of place: every rank gets its {7, 8}.
  float* src = ToDevice(std::vector<float>{r == n - 1 ? 7.0f : -1.0f, r == n - 1 ? 8.0f : -1.0f});
  float* dst = ToDevice(std::vector<float>{0.0f, 0.0f});
  ASSERT_EQ(Settle(comm, ncclBroadcast(src, dst, 2, ncclFloat32, n - 1, comm, stream)), ncclSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(ToHost(dst, 2), (std::vector<float>{7.0f, 8.0f}));
  cudaFree(x);
  cudaFree(src);
  cudaFree(dst);
  cudaStreamDestroy(stream);
  ncclCommAbort(comm);
}

// A group of sends and receives: to the next rank and to self, from the previous rank and from self. In one group
// they cannot wait for each other (each rank sends before anyone receives).
TEST(FakeNcclTest, SendsAndReceivesInAGroupToSelfToo) {
  ncclComm_t comm = OpenWorld();
  const int n = WorldSize(), r = WorldRank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  int64_t* out = ToDevice(std::vector<int64_t>{100 + r, 200 + r});
  int64_t* in = ToDevice(std::vector<int64_t>{-1, -1});
  ASSERT_EQ(ncclGroupStart(), ncclSuccess);
  ASSERT_EQ(ncclSend(out, 1, ncclInt64, next, comm, stream), ncclSuccess);
  ASSERT_EQ(ncclRecv(in, 1, ncclInt64, prev, comm, stream), ncclSuccess);
  ASSERT_EQ(ncclSend(out + 1, 1, ncclInt64, r, comm, stream), ncclSuccess);
  ASSERT_EQ(ncclRecv(in + 1, 1, ncclInt64, r, comm, stream), ncclSuccess);
  ASSERT_EQ(Settle(comm, ncclGroupEnd()), ncclSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(ToHost(in, 2), (std::vector<int64_t>{100 + prev, 200 + r}));
  cudaFree(out);
  cudaFree(in);
  cudaStreamDestroy(stream);
  ncclCommAbort(comm);
}

// While a non-blocking call is in progress the communicator refuses other calls, and its work is not on the
// stream yet: an event recorded then does not cover it (what NcclComm's settling is for).
TEST(FakeNcclTest, WorkReachesTheStreamOnlyOnceSettled) {
  ncclComm_t comm = OpenWorld();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  cudaEvent_t early = nullptr;
  ASSERT_EQ(cudaEventCreate(&early), cudaSuccess);
  float* x = ToDevice(std::vector<float>{1.0f});
  fake_nccl::SetHelperDelay(std::chrono::milliseconds(300));
  const ncclResult_t rc = ncclAllReduce(x, x, 1, ncclFloat32, ncclSum, comm, stream);
  ASSERT_EQ(rc, ncclInProgress);
  ncclResult_t state = ncclSuccess;
  EXPECT_EQ(ncclCommGetAsyncError(comm, &state), ncclSuccess);
  EXPECT_EQ(state, ncclInProgress);
  EXPECT_EQ(ncclAllReduce(x, x, 1, ncclFloat32, ncclSum, comm, stream), ncclInvalidArgument);
  ASSERT_EQ(cudaEventRecord(early, stream), cudaSuccess);
  ASSERT_EQ(cudaEventSynchronize(early), cudaSuccess);
  EXPECT_EQ(ToHost(x, 1)[0], 1.0f) << "the collective ran before its call settled";
  ASSERT_EQ(Settle(comm, rc), ncclSuccess);
  fake_nccl::SetHelperDelay(std::chrono::milliseconds(0));
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(ToHost(x, 1)[0], static_cast<float>(WorldSize()));
  cudaFree(x);
  cudaEventDestroy(early);
  cudaStreamDestroy(stream);
  ncclCommAbort(comm);
}

TEST(FakeNcclTest, HostBuffersAreRefused) {
  ncclComm_t comm = OpenWorld();
  float host[4] = {1, 2, 3, 4};
  EXPECT_EQ(ncclAllReduce(host, host, 4, ncclFloat32, ncclSum, comm, nullptr), ncclInvalidArgument);
  EXPECT_NE(std::strstr(ncclGetLastError(comm), "not device memory"), nullptr) << ncclGetLastError(comm);
  ncclCommAbort(comm);
}

// Split by parity, keys reversed: the split settles in the parent's state and *newcomm comes at the end.
TEST(FakeNcclTest, SplitSettlesInTheParentAndOrdersByKey) {
  ncclComm_t comm = OpenWorld();
  const int n = WorldSize(), r = WorldRank();
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t child = nullptr;
  ncclResult_t rc = ncclCommSplit(comm, r % 2, n - r, &child, &config);
  EXPECT_EQ(rc, ncclInProgress);
  ASSERT_EQ(Settle(comm, rc), ncclSuccess);
  ASSERT_NE(child, nullptr);
  int child_rank = -1, child_count = -1;
  EXPECT_EQ(ncclCommUserRank(child, &child_rank), ncclSuccess);
  EXPECT_EQ(ncclCommCount(child, &child_count), ncclSuccess);
  const int members = (n - r % 2 + 1) / 2;  // ranks of this parity
  EXPECT_EQ(child_count, members);
  EXPECT_EQ(child_rank, members - 1 - r / 2);  // the highest key comes last
  // A sum over the child: the world ranks of this parity.
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  int32_t* x = ToDevice(std::vector<int32_t>{r});
  ASSERT_EQ(Settle(child, ncclAllReduce(x, x, 1, ncclInt32, ncclSum, child, stream)), ncclSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  int expected = 0;
  for (int q = r % 2; q < n; q += 2) expected += q;
  EXPECT_EQ(ToHost(x, 1)[0], expected);
  cudaFree(x);
  cudaStreamDestroy(stream);
  ncclCommAbort(child);
  ncclCommAbort(comm);
}

// The last rank never issues: the others' all-reduce stays incomplete on their streams (queries answer
// cudaErrorNotReady, the host is not blocked), a finalize stays in progress behind it (NCCL's waits for every
// collective issued on the communicator), ncclCommAbort ends both, and the aborted handle is refused.
TEST(FakeNcclPeerTest, StalledPeerLeavesTheStreamIncompleteUntilAbort) {
  ncclComm_t comm = OpenWorld();
  const int n = WorldSize(), r = WorldRank();
  if (r != n - 1) {
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    float* x = ToDevice(std::vector<float>(256, 1.0f));
    ASSERT_EQ(Settle(comm, ncclAllReduce(x, x, 256, ncclFloat32, ncclSum, comm, stream)), ncclSuccess);
    ASSERT_EQ(ncclCommFinalize(comm), ncclInProgress);
    const auto until = Clock::now() + std::chrono::milliseconds(200);
    while (Clock::now() < until) {
      ASSERT_EQ(cudaStreamQuery(stream), cudaErrorNotReady);
      ncclResult_t finalizing = ncclSuccess;
      ASSERT_EQ(ncclCommGetAsyncError(comm, &finalizing), ncclSuccess);
      ASSERT_EQ(finalizing, ncclInProgress);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_EQ(ncclCommAbort(comm), ncclSuccess);
    cudaError_t q = cudaStreamQuery(stream);
    for (int i = 0; q == cudaErrorNotReady && i < 100; ++i) q = cudaStreamQuery(stream);
    EXPECT_EQ(q, cudaSuccess);
    ncclResult_t state = ncclSuccess;
    EXPECT_EQ(ncclCommGetAsyncError(comm, &state), ncclInvalidUsage);
    EXPECT_EQ(ncclAllReduce(x, x, 1, ncclFloat32, ncclSum, comm, stream), ncclInvalidUsage);
    cudaFree(x);
    cudaStreamDestroy(stream);
  } else {
    ncclCommAbort(comm);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace zero::testing

// A host-only stand-in for the subset of NCCL that zero's NcclComm (src/comm_nccl.cc) calls, over MPI between the
// ranks and on the stand-in CUDA runtime's streams (testing/fake_cuda/cuda_runtime.h), so that NcclComm's host
// code runs in the ZERO_CUDA_EMULATION build: nccl_comm_test, and the engine suites' CUDA cases with
// ZERO_TEST_STAGED_COMM=0. Put this directory first on the include path of such a target only, never beside the
// real NCCL. One instance per process: the shared library zero_fake_nccl.
//
// What it keeps of NCCL's contracts (its documentation and init.cc/group.cc/enqueue.cc):
//   - non-blocking communicators (ncclConfig_t::blocking = 0): init, split, finalize and sends/receives at any
//     size, and every collective or group end with more than one rank, return ncclInProgress and finish on a
//     helper thread, sometimes after a short delay (NCCL's group end hands all queued work of a non-blocking
//     communicator to a thread; only a one-rank collective is a plain copy issued at once);
//     ncclCommGetAsyncError answers ncclInProgress until then, and any other call on the communicator meanwhile
//     fails with ncclInvalidArgument. A collective's work reaches its stream only when that state is back to
//     ncclSuccess (so an event recorded before that misses it); a split reports through the parent's state and
//     writes *newcomm at the end; finalize completes only once every collective issued on the communicator has
//     (NCCL's synchronizes its internal stream, which follows every launch), so with one stuck on a stalled peer
//     it stays in progress until ncclCommAbort;
//   - collectives run in stream order on device memory (host pointers are refused, as NCCL's pointer checks do):
//     each is a step on its stream (fake_cuda::EnqueueStep) that posts its messages when the stream reaches it and
//     completes when every peer's part has arrived, so a stalled peer leaves the stream incomplete (queries answer
//     cudaErrorNotReady) instead of blocking the host; ncclCommAbort makes such steps finish (the data undefined,
//     as after an aborted kernel) and the handle unusable: a later call with it fails with ncclInvalidUsage
//     instead of touching freed memory;
//   - ops of one communicator match across ranks by the order the host issued them (collectives) and per peer
//     (sends and receives), not by the order streams happen to run, as NCCL's do; a group's ops on one stream are
//     one step, so sends and receives between two ranks (to self too) cannot wait for each other;
//   - reductions combine the ranks' contributions in rank order on every rank (the same bits everywhere), bf16 and
//     fp16 rounded after each addition; ncclAvg divides the sum by the rank count; in-place forms follow NCCL's
//     layout rules (all-gather: send == recv + rank * count; reduce-scatter: recv == send + rank * count).
// What it cannot show: NCCL's algorithms and their summation order (rings, trees), real concurrency of kernels
// of two communicators (the family ordering's deadlock), transport errors reported through the asynchronous
// state, and timing. The unique id carries the creating process's rank in MPI_COMM_WORLD and a serial: that
// process must be one of the communicator's ranks, and every rank a process of MPI_COMM_WORLD.
//
// The names, enum values and result codes are NCCL's; the handle type is distinct (FakeNcclComm) and the functions
// have C++ linkage.
#pragma once

#include <chrono>
#include <cstddef>

#include "cuda_runtime.h"

enum FakeNcclResult : int {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
  ncclNumResults = 8,
};
using ncclResult_t = FakeNcclResult;

enum FakeNcclDataType : int {
  ncclInt8 = 0,
  ncclChar = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclInt = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclHalf = 6,
  ncclFloat32 = 7,
  ncclFloat = 7,
  ncclFloat64 = 8,
  ncclDouble = 8,
  ncclBfloat16 = 9,
};
using ncclDataType_t = FakeNcclDataType;

enum FakeNcclRedOp : int {
  ncclSum = 0,
  ncclProd = 1,
  ncclMax = 2,
  ncclMin = 3,
  ncclAvg = 4,
};
using ncclRedOp_t = FakeNcclRedOp;

#define NCCL_MAJOR 2
#define NCCL_MINOR 28
#define NCCL_PATCH 9
#define NCCL_VERSION(X, Y, Z) ((X)*10000 + (Y)*100 + (Z))
#define NCCL_VERSION_CODE NCCL_VERSION(NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH)
#define NCCL_SPLIT_NOCOLOR -1
#define NCCL_UNIQUE_ID_BYTES 128
#define NCCL_CONFIG_UNDEF_INT (-2147483647 - 1)

struct ncclUniqueId {
  char internal[NCCL_UNIQUE_ID_BYTES];
};

// The fields NcclComm sets; the initializer marks the rest undefined, as NCCL's does.
struct ncclConfig_t {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
};
#define NCCL_CONFIG_INITIALIZER \
  { sizeof(ncclConfig_t), 0xcafebeef, NCCL_VERSION_CODE, NCCL_CONFIG_UNDEF_INT }

struct FakeNcclComm;
using ncclComm_t = FakeNcclComm*;

ncclResult_t ncclGetVersion(int* version);
ncclResult_t ncclGetUniqueId(ncclUniqueId* id);
ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t* config);
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank);
ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* newcomm, ncclConfig_t* config);
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error);
ncclResult_t ncclCommFinalize(ncclComm_t comm);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommAbort(ncclComm_t comm);
ncclResult_t ncclCommCount(const ncclComm_t comm, int* count);
ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank);
ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device);
const char* ncclGetErrorString(ncclResult_t result);
const char* ncclGetLastError(ncclComm_t comm);

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, ncclDataType_t datatype,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream);
ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream);
ncclResult_t ncclGroupStart();
ncclResult_t ncclGroupEnd();

namespace fake_nccl {

// How long a helper thread takes before a non-blocking call completes: by default a millisecond on every other
// call, none on the others; a test that must see ncclInProgress for a while sets a longer one (zero: default).
void SetHelperDelay(std::chrono::milliseconds delay);

}  // namespace fake_nccl

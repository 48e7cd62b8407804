// NcclComm: zero::Comm over NCCL on CUDA devices (Comm::OpenNccl), bootstrapped over MPI.
//
// Bootstrap: ranks first agree over MPI that every one of them has a usable device (so a rank without one
// makes all of them fail, instead of leaving the others in ncclCommInitRankConfig); the local device is the
// node-local rank (MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)), and a node with more ranks than GPUs is refused
// unless the loaded NCCL lets ranks share a GPU (cuda_placement.h), and NCCL settings that would defeat the timeouts
// are refused by name (RefusedNcclSettings); rank 0's ncclGetUniqueId (and whether it worked) is broadcast with
// MPI_Bcast, and the ranks agree that each set up its device before NCCL's collective init.
//
// The communicator is non-blocking (ncclConfig_t::blocking = 0) so that no NCCL call can wait for a peer without
// a timeout. With more than one rank NCCL hands each call to a helper thread and returns ncclInProgress: the
// kernels reach the stream only when the communicator's asynchronous state is back to ncclSuccess, and NCCL
// refuses any other call on the communicator until then. Every call therefore settles (Settle: polls that state
// against CommOptions::timeout, aborting on expiry) before anything is recorded after it or the call returns.
//
// Waiting: a collective with a caller's stream (CollectiveOptions::stream: the engine's communication stream) is
// enqueued there and returns once enqueued; a watchdog (Poll, run by every call and by health()) retires completed ones
// through events and times out the oldest. Without a stream, or with host buffers (staged), a call runs on this Comm's
// own stream (after the caller's stream's earlier work, which a staged call first waits for on the host) and polls
// cudaStreamQuery and ncclCommGetAsyncError against CommOptions::timeout. On an NCCL error the Comm breaks with NCCL's
// own error string (ncclGetLastError); on a timeout it calls ncclCommAbort (this rank's kernels stop; a peer over a
// network transport sees its connections fail and breaks on its NCCL's asynchronous error, a peer on the same node
// (P2P, SHM) on its own timeout: NCCL cannot tell it why, so peers get kTimeout or kInternal, never Abort's reason) and
// breaks with a status naming the collective. Every later call returns the breaking status. health() and Abort() make
// this Comm's GPU the calling thread's current device, as every collective does. Buffers are device memory; counts are
// elements; the in-place forms are NCCL's. A failed CUDA call's error is cleared from the runtime's last-error state
// once it is turned into a status, so that it is not reported again by an unrelated kernel launch check.
//
// A family: a Comm and its Duplicates (the engine's private communicator, comm.h) are separate NCCL communicators,
// and NCCL does not allow the kernels of two communicators to run at the same time unless every rank orders them
// alike (one may block the GPU waiting for a peer that runs the other). Every call therefore makes its stream wait
// for the family's last enqueued work (each member records an event after each enqueue) before it enqueues: the
// GPU runs the family's collectives in the order the host issued them, which is the same on every rank when one
// thread issues them (the engine's calls run on the thread that calls the engine, the trainer's own in program
// order). With NCCL, collectives of one family from several threads at once are not supported.
//
// Compiled with warnings as errors; without a GPU, OpenNccl returns Unavailable on every rank (tested). The GPU
// half (tests/nccl_comm_test.cc at 1, 2 and 4 ranks, with NCCL >= 2.30 for ranks sharing one GPU) runs through
// scripts/gpu/, and on every CI machine in the ZERO_CUDA_EMULATION build, where this file is compiled against the
// host-only CUDA and NCCL stand-ins (tests/testing/fake_cuda, tests/testing/fake_nccl).
#include <mpi.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm_internal.h"
#include "comm_mpi.h"
#include "cuda_placement.h"
#include "zero/comm.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#include <nccl.h>

#include "cuda_errors.h"
#include "node_topology.h"
#endif

namespace zero {

#if defined(ZERO_WITH_CUDA)
namespace {

using internal::CallInfo;
using internal::CollectiveKind;
using Clock = std::chrono::steady_clock;

constexpr int kSpinPolls = 200;
constexpr auto kNap = std::chrono::microseconds(20);

bool NcclType(DType dtype, ncclDataType_t* out) {
  switch (dtype) {
    case DType::kF32: *out = ncclFloat32; return true;
    case DType::kF64: *out = ncclFloat64; return true;
    case DType::kBF16: *out = ncclBfloat16; return true;
    case DType::kF16: *out = ncclFloat16; return true;
    case DType::kU8: *out = ncclUint8; return true;
    case DType::kI64: *out = ncclInt64; return true;
  }
  return false;
}

ncclRedOp_t NcclOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

using internal::Queried;
using internal::Reported;

class NcclComm;

// The communicators split from one OpenNccl communicator (see "A family" above).
struct NcclFamily {
  std::mutex mu;
  std::vector<NcclComm*> members;
};

// NcclComm's own buffers (the barrier's scratch word, the staging buffer) are stream-ordered allocations on its
// stream where the device has memory pools: a cudaFree waits for the whole device, so a collective of another
// communicator stuck on a dead peer would hang it with no timeout. A device without pools (some virtualized GPUs
// refuse cudaMallocAsync) gets cudaMalloc and cudaFree, and that hazard back, rather than no NCCL at all.
bool HasMemoryPools(int device) {
  int pools = 0;
  if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return pools != 0;
}
cudaError_t AllocOn(int device, void** p, size_t bytes, cudaStream_t stream) {
  return HasMemoryPools(device) ? cudaMallocAsync(p, bytes, stream) : cudaMalloc(p, bytes);
}
cudaError_t FreeOn(int device, void* p, cudaStream_t stream) {
  return HasMemoryPools(device) ? cudaFreeAsync(p, stream) : cudaFree(p);
}

class NcclComm final : public Comm {
 public:
  NcclComm(ncclComm_t comm, cudaStream_t stream, void* scratch, int device, int rank, int world,
           const CommOptions& options, NodeTopology topology, std::shared_ptr<NcclFamily> family = nullptr)
      : Comm(rank, world),
        comm_(comm),
        stream_(stream),
        scratch_(scratch),
        device_(device),
        options_(options),
        family_(family != nullptr ? std::move(family) : std::make_shared<NcclFamily>()) {
    timeout_ = options.timeout;
    topology_ = std::move(topology);
    std::lock_guard<std::mutex> lock(family_->mu);
    family_->members.push_back(this);
  }

  ~NcclComm() override {
    {
      std::lock_guard<std::mutex> lock(family_->mu);
      std::erase(family_->members, this);
    }
    (void)Reported(cudaSetDevice(device_));
    if (comm_aborted_) {
      // ncclCommAbort already freed the communicator.
    } else if (broken_.ok()) {
      // Flush, then destroy; a finalize that does not finish within the timeout is aborted instead.
      ncclResult_t state = ncclCommFinalize(comm_);
      const auto deadline = Clock::now() + options_.timeout;
      while (state == ncclInProgress || (state == ncclSuccess && Pending())) {
        if (Clock::now() >= deadline) break;
        std::this_thread::sleep_for(kNap);
        if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
      }
      if (state == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    } else {
      ncclCommAbort(comm_);
    }
    for (const InFlight& f : inflight_) cudaEventDestroy(f.event);
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    // Stream-ordered frees where the device has pools (AllocOn): cudaFree would wait for the whole device, so a
    // collective of another communicator stuck on a dead peer (the family's other member, say) would hang this
    // destructor with no timeout.
    (void)FreeOn(device_, scratch_, stream_);
    if (stage_ != nullptr) (void)FreeOn(device_, stage_, stream_);
    if (order_event_ != nullptr) cudaEventDestroy(order_event_);
    if (family_event_ != nullptr) cudaEventDestroy(family_event_);
    cudaStreamDestroy(stream_);
    (void)cudaGetLastError();  // nothing above may leave an error for the caller's next launch check
  }

  int cuda_device() const override { return device_; }

  // From the thread that issues the collectives (comm.h): ncclCommAbort frees the communicator.
  void Abort(const Status& reason) override {
    CallScope scope(this);
    if (!broken_.ok()) return;
    // ncclCommAbort switches to the communicator's device and back to the caller's; on a foreign thread "back" is
    // device 0, and since CUDA 12 cudaSetDevice initializes that device's context.
    CurrentDeviceForForeignThread();
    broken_ = internal::AbortedBy(rank(), internal::AbortReasonText(reason));
    AbortNccl();  // peers' pending collectives with this rank fail in their NCCL
  }

  // Any thread (comm.h). Also the watchdog, polling the collectives in flight (see Poll), when no call of this
  // Comm is running on another thread; while one is (it polls for itself), the status the calls so far left.
  Status health() const override {
    auto* self = const_cast<NcclComm*>(this);
    std::unique_lock<std::mutex> lock(self->state_mu_, std::try_to_lock);
    if (!lock.owns_lock()) {
      std::lock_guard<std::mutex> published(published_mu_);
      return published_;
    }
    self->CurrentDeviceForForeignThread();
    const Status s = self->Poll();
    self->Publish();
    return s;
  }

 protected:
  Status DoReduceScatter(const void* send, void* recv, int64_t count, DType dtype,
                       const CollectiveOptions& opts) override {
    const CallInfo call{CollectiveKind::kReduceScatter, opts.what, count, dtype, ReduceOp::kSum, 0};
    return Run(call, opts, send, recv, [&](const void* s, void* r, ncclDataType_t t, cudaStream_t st) {
      return ncclReduceScatter(s, r, static_cast<size_t>(count), t, ncclSum, comm_, st);
    });
  }

  Status DoAllGather(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override {
    const CallInfo call{CollectiveKind::kAllGather, opts.what, count, dtype, ReduceOp::kSum, 0};
    return Run(call, opts, send, recv, [&](const void* s, void* r, ncclDataType_t t, cudaStream_t st) {
      return ncclAllGather(s, r, static_cast<size_t>(count), t, comm_, st);
    });
  }

  Status DoAllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                   const CollectiveOptions& opts) override {
    const CallInfo call{CollectiveKind::kAllReduce, opts.what, count, dtype, op, 0};
    return Run(call, opts, send, recv, [&](const void* s, void* r, ncclDataType_t t, cudaStream_t st) {
      return ncclAllReduce(s, r, static_cast<size_t>(count), t, NcclOp(op), comm_, st);
    });
  }

  Status DoBroadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) override {
    const CallInfo call{CollectiveKind::kBroadcast, opts.what, count, dtype, ReduceOp::kSum, root};
    return Run(call, opts, nullptr, buffer, [&](const void*, void* r, ncclDataType_t t, cudaStream_t st) {
      return ncclBroadcast(r, r, static_cast<size_t>(count), t, root, comm_, st);
    });
  }

  Status DoBarrier(const CollectiveOptions& opts) override {
    // A one-element all-reduce on the device scratch word, counted as Barrier (no data).
    const CallInfo call{CollectiveKind::kBarrier, opts.what, 0, DType::kF32, ReduceOp::kSum, 0};
    return Run(call, opts, nullptr, nullptr, [&](const void*, void*, ncclDataType_t, cudaStream_t st) {
      return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, st);
    });
  }

  // One NCCL group for all items (device memory only; host buffers fall back to one staged call per item).
  Status DoAllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts) override {
    for (const GatherItem& item : items) {  // one call per item, each through Run (which holds the scope)
      if (IsHost(item.send) || IsHost(item.recv)) return Comm::DoAllGatherMany(items, dtype, opts);
    }
    CallScope scope(this);
    if (!broken_.ok()) return broken_;
    ncclDataType_t type = ncclFloat32;
    const CallInfo first{CollectiveKind::kAllGather, opts.what, items.empty() ? 0 : items[0].count, dtype,
                         ReduceOp::kSum, 0};
    Status bad;
    if (!NcclType(dtype, &type)) bad = Status::InvalidArgument(internal::DescribeCall(first) + ": bad dtype");
    for (const GatherItem& item : items) {
      if (!bad.ok()) break;
      const CallInfo call{CollectiveKind::kAllGather, opts.what, item.count, dtype, ReduceOp::kSum, 0};
      bad = internal::ValidateCall(call, item.send, item.recv, rank(), world_size());
    }
    if (!bad.ok()) {
      broken_ = bad;  // peers will issue the group and wait for this rank: abort so that their NCCL fails them
      AbortNccl();
      return broken_;
    }
    for (const GatherItem& item : items) {
      const CallInfo call{CollectiveKind::kAllGather, opts.what, item.count, dtype, ReduceOp::kSum, 0};
      internal::CountCall(&counters_, call, opts, world_size());
      CountLinks(call, opts);
    }
    ZERO_RETURN_IF_ERROR(UseDevice(first));
    ZERO_RETURN_IF_ERROR(Poll());
    // With a caller's stream the group goes there, asynchronously (tracked by the watchdog); without, on this
    // Comm's stream, waited for.
    const auto target = opts.stream != nullptr ? static_cast<cudaStream_t>(opts.stream) : stream_;
    ZERO_RETURN_IF_ERROR(AfterFamily(first, target));
    ncclResult_t rc = ncclGroupStart();
    for (const GatherItem& item : items) {
      if (rc != ncclSuccess && rc != ncclInProgress) break;
      if (item.count == 0) continue;
      rc = ncclAllGather(item.send, item.recv, static_cast<size_t>(item.count), type, comm_, target);
    }
    const ncclResult_t end = ncclGroupEnd();
    if (rc == ncclSuccess || rc == ncclInProgress) rc = end;
    ZERO_RETURN_IF_ERROR(Settle(first, rc, "enqueue"));
    ZERO_RETURN_IF_ERROR(MarkFamily(first, target));
    return opts.stream != nullptr ? Track(first, target) : Wait(first);
  }

  // ncclCommSplit with one color: a communicator over the same ranks with its own stream and scratch.
  Status DoDuplicate(std::unique_ptr<Comm>* out) override {
    std::lock_guard<std::mutex> lock(call_mutex());  // ncclCommSplit is a call on comm_, like the collectives
    return SplitInto(/*color=*/0, rank(), topology_, "Comm::Duplicate (ncclCommSplit)", out);
  }

  // Under the call lock already (Comm::Split).
  Status DoSplit(int color, int key, const std::vector<int>& members, const NodeTopology& topology,
                 std::unique_ptr<Comm>* out) override {
    (void)members;
    return SplitInto(color, key, topology, "Comm::Split (ncclCommSplit)", out);
  }

  // ncclSend/ncclRecv to and from every peer in one group (NCCL's all-to-all recipe).
  Status DoAllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override {
    const CallInfo call{CollectiveKind::kAllToAll, opts.what, count, dtype, ReduceOp::kSum, 0};
    const size_t block = static_cast<size_t>(count) * DTypeSize(dtype);
    const int n = world_size();
    return Run(call, opts, send, recv, [&](const void* s, void* r, ncclDataType_t t, cudaStream_t st) {
      ncclResult_t rc = ncclGroupStart();
      for (int p = 0; p < n && (rc == ncclSuccess || rc == ncclInProgress); ++p) {
        rc = ncclSend(static_cast<const char*>(s) + p * block, static_cast<size_t>(count), t, p, comm_, st);
        if (rc == ncclSuccess || rc == ncclInProgress) {
          rc = ncclRecv(static_cast<char*>(r) + p * block, static_cast<size_t>(count), t, p, comm_, st);
        }
      }
      const ncclResult_t end = ncclGroupEnd();
      return rc == ncclSuccess || rc == ncclInProgress ? end : rc;
    });
  }

 private:
  // Validates, counts, enqueues `issue` on this Comm's stream (after opts.stream's earlier work) and waits for it.
  // Host buffers (small control messages: agreement checks, norms) are staged through device memory.
  template <typename Issue>
  Status Run(const CallInfo& call, const CollectiveOptions& opts, const void* send, void* recv, Issue issue) {
    CallScope scope(this);
    if (!broken_.ok()) return broken_;
    ncclDataType_t type = ncclFloat32;
    Status bad;
    if (!NcclType(call.dtype, &type)) bad = Status::InvalidArgument(internal::DescribeCall(call) + ": bad dtype");
    if (bad.ok() && call.kind != CollectiveKind::kBarrier) {
      bad = internal::ValidateCall(call, send, recv, rank(), world_size());
    }
    size_t send_bytes = 0, recv_bytes = 0;
    Sizes(call, &send_bytes, &recv_bytes);
    const bool staged = call.kind != CollectiveKind::kBarrier && (IsHost(send) || IsHost(recv));
    if (bad.ok() && staged && send_bytes + recv_bytes > kMaxStagedBytes) {
      bad = Status::InvalidArgument(internal::DescribeCall(call) + " on rank " + std::to_string(rank()) +
                                    ": NcclComm moves device memory; host buffers are staged only up to " +
                                    std::to_string(kMaxStagedBytes) + " bytes (control messages)");
    }
    if (!bad.ok()) {
      // Peers will issue this collective and wait for this rank: abort so that their NCCL fails them.
      broken_ = bad;
      AbortNccl();
      return broken_;
    }
    internal::CountCall(&counters_, call, opts, world_size());
    CountLinks(call, opts);
    if (call.count == 0 && call.kind != CollectiveKind::kBarrier) return Status::Ok();
    ZERO_RETURN_IF_ERROR(UseDevice(call));
    ZERO_RETURN_IF_ERROR(Poll());
    if (!staged && opts.stream != nullptr && call.kind != CollectiveKind::kBarrier) {
      // Asynchronous: on the caller's stream, tracked by the watchdog (Poll) until its event completes. The event
      // (and whatever the caller records next) must come after NCCL's kernels: settle first.
      const auto caller = static_cast<cudaStream_t>(opts.stream);
      ZERO_RETURN_IF_ERROR(AfterFamily(call, caller));
      ZERO_RETURN_IF_ERROR(Settle(call, issue(send, recv, type, caller), "enqueue"));
      ZERO_RETURN_IF_ERROR(MarkFamily(call, caller));
      return Track(call, caller);
    }
    if (!staged) {
      if (opts.stream != nullptr) ZERO_RETURN_IF_ERROR(Follow(call, static_cast<cudaStream_t>(opts.stream)));
      ZERO_RETURN_IF_ERROR(AfterFamily(call, stream_));
      ZERO_RETURN_IF_ERROR(Settle(call, issue(send, recv, type, stream_), "enqueue"));
      ZERO_RETURN_IF_ERROR(MarkFamily(call, stream_));
      return Wait(call);
    }
    // Host data is read when the copy is issued if it is pageable (staged by the CPU), in stream order if pinned;
    // either way it must come after the caller's stream's earlier work (which may write it, e.g. a D2H copy) and
    // the copy must not wait for the stream without a timeout: a copy from pageable memory "may synchronize with
    // the stream" (the runtime's API synchronization notes), and behind the caller's stream and the family's last
    // work are queued collectives that never finish when a peer stalls. So the caller's stream is drained first,
    // polled against the timeout with the watchdog running, and the copy goes up while this Comm's stream is idle
    // (every earlier call on it was waited for), before it is made to wait for the family.
    if (opts.stream != nullptr) ZERO_RETURN_IF_ERROR(DrainCaller(call, static_cast<cudaStream_t>(opts.stream)));
    ZERO_RETURN_IF_ERROR(EnsureStage(call, send_bytes + recv_bytes + kStageAlign));
    char* stage_send = static_cast<char*>(stage_);
    char* stage_recv = stage_send + (send_bytes + kStageAlign - 1) / kStageAlign * kStageAlign;
    cudaError_t crc = cudaSuccess;
    if (send_bytes > 0) crc = cudaMemcpyAsync(stage_send, send, send_bytes, cudaMemcpyDefault, stream_);
    // cudaMemcpyDefault: one of the two buffers may be device memory (only one needs to be host memory to stage).
    // Broadcast is in place: the root's data starts in the receive buffer.
    if (crc == cudaSuccess && call.kind == CollectiveKind::kBroadcast) {
      crc = cudaMemcpyAsync(stage_recv, recv, recv_bytes, cudaMemcpyDefault, stream_);
    }
    if (crc != cudaSuccess) return CudaBreak(call, crc);
    ZERO_RETURN_IF_ERROR(AfterFamily(call, stream_));
    ZERO_RETURN_IF_ERROR(Settle(call, issue(stage_send, stage_recv, type, stream_), "enqueue"));
    ZERO_RETURN_IF_ERROR(MarkFamily(call, stream_));
    ZERO_RETURN_IF_ERROR(Wait(call));
    crc = cudaMemcpyAsync(recv, stage_recv, recv_bytes, cudaMemcpyDefault, stream_);
    if (crc == cudaSuccess) crc = cudaStreamSynchronize(stream_);  // this Comm's stream only: a few bytes
    return crc == cudaSuccess ? Status::Ok() : CudaBreak(call, crc);
  }

  // CommCounters' link kinds: what a ring in rank order would send (comm_internal.h's ModelSends).
  void CountLinks(const CallInfo& call, const CollectiveOptions& opts) {
    if (opts.control) return;
    internal::ModelSends(call, rank(), world_size(),
                         [&](int peer, int64_t bytes) { internal::CountSent(&counters_, topology_, peer, bytes); });
  }

  // ncclCommSplit (non-blocking): a communicator over the ranks that pass `color`, ordered by `key`, with its own
  // stream and scratch, in this Comm's family. REQUIRES the call lock.
  Status SplitInto(int color, int key, const NodeTopology& topology, const char* what, std::unique_ptr<Comm>* out) {
    CallScope scope(this);
    ZERO_RETURN_IF_ERROR(Poll());
    const CallInfo call{CollectiveKind::kBarrier, what, 0, DType::kF32, ReduceOp::kSum, 0};
    ZERO_RETURN_IF_ERROR(UseDevice(call));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t split = nullptr;
    // With a non-blocking parent NCCL runs the split on a helper thread: the parent's asynchronous state says when
    // it is done and how it went, and `split` is written by that thread, at the end (NCCL's init.cc,
    // ncclCommInitChildComm). Polling the new communicator instead would see a fresh, idle state at once and hand
    // out a parent that NCCL still considers busy.
    const ncclResult_t rc = ncclCommSplit(comm_, color, key, &split, &config);
    const Status settled = Settle(call, rc, "split");
    ncclComm_t child = __atomic_load_n(&split, __ATOMIC_ACQUIRE);  // the helper thread has finished or was joined
    if (!settled.ok()) {
      if (child != nullptr) ncclCommAbort(child);
      return settled;
    }
    if (child == nullptr) return Break(call, ncclInternalError, "split (no communicator returned)");
    cudaStream_t stream = nullptr;
    void* scratch = nullptr;
    cudaError_t crc = Reported(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    if (crc == cudaSuccess) crc = Reported(AllocOn(device_, &scratch, sizeof(float), stream));  // see ~NcclComm
    // Barrier uses the scratch word on the caller's stream too: the allocation must have happened first (a new,
    // empty stream: this waits for nothing else).
    if (crc == cudaSuccess) crc = Reported(cudaStreamSynchronize(stream));
    if (crc != cudaSuccess) {
      ncclCommAbort(child);
      if (stream != nullptr) cudaStreamDestroy(stream);
      return CudaBreak(call, crc);
    }
    int child_rank = 0, child_world = 1;
    ncclCommUserRank(child, &child_rank);
    ncclCommCount(child, &child_world);
    out->reset(new NcclComm(child, stream, scratch, device_, child_rank, child_world, options_, topology, family_));
    return Status::Ok();
  }

  static constexpr size_t kMaxStagedBytes = size_t{1} << 20;
  static constexpr size_t kStageAlign = 256;

  static bool IsHost(const void* p) {
    if (p == nullptr) return false;
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
      cudaGetLastError();  // not a CUDA pointer at all: plain host memory
      return true;
    }
    return attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged;
  }

  void Sizes(const CallInfo& call, size_t* send_bytes, size_t* recv_bytes) const {
    const size_t n = static_cast<size_t>(call.count) * DTypeSize(call.dtype);
    const size_t all = n * static_cast<size_t>(world_size());
    switch (call.kind) {
      case CollectiveKind::kReduceScatter: *send_bytes = all; *recv_bytes = n; break;
      case CollectiveKind::kAllGather: *send_bytes = n; *recv_bytes = all; break;
      case CollectiveKind::kAllReduce: *send_bytes = n; *recv_bytes = n; break;
      case CollectiveKind::kBroadcast: *send_bytes = 0; *recv_bytes = n; break;
      case CollectiveKind::kAllToAll: *send_bytes = all; *recv_bytes = all; break;
      default: *send_bytes = 0; *recv_bytes = 0; break;
    }
  }

  // health() and Abort() on a thread other than the issuing one (comm.h allows it): a thread that never chose a
  // device has device 0 current, and its first runtime call (cudaEventQuery) creates a primary context there, about
  // half a GiB of GPU 0 per rank on a node whose other ranks use GPUs 1..n-1. Making this Comm's device current
  // first costs nothing on the issuing thread (every call does it) and creates no context.
  void CurrentDeviceForForeignThread() { (void)Reported(cudaSetDevice(device_)); }

  // The calling thread's current device is this Comm's (NCCL enqueues on it; the stream and staging are on it).
  Status UseDevice(const CallInfo& call) {
    const cudaError_t crc = cudaSetDevice(device_);
    return crc == cudaSuccess ? Status::Ok() : CudaBreak(call, crc);
  }

  // `target` waits for the last work every other member of the family enqueued (see "A family").
  Status AfterFamily(const CallInfo& call, cudaStream_t target) {
    std::lock_guard<std::mutex> lock(family_->mu);
    for (NcclComm* other : family_->members) {
      if (other == this || other->family_event_ == nullptr) continue;
      const cudaError_t crc = cudaStreamWaitEvent(target, other->family_event_, 0);
      if (crc != cudaSuccess) return CudaBreak(call, Reported(crc));
    }
    return Status::Ok();
  }
  // Records this member's last enqueued work, on `target`, for the family's next calls. Also while it is alone: a
  // Duplicate made later must still find the work this Comm left in flight (asynchronous collectives on the
  // caller's stream) and run its first collectives after it.
  Status MarkFamily(const CallInfo& call, cudaStream_t target) {
    std::lock_guard<std::mutex> lock(family_->mu);
    cudaError_t crc = cudaSuccess;
    if (family_event_ == nullptr) crc = cudaEventCreateWithFlags(&family_event_, cudaEventDisableTiming);
    if (crc == cudaSuccess) crc = cudaEventRecord(family_event_, target);
    return crc == cudaSuccess ? Status::Ok() : CudaBreak(call, Reported(crc));
  }

  // Returns once the work `caller` has so far has run (a staged call's host data may depend on it), polling with
  // the watchdog (an asynchronous collective of this Comm that is stuck there is the one to name) against the
  // timeout.
  Status DrainCaller(const CallInfo& call, cudaStream_t caller) {
    const auto deadline = Clock::now() + options_.timeout;
    for (int polls = 0;; ++polls) {
      ZERO_RETURN_IF_ERROR(Poll());
      const cudaError_t q = Queried(cudaStreamQuery(caller));
      if (q == cudaSuccess) return Status::Ok();
      if (q != cudaErrorNotReady) return CudaBreak(call, q);
      if (Clock::now() >= deadline) return TimedOut(call, "did not see the caller's stream drain");
      if (polls >= kSpinPolls) std::this_thread::sleep_for(kNap);
    }
  }

  // This Comm's stream waits for the work `caller` has so far (the engine's communication stream).
  Status Follow(const CallInfo& call, cudaStream_t caller) {
    cudaError_t crc = cudaSuccess;
    if (order_event_ == nullptr) crc = cudaEventCreateWithFlags(&order_event_, cudaEventDisableTiming);
    if (crc == cudaSuccess) crc = cudaEventRecord(order_event_, caller);
    if (crc == cudaSuccess) crc = cudaStreamWaitEvent(stream_, order_event_, 0);
    return crc == cudaSuccess ? Status::Ok() : CudaBreak(call, crc);
  }

  // The staging buffer, allocated once at its largest (control messages: at most kMaxStagedBytes plus alignment),
  // on stream_ and freed there with the Comm: growing it would free the old one meanwhile, and a cudaFree waits for
  // the whole device, NCCL kernels of the engine's queued collectives included (no timeout when a peer stalls).
  Status EnsureStage(const CallInfo& call, size_t bytes) {
    if (bytes <= stage_bytes_) return Status::Ok();
    const size_t largest = kMaxStagedBytes + kStageAlign;
    if (bytes > largest || stage_ != nullptr) {  // unreachable: Run refuses larger messages before it gets here
      broken_ = Status::Internal(internal::DescribeCall(call) + " on rank " + std::to_string(rank()) + ": " +
                                 std::to_string(bytes) + " bytes of staging requested, more than the " +
                                 std::to_string(largest) + " allocated");
      AbortNccl();  // peers wait for this rank's part
      return broken_;
    }
    const cudaError_t crc = AllocOn(device_, &stage_, largest, stream_);
    if (crc != cudaSuccess) {
      stage_ = nullptr;
      return CudaBreak(call, crc);
    }
    stage_bytes_ = largest;
    return Status::Ok();
  }

  Status CudaBreak(const CallInfo& call, cudaError_t crc) {
    (void)Reported(crc);
    broken_ = Status::Internal(internal::DescribeCall(call) + " on rank " + std::to_string(rank()) + ": CUDA error " +
                               cudaGetErrorString(crc) + "; this communicator is now unusable");
    AbortNccl();
    return broken_;
  }

  // ncclCommAbort once (it frees the communicator): peers whose kernels wait for this rank fail in their NCCL.
  void AbortNccl() {
    if (comm_aborted_) return;
    ncclCommAbort(comm_);
    comm_aborted_ = true;
  }

  // Breaks with a Timeout naming `call` and what did not happen in time, after aborting the communicator.
  Status TimedOut(const CallInfo& call, const char* what) {
    AbortNccl();
    broken_ = Status::Timeout(internal::DescribeCall(call) + " on rank " + std::to_string(rank()) + " of " +
                              std::to_string(world_size()) + " " + what + " within " +
                              std::to_string(options_.timeout.count()) +
                              " ms: a peer is stalled or the ranks issued collectives in different orders; the "
                              "NCCL communicator was aborted and is now unusable");
    return broken_;
  }

  bool Pending() const { return Queried(cudaStreamQuery(stream_)) == cudaErrorNotReady; }

  // After an NCCL call (or ncclGroupEnd) returned `rc`: an error breaks the Comm; ncclInProgress (a non-blocking
  // communicator with more than one rank, whose call went to NCCL's helper thread) is polled until the
  // communicator's asynchronous state leaves it, i.e. until the kernels are on the stream (or the call failed).
  // Bounded by the timeout: the helper may be connecting to peers that never come.
  Status Settle(const CallInfo& call, ncclResult_t rc, const char* when) {
    if (rc == ncclSuccess) return Status::Ok();
    if (rc != ncclInProgress) return Break(call, rc, when);
    const auto deadline = Clock::now() + options_.timeout;
    for (int polls = 0;; ++polls) {
      ncclResult_t state = ncclInProgress;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
      if (q != ncclSuccess) return Break(call, q, "reading the asynchronous state");
      if (state == ncclSuccess) return Status::Ok();
      if (state != ncclInProgress) return Break(call, state, when);
      if (Clock::now() >= deadline) {
        // A split is collective too: a rank that never calls Duplicate leaves the others here.
        return TimedOut(call, std::strcmp(when, "split") == 0 ? "did not complete" : "was not handed to the GPU");
      }
      if (polls >= kSpinPolls) std::this_thread::sleep_for(kNap);
    }
  }

  // Records the completion of `call`, just enqueued on `caller`, for the watchdog.
  Status Track(const CallInfo& call, cudaStream_t caller) {
    cudaEvent_t ev = nullptr;
    cudaError_t crc = cudaSuccess;
    if (!free_events_.empty()) {
      ev = free_events_.back();
      free_events_.pop_back();
    } else {
      crc = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    }
    if (crc == cudaSuccess) crc = cudaEventRecord(ev, caller);
    if (crc != cudaSuccess) {
      if (ev != nullptr) free_events_.push_back(ev);
      return CudaBreak(call, crc);
    }
    inflight_.push_back({ev, internal::DescribeCall(call), Clock::now() + options_.timeout});
    return Status::Ok();
  }

  // The watchdog over asynchronous collectives: retires completed ones (oldest first), turns NCCL's asynchronous
  // errors into a broken Comm, and aborts the communicator when the oldest one exceeds the timeout, naming it
  // (its `what` carries the bucket and step). Called by every collective and by health().
  Status Poll() {
    if (!broken_.ok()) return broken_;
    ncclResult_t async = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_, &async);
    if (query != ncclSuccess || (async != ncclSuccess && async != ncclInProgress)) {
      const std::string what = inflight_.empty() ? std::string("a collective") : inflight_.front().what;
      const char* last = ncclGetLastError(comm_);
      // A failed query leaves `async` unwritten: its own code is the news then.
      broken_ = Status::Internal(what + " on rank " + std::to_string(rank()) + ": NCCL asynchronous error: " +
                                 ncclGetErrorString(query != ncclSuccess ? query : async) +
                                 (last && *last ? std::string(" (") + last + ")" : "") +
                                 "; this communicator is now unusable");
      AbortNccl();
      return broken_;
    }
    while (!inflight_.empty()) {
      const InFlight& f = inflight_.front();
      const cudaError_t q = Queried(cudaEventQuery(f.event));
      if (q == cudaSuccess) {
        free_events_.push_back(f.event);
        inflight_.pop_front();
        continue;
      }
      if (q != cudaErrorNotReady) {
        (void)Reported(q);
        broken_ = Status::Internal(f.what + " on rank " + std::to_string(rank()) + ": CUDA error " +
                                   cudaGetErrorString(q) + "; this communicator is now unusable");
        return broken_;
      }
      if (Clock::now() >= f.deadline) {
        AbortNccl();
        broken_ = Status::Timeout(f.what + " on rank " + std::to_string(rank()) + " of " +
                                  std::to_string(world_size()) + " did not complete within " +
                                  std::to_string(options_.timeout.count()) +
                                  " ms: a peer is stalled or the ranks issued collectives in different orders; the "
                                  "NCCL communicator was aborted and is now unusable");
        return broken_;
      }
      break;
    }
    return Status::Ok();
  }

  Status Wait(const CallInfo& call) {
    const auto deadline = Clock::now() + options_.timeout;
    for (int polls = 0;; ++polls) {
      ZERO_RETURN_IF_ERROR(Poll());  // an earlier asynchronous collective that is stuck is the one to name
      ncclResult_t async = ncclSuccess;
      const ncclResult_t query = ncclCommGetAsyncError(comm_, &async);
      if (query != ncclSuccess || (async != ncclSuccess && async != ncclInProgress)) {
        return Break(call, query != ncclSuccess ? query : async, "asynchronous error");
      }
      const cudaError_t q = Queried(cudaStreamQuery(stream_));
      if (q == cudaSuccess && async == ncclSuccess) return Status::Ok();
      if (q != cudaSuccess && q != cudaErrorNotReady) {
        (void)Reported(q);
        broken_ = Status::Internal(internal::DescribeCall(call) + " on rank " + std::to_string(rank()) +
                                   ": CUDA error " + cudaGetErrorString(q) + "; this communicator is now unusable");
        return broken_;
      }
      if (Clock::now() >= deadline) return TimedOut(call, "did not complete");
      if (polls >= kSpinPolls) std::this_thread::sleep_for(kNap);
    }
  }

  // Copies a broken status to published_ for health() on other threads. REQUIRES state_mu_.
  void Publish() {
    if (broken_.ok()) return;
    std::lock_guard<std::mutex> lock(published_mu_);
    if (published_.ok()) published_ = broken_;
  }

  // state_mu_ for the duration of a call; publishes what the call left on its way out.
  class CallScope {
   public:
    explicit CallScope(NcclComm* comm) : comm_(comm), lock_(comm->state_mu_) {}
    ~CallScope() { comm_->Publish(); }
    CallScope(const CallScope&) = delete;
    CallScope& operator=(const CallScope&) = delete;

   private:
    NcclComm* comm_;
    std::lock_guard<std::mutex> lock_;
  };

  // Breaks with NCCL's error (its own last-error text when there is one) and aborts the communicator.
  Status Break(const CallInfo& call, ncclResult_t rc, const char* when) {
    const char* last = comm_aborted_ ? "" : ncclGetLastError(comm_);
    broken_ = Status::Internal(internal::DescribeCall(call) + " on rank " + std::to_string(rank()) + ": NCCL " +
                               when + ": " + ncclGetErrorString(rc) + (last && *last ? std::string(" (") + last + ")" : "") +
                               "; this communicator is now unusable");
    AbortNccl();
    return broken_;
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  void* scratch_;  // one float for Barrier
  int device_;
  cudaEvent_t order_event_ = nullptr;  // Follow's cross-stream edge
  void* stage_ = nullptr;             // device staging for host buffers
  size_t stage_bytes_ = 0;
  struct InFlight {
    cudaEvent_t event;
    std::string what;
    Clock::time_point deadline;
  };
  std::deque<InFlight> inflight_;         // asynchronous collectives not yet seen complete, oldest first
  std::vector<cudaEvent_t> free_events_;  // recycled completion events
  const CommOptions options_;
  std::shared_ptr<NcclFamily> family_;
  cudaEvent_t family_event_ = nullptr;  // this member's last enqueued work (guarded by family_->mu)
  Status broken_;
  bool comm_aborted_ = false;
  // Held by every call (CallScope) and by health() while it polls: broken_, comm_aborted_, the events in flight
  // and the communicator itself are touched by one thread at a time. health() on another thread during a call
  // does not wait for it: it returns published_, the broken status as of the last call's end.
  std::mutex state_mu_;
  mutable std::mutex published_mu_;
  Status published_;
};

// The value NCCL makes of its integer parameter `name` (the environment, then its configuration files; strtoll with
// base 0), when that is exactly `value`.
bool NcclParamIs(const char* name, long long value) {
  const std::optional<std::string> text = internal::NcclParamValue(name, internal::NcclConfFiles());
  if (!text || text->empty()) return false;
  errno = 0;
  const long long v = std::strtoll(text->c_str(), nullptr, 0);
  return errno == 0 && v == value;
}

// NCCL settings that override the communicators' configuration and break NcclComm's promises, or empty. Both are
// read by NCCL over ncclConfig_t (init.cc, envConfigOverride), so NcclComm cannot opt out of them itself:
//  * NCCL_COMM_BLOCKING=1 makes every communicator blocking: the init, split and finalize would wait for a stalled
//    or dead peer with no timeout (NcclComm polls the non-blocking forms against CommOptions::timeout);
//  * NCCL_COMM_SPLIT_SHARE_RESOURCES=1 makes Duplicate's and Split's communicators share their parent's abort flag:
//    aborting the engine's communicator on a timeout would stop the trainer's collectives too, and NCCL would still
//    report them successful (the parent's own state is untouched).
std::string RefusedNcclSettings() {
  if (NcclParamIs("NCCL_COMM_BLOCKING", 1)) {
    return "NCCL_COMM_BLOCKING=1 is set (environment or nccl.conf): it makes NCCL's init, split and finalize wait for "
           "a stalled peer with no timeout, where NcclComm relies on non-blocking communicators; unset it";
  }
  if (NcclParamIs("NCCL_COMM_SPLIT_SHARE_RESOURCES", 1)) {
    return "NCCL_COMM_SPLIT_SHARE_RESOURCES=1 is set (environment or nccl.conf): a Duplicate would share its "
           "parent's abort flag, so that aborting one silently ends the other's collectives; unset it";
  }
  return "";
}

// Frees what OpenNccl made before a communicator owned it.
void ReleaseOpenResources(ncclComm_t nccl, cudaStream_t stream, void* scratch, int device) {
  if (nccl != nullptr) ncclCommAbort(nccl);
  if (scratch != nullptr) (void)FreeOn(device, scratch, stream);  // allocated by AllocOn on `stream`
  if (stream != nullptr) cudaStreamDestroy(stream);
  (void)cudaGetLastError();
}

}  // namespace

Status Comm::OpenNccl(int64_t mpi_comm_fortran_handle, const CommOptions& options, std::unique_ptr<Comm>* comm) {
  comm->reset();
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return Status::FailedPrecondition("Comm::OpenNccl: MPI is not initialized");
  MPI_Comm parent = MPI_Comm_f2c(static_cast<MPI_Fint>(mpi_comm_fortran_handle));
  int rank = 0, world = 1;
  MPI_Comm_rank(parent, &rank);
  MPI_Comm_size(parent, &world);
  MPI_Comm local = MPI_COMM_NULL;
  MPI_Comm_split_type(parent, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
  int local_rank = 0, local_ranks = 1;
  MPI_Comm_rank(local, &local_rank);
  MPI_Comm_size(local, &local_ranks);
  const std::string where = "Comm::OpenNccl on rank " + std::to_string(rank);

  // Every rank must have a device of its own (or a GPU it may share: cuda_placement.h), or none proceeds. Whether
  // ranks share is decided by the PCI bus id of the GPU each would use, gathered over the node: ranks that each see
  // other devices (their own CUDA_VISIBLE_DEVICES) are not sharing however few devices each one sees.
  int devices = 0;
  cudaError_t crc = cudaGetDeviceCount(&devices);
  if (crc != cudaSuccess) devices = 0;
  char bus_id[32] = {};  // "" where this rank has no device or its bus id cannot be read
  if (devices > 0 && cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), local_rank % devices) != cudaSuccess) {
    (void)cudaGetLastError();
    bus_id[0] = '\0';
  }
  std::vector<char> all_ids(static_cast<size_t>(local_ranks) * sizeof(bus_id));
  MPI_Allgather(bus_id, sizeof(bus_id), MPI_CHAR, all_ids.data(), sizeof(bus_id), MPI_CHAR, local);
  MPI_Comm_free(&local);
  std::vector<std::string> node_ids;
  for (int r = 0; r < local_ranks; ++r) {
    const char* id = all_ids.data() + static_cast<size_t>(r) * sizeof(bus_id);
    if (id[0] != '\0') node_ids.emplace_back(id, strnlen(id, sizeof(bus_id)));
  }
  // Where some rank's bus id is missing, the device count decides, as it did before bus ids.
  const bool ids_known = static_cast<int>(node_ids.size()) == local_ranks;
  std::string why;
  internal::GpuPlacement place;
  if (crc != cudaSuccess) {
    (void)cudaGetLastError();
    why = cudaGetErrorString(crc);
  } else {
    int version = 0;
    if (ncclGetVersion(&version) != ncclSuccess) version = 0;
    const std::optional<std::string> multi_rank =
        internal::NcclParamValue("NCCL_MULTI_RANK_GPU_ENABLE", internal::NcclConfFiles());
    place = internal::PlaceRankOnGpu(local_rank, local_ranks, devices, version,
                                     multi_rank ? multi_rank->c_str() : nullptr,
                                     ids_known ? node_ids : std::vector<std::string>{});
    why = place.refusal;
    if (why.empty()) why = RefusedNcclSettings();
  }
  int ok = why.empty() ? 1 : 0, all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, parent);
  if (!all_ok) {
    // A refused placement or setting says what to do itself; the other causes get the CPU alternative.
    const bool refused_placement = devices > 0 && !why.empty() && crc == cudaSuccess;
    if (why.empty()) why = "another rank cannot use a GPU (its own status says why)";
    return Status::Unavailable(where + ": " + why +
                               (refused_placement ? "" : "; use Comm::OpenMpi and Backend::kCpu on machines without "
                                                         "GPUs"));
  }
  const int device = place.device;
  // Which node each rank is on (CommOptions::ranks_per_node may override the shared-memory split).
  NodeTopology topology;
  ZERO_RETURN_IF_ERROR(internal::DetectNodeTopology(parent, options.ranks_per_node, &topology).WithContext(where));

  // Rank 0's unique id, and whether ncclGetUniqueId worked (it needs a usable network interface for NCCL's
  // bootstrap): every rank learns the outcome instead of initializing with an id that was never written.
  struct {
    ncclUniqueId id;
    int rc;
  } bootstrap{};
  if (rank == 0) bootstrap.rc = static_cast<int>(ncclGetUniqueId(&bootstrap.id));
  MPI_Bcast(&bootstrap, sizeof(bootstrap), MPI_BYTE, 0, parent);
  if (bootstrap.rc != ncclSuccess) {
    return Status::Unavailable(where + ": ncclGetUniqueId failed on rank 0: " +
                               ncclGetErrorString(static_cast<ncclResult_t>(bootstrap.rc)) +
                               " (NCCL's bootstrap found no usable network interface; on one machine "
                               "NCCL_SOCKET_IFNAME=lo helps, NCCL_DEBUG=WARN says more); or use Comm::OpenMpi");
  }

  crc = cudaSetDevice(device);
  cudaStream_t stream = nullptr;
  void* scratch = nullptr;
  if (crc == cudaSuccess) crc = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  // On the stream where the device has pools, as every buffer of NcclComm (AllocOn, ~NcclComm).
  if (crc == cudaSuccess) crc = AllocOn(device, &scratch, sizeof(float), stream);
  // Barrier uses the scratch word on the caller's stream too: the allocation must have happened first (a new, empty
  // stream: this waits for nothing else).
  if (crc == cudaSuccess) crc = cudaStreamSynchronize(stream);
  if (crc != cudaSuccess) (void)cudaGetLastError();
  // Agree on the device setup before NCCL's init, which is collective: a rank that skipped it would leave the
  // others in their init's bootstrap for the whole timeout (300 s by default) before they learn why.
  ok = crc == cudaSuccess ? 1 : 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, parent);
  if (!all_ok) {
    ReleaseOpenResources(nullptr, stream, scratch, device);
    return Status::Unavailable(where + ": " +
                               (crc != cudaSuccess ? std::string("CUDA device ") + std::to_string(device) + ": " +
                                                         cudaGetErrorString(crc)
                                                   : std::string("another rank could not set up its CUDA device "
                                                                 "(its own status says why)")) +
                               "; use Comm::OpenMpi with Backend::kCpu if the GPUs cannot be used");
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t nccl = nullptr;
  ncclResult_t rc = ncclCommInitRankConfig(&nccl, world, bootstrap.id, rank, &config);
  const auto deadline = Clock::now() + options.timeout;
  while (rc == ncclInProgress && Clock::now() < deadline) {
    std::this_thread::sleep_for(kNap);
    if (ncclCommGetAsyncError(nccl, &rc) != ncclSuccess) rc = ncclInternalError;
  }
  // Agree on the outcome: a rank whose init failed must not leave the others with a half-built communicator.
  ok = rc == ncclSuccess ? 1 : 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, parent);
  if (!all_ok) {
    const std::string last = nccl != nullptr && rc != ncclSuccess ? ncclGetLastError(nccl) : "";
    ReleaseOpenResources(nccl, stream, scratch, device);
    const std::string detail = rc == ncclInProgress ? "timed out after " + std::to_string(options.timeout.count()) +
                                                          " ms"
                               : rc != ncclSuccess ? std::string(ncclGetErrorString(rc)) +
                                                         (last.empty() ? "" : " (" + last + ")")
                                                   : "another rank failed";
    return Status::Unavailable(where + ": NCCL initialization failed: " + detail +
                               "; NCCL_DEBUG=WARN says why, or use Comm::OpenMpi with Backend::kCpu");
  }
  comm->reset(new NcclComm(nccl, stream, scratch, device, rank, world, options, std::move(topology)));
  return Status::Ok();
}


#else

Status Comm::OpenNccl(int64_t, const CommOptions&, std::unique_ptr<Comm>* comm) {
  comm->reset();
  return Status::Unavailable(
      "Comm::OpenNccl: this build of zero has no CUDA/NCCL support (ZERO_WITH_CUDA=OFF or no toolkit); use "
      "Comm::OpenMpi");
}

#endif

// Either build: a Comm without an MPI communicator is refused first, then the handle form opens (or says why not).
Status Comm::OpenNccl(const Comm& mpi, const CommOptions& options, std::unique_ptr<Comm>* comm) {
  comm->reset();
  const auto* over = dynamic_cast<const internal::MpiComm*>(&mpi);
  if (over == nullptr) {
    return Status::InvalidArgument("Comm::OpenNccl on rank " + std::to_string(mpi.rank()) +
                                   ": the Comm to bootstrap over must come from Comm::OpenMpi or Comm::FromMpiComm "
                                   "(this one has no MPI communicator)");
  }
  return OpenNccl(MPI_Comm_c2f(over->mpi_comm()), options, comm);
}

}  // namespace zero

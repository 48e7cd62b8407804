// StagedComm: a test-only zero::Comm that moves device buffers by staging them through host memory and an inner
// host-memory Comm (an MpiComm from Comm::FromMpiComm), while reporting cuda_device() >= 0. Engine::Open accepts
// Backend::kCuda with it, so the engine's CUDA cases run at 2-4 ranks on ONE GPU even where NCCL refuses several
// ranks per GPU ("Duplicate GPU detected" before NCCL 2.30), and their sums follow MpiComm's fixed ring order, so
// the mirrored reference stays bitwise (testing/reference.h).
//
// Ordering is synchronous, which is fine for a test Comm and nothing like NcclComm's: with
// CollectiveOptions::stream set (the engine's communication stream) a call first waits for that stream's earlier
// work, copies the caller's buffers to the host on that stream and waits, runs the inner collective, copies the
// results back on that stream and waits again before returning. So it does not exercise NcclComm's asynchronous
// path (tests/nccl_comm_test and NCCL >= 2.30 do); it does exercise the engine's own event ordering between its
// compute and communication streams, its device buffers, shard offsets and in-place forms at world > 1.
//
// Everything else is the inner Comm's: argument checks (the caller's pointers are validated first, with the same
// rules), counters (each call adds what the inner Comm counted, bytes per link kind included), the node topology
// (CommOptions::ranks_per_node of the inner Comm), Split, Abort, health and timeouts. A failed copy breaks
// this Comm and aborts the inner one, so peers fail instead of hanging.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "comm_internal.h"  // CallInfo
#include "zero/comm.h"
#include "zero/status.h"

namespace zero::testing {

// How StagedComm reaches the buffers it is given. Thread-safe: a Comm and its duplicates share one.
class StagingMemory {
 public:
  virtual ~StagingMemory() = default;
  // What StagedComm::cuda_device() reports: a CUDA device ordinal, or -1 for host memory.
  virtual int device() const = 0;
  // Returns once the work enqueued on `stream` (a cudaStream_t) before this call has run.
  virtual Status Synchronize(void* stream) = 0;
  // Copies `bytes` from `src` (the caller's buffer) to host memory `host`, finished on return. `stream` is the
  // caller's CollectiveOptions::stream (null: the legacy default stream).
  virtual Status ToHost(void* host, const void* src, int64_t bytes, void* stream) = 0;
  // Copies `bytes` from host memory `host` to `dst` (the caller's buffer), finished on return.
  virtual Status FromHost(void* dst, const void* host, int64_t bytes, void* stream) = 0;
};

// Host memory: memcpy, streams ignored, device() = -1 (so Backend::kCpu accepts the Comm). Tests StagedComm's
// own logic on machines without a GPU.
std::unique_ptr<StagingMemory> NewHostStaging();
// CUDA: cudaMemcpyAsync on the stream, then cudaStreamSynchronize, with `device` current. Unavailable without
// CUDA in the build.
Status NewCudaStaging(int device, std::unique_ptr<StagingMemory>* out);

class StagedComm final : public Comm {
 public:
  // `inner` moves host memory (cuda_device() < 0); StagedComm owns it.
  StagedComm(std::unique_ptr<Comm> inner, std::shared_ptr<StagingMemory> memory);

  int cuda_device() const override { return memory_->device(); }
  void Abort(const Status& reason) override { inner_->Abort(reason); }
  Status health() const override;

 protected:
  Status DoReduceScatter(const void* send, void* recv, int64_t count, DType dtype,
                         const CollectiveOptions& opts) override;
  Status DoAllGather(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override;
  Status DoAllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                     const CollectiveOptions& opts) override;
  Status DoBroadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) override;
  Status DoBarrier(const CollectiveOptions& opts) override;
  Status DoAllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts) override;
  Status DoDuplicate(std::unique_ptr<Comm>* out) override;
  // The inner Comm's Split (its topology, restricted), staged like this one.
  Status DoSplit(int color, int key, const std::vector<int>& members, const NodeTopology& topology,
                 std::unique_ptr<Comm>* out) override;
  Status DoAllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override;

 private:
  // Host staging of at least `bytes` (8-byte aligned; reused across calls, which the call lock serializes).
  char* Stage(int64_t bytes);
  // health(), then the call's arguments (a bad call breaks this Comm).
  Status Check(const internal::CallInfo& call, const void* send, const void* recv);
  // Waits for CollectiveOptions::stream's earlier work; a failure breaks this Comm.
  Status WaitStream(const CollectiveOptions& opts);
  // Copies to / from the host; a failure breaks this Comm (see Break).
  Status Read(char* host, const void* src, int64_t bytes, const CollectiveOptions& opts);
  Status Write(void* dst, const char* host, int64_t bytes, const CollectiveOptions& opts);
  // Marks this Comm broken with `s` and aborts the inner one, so peers waiting for this rank fail too.
  Status Break(const Status& s);
  // Adds what the inner Comm counted since `before` to this Comm's counters.
  void AddCounts(const CommCounters& before);
  static CollectiveOptions InnerOptions(const CollectiveOptions& opts);

  std::unique_ptr<Comm> inner_;
  std::shared_ptr<StagingMemory> memory_;
  std::vector<double> staging_;
  mutable std::mutex mu_;  // guards broken_ (health may come from any thread)
  Status broken_;
};

}  // namespace zero::testing

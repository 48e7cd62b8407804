// StagedComm (staged_comm.h): device buffers through host memory and an inner host-memory Comm.
#include "testing/staged_comm.h"

#include <cstring>
#include <string>
#include <utility>

#include "comm_internal.h"  // ValidateCall: the same argument rules as every backend

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace zero::testing {

namespace {

using internal::CallInfo;
using internal::CollectiveKind;

class HostStaging final : public StagingMemory {
 public:
  int device() const override { return -1; }
  Status Synchronize(void*) override { return Status::Ok(); }
  Status ToHost(void* host, const void* src, int64_t bytes, void*) override {
    std::memcpy(host, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  Status FromHost(void* dst, const void* host, int64_t bytes, void*) override {
    std::memcpy(dst, host, static_cast<size_t>(bytes));
    return Status::Ok();
  }
};

#if defined(ZERO_WITH_CUDA)
class CudaStaging final : public StagingMemory {
 public:
  explicit CudaStaging(int device) : device_(device) {}
  int device() const override { return device_; }
  Status Synchronize(void* stream) override {
    ZERO_RETURN_IF_ERROR(Check("cudaSetDevice", cudaSetDevice(device_)));
    return Check("cudaStreamSynchronize", cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  }
  Status ToHost(void* host, const void* src, int64_t bytes, void* stream) override {
    return Copy(host, src, bytes, stream);
  }
  Status FromHost(void* dst, const void* host, int64_t bytes, void* stream) override {
    return Copy(dst, host, bytes, stream);
  }

 private:
  // On the caller's stream (the engine's communication stream, whose earlier work the copy must follow), then
  // waited for: the host buffer is read or written by the time this returns.
  Status Copy(void* dst, const void* src, int64_t bytes, void* stream) {
    const auto s = static_cast<cudaStream_t>(stream);
    ZERO_RETURN_IF_ERROR(Check("cudaSetDevice", cudaSetDevice(device_)));
    ZERO_RETURN_IF_ERROR(
        Check("cudaMemcpyAsync", cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault, s)));
    return Check("cudaStreamSynchronize", cudaStreamSynchronize(s));
  }
  Status Check(const char* what, cudaError_t rc) const {
    if (rc == cudaSuccess) return Status::Ok();
    cudaGetLastError();  // no sticky last error for an unrelated launch check
    return Status::Internal(std::string("StagedComm on device ") + std::to_string(device_) + ": " + what + ": " +
                            cudaGetErrorString(rc));
  }
  int device_;
};
#endif

}  // namespace

std::unique_ptr<StagingMemory> NewHostStaging() { return std::make_unique<HostStaging>(); }

Status NewCudaStaging(int device, std::unique_ptr<StagingMemory>* out) {
  out->reset();
#if defined(ZERO_WITH_CUDA)
  *out = std::make_unique<CudaStaging>(device);
  return Status::Ok();
#else
  (void)device;
  return Status::Unavailable("StagedComm: this build has no CUDA (ZERO_WITH_CUDA=OFF or no toolkit)");
#endif
}

StagedComm::StagedComm(std::unique_ptr<Comm> inner, std::shared_ptr<StagingMemory> memory)
    : Comm(inner->rank(), inner->world_size()), inner_(std::move(inner)), memory_(std::move(memory)) {
  timeout_ = inner_->timeout();
  topology_ = inner_->topology();
}

Status StagedComm::health() const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_.ok()) return broken_;
  }
  return inner_->health();
}

char* StagedComm::Stage(int64_t bytes) {
  const size_t words = static_cast<size_t>((bytes + 7) / 8);
  if (staging_.size() < words) staging_.resize(words);
  return reinterpret_cast<char*>(staging_.data());
}

Status StagedComm::Break(const Status& s) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok()) broken_ = s;
  }
  inner_->Abort(s);
  return s;
}

CollectiveOptions StagedComm::InnerOptions(const CollectiveOptions& opts) {
  CollectiveOptions inner = opts;
  inner.stream = nullptr;  // the inner Comm moves host memory: no stream of its own to follow
  return inner;
}

Status StagedComm::Read(char* host, const void* src, int64_t bytes, const CollectiveOptions& opts) {
  if (bytes == 0) return Status::Ok();
  const Status s = memory_->ToHost(host, src, bytes, opts.stream);
  return s.ok() ? s : Break(s);
}

Status StagedComm::Write(void* dst, const char* host, int64_t bytes, const CollectiveOptions& opts) {
  if (bytes == 0) return Status::Ok();
  const Status s = memory_->FromHost(dst, host, bytes, opts.stream);
  return s.ok() ? s : Break(s);
}

void StagedComm::AddCounts(const CommCounters& before) {
  const CommCounters& now = inner_->counters();
  counters_.reduce_scatter += now.reduce_scatter - before.reduce_scatter;
  counters_.all_gather += now.all_gather - before.all_gather;
  counters_.all_reduce += now.all_reduce - before.all_reduce;
  counters_.broadcast += now.broadcast - before.broadcast;
  counters_.all_to_all += now.all_to_all - before.all_to_all;
  counters_.intra_node_bytes += now.intra_node_bytes - before.intra_node_bytes;
  counters_.inter_node_bytes += now.inter_node_bytes - before.inter_node_bytes;
  counters_.control_calls += now.control_calls - before.control_calls;
  counters_.control_elements += now.control_elements - before.control_elements;
}

// A broken Comm answers with its status before touching any buffer; bad arguments break it (the peers could not
// know this rank skipped the call, so they are told rather than left to time out).
Status StagedComm::Check(const CallInfo& call, const void* send, const void* recv) {
  ZERO_RETURN_IF_ERROR(health());
  const Status v = internal::ValidateCall(call, send, recv, rank(), world_size());
  return v.ok() ? v : Break(v);
}

// The caller's stream (the engine's communication stream) has earlier work that wrote the buffers: wait for it.
Status StagedComm::WaitStream(const CollectiveOptions& opts) {
  if (opts.stream == nullptr) return Status::Ok();
  const Status s = memory_->Synchronize(opts.stream);
  return s.ok() ? s : Break(s);
}

Status StagedComm::DoReduceScatter(const void* send, void* recv, int64_t count, DType dtype,
                                   const CollectiveOptions& opts) {
  ZERO_RETURN_IF_ERROR(Check({CollectiveKind::kReduceScatter, opts.what, count, dtype}, send, recv));
  ZERO_RETURN_IF_ERROR(WaitStream(opts));
  const int64_t bytes = count * static_cast<int64_t>(DTypeSize(dtype)), all = bytes * world_size();
  const bool in_place = count > 0 && recv == static_cast<const char*>(send) + rank() * bytes;
  char* h_send = Stage(all + bytes);
  char* h_recv = in_place ? h_send + rank() * bytes : h_send + all;  // the same form on the host
  ZERO_RETURN_IF_ERROR(Read(h_send, send, all, opts));
  const CommCounters before = inner_->counters();
  const Status s = inner_->ReduceScatter(count > 0 ? h_send : nullptr, count > 0 ? h_recv : nullptr, count, dtype,
                                         InnerOptions(opts));
  AddCounts(before);
  ZERO_RETURN_IF_ERROR(s);
  return Write(recv, h_recv, bytes, opts);
}

Status StagedComm::DoAllGather(const void* send, void* recv, int64_t count, DType dtype,
                               const CollectiveOptions& opts) {
  ZERO_RETURN_IF_ERROR(Check({CollectiveKind::kAllGather, opts.what, count, dtype}, send, recv));
  ZERO_RETURN_IF_ERROR(WaitStream(opts));
  const int64_t bytes = count * static_cast<int64_t>(DTypeSize(dtype)), all = bytes * world_size();
  const bool in_place = count > 0 && send == static_cast<const char*>(recv) + rank() * bytes;
  char* h_recv = Stage(all + bytes);
  char* h_send = in_place ? h_recv + rank() * bytes : h_recv + all;
  ZERO_RETURN_IF_ERROR(Read(h_send, send, bytes, opts));
  const CommCounters before = inner_->counters();
  const Status s =
      inner_->AllGather(count > 0 ? h_send : nullptr, count > 0 ? h_recv : nullptr, count, dtype, InnerOptions(opts));
  AddCounts(before);
  ZERO_RETURN_IF_ERROR(s);
  return Write(recv, h_recv, all, opts);
}

Status StagedComm::DoAllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                               const CollectiveOptions& opts) {
  ZERO_RETURN_IF_ERROR(Check({CollectiveKind::kAllReduce, opts.what, count, dtype, op}, send, recv));
  ZERO_RETURN_IF_ERROR(WaitStream(opts));
  const int64_t bytes = count * static_cast<int64_t>(DTypeSize(dtype));
  const bool in_place = send == recv;
  char* h_send = Stage(2 * bytes);
  char* h_recv = in_place ? h_send : h_send + bytes;
  ZERO_RETURN_IF_ERROR(Read(h_send, send, bytes, opts));
  const CommCounters before = inner_->counters();
  const Status s = inner_->AllReduce(count > 0 ? h_send : nullptr, count > 0 ? h_recv : nullptr, count, dtype, op,
                                     InnerOptions(opts));
  AddCounts(before);
  ZERO_RETURN_IF_ERROR(s);
  return Write(recv, h_recv, bytes, opts);
}

Status StagedComm::DoBroadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) {
  ZERO_RETURN_IF_ERROR(
      Check({CollectiveKind::kBroadcast, opts.what, count, dtype, ReduceOp::kSum, root}, nullptr, buffer));
  ZERO_RETURN_IF_ERROR(WaitStream(opts));
  const int64_t bytes = count * static_cast<int64_t>(DTypeSize(dtype));
  char* h_buf = Stage(bytes);
  if (rank() == root) ZERO_RETURN_IF_ERROR(Read(h_buf, buffer, bytes, opts));
  const CommCounters before = inner_->counters();
  const Status s = inner_->Broadcast(count > 0 ? h_buf : nullptr, count, dtype, root, InnerOptions(opts));
  AddCounts(before);
  ZERO_RETURN_IF_ERROR(s);
  return rank() == root ? Status::Ok() : Write(buffer, h_buf, bytes, opts);  // the root's buffer is unchanged
}

Status StagedComm::DoBarrier(const CollectiveOptions& opts) {
  ZERO_RETURN_IF_ERROR(health());
  ZERO_RETURN_IF_ERROR(WaitStream(opts));
  const CommCounters before = inner_->counters();
  const Status s = inner_->Barrier(InnerOptions(opts));
  AddCounts(before);
  return s;
}

Status StagedComm::DoAllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
  int64_t total = 0;
  for (const GatherItem& item : items) {
    ZERO_RETURN_IF_ERROR(Check({CollectiveKind::kAllGather, opts.what, item.count, dtype}, item.send, item.recv));
    total += item.count * elem * (world_size() + 1);
  }
  ZERO_RETURN_IF_ERROR(WaitStream(opts));
  // Each item gets [recv: world * bytes][send: bytes] on the host, in the caller's in-place form.
  char* base = Stage(total);
  std::vector<GatherItem> host(items.size());
  int64_t at = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const GatherItem& item = items[i];
    const int64_t bytes = item.count * elem, all = bytes * world_size();
    const bool in_place = item.count > 0 && item.send == static_cast<const char*>(item.recv) + rank() * bytes;
    char* h_recv = base + at;
    char* h_send = in_place ? h_recv + rank() * bytes : h_recv + all;
    at += all + bytes;
    ZERO_RETURN_IF_ERROR(Read(h_send, item.send, bytes, opts));
    host[i] = {item.count > 0 ? h_send : nullptr, item.count > 0 ? h_recv : nullptr, item.count};
  }
  const CommCounters before = inner_->counters();
  const Status s = inner_->AllGatherMany(host, dtype, InnerOptions(opts));
  AddCounts(before);
  ZERO_RETURN_IF_ERROR(s);
  for (size_t i = 0; i < items.size(); ++i) {
    ZERO_RETURN_IF_ERROR(
        Write(items[i].recv, static_cast<const char*>(host[i].recv), items[i].count * elem * world_size(), opts));
  }
  return Status::Ok();
}

Status StagedComm::DoAllToAll(const void* send, void* recv, int64_t count, DType dtype,
                              const CollectiveOptions& opts) {
  ZERO_RETURN_IF_ERROR(Check({CollectiveKind::kAllToAll, opts.what, count, dtype}, send, recv));
  ZERO_RETURN_IF_ERROR(WaitStream(opts));
  const int64_t all = count * static_cast<int64_t>(DTypeSize(dtype)) * world_size();
  char* h_send = Stage(2 * all);  // AllToAll is never in place (ValidateCall)
  char* h_recv = h_send + all;
  ZERO_RETURN_IF_ERROR(Read(h_send, send, all, opts));
  const CommCounters before = inner_->counters();
  const Status s =
      inner_->AllToAll(count > 0 ? h_send : nullptr, count > 0 ? h_recv : nullptr, count, dtype, InnerOptions(opts));
  AddCounts(before);
  ZERO_RETURN_IF_ERROR(s);
  return Write(recv, h_recv, all, opts);
}

Status StagedComm::DoSplit(int color, int key, const std::vector<int>& members, const NodeTopology& topology,
                           std::unique_ptr<Comm>* out) {
  (void)members;
  (void)topology;  // the inner Comm restricts its own topology the same way
  ZERO_RETURN_IF_ERROR(health());
  std::unique_ptr<Comm> inner;
  ZERO_RETURN_IF_ERROR(inner_->Split(color, key, &inner));
  *out = std::make_unique<StagedComm>(std::move(inner), memory_);
  return Status::Ok();
}

Status StagedComm::DoDuplicate(std::unique_ptr<Comm>* out) {
  std::unique_ptr<Comm> inner;
  ZERO_RETURN_IF_ERROR(inner_->Duplicate(&inner));
  *out = std::make_unique<StagedComm>(std::move(inner), memory_);
  return Status::Ok();
}

}  // namespace zero::testing

// Comm's public collectives (the call lock, then the backend) and the defaults shared by every backend.
#include <memory>
#include <mutex>

#include "zero/comm.h"

namespace zero {

Status Comm::ReduceScatter(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) {
  std::lock_guard<std::mutex> lock(call_mu_);
  return DoReduceScatter(send, recv, count, dtype, opts);
}

Status Comm::AllGather(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) {
  std::lock_guard<std::mutex> lock(call_mu_);
  return DoAllGather(send, recv, count, dtype, opts);
}

Status Comm::AllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                       const CollectiveOptions& opts) {
  std::lock_guard<std::mutex> lock(call_mu_);
  return DoAllReduce(send, recv, count, dtype, op, opts);
}

Status Comm::Broadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) {
  std::lock_guard<std::mutex> lock(call_mu_);
  return DoBroadcast(buffer, count, dtype, root, opts);
}

Status Comm::Barrier(const CollectiveOptions& opts) {
  std::lock_guard<std::mutex> lock(call_mu_);
  return DoBarrier(opts);
}

Status Comm::AllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts) {
  std::lock_guard<std::mutex> lock(call_mu_);
  return DoAllGatherMany(items, dtype, opts);
}

Status Comm::DoAllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts) {
  for (const GatherItem& item : items) ZERO_RETURN_IF_ERROR(DoAllGather(item.send, item.recv, item.count, dtype, opts));
  return Status::Ok();
}

// Not under the call lock: on MPI a duplicate is an MPI collective on the data communicator, independent of the
// point-to-point messages of collectives that other threads may be running, so those may go on meanwhile. A
// backend whose duplication must exclude its collectives (NCCL) takes call_mutex() itself.
Status Comm::Duplicate(std::unique_ptr<Comm>* out) {
  if (out == nullptr) return Status::InvalidArgument("Comm::Duplicate: the output pointer is null");
  out->reset();
  std::lock_guard<std::mutex> lock(dup_mu_);
  ZERO_RETURN_IF_ERROR(health());
  return DoDuplicate(out);
}

}  // namespace zero

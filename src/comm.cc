// Comm's public collectives (the call lock, then the backend) and the defaults shared by every backend.
#include <algorithm>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "node_topology.h"
#include "zero/comm.h"

namespace zero {

Comm::Comm(int rank, int world_size) : rank_(rank), world_size_(world_size) {
  topology_ = internal::OneNode(rank, world_size);
}

CommCounters& CommCounters::operator+=(const CommCounters& o) {
  reduce_scatter += o.reduce_scatter;
  all_gather += o.all_gather;
  all_reduce += o.all_reduce;
  broadcast += o.broadcast;
  all_to_all += o.all_to_all;
  control_calls += o.control_calls;
  control_elements += o.control_elements;
  intra_node_bytes += o.intra_node_bytes;
  inter_node_bytes += o.inter_node_bytes;
  return *this;
}

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

Status Comm::AllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) {
  std::lock_guard<std::mutex> lock(call_mu_);
  return DoAllToAll(send, recv, count, dtype, opts);
}

Status Comm::DoAllToAll(const void*, void*, int64_t, DType, const CollectiveOptions& opts) {
  return Status::Unavailable(std::string("AllToAll") + (opts.what ? std::string(" \"") + opts.what + "\"" : "") +
                               " on rank " + std::to_string(rank()) +
                               ": this communicator has no all-to-all; use Comm::OpenMpi or Comm::OpenNccl");
}

Status Comm::DoSplit(int, int, const std::vector<int>&, const NodeTopology&, std::unique_ptr<Comm>*) {
  return Status::Unavailable("Comm::Split on rank " + std::to_string(rank()) +
                               ": this communicator cannot be split; use Comm::OpenMpi or Comm::OpenNccl");
}

// Under the call lock throughout: the exchange of colors is a collective of this Comm, and the backends' splits
// (MPI_Comm_split, ncclCommSplit) are calls on the same communicator.
Status Comm::Split(int color, int key, std::unique_ptr<Comm>* out) {
  if (out == nullptr) return Status::InvalidArgument("Comm::Split: the output pointer is null");
  out->reset();
  std::lock_guard<std::mutex> lock(call_mu_);
  ZERO_RETURN_IF_ERROR(health());
  const int n = world_size();
  // Every rank takes part in the exchange, also with a bad color, so that all of them fail alike.
  const int64_t mine[2] = {color, key};
  std::vector<int64_t> all(2 * static_cast<size_t>(n));
  CollectiveOptions co;
  co.control = true;
  co.what = "Comm::Split";
  ZERO_RETURN_IF_ERROR(DoAllGather(mine, all.data(), 2, DType::kI64, co));
  for (int r = 0; r < n; ++r) {
    if (all[2 * static_cast<size_t>(r)] < 0) {
      return Status::InvalidArgument("Comm::Split on rank " + std::to_string(rank()) + ": rank " + std::to_string(r) +
                                     " passed color " + std::to_string(all[2 * static_cast<size_t>(r)]) +
                                     "; colors must be >= 0");
    }
  }
  std::vector<int> members;
  for (int r = 0; r < n; ++r) {
    if (all[2 * static_cast<size_t>(r)] == color) members.push_back(r);
  }
  std::stable_sort(members.begin(), members.end(), [&](int a, int b) {
    return all[2 * static_cast<size_t>(a) + 1] < all[2 * static_cast<size_t>(b) + 1];
  });
  const int position = static_cast<int>(std::find(members.begin(), members.end(), rank()) - members.begin());
  return DoSplit(color, key, members, internal::Restrict(topology_, members, position), out);
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

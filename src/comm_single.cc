// SingleComm: Comm::Single(), a world of one rank. Every collective is a copy (nothing when in place); arguments,
// counters, Abort and health behave exactly as an MpiComm of world size 1, so code under test cannot tell them
// apart.
#include <memory>
#include <mutex>
#include <vector>

#include "comm_internal.h"
#include "zero/comm.h"

namespace zero {
namespace {

using internal::CallInfo;
using internal::CollectiveKind;

class SingleComm final : public Comm {
 public:
  SingleComm() : Comm(/*rank=*/0, /*world_size=*/1) {}

  void Abort(const Status& reason) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok()) broken_ = internal::AbortedBy(0, internal::AbortReasonText(reason));
  }

  Status health() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return broken_;
  }

 protected:

  Status DoReduceScatter(const void* send, void* recv, int64_t count, DType dtype,
                       const CollectiveOptions& opts) override {
    ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kReduceScatter, opts.what, count, dtype}, send, recv, opts));
    internal::CopyUnlessSame(recv, send, count * DTypeSize(dtype));
    return Status::Ok();
  }

  Status DoAllGather(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override {
    ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kAllGather, opts.what, count, dtype}, send, recv, opts));
    internal::CopyUnlessSame(recv, send, count * DTypeSize(dtype));
    return Status::Ok();
  }

  Status DoAllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                   const CollectiveOptions& opts) override {
    ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kAllReduce, opts.what, count, dtype, op}, send, recv, opts));
    internal::CopyUnlessSame(recv, send, count * DTypeSize(dtype));
    return Status::Ok();
  }

  Status DoBroadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) override {
    CallInfo call{CollectiveKind::kBroadcast, opts.what, count, dtype, ReduceOp::kSum, root};
    return Begin(call, nullptr, buffer, opts);
  }

  Status DoBarrier(const CollectiveOptions& opts) override {
    return Begin({CollectiveKind::kBarrier, opts.what}, nullptr, nullptr, opts);
  }

  Status DoDuplicate(std::unique_ptr<Comm>* out) override {
    out->reset(new SingleComm());
    return Status::Ok();
  }

  Status DoAllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override {
    ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kAllToAll, opts.what, count, dtype}, send, recv, opts));
    internal::CopyUnlessSame(recv, send, count * DTypeSize(dtype));
    return Status::Ok();
  }

  Status DoSplit(int, int, const std::vector<int>&, const NodeTopology&, std::unique_ptr<Comm>* out) override {
    out->reset(new SingleComm());
    return Status::Ok();
  }

 private:
  // A broken Comm returns its status; bad arguments break it (as in MpiComm, where the other ranks could not
  // know this rank skipped the call); otherwise the call is counted.
  Status Begin(const CallInfo& call, const void* send, const void* recv, const CollectiveOptions& opts) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_.ok()) return broken_;
    Status s = internal::ValidateCall(call, send, recv, /*rank=*/0, /*world=*/1);
    if (!s.ok()) {
      broken_ = s;
      return s;
    }
    internal::CountCall(&counters_, call, opts, /*world=*/1);
    return Status::Ok();
  }

  mutable std::mutex mu_;  // guards broken_: Abort and health may come from another thread
  Status broken_;
};

}  // namespace

std::unique_ptr<Comm> Comm::Single() { return std::make_unique<SingleComm>(); }

}  // namespace zero

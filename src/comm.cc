// Comm's non-virtual defaults, shared by every backend.
#include "zero/comm.h"

namespace zero {

Status Comm::AllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts) {
  for (const GatherItem& item : items) ZERO_RETURN_IF_ERROR(AllGather(item.send, item.recv, item.count, dtype, opts));
  return Status::Ok();
}

}  // namespace zero

// BufferPlan: every buffer Engine::Open allocates, with its category, kind and size, as a pure function of the
// options and the partition plan. Open allocates exactly this list, in this order, and zero::Estimate sums it,
// so the estimator cannot drift from the allocator: there is one copy of the sizing rules, here.
//
// Sizes (Ψt / Ψf trainable / frozen padded elements, N ranks, p / g bytes per param_dtype / grad_dtype element,
// "opt" = Ψt in stage 0 and Ψt/N otherwise):
//   trainable, frozen parameters  p·Ψt, p·Ψf (stage 3: p·Ψt/N, p·Ψf/N; pinned host with offload_params)
//   gradients                     g·Ψt (stages 2-3: g·Ψt/N)
//   fp32 master                   4·opt when param_dtype is 16-bit or the optimizer is offloaded
//   optimizer state               4·opt (SGD momentum, AdamW m) + 4·opt (AdamW v); pinned host when offloaded
//   offload staging               2 × (g + p unless offload_params) · largest trainable bucket shard, pinned host
//   gradient pool (stages 2-3)    P = grad_pool_buffers (every trainable unit without overlap), at most one per
//                                 trainable unit, in two sizes like the gather slots below (g bytes; k chosen
//                                 by size)
//   persistent units (stage 3)    p · units whose full padded bytes fit persist_bytes
//   gather slots (stage 3)        G = min(gather_slots, non-persistent units) slots: k of p · s1 and G − k of
//                                 p · s(k+1), s1 >= s2 >= ... the non-persistent units' full padded elements;
//                                 k = large_gather_slots, or (0) the k in 1..G with the fewest bytes, the
//                                 largest such k among equals
//   norm scratch (CUDA)           48 bytes per trainable bucket + 16 per started 4096 elements of its shard
#pragma once

#include <cstdint>
#include <vector>

#include "partition_plan.h"
#include "zero/options.h"
#include "zero/status.h"
#include "zero/types.h"

namespace zero {

// Which engine member a planned buffer goes to (engine.cc maps these to Engine::Impl's DeviceBuffers).
enum class BufferId : uint8_t {
  kTrainableParams,
  kFrozenParams,
  kGrads,
  kMaster,
  kState0,
  kState1,
  kHostGradStaging,   // index 0, 1
  kHostParamStaging,  // index 0, 1
  kGradPool,          // index 0 .. pool_buffers-1
  kPersistentParams,
  kGatherSlot,        // index 0 .. gather_slots-1
  kNormScratch,
};

struct PlannedBuffer {
  BufferId id;
  int index = 0;
  MemoryCategory category;
  MemoryKind kind;
  int64_t bytes = 0;
  const char* what = "";  // the allocation's name in out-of-memory messages and estimate tables
  // Parameters, gradients and optimizer state proper (what a bare parameter count can still estimate); false for
  // working buffers whose size depends on the model's unit structure (pool, gather slots, staging, scratch).
  bool model_state = false;
};

struct BufferPlan {
  // Per unit: padded elements of its trainable buckets and of all its buckets (its full layout).
  std::vector<int64_t> unit_trainable_elems, unit_full_elems;
  // Stage 3: units gathered for the whole run, and their start in the persistent buffer.
  std::vector<bool> unit_persistent;
  std::vector<int64_t> unit_persistent_offset;
  // Stages 2-3: elements of each gradient pool buffer (empty: no pool); the large_pool_buffers first ones fit
  // every unit.
  std::vector<int64_t> pool_elems;
  int pool_buffers = 0;
  int large_pool_buffers = 0;
  // Stage 3: elements of each gather slot (empty: no slots); the large_slots first ones fit every unit.
  std::vector<int64_t> slot_elems;
  int gather_slots = 0;
  int large_slots = 0;
  int64_t largest_trainable_shard = 0;
  std::vector<PlannedBuffer> buffers;  // allocation order

  int64_t Bytes(MemoryKind kind, MemoryCategory category) const;  // pinned and pageable host count as host
};

// REQUIRES: options validated (ValidateOptions) with a concrete stage (not kAuto); `plan` built from the same
// bucket_elements.
BufferPlan PlanBuffers(const Options& options, const PartitionPlan& plan);


// Engine::Open's option checks (engine.cc), shared with zero::Estimate.
Status ValidateOptions(const Options& options, int num_units);

}  // namespace zero

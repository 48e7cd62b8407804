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
// With the NVMe tier (Options::nvme_path) the master and optimizer state are not in host memory but in the tier's
// optimizer file (kNvme): per trainable bucket one record, its shard's master, then m and v (or momentum), each
// `shard` fp32, the record rounded up to 4096 bytes. With nvme_params the parameter shards (trainable and frozen)
// are in its parameter file: per bucket one record of p · shard bytes, rounded up to 4096. In host memory instead:
//   NVMe bounce buffers           nvme_buffers × (the largest trainable bucket's optimizer record + its parameter
//                                 record with nvme_params), pinned
//   NVMe gather bounce buffers    nvme_params: max(2, G) × the largest unit's parameter records, pinned
//   NVMe block checksums          9 bytes per nvme_block_bytes block of every record (rounded to 8), pageable
//   ZeRO++ (Options::zeropp; L ranks per node, n = N / L nodes, Pq(c, bits) = kernels::QuantPayloadBytes):
//     hpZ secondary partition     p · padded / L of every bucket of every non-persistent unit (stage 3)
//     qwZ staging                 the largest non-persistent unit's Σ N · Pq(shard, 8) over its buckets (stage 3)
//     qgZ staging                 the largest trainable bucket's (2N + 2n) · Pq(shard, bits) + 4 (n + 1) · shard
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
  kNvmeOptimizerFile,  // kNvme: not allocated; the tier's files
  kNvmeParamFile,
  kNvmeBounce,         // index 0 .. nvme_buffers-1
  kNvmeGatherBounce,   // index 0 .. NvmeLayout::gather_bounces-1
  kNvmeChecksums,
  kHpzSecondary,
  kQwzStaging,
  kQgzStaging,
};

// Where the NVMe tier keeps what (BufferPlan::nvme); empty without a tier.
struct NvmeLayout {
  bool on = false;
  bool params = false;  // nvme_params: the stage-3 parameter shards too
  int states = 0;       // fp32 arrays per optimizer record: master + m + v (3) or master + momentum (2)
  std::vector<int> opt_record;          // per plan bucket: its record in the optimizer file, -1 for frozen ones
  std::vector<int64_t> opt_record_bytes;  // per optimizer record
  std::vector<int> opt_record_bucket;     // per optimizer record: its bucket
  std::vector<int64_t> param_record_bytes;  // nvme_params: per plan bucket (record index = bucket index)
  int64_t bounce_opt_bytes = 0;    // a bounce buffer: the largest optimizer record ...
  int64_t bounce_param_bytes = 0;  // ... then, with nvme_params, the largest trainable parameter record
  int gather_bounces = 0;
  int64_t gather_bounce_bytes = 0;  // the largest unit's parameter records, back to back
  int64_t blocks = 0;               // checksum blocks over both files
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
  NvmeLayout nvme;
  // hpZ: each bucket's start (elements) in the secondary partition, -1 for buckets of persistent units (none without
  // hpZ); the partition spans hpz_ranks ranks (a node), so a bucket's piece is padded / hpz_ranks elements.
  std::vector<int64_t> hpz_offset;
  int hpz_ranks = 1;
  std::vector<PlannedBuffer> buffers;  // allocation order (kNvme entries are the tier's files, not allocations)

  int64_t Bytes(MemoryKind kind, MemoryCategory category) const;  // pinned and pageable host count as host
};

// REQUIRES: options validated (ValidateOptions) with a concrete stage (not kAuto); `plan` built from the same
// bucket_elements; ranks_per_node divides the world size (it sizes ZeRO++'s buffers only).
BufferPlan PlanBuffers(const Options& options, const PartitionPlan& plan, int ranks_per_node = 1);


// Engine::Open's option checks (engine.cc), shared with zero::Estimate.
Status ValidateOptions(const Options& options, int num_units);
// Its checks of Options::zeropp (engine_zeropp.cc).
Status ValidateZeroPlusPlus(const Options& options);

}  // namespace zero

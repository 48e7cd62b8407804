// PlanBuffers: the engine's buffer sizing rules, in one place (see buffer_plan.h).
#include "buffer_plan.h"

#include <algorithm>
#include <functional>
#include <vector>

#include "comm_hierarchical.h"
#include "kernels/sum_squares.cuh"
#include "nvme_tier.h"

namespace zero {

int64_t BufferPlan::Bytes(MemoryKind kind, MemoryCategory category) const {
  auto host = [](MemoryKind k) { return k == MemoryKind::kPinnedHost || k == MemoryKind::kPageableHost; };
  int64_t sum = 0;
  for (const PlannedBuffer& b : buffers) {
    if ((b.kind == kind || (host(b.kind) && host(kind))) && b.category == category) sum += b.bytes;
  }
  return sum;
}

// Buffers that each hold one unit at a time (stage 3's gather slots, stages 2-3's gradient pool), `count` of them
// for units of `sizes` elements: `large` of them fit every unit, the others every unit but the `large` largest
// (large = 0: the count in 1..count with the fewest elements, the largest among equals). No more buffers than
// units. Returns each buffer's elements, large ones first; *large_out is how many are large.
static std::vector<int64_t> TwoSizeBuffers(std::vector<int64_t> sizes, int count, int large, int* large_out) {
  std::sort(sizes.begin(), sizes.end(), std::greater<int64_t>());
  const int n = static_cast<int>(std::min<size_t>(static_cast<size_t>(count), sizes.size()));
  auto regular = [&](int k) { return k < static_cast<int>(sizes.size()) ? sizes[static_cast<size_t>(k)] : 0; };
  int k = std::min(large, n);
  if (k == 0 && n > 0) {
    int64_t best = -1;
    for (int c = 1; c <= n; ++c) {
      const int64_t total = c * sizes[0] + (n - c) * regular(c);
      if (best < 0 || total <= best) {
        best = total;
        k = c;
      }
    }
  }
  std::vector<int64_t> out;
  for (int i = 0; i < n; ++i) out.push_back(i < k ? sizes[0] : regular(k));
  *large_out = k;
  return out;
}

// ZeRO++'s buffers (buffer_plan.h's table), after every other one so that the rest of the plan does not move.
template <typename Add>
static void PlanZeroPlusPlus(const Options& o, const PartitionPlan& plan, int ranks_per_node, Add add,
                             BufferPlan* bp) {
  const ZeroPlusPlusOptions& z = o.zeropp;
  const int world = plan.world_size, L = std::max(1, ranks_per_node), nodes = std::max(1, world / L);
  const int64_t pe = static_cast<int64_t>(DTypeSize(o.param_dtype));
  bp->hpz_offset.assign(plan.buckets.size(), -1);
  bp->hpz_ranks = L;
  const bool stage3 = o.stage == Stage::kParameters;
  if (stage3 && z.hpz) {
    int64_t secondary = 0;
    for (const Bucket& b : plan.buckets) {
      if (bp->unit_persistent[static_cast<size_t>(b.unit)]) continue;
      bp->hpz_offset[static_cast<size_t>(b.index)] = secondary;
      secondary += b.padded / L;
    }
    add(BufferId::kHpzSecondary, 0, MemoryCategory::kParams, MemoryKind::kDevice, secondary * pe,
        "hpZ secondary partition (ZeRO++)", true);
  }
  if (stage3 && z.qwz) {
    int64_t largest = 0;
    for (size_t u = 0; u < plan.units.size(); ++u) {
      if (bp->unit_persistent[u]) continue;
      std::vector<int64_t> shards;
      for (int b : plan.units[u].trainable_buckets) shards.push_back(plan.buckets[static_cast<size_t>(b)].shard);
      for (int b : plan.units[u].frozen_buckets) shards.push_back(plan.buckets[static_cast<size_t>(b)].shard);
      largest = std::max(largest, internal::HierarchicalComm::GatherStagingBytes(shards, world));
    }
    add(BufferId::kQwzStaging, 0, MemoryCategory::kBuffers, MemoryKind::kDevice, largest, "qwZ staging (ZeRO++)",
        false);
  }
  if (z.qgz_bits > 0 && o.stage != Stage::kDataParallel) {
    int64_t largest = 0;
    for (const Bucket& b : plan.buckets) {
      if (!b.trainable) continue;
      largest = std::max(largest, internal::HierarchicalComm::ReduceStagingBytes(b.shard, nodes, L, z.qgz_bits));
    }
    add(BufferId::kQgzStaging, 0, MemoryCategory::kBuffers, MemoryKind::kDevice, largest, "qgZ staging (ZeRO++)",
        false);
  }
}

BufferPlan PlanBuffers(const Options& o, const PartitionPlan& plan, int ranks_per_node) {
  BufferPlan bp;
  const Stage st = o.stage;
  const bool stage3 = st == Stage::kParameters;
  const bool sharded_grads = st == Stage::kGradients || stage3;
  const bool offload = o.offload_optimizer;
  const int64_t pe = static_cast<int64_t>(DTypeSize(o.param_dtype));
  const int64_t ge = static_cast<int64_t>(DTypeSize(o.grad_dtype));
  // The fp32 master is apart from the compute parameters when those are 16-bit or live on the device while the
  // optimizer runs on the host.
  const bool sep_master = o.param_dtype != DType::kF32 || offload;

  // A unit's full layout: its trainable buckets, then its frozen buckets.
  const size_t num_units = plan.units.size();
  bp.unit_trainable_elems.assign(num_units, 0);
  bp.unit_full_elems.assign(num_units, 0);
  for (size_t u = 0; u < num_units; ++u) {
    const UnitPlan& up = plan.units[u];
    bp.unit_trainable_elems[u] = up.trainable_padded;
    bp.unit_full_elems[u] = up.trainable_padded + up.frozen_padded;
  }
  for (const Bucket& b : plan.buckets) {
    if (b.trainable) bp.largest_trainable_shard = std::max(bp.largest_trainable_shard, b.shard);
  }

  auto add = [&](BufferId id, int index, MemoryCategory c, MemoryKind k, int64_t bytes, const char* what,
                 bool model_state) {
    PlannedBuffer b;
    b.id = id;
    b.index = index;
    b.category = c;
    b.kind = k;
    b.bytes = bytes;
    b.what = what;
    b.model_state = model_state;
    bp.buffers.push_back(b);
  };
  const int64_t tp = plan.trainable_padded, fp = plan.frozen_padded;
  const int64_t ts = plan.trainable_shard, fs = plan.frozen_shard;
  const MemoryKind param_kind = o.offload_params ? MemoryKind::kPinnedHost : MemoryKind::kDevice;
  const MemoryKind opt_kind = offload ? MemoryKind::kPinnedHost : MemoryKind::kDevice;
  // The NVMe tier's records (see the header): sizes rounded up to O_DIRECT's alignment.
  NvmeLayout& nv = bp.nvme;
  nv.on = !o.nvme_path.empty();
  nv.params = nv.on && o.nvme_params;
  if (nv.on) {
    nv.states = o.optimizer == OptimizerKind::kAdamW ? 3 : 2;
    nv.opt_record.assign(plan.buckets.size(), -1);
    for (const Bucket& b : plan.buckets) {
      if (!b.trainable) continue;
      nv.opt_record[static_cast<size_t>(b.index)] = static_cast<int>(nv.opt_record_bytes.size());
      nv.opt_record_bytes.push_back(NvmeAlign(nv.states * 4 * b.shard));
      nv.opt_record_bucket.push_back(b.index);
      nv.bounce_opt_bytes = std::max(nv.bounce_opt_bytes, nv.opt_record_bytes.back());
      nv.blocks += NvmeBlocks(nv.opt_record_bytes.back(), o.nvme_block_bytes);
      if (nv.params) nv.bounce_param_bytes = std::max(nv.bounce_param_bytes, NvmeAlign(pe * b.shard));
    }
    if (nv.params) {
      for (const Bucket& b : plan.buckets) {
        nv.param_record_bytes.push_back(NvmeAlign(pe * b.shard));
        nv.blocks += NvmeBlocks(nv.param_record_bytes.back(), o.nvme_block_bytes);
      }
      for (const UnitPlan& up : plan.units) {
        int64_t unit = 0;
        for (int b : up.trainable_buckets) unit += nv.param_record_bytes[static_cast<size_t>(b)];
        for (int b : up.frozen_buckets) unit += nv.param_record_bytes[static_cast<size_t>(b)];
        nv.gather_bounce_bytes = std::max(nv.gather_bounce_bytes, unit);
      }
    }
  }
  auto sum = [](const std::vector<int64_t>& v) {
    int64_t t = 0;
    for (int64_t x : v) t += x;
    return t;
  };
  if (nv.params) {
    add(BufferId::kNvmeParamFile, 0, MemoryCategory::kParams, MemoryKind::kNvme, sum(nv.param_record_bytes),
        "NVMe parameter shards (file)", true);
  } else {
    add(BufferId::kTrainableParams, 0, MemoryCategory::kParams, param_kind, (stage3 ? ts : tp) * pe,
        "trainable parameters", true);
    add(BufferId::kFrozenParams, 0, MemoryCategory::kParams, param_kind, (stage3 ? fs : fp) * pe,
        "frozen parameters", true);
  }
  add(BufferId::kGrads, 0, MemoryCategory::kGrads, MemoryKind::kDevice, (sharded_grads ? ts : tp) * ge, "gradients",
      true);
  const int64_t opt = st == Stage::kDataParallel ? tp : ts;
  if (nv.on) {
    add(BufferId::kNvmeOptimizerFile, 0, MemoryCategory::kOptimizer, MemoryKind::kNvme, sum(nv.opt_record_bytes),
        "NVMe optimizer state (file)", true);
  } else {
    if (sep_master) {
      add(BufferId::kMaster, 0, MemoryCategory::kOptimizer, opt_kind, opt * 4, "fp32 master parameters", true);
    }
    add(BufferId::kState0, 0, MemoryCategory::kOptimizer, opt_kind, opt * 4, "optimizer state", true);
    if (o.optimizer == OptimizerKind::kAdamW) {
      add(BufferId::kState1, 0, MemoryCategory::kOptimizer, opt_kind, opt * 4, "optimizer state", true);
    }
  }
  if (offload) {
    // Double-buffered host staging of the largest trainable bucket shard: gradients down, parameters up.
    for (int i = 0; i < 2; ++i) {
      add(BufferId::kHostGradStaging, i, MemoryCategory::kGrads, MemoryKind::kPinnedHost,
          bp.largest_trainable_shard * ge, "offload gradient staging", false);
      if (!o.offload_params) {
        add(BufferId::kHostParamStaging, i, MemoryCategory::kBuffers, MemoryKind::kPinnedHost,
            bp.largest_trainable_shard * pe, "offload parameter staging", false);
      }
    }
  }
  if (sharded_grads) {
    std::vector<int64_t> trainable;
    for (int64_t t : bp.unit_trainable_elems) {
      if (t > 0) trainable.push_back(t);
    }
    // Without overlap every unit's buffer stays bound until the micro-step's last GradsReady.
    const int buffers = o.overlap_reductions ? o.grad_pool_buffers : static_cast<int>(trainable.size());
    bp.pool_elems = TwoSizeBuffers(trainable, buffers, /*large=*/0, &bp.large_pool_buffers);
    bp.pool_buffers = static_cast<int>(bp.pool_elems.size());
    for (int i = 0; i < bp.pool_buffers; ++i) {
      add(BufferId::kGradPool, i, MemoryCategory::kBuffers, MemoryKind::kDevice,
          bp.pool_elems[static_cast<size_t>(i)] * ge, "gradient pool", false);
    }
  }
  bp.unit_persistent.assign(num_units, false);
  bp.unit_persistent_offset.assign(num_units, 0);
  if (stage3) {
    int64_t persistent = 0;
    std::vector<int64_t> sizes;  // non-persistent units' full elements
    for (size_t u = 0; u < num_units; ++u) {
      const int64_t full = bp.unit_full_elems[u];
      if (full * pe <= o.persist_bytes) {
        bp.unit_persistent[u] = true;
        bp.unit_persistent_offset[u] = persistent;
        persistent += full;
      } else if (full > 0) {
        sizes.push_back(full);
      }
    }
    add(BufferId::kPersistentParams, 0, MemoryCategory::kParams, MemoryKind::kDevice, persistent * pe,
        "persistent stage-3 units", false);
    bp.slot_elems = TwoSizeBuffers(sizes, o.gather_slots, o.large_gather_slots, &bp.large_slots);
    bp.gather_slots = static_cast<int>(bp.slot_elems.size());
    for (int i = 0; i < bp.gather_slots; ++i) {
      add(BufferId::kGatherSlot, i, MemoryCategory::kBuffers, MemoryKind::kDevice,
          bp.slot_elems[static_cast<size_t>(i)] * pe,
          i < bp.large_slots ? "stage-3 gather slots (fit every unit)" : "stage-3 gather slots", false);
    }
  }
  if (nv.on) {
    for (int i = 0; i < o.nvme_buffers; ++i) {
      add(BufferId::kNvmeBounce, i, MemoryCategory::kBuffers, MemoryKind::kPinnedHost,
          nv.bounce_opt_bytes + nv.bounce_param_bytes, "NVMe bounce buffers", false);
    }
    if (nv.params) {
      // One per unit being gathered or prefetched at once (the gather slots), at least two.
      nv.gather_bounces = std::max(2, bp.gather_slots);
      for (int i = 0; i < nv.gather_bounces; ++i) {
        add(BufferId::kNvmeGatherBounce, i, MemoryCategory::kBuffers, MemoryKind::kPinnedHost, nv.gather_bounce_bytes,
            "NVMe gather bounce buffers", false);
      }
    }
    add(BufferId::kNvmeChecksums, 0, MemoryCategory::kBuffers, MemoryKind::kPageableHost, NvmeChecksumBytes(nv.blocks),
        "NVMe block checksums", false);
  }
  // The step's norm is one batch over every trainable bucket shard (kernels/sum_squares.cuh sizes its scratch).
  std::vector<int64_t> norm_sizes;
  for (const Bucket& b : plan.buckets) {
    if (b.trainable) norm_sizes.push_back(b.shard);
  }
  const int64_t scratch = o.backend == Backend::kCuda ? kernels::SumSquaresScratchBytes(
                                                            norm_sizes.data(), static_cast<int64_t>(norm_sizes.size()))
                                                      : 0;
  if (scratch > 0) {
    add(BufferId::kNormScratch, 0, MemoryCategory::kBuffers, MemoryKind::kDevice, scratch, "gradient norm scratch",
        false);
  }
  PlanZeroPlusPlus(o, plan, ranks_per_node, add, &bp);
  return bp;
}

}  // namespace zero

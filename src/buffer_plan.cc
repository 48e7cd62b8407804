// PlanBuffers: the engine's buffer sizing rules, in one place (see buffer_plan.h).
#include "buffer_plan.h"

#include <algorithm>
#include <vector>

#include "kernels/sum_squares.cuh"

namespace zero {

int64_t BufferPlan::Bytes(MemoryKind kind, MemoryCategory category) const {
  const bool device = kind == MemoryKind::kDevice;
  int64_t sum = 0;
  for (const PlannedBuffer& b : buffers) {
    if ((b.kind == MemoryKind::kDevice) == device && b.category == category) sum += b.bytes;
  }
  return sum;
}

int64_t NormScratchBytes(Backend backend, int64_t n) {
  if (backend != Backend::kCuda) return 0;
  return kernels::SumSquaresScratchBytes(&n, 1);  // kernels/reduce.cu's layout, for one range
}

BufferPlan PlanBuffers(const Options& o, const PartitionPlan& plan) {
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
  add(BufferId::kTrainableParams, 0, MemoryCategory::kParams, param_kind, (stage3 ? ts : tp) * pe,
      "trainable parameters", true);
  add(BufferId::kFrozenParams, 0, MemoryCategory::kParams, param_kind, (stage3 ? fs : fp) * pe, "frozen parameters",
      true);
  add(BufferId::kGrads, 0, MemoryCategory::kGrads, MemoryKind::kDevice, (sharded_grads ? ts : tp) * ge, "gradients",
      true);
  const int64_t opt = st == Stage::kDataParallel ? tp : ts;
  if (sep_master) {
    add(BufferId::kMaster, 0, MemoryCategory::kOptimizer, opt_kind, opt * 4, "fp32 master parameters", true);
  }
  add(BufferId::kState0, 0, MemoryCategory::kOptimizer, opt_kind, opt * 4, "optimizer state", true);
  if (o.optimizer == OptimizerKind::kAdamW) {
    add(BufferId::kState1, 0, MemoryCategory::kOptimizer, opt_kind, opt * 4, "optimizer state", true);
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
    for (int64_t t : bp.unit_trainable_elems) bp.pool_elems = std::max(bp.pool_elems, t);
    if (bp.pool_elems > 0) {
      // Without overlap every unit's buffer stays bound until the micro-step's last GradsReady.
      int buffers = o.grad_pool_buffers;
      if (!o.overlap_reductions) {
        int trainable_units = 0;
        for (int64_t t : bp.unit_trainable_elems) trainable_units += t > 0;
        buffers = std::max(buffers, trainable_units);
      }
      bp.pool_buffers = buffers;
      for (int i = 0; i < buffers; ++i) {
        add(BufferId::kGradPool, i, MemoryCategory::kBuffers, MemoryKind::kDevice, bp.pool_elems * ge,
            "gradient pool", false);
      }
    }
  }
  bp.unit_persistent.assign(num_units, false);
  bp.unit_persistent_offset.assign(num_units, 0);
  if (stage3) {
    int64_t persistent = 0;
    for (size_t u = 0; u < num_units; ++u) {
      const int64_t full = bp.unit_full_elems[u];
      if (full * pe <= o.persist_bytes) {
        bp.unit_persistent[u] = true;
        bp.unit_persistent_offset[u] = persistent;
        persistent += full;
      } else {
        bp.slot_elems = std::max(bp.slot_elems, full);
      }
    }
    add(BufferId::kPersistentParams, 0, MemoryCategory::kParams, MemoryKind::kDevice, persistent * pe,
        "persistent stage-3 units", false);
    if (bp.slot_elems > 0) {
      bp.gather_slots = o.gather_slots;
      for (int i = 0; i < o.gather_slots; ++i) {
        add(BufferId::kGatherSlot, i, MemoryCategory::kBuffers, MemoryKind::kDevice, bp.slot_elems * pe,
            "stage-3 gather slots", false);
      }
    }
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
  return bp;
}

}  // namespace zero

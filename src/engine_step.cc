// Engine: InitParams, Step (global norm, clipping, optimizer over owned fragments, re-gather) and GatherFull.
//
// The global norm is computed from owned shards only: each rank sums the squares of its shard of every
// trainable bucket (plan order, fp64, fixed blocks), the per-rank partials are all-gathered and added in rank
// order. Every rank therefore gets the same bits, and a single-process reference can mirror the order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <vector>

#include "engine_impl.h"
#include "kernels/cpu_adamw.h"
#include "kernels/cpu_kernels.h"

namespace zero {

namespace {
constexpr double kClipEps = 1e-6;  // torch.nn.utils.clip_grad_norm_
}  // namespace

void Engine::Impl::ZeroGrads() {
  if (grads.data() != nullptr) (void)device->Zero(grads.data(), grads.bytes(), nullptr);
}

Status Engine::Impl::InitParamsImpl(const FillFn& fill) {
  Status local;
  if (!fill) local = Status::InvalidArgument("InitParams on " + Where() + ": fill is empty");
  if (micro >= 0 || in_eval) {
    local = Status::FailedPrecondition("InitParams on " + Where() + ": a step or eval pass is in progress");
  }
  ZERO_RETURN_IF_ERROR(Agree(AgreeKind::kInitParams, 0, local));
  ++params_epoch;  // ZeRO++'s hpZ pieces are stale from here (Load comes here too)
  const bool stage3 = options.stage == Stage::kParameters;
  // Each owned fragment: fill in fp32, then the fp32 master (low-precision param_dtype) and the compute copy.
  const bool stage0 = options.stage == Stage::kDataParallel;
  std::vector<float> staging;
  std::vector<char> staging_p;
  Status e;
  // With the NVMe tier, a bucket's records are composed in a bounce buffer (the optimizer record: the master, m = v
  // = 0; the parameter record in a gather bounce buffer, which fits the largest bucket, frozen ones included) and
  // written from there, several buckets in flight.
  const bool tier = nvme != nullptr;
  nvme_cached_opt = nvme_cached_param = -1;
  int next_opt = 0, next_param = 0;
  auto fail = [&](const Status& why) {
    poison = why.WithContext("InitParams at " + Where());
    comm->Abort(poison);  // peers wait in the gathers below
    return poison;
  };
  for (const Bucket& b : plan.buckets) {
    char* base = stage3 ? ShardParamBase(b) : PAt(FullParamBase(b), rank * b.shard);
    const int64_t master_base = stage0 ? b.offset + rank * b.shard : b.shard_offset;
    char* opt_rec = nullptr;
    char* param_rec = nullptr;
    NvmeInFlight* opt_io = nullptr;
    NvmeInFlight* param_io = nullptr;
    if (tier && b.trainable) {
      const size_t i = static_cast<size_t>(next_opt++) % nvme_bounce.size();
      opt_io = &nvme_bounce_io[i];
      if (Status w = NvmeWaitIo(*opt_io); !w.ok()) return fail(w);
      opt_rec = NvmeOpt(static_cast<int>(i));
      std::memset(opt_rec, 0, static_cast<size_t>(nvme_layout.opt_record_bytes[static_cast<size_t>(
                                  nvme_layout.opt_record[static_cast<size_t>(b.index)])]));
    }
    if (tier && nvme_layout.params) {
      const size_t i = static_cast<size_t>(next_param++) % nvme_gather_bounce.size();
      param_io = &nvme_gather_io[i];
      if (Status w = NvmeWaitIo(*param_io); !w.ok()) return fail(w);
      param_rec = nvme_gather_bounce[i].as<char>();
      std::memset(param_rec, 0, static_cast<size_t>(nvme_layout.param_record_bytes[static_cast<size_t>(b.index)]));
    }
    for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
      char* dst = PAt(base, f.shard_off);
      if (!sep_master && device->host_addressable()) {
        fill(f.param, f.param_off, f.count, reinterpret_cast<float*>(dst));
        continue;
      }
      staging.assign(static_cast<size_t>(f.count), 0.0f);
      fill(f.param, f.param_off, f.count, staging.data());
      if (opt_rec != nullptr) {
        std::memcpy(opt_rec + f.shard_off * 4, staging.data(), static_cast<size_t>(f.count) * 4);
      } else if (b.trainable && sep_master) {
        e = device->CopyToDevice(master.as<float>() + master_base + f.shard_off, staging.data(), f.count * 4);
      }
      if (param_rec != nullptr) {
        kernels::CastCpu(staging.data(), DType::kF32, param_rec + f.shard_off * pe, pdt, f.count, 1);
      } else if (!mixed) {
        if (e.ok()) e = device->CopyToDevice(dst, staging.data(), f.count * 4);
      } else {
        staging_p.resize(static_cast<size_t>(f.count * pe));
        kernels::CastCpu(staging.data(), DType::kF32, staging_p.data(), pdt, f.count, 1);
        if (e.ok()) e = device->CopyToDevice(dst, staging_p.data(), f.count * pe);
      }
      if (!e.ok()) return fail(e);
    }
    if (opt_rec != nullptr) e = NvmeWriteOpt(b, opt_rec, *opt_io);
    if (e.ok() && param_rec != nullptr) e = NvmeWriteParams(b, param_rec, *param_io);
    if (!e.ok()) return fail(e);
  }
  // Every record is on the disk before a gather (stage 3's persistent units, below) or a step reads it.
  if (tier) {
    if (Status w = NvmeWaitAllIo(); !w.ok()) return fail(w);
  }
  if (!stage3) {
    for (const Bucket& b : plan.buckets) {
      char* full = FullParamBase(b);
      const int64_t shard = b.shard;
      const int r = rank;
      const DType dt = pdt;
      const int64_t bytes = pe;
      LaunchComm([this, full, shard, r, dt, bytes](void* stream) {
        CollectiveOptions co;
        co.stream = stream;
        co.what = "InitParams gather";
        return comm->AllGather(full + r * shard * bytes, full, shard, dt, co);
      });
      if (stage0 && sep_master && b.trainable) {  // stage 0 keeps a full fp32 master on every rank
        float* m = master.as<float>() + b.offset;
        LaunchComm([this, m, shard, r](void* stream) {
          CollectiveOptions co;
          co.stream = stream;
          co.what = "InitParams gather of the fp32 master";
          return comm->AllGather(m + r * shard, m, shard, DType::kF32, co);
        });
      }
    }
  } else {
    DropUnheldSlots();
    for (size_t u = 0; u < units.size(); ++u) {
      if (units[u].persistent) GatherUnit(static_cast<int>(u), UnitParamBase(static_cast<int>(u)));
    }
  }
  Status s = DrainComm();
  params_pending = false;
  if (!s.ok()) {
    poison = s;
    return s;
  }
  // Done when Zero returns, also for offloaded (host) state: Load writes the checkpoint's moments next, with the CPU.
  for (DeviceBuffer* b : {&state0, &state1}) {
    if (b->data() == nullptr) continue;
    if (Status z = device->Zero(b->data(), b->bytes(), nullptr); !z.ok()) {
      poison = z.WithContext("InitParams zeroing the optimizer state at " + Where());
      comm->Abort(poison);  // peers would wait for this rank in the next step's collectives
      return poison;
    }
  }
  ZeroGrads();
  step = 0;
  sgd_first_step = true;
  ResetScaler();
  incomplete = Status::Ok();
  return Status::Ok();
}

void Engine::Impl::ResetScaler() {
  const LossScaleOptions& o = options.loss_scale;
  dynamic_scale = o.mode == LossScaleOptions::Mode::kDynamic ||
                  (o.mode == LossScaleOptions::Mode::kAuto && (pdt == DType::kF16 || gdt == DType::kF16));
  loss_scale = dynamic_scale || o.mode == LossScaleOptions::Mode::kStatic ? o.initial : 1.0f;
  scale_hysteresis = o.hysteresis;
  scaler_iter = 0;
  last_overflow_iter = -1;
}

// DeepSpeed's DynamicLossScaler.update_scale (consecutive_hysteresis = false). Returns false when an overflow
// happened at the minimum scale: nothing can make the step representable.
bool Engine::Impl::UpdateScaler(bool overflow) {
  bool ok = true;
  if (dynamic_scale) {
    const LossScaleOptions& o = options.loss_scale;
    if (overflow) {
      if (scale_hysteresis <= 1) {
        if (loss_scale <= o.min_scale) ok = false;
        loss_scale = std::max(loss_scale / 2.0f, o.min_scale);
      } else {
        --scale_hysteresis;
      }
      last_overflow_iter = scaler_iter;
    } else if ((scaler_iter - last_overflow_iter) % o.growth_interval == 0) {
      scale_hysteresis = o.hysteresis;
      loss_scale *= 2.0f;
    }
  }
  ++scaler_iter;
  return ok;
}

// Issues the post-step parameter gathers; the trainer's next use waits for params_ready (WaitParams).
void Engine::Impl::GatherAfterStep() {
  // optimizer -> post-step gather: later gathers (these, and stage 3's at Acquire) read the updated shards.
  device->RecordCompute(optimizer_done.get());
  comm_stream->Wait(*optimizer_done);
  if (options.stage == Stage::kOptimizerStates || options.stage == Stage::kGradients) {
    for (const Bucket& b : plan.buckets) {
      if (b.trainable) GatherBucketAfterStep(b);
    }
  } else if (options.stage == Stage::kParameters) {
    GatherPersistentAfterStep();
  }
  comm_stream->Record(params_ready.get());
  params_pending = true;
}

void Engine::Impl::GatherBucketAfterStep(const Bucket& b) {
  char* full = FullParamBase(b);
  const char* mine = PAt(full, rank * b.shard);
  const int64_t shard = b.shard;
  const DType dt = pdt;
  LaunchComm([this, full, mine, shard, dt](void* stream) {
    CollectiveOptions co;
    co.stream = stream;
    co.what = "parameter all-gather after the step";
    return comm->AllGather(mine, full, shard, dt, co);
  });
  Log(Engine::Event::kGather, b.unit, b.index);
}

void Engine::Impl::GatherPersistentAfterStep() {
  for (size_t u = 0; u < units.size(); ++u) {
    if (!units[u].persistent) continue;
    const std::vector<int>& trainable = plan.units[u].trainable_buckets;
    LaunchGathers(trainable, UnitParamBase(static_cast<int>(u)), "parameter all-gather after the step");
    for (int bi : trainable) Log(Engine::Event::kGather, static_cast<int>(u), bi);
  }
}

// The offloaded optimizer (stages 1-3). For trainable bucket k in plan order, with staging slot i = k % 2:
//   copy stream:  gradient shard of k+1 -> host_grad[(k+1)%2]     (issued before k is updated: overlaps it)
//   host:         wait d2h_done[i]; wait h2d_done[i] (bucket k-2 has left host_copy[i]); update master, m, v of
//                 k's fragments on the CPU, writing the new compute copy to host_copy[i] (or, with offloaded
//                 parameters, straight into the host shard)
//   copy stream:  host_copy[i] -> the device parameters of k; record h2d_done[i]
//   comm stream:  wait h2d_done[i]; stages 1-2: all-gather k (overlaps the update of k+1)
// The host thread never waits for a gather; the trainer's next use of parameters waits for params_ready.
//
// With the NVMe tier, master, m and v of bucket k are not in host memory but in its record on the tier, streamed
// through S = nvme_buffers bounce buffers, bucket k in buffer k % S:
//   tier:         read k + S - 2 into its buffer once the write of k - 2 (the buffer's last bucket) completed
//                 (S = 3: bucket k+1 is read while k is updated and k-1 written back)
//   host:         wait for the read of k (every block verified against its checksum), update in the buffer (with
//                 nvme_params the new parameter shard goes to the buffer's parameter record), queue the writes
// and the step returns once every write is done, so the tier is consistent between steps. The gradient norm and
// the skip decision came before any of this (StepImpl): a skipped step reads nothing.
Status Engine::Impl::OffloadOptimizer(double grad_scale, double lr, int64_t t) {
  const Stage st = options.stage;
  const bool full_grads = st == Stage::kOptimizerStates;
  const bool adamw = options.optimizer == OptimizerKind::kAdamW;
  const bool tier = nvme != nullptr;
  const bool tier_params = tier && nvme_layout.params;
  Device* dev = device.get();
  std::vector<const Bucket*> order;
  for (const Bucket& b : plan.buckets) {
    if (b.trainable) order.push_back(&b);
  }
  // Files removed, replaced or truncated behind the engine's back are found before anything reads them.
  if (tier) ZERO_RETURN_IF_ERROR(nvme->CheckFiles());
  nvme_cached_opt = nvme_cached_param = -1;  // the bounce buffers are the step's now
  // compute -> copies: the trainer's last kernels may still read the device parameters the copies overwrite.
  device->RecordCompute(step_begin.get());
  copy_stream->Wait(*step_begin);
  auto down = [&](size_t k) {
    const Bucket& b = *order[k];
    const char* src = GAt(grads.as<char>(), full_grads ? b.offset + rank * b.shard : b.shard_offset);
    void* dst = host_grad[k % 2].data();
    const int64_t bytes = b.shard * ge;
    copy_stream->Launch([dev, dst, src, bytes](void* stream) { return dev->Copy(dst, src, bytes, stream); });
    copy_stream->Record(d2h_done[k % 2].get());
  };
  const size_t S = tier ? nvme_bounce.size() : 1;
  size_t next_read = 0;
  auto read_ahead = [&](size_t upto) -> Status {
    for (; next_read < order.size() && next_read <= upto; ++next_read) {
      NvmeInFlight& io = nvme_bounce_io[next_read % S];
      ZERO_RETURN_IF_ERROR(NvmeWaitIo(io));  // the writes of bucket next_read - S, which used this buffer
      ZERO_RETURN_IF_ERROR(NvmeReadOpt(*order[next_read], NvmeOpt(static_cast<int>(next_read % S)), io));
    }
    return Status::Ok();
  };
  if (!order.empty()) down(0);
  for (size_t k = 0; k < order.size(); ++k) {
    const Bucket& b = *order[k];
    const size_t i = k % 2;
    if (k + 1 < order.size()) down(k + 1);
    char* rec = nullptr;  // the tier: bucket k's optimizer record, [master | m | v], `b.shard` fp32 each
    if (tier) {
      ZERO_RETURN_IF_ERROR(read_ahead(k + S - 2));
      ZERO_RETURN_IF_ERROR(NvmeWaitIo(nvme_bounce_io[k % S]));
      rec = NvmeOpt(static_cast<int>(k % S));
    }
    ZERO_RETURN_IF_ERROR(d2h_done[i]->Synchronize(wait_timeout, "the gradient copy to the host"));
    if (k >= 2) ZERO_RETURN_IF_ERROR(h2d_done[i]->Synchronize(wait_timeout, "the parameter copy to the device"));
    ZERO_RETURN_IF_ERROR(copy_stream->status());
    const char* hg = host_grad[i].as<char>();
    for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
      const int64_t spos = b.shard_offset + f.shard_off;
      const ParamSpec& spec = specs[static_cast<size_t>(f.param)];
      const double plr = lr * spec.lr_mult;
      float* p = tier ? reinterpret_cast<float*>(rec) + f.shard_off : master.as<float>() + spos;
      float* m = tier ? reinterpret_cast<float*>(rec) + b.shard + f.shard_off : state0.as<float>() + spos;
      float* v = !adamw ? nullptr
                 : tier ? reinterpret_cast<float*>(rec) + 2 * b.shard + f.shard_off
                        : state1.as<float>() + spos;
      const void* g = hg + f.shard_off * ge;
      void* copy = tier_params       ? PAt(NvmeParam(static_cast<int>(k % S)), f.shard_off)
                   : offload_params ? PAt(trainable_params.as<char>(), spos)
                                    : PAt(host_copy[i].as<char>(), f.shard_off);
      bool ok;
      if (adamw) {
        const AdamWOptions& a = options.adamw;
        const auto c = kernels::MakeAdamWCoeffs(plr, a.beta1, a.beta2, a.eps, a.weight_decay * spec.wd_mult, t,
                                                grad_scale);
        ok = kernels::AdamWStepCpu(c, p, m, v, g, gdt, copy, pdt, f.count, threads);
      } else {
        const SgdOptions& o = options.sgd;
        const auto c = kernels::MakeSgdCoeffs(plr, o.momentum, o.dampening, o.weight_decay * spec.wd_mult,
                                              o.nesterov, sgd_first_step, grad_scale);
        ok = kernels::SgdCpu(c, p, m, g, gdt, f.count, threads) &&
             kernels::CastCpu(p, DType::kF32, copy, pdt, f.count, threads);
      }
      if (!ok) return Status::Internal("offloaded optimizer: unsupported dtype at " + Where());
    }
    if (tier) {
      NvmeInFlight& io = nvme_bounce_io[k % S];
      ZERO_RETURN_IF_ERROR(NvmeWriteOpt(b, rec, io));
      if (tier_params) {
        NvmeZeroParamPadding(b, NvmeParam(static_cast<int>(k % S)));
        ZERO_RETURN_IF_ERROR(NvmeWriteParams(b, NvmeParam(static_cast<int>(k % S)), io));
      }
    }
    if (!offload_params) {
      // Fragment by fragment, so that the shard's padding on the device is never written.
      char* base = st == Stage::kParameters ? ShardParamBase(b) : PAt(FullParamBase(b), rank * b.shard);
      for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
        char* dst = PAt(base, f.shard_off);
        const char* src = PAt(host_copy[i].as<char>(), f.shard_off);
        const int64_t bytes = f.count * pe;
        copy_stream->Launch([dev, dst, src, bytes](void* stream) { return dev->Copy(dst, src, bytes, stream); });
      }
      copy_stream->Record(h2d_done[i].get());
      comm_stream->Wait(*h2d_done[i]);
    }
    if (st != Stage::kParameters) GatherBucketAfterStep(b);
  }
  // Every write is on the disk before the step returns: the next step's reads, stage 3's gathers and Save find the
  // tier consistent.
  if (tier) ZERO_RETURN_IF_ERROR(NvmeWaitAllIo());
  return Status::Ok();
}

// The optimizer on the device (stage 0: every rank updates the replicated state; otherwise this rank's shard),
// writing the low-precision compute copy in the same pass when parameters are bf16/fp16.
Status Engine::Impl::DeviceOptimizer(double grad_scale, double lr, int64_t t) {
  const Stage st = options.stage;
  const bool full_grads = st == Stage::kDataParallel || st == Stage::kOptimizerStates;
  const bool adamw = options.optimizer == OptimizerKind::kAdamW;
  char* g = grads.as<char>();
  // Stage 0 keeps a replicated optimizer: every rank updates every rank's part.
  const int first_owner = st == Stage::kDataParallel ? 0 : rank;
  const int last_owner = st == Stage::kDataParallel ? world - 1 : rank;
  Status opt;
  for (const Bucket& b : plan.buckets) {
    if (!b.trainable) continue;
    for (int r = first_owner; r <= last_owner; ++r) {
      for (const Fragment& f : b.fragments[static_cast<size_t>(r)]) {
        const int64_t pos = b.offset + r * b.shard + f.shard_off;  // in the full trainable layout
        const int64_t spos = b.shard_offset + f.shard_off;         // in the shard layout
        const char* gr = GAt(g, full_grads ? pos : spos);
        const int64_t opos = st == Stage::kDataParallel ? pos : spos;
        float* p = MasterAt(opos, pos, spos);
        // The low-precision compute copy, written in the same pass.
        void* copy = mixed ? PAt(trainable_params.as<char>(), st == Stage::kParameters ? spos : pos) : nullptr;
        const ParamSpec& spec = specs[static_cast<size_t>(f.param)];
        const double plr = lr * spec.lr_mult;
        if (adamw) {
          const AdamWOptions& a = options.adamw;
          const auto c = kernels::MakeAdamWCoeffs(plr, a.beta1, a.beta2, a.eps, a.weight_decay * spec.wd_mult, t,
                                                  grad_scale);
          if (opt.ok()) {
            opt = device->AdamW(c, p, state0.as<float>() + opos, state1.as<float>() + opos, gr, gdt, copy, pdt,
                                f.count, nullptr);
          }
        } else {
          const SgdOptions& o = options.sgd;
          const auto c = kernels::MakeSgdCoeffs(plr, o.momentum, o.dampening, o.weight_decay * spec.wd_mult,
                                                o.nesterov, sgd_first_step, grad_scale);
          if (opt.ok()) opt = device->Sgd(c, p, state0.as<float>() + opos, gr, gdt, copy, pdt, f.count, nullptr);
        }
      }
    }
  }
  return opt;
}

Status Engine::Impl::StepImpl(const StepArgs& args, StepResult* result) {
  const std::string call = "Step on " + Where();
  Status local;
  if (result == nullptr) local = Status::InvalidArgument(call + ": result is null");
  if (in_eval) local = Status::FailedPrecondition(call + ": inside an eval pass; call EndEval first");
  if (micro < 0) local = Status::FailedPrecondition(call + ": no micro-step was run; call BeginMicroStep first");
  if (local.ok() && !micro_is_last) {
    local = Status::FailedPrecondition(call + ": the current micro-step was not begun with is_last = true");
  }
  if (local.ok() && !full_scope_units.empty()) {
    local = Status::FailedPrecondition(call + ": a GatherFull scope is open; close it first");
  }
  if (local.ok()) local = CheckUnitsDone(call, /*need_grads=*/true);
  // Some reductions of this micro-step may already be out while this rank cannot finish the rest: peers would
  // wait for them forever, so abort the communicator (they get this reason) instead of reporting locally.
  if (!local.ok() && next_reduce > 0 && next_reduce < reduce_order.size()) {
    poison = local.WithContext("the engine is unusable, its reductions were left half done");
    comm->Abort(local);
    return poison;
  }
  ZERO_RETURN_IF_ERROR(Agree(AgreeKind::kStep, 0, local));
  // reduce/accumulate -> Step: the agreement check ran after every reduction on the comm stream; drain anyway,
  // so the edge does not rest on that.
  ZERO_RETURN_IF_ERROR(DrainComm());

  // Global norm from owned shards (see the file comment).
  const Stage st = options.stage;
  const bool full_grads = st == Stage::kDataParallel || st == Stage::kOptimizerStates;
  // Every trainable bucket's owned shard in one batch (one wait on CUDA); the per-bucket sums are then added here
  // in plan order, so the bits are those of one SumSquares call per bucket.
  std::vector<kernels::SumSquaresRange> ranges;
  for (const Bucket& b : plan.buckets) {
    if (!b.trainable) continue;
    ranges.push_back({GAt(grads.as<char>(), full_grads ? b.offset + rank * b.shard : b.shard_offset), b.shard});
  }
  std::vector<kernels::SumSquares> sums;
  if (Status e = device->SumSquares(ranges, gdt, norm_scratch.data(), norm_scratch.bytes(), &sums); !e.ok()) {
    poison = e.WithContext("gradient norm at " + Where());
    comm->Abort(poison);  // peers wait in the norm all-gather below
    return poison;
  }
  double mine[2] = {0.0, 0.0};
  for (const kernels::SumSquares& ss : sums) {
    mine[0] += ss.sum;
    mine[1] += static_cast<double>(ss.nonfinite);
  }
  std::vector<double> all(2 * static_cast<size_t>(world));
  CollectiveOptions co;
  co.control = true;
  co.what = "gradient norm";
  Status s = RunComm([&](void*) { return comm->AllGather(mine, all.data(), 2, DType::kF64, co); });
  if (!s.ok()) {
    poison = s;
    return s;
  }
  double sumsq = 0.0, nonfinite = 0.0;
  for (int r = 0; r < world; ++r) {
    sumsq += all[2 * static_cast<size_t>(r)];
    nonfinite += all[2 * static_cast<size_t>(r) + 1];
  }
  const double inv_avg = 1.0 / (static_cast<double>(world) * micros_done);
  StepResult res;
  // The gradients carry the loss scale (a power of two, so dividing it out is exact).
  res.loss_scale = loss_scale;
  res.grad_norm = std::sqrt(sumsq) * inv_avg / loss_scale;
  if (options.clip_norm > 0) {
    const double c = options.clip_norm / (res.grad_norm + kClipEps);
    if (c < 1.0) res.clip_coef = c;
  }
  const bool adamw = options.optimizer == OptimizerKind::kAdamW;
  res.lr = args.lr >= 0 ? args.lr : (adamw ? options.adamw.lr : options.sgd.lr);
  res.skipped = nonfinite > 0;

  // Every rank saw the same sums, so every rank takes the same decision and the same scaler update.
  const bool scale_ok = UpdateScaler(res.skipped);

  if (!res.skipped) {
    const double grad_scale = inv_avg * res.clip_coef / res.loss_scale;
    const Status opt = offload ? OffloadOptimizer(grad_scale, res.lr, step + 1)
                               : DeviceOptimizer(grad_scale, res.lr, step + 1);
    if (!opt.ok()) {
      poison = opt.WithContext("optimizer at " + Where());
      comm->Abort(poison);  // peers wait in the parameter gathers
      return poison;
    }
    ++step;
    ++params_epoch;  // ZeRO++'s hpZ pieces are stale now
    sgd_first_step = false;
    DropUnheldSlots();  // stage-3 gathered copies are stale now (nothing is held at Step)
    if (offload) {
      // Stages 1-2 queued their gathers bucket by bucket; stage 3's persistent units follow.
      if (options.stage == Stage::kParameters) GatherPersistentAfterStep();
      comm_stream->Record(params_ready.get());
      params_pending = true;
    } else {
      GatherAfterStep();
    }
  }
  ZeroGrads();
  res.step = step;
  Log(Engine::Event::kStep, -1, -1);
  micro = -1;
  micros_done = 0;
  micro_is_last = false;
  next_reduce = 0;
  trace_hash = 0;
  for (UnitState& u : units) {
    u.grads_ready = false;
    u.grad_window = false;
  }
  *result = res;
  if (!scale_ok) {
    return Status::FailedPrecondition(
        call + ": the gradients overflowed at the minimum loss scale (" + std::to_string(options.loss_scale.min_scale) +
        "), so the step was skipped and the scale cannot go lower. Training has diverged or the values do not fit "
        "fp16: lower the learning rate, clip gradients, or use param_dtype = kBF16. The engine stays usable");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------------------------
// GatherFull

Status Engine::GatherFull(std::span<const int> unit_list, FullParamsScope* scope) {
  Impl& e = *impl_;
  ZERO_RETURN_IF_ERROR(e.CheckUsable());
  Status local;
  if (scope == nullptr) local = Status::InvalidArgument("GatherFull on " + e.Where() + ": scope is null");
  if (local.ok() && e.micro >= 0) {
    local = Status::FailedPrecondition("GatherFull on " + e.Where() + ": a training step is in progress");
  }
  if (local.ok() && !e.full_scope_units.empty()) {
    local = Status::FailedPrecondition("GatherFull on " + e.Where() + ": another GatherFull scope is open");
  }
  uint64_t h = 0;
  for (int u : unit_list) {
    if (local.ok()) local = e.ValidUnit(u, "GatherFull");
    h = (h * 1000003u + static_cast<uint64_t>(u) + 1) & ((uint64_t{1} << 52) - 1);
  }
  ZERO_RETURN_IF_ERROR(e.Agree(AgreeKind::kGatherFull, static_cast<int64_t>(h), local));
  std::vector<int> list(unit_list.begin(), unit_list.end());
  if (e.options.stage == Stage::kParameters) {
    for (int u : list) {
      UnitState& us = e.units[static_cast<size_t>(u)];
      if (us.persistent || us.full_scope.data() != nullptr) continue;
      Status s = e.device->Allocate(us.full_elems * e.pe, MemoryCategory::kBuffers, MemoryKind::kDevice,
                                    "GatherFull of " + e.UnitName(u), &us.full_scope);
      // Allocation may fail on one rank only; the gathers below must still run everywhere, so a failing rank
      // aborts the communicator instead of leaving its peers waiting.
      if (!s.ok()) {
        e.poison = s;
        e.comm->Abort(s);
        return s;
      }
      e.GatherUnit(u, us.full_scope.as<char>());
    }
  }
  ZERO_RETURN_IF_ERROR(e.DrainComm());  // also the post-step gathers of stages 1-2
  e.params_pending = false;
  e.full_scope_units = list;
  *scope = FullParamsScope();
  scope->engine_ = this;
  scope->units_ = std::move(list);
  return Status::Ok();
}

Status Engine::ReleaseFull(const std::vector<int>& unit_list) {
  Impl& e = *impl_;
  ZERO_RETURN_IF_ERROR(e.CheckUsable());
  ZERO_RETURN_IF_ERROR(e.Agree(AgreeKind::kReleaseFull, static_cast<int64_t>(unit_list.size()), Status::Ok()));
  for (int u : unit_list) e.units[static_cast<size_t>(u)].full_scope.Reset();
  e.full_scope_units.clear();
  return Status::Ok();
}

FullParamsScope::FullParamsScope(FullParamsScope&& other) noexcept { *this = std::move(other); }

FullParamsScope& FullParamsScope::operator=(FullParamsScope&& other) noexcept {
  if (this != &other) {
    (void)Close();
    engine_ = other.engine_;
    units_ = std::move(other.units_);
    other.engine_ = nullptr;
  }
  return *this;
}

FullParamsScope::~FullParamsScope() { (void)Close(); }

Status FullParamsScope::Close() {
  if (engine_ == nullptr) return Status::Ok();
  Engine* e = engine_;
  engine_ = nullptr;
  return e->ReleaseFull(units_);
}

}  // namespace zero

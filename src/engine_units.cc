// Engine: the per-unit protocol. Acquire/Release (stage-3 gathers, the recorded trace, prefetch) and
// GradsReady (gradient pool, bucket reductions in a fixed order).
//
// Collective order: every rank issues the same collectives in the same order because every decision below
// depends only on state that is identical across ranks (the plan, the recorded trace, slot and pool occupancy,
// which all follow the same sequence of calls). Reductions go out in `reduce_order` (units descending, the order
// backward produces them); a unit whose gradients are ready waits for the units before it in that order.
#include <algorithm>
#include <cstring>
#include <sstream>

#include "engine_impl.h"

namespace zero {

namespace {
const char* PassName(Pass p) { return p == Pass::kForward ? "kForward" : "kBackward"; }
}  // namespace

Status Engine::Impl::AcquireImpl(int unit, Pass pass) {
  UnitState& u = units[static_cast<size_t>(unit)];
  const std::string call = std::string("Acquire(") + std::to_string(unit) + ", " + PassName(pass) + ") on " + Where();
  if (in_eval && pass == Pass::kBackward) {
    return Status::FailedPrecondition(call + ": eval passes are forward-only");
  }
  if (!in_eval && micro < 0) {
    return Status::FailedPrecondition(call + ": outside a micro-step and outside an eval pass; call BeginMicroStep "
                                      "for training, or BeginEval before forward-only passes (evaluation, generation)");
  }
  if (pass == Pass::kBackward && u.grads_ready) {
    return Status::FailedPrecondition(call + ": GradsReady was already called for this unit in this micro-step");
  }
  const bool stage3 = options.stage == Stage::kParameters;
  const bool dyn = dynamic.on && !in_eval;
  if (dyn) {
    // Units that depend on the data (engine_dynamic.cc): local checks first, then the turn if this is backward.
    if (pass == Pass::kForward && dynamic.turned) {
      return Status::FailedPrecondition(call + ": this micro-step's backward has begun; in a micro-step with declared "
                                        "units every forward Acquire comes before the first backward call");
    }
    if (pass == Pass::kForward && !dynamic.may_use[static_cast<size_t>(unit)]) {
      return Status::FailedPrecondition(call + ": this rank did not declare " + UnitName(unit) +
                                        " in BeginMicroStep's units; declare every unit it may use");
    }
    if (pass == Pass::kBackward) {
      if (!dynamic.turned) ZERO_RETURN_IF_ERROR(Turn());
      if (!u.used_forward) {
        return Status::FailedPrecondition(call + ": this rank did not acquire " + UnitName(unit) +
                                          " in this micro-step's forward, so it contributes zero gradients (already "
                                          "accounted for); in a micro-step with declared units a backward follows a "
                                          "forward");
      }
    }
    u.used = true;
    if (pass == Pass::kForward) u.used_forward = true;
  }
  if (stage3 && !in_eval && !dyn) {
    Trace& t = train_trace;
    const TraceEntry entry{unit, pass};
    if (t.recording) {
      // While the trace is being recorded, every rank checks each Acquire before gathering, so that ranks
      // with different unit orders get an error instead of mismatched gathers.
      ZERO_RETURN_IF_ERROR(Agree(AgreeKind::kAcquireRecord, 2 * unit + (pass == Pass::kBackward), Status::Ok()));
      t.entries.push_back(entry);
    } else if (t.recorded) {
      if (t.pos >= t.entries.size() || !(t.entries[t.pos] == entry)) {
        std::ostringstream os;
        os << call << " deviates from the recorded stage-3 order at position " << t.pos << " (expected ";
        if (t.pos < t.entries.size()) {
          os << "Acquire(" << t.entries[t.pos].unit << ", " << PassName(t.entries[t.pos].pass) << ")";
        } else {
          os << "no more acquisitions in this " << (in_eval ? "eval pass" : "micro-step");
        }
        os << "). Stage 3 gathers in the order recorded by the first micro-step; every micro-step must acquire the "
              "same units in the same order. The communicator was aborted so that peers fail too";
        poison = Status::Mismatch(os.str());
        comm->Abort(poison);
        return poison;
      }
      ++t.pos;
    }
  }
  // Before this Acquire enters the trace hash, so that a rank that took another unit is named by the unit.
  if (stage3 && in_eval) LaunchEvalCheck(unit);
  if (!dyn) HashEvent(1 + static_cast<int>(pass), unit);  // declared micro-steps differ by rank on purpose
  Log(Engine::Event::kAcquire, unit, -1);
  if (pass == Pass::kBackward) {
    if (!u.grad_window) {
      u.grad_window = true;
      const bool pooled = options.stage == Stage::kGradients || stage3;
      if (pooled && u.trainable_elems > 0 && u.pool_slot < 0) ZERO_RETURN_IF_ERROR(BindPool(unit, /*for_trainer=*/true));
    }
    ++u.bwd_refs;
  } else {
    ++u.fwd_refs;
  }
  ZERO_RETURN_IF_ERROR(WaitParams());
  if (stage3) {
    int wait_slot = -1;
    Status s;
    if (in_eval) {
      s = AcquireEval(unit, &wait_slot);
    } else if (dyn) {
      s = AcquireDynamic(unit, pass, &wait_slot);
    } else {
      s = EnsureResident(unit, &wait_slot);
      if (s.ok()) s = Prefetch();  // issued before waiting, so the next gathers run while this unit computes
    }
    if (!s.ok()) {
      poison = s;
      return s;
    }
    if (wait_slot >= 0 && test.skip_wait != EngineTestHooks::SkipWait::kSlotReady) {
      ZERO_RETURN_IF_ERROR(WaitOnCompute(*slot_ready[static_cast<size_t>(wait_slot)], "the gather of " +
                                                                                            UnitName(unit)));
    }
  }
  return Status::Ok();
}

Status Engine::Impl::ReleaseImpl(int unit, Pass pass) {
  UnitState& u = units[static_cast<size_t>(unit)];
  int& refs = pass == Pass::kForward ? u.fwd_refs : u.bwd_refs;
  if (refs == 0) {
    return Status::FailedPrecondition(std::string("Release(") + std::to_string(unit) + ", " + PassName(pass) +
                                      ") on " + Where() + " without a matching Acquire");
  }
  --refs;
  const bool dyn = dynamic.on && !in_eval;
  if (!dyn) HashEvent(3 + static_cast<int>(pass), unit);
  Log(Engine::Event::kRelease, unit, -1);
  if (options.stage == Stage::kParameters && u.fwd_refs == 0 && u.bwd_refs == 0 && u.gather_slot >= 0) {
    // Declared micro-steps gather each unit once per pass on every rank: nothing is kept across the turn.
    const bool keep = u.keep_gathered && pass == Pass::kForward && !in_eval && !dyn;
    if (!keep) DropSlot(slots[static_cast<size_t>(u.gather_slot)]);
  }
  return Status::Ok();
}

Status Engine::Impl::GradsReadyImpl(int unit) {
  UnitState& u = units[static_cast<size_t>(unit)];
  const std::string call = "GradsReady(" + std::to_string(unit) + ") on " + Where();
  if (in_eval) return Status::FailedPrecondition(call + ": eval passes have no gradients");
  if (micro < 0) return Status::FailedPrecondition(call + ": outside a micro-step; call BeginMicroStep");
  if (u.grads_ready) {
    return Status::FailedPrecondition(call + ": called twice in one micro-step; call it once, after the unit's "
                                      "last backward use");
  }
  const bool dyn = dynamic.on;
  if (dyn) {
    if (!dynamic.turned) {
      const Status t = Turn();
      if (!t.ok()) return t;
    }
    // A unit this rank did not use contributes zeros by itself (Turn): nothing to do, also when called twice.
    if (!u.used) return Status::Ok();
  }
  u.grads_ready = true;
  u.grad_window = false;
  if (!dyn) HashEvent(5, unit);
  Log(Engine::Event::kGradsReady, unit, -1);
  if (u.trainable_elems == 0) return Status::Ok();
  device->RecordCompute(grads_done[static_cast<size_t>(unit)].get());
  const bool pooled = options.stage == Stage::kGradients || options.stage == Stage::kParameters;
  // A unit that got no backward this micro-step still contributes (zero) gradients to its reductions.
  if (pooled && u.pool_slot < 0) ZERO_RETURN_IF_ERROR(BindPool(unit, /*for_trainer=*/true));
  Status s = IssueReadyReductions();
  if (!s.ok()) poison = s;
  return s;
}

// Free pool buffers are zero: allocation zero-fills them, and the communication stream zeroes each one after the
// reduction of the unit that used it (ReleasePoolAfterReduction). Binding only waits for that (reduce -> pool),
// and prefers a buffer whose wait is already over, so that the trainer's thread neither zeroes nor, when the
// pool is large enough, waits. Which physical buffer a unit gets is this rank's own choice: it changes no
// collective.
// Buffers come in two sizes (BufferPlan): a unit takes the smallest free one that fits it, so that the large ones
// stay for the units that need them.
Status Engine::Impl::BindPool(int unit, bool for_trainer) {
  const int64_t need = units[static_cast<size_t>(unit)].trainable_elems;
  int pick = -1;
  bool pick_ready = false;
  for (size_t i = 0; i < grad_pool.size(); ++i) {
    if (pool_owner[i] >= 0 || pool_elems[i] < need) continue;
    const bool ready = pool_free[i]->Query();
    const bool better = pick < 0 || pool_elems[i] < pool_elems[static_cast<size_t>(pick)] ||
                        (pool_elems[i] == pool_elems[static_cast<size_t>(pick)] && ready && !pick_ready);
    if (better) {
      pick = static_cast<int>(i);
      pick_ready = ready;
    }
  }
  if (pick >= 0) {
    const size_t i = static_cast<size_t>(pick);
    pool_owner[i] = unit;
    units[static_cast<size_t>(unit)].pool_slot = pick;
    // reduce -> pool: the buffer's previous reduction, accumulation and zeroing are done before the trainer adds.
    // A buffer bound for a zero contribution is only read by the next reduction, which the communication stream
    // runs after the previous one's zeroing anyway: no wait.
    if (for_trainer && test.skip_wait != EngineTestHooks::SkipWait::kPoolFree) {
      ZERO_RETURN_IF_ERROR(WaitOnCompute(*pool_free[i], "the reduction of gradient pool buffer " + std::to_string(i)));
    }
    return Status::Ok();
  }
  std::ostringstream os;
  os << "Acquire(" << unit << ", kBackward) on " << Where() << ": the gradient pool is exhausted: every buffer that "
     << "fits " << UnitName(unit) << " is bound; buffers (unit, bytes):";
  for (size_t i = 0; i < grad_pool.size(); ++i) os << " (" << pool_owner[i] << ", " << FormatBytes(pool_elems[i] * ge) << ")";
  os << ". A unit holds a buffer from its first backward Acquire until its reduction, which waits for the units "
        "after it (reductions go out in descending unit order). Raise Options.grad_pool_buffers, or call "
        "GradsReady in descending unit order";
  return Status::FailedPrecondition(os.str());
}

Status Engine::Impl::IssueReadyReductions() {
  const bool pooled = options.stage == Stage::kGradients || options.stage == Stage::kParameters;
  if (!pooled && !micro_is_last) return Status::Ok();  // stages 0-1 reduce once, after the last micro-step
  // Stage 3 with declared units: reductions and backward gathers go out in one program (engine_dynamic.cc).
  if (dynamic.on && options.stage == Stage::kParameters) return AdvanceProgram(-1, /*drain=*/false);
  if (!options.overlap_reductions) {
    // Without overlap every reduction waits for the micro-step's last GradsReady.
    for (const UnitState& u : units) {
      if (u.trainable_elems > 0 && !ReadyToReduce(u)) return Status::Ok();
    }
  }
  while (next_reduce < reduce_order.size()) {
    const int unit = plan.buckets[static_cast<size_t>(reduce_order[next_reduce])].unit;
    const UnitState& u = units[static_cast<size_t>(unit)];
    if (!ReadyToReduce(u)) break;
    ZERO_RETURN_IF_ERROR(ReduceUnit(unit));
  }
  return Status::Ok();
}

Status Engine::Impl::ReduceUnit(int unit) {
  const bool pooled = options.stage == Stage::kGradients || options.stage == Stage::kParameters;
  // Units before it in reduction order that no rank used (declared micro-steps) have nothing to reduce.
  while (next_reduce < reduce_order.size()) {
    const int first = plan.buckets[static_cast<size_t>(reduce_order[next_reduce])].unit;
    if (first == unit) break;
    if (!units[static_cast<size_t>(first)].skip_reduce) {
      return Status::Internal("reduction of " + UnitName(unit) + " at " + Where() + " before " + UnitName(first) +
                              " (a bug in zero)");
    }
    ++next_reduce;
  }
  UnitState& u = units[static_cast<size_t>(unit)];
  if (u.skip_reduce) {  // no rank used it: nothing to reduce
    while (next_reduce < reduce_order.size() &&
           plan.buckets[static_cast<size_t>(reduce_order[next_reduce])].unit == unit) {
      ++next_reduce;
    }
    return Status::Ok();
  }
  if (pooled && u.pool_slot < 0) ZERO_RETURN_IF_ERROR(BindPool(unit, /*for_trainer=*/false));  // zeros
  comm_stream->Wait(*grads_done[static_cast<size_t>(unit)]);  // compute -> reduce
  while (next_reduce < reduce_order.size()) {
    const int b = reduce_order[next_reduce];
    if (plan.buckets[static_cast<size_t>(b)].unit != unit) break;
    // At most reductions_in_flight reductions queued or running: the host waits (never the compute stream, whose
    // kernels must not stall behind communication).
    const size_t ring = static_cast<size_t>(reductions_issued % options.reductions_in_flight);
    if (reductions_issued >= options.reductions_in_flight) {
      ZERO_RETURN_IF_ERROR(WaitOnHost(*in_flight[ring], "an earlier reduction"));
    }
    ZERO_RETURN_IF_ERROR(ReduceBucket(b));
    comm_stream->Record(in_flight[ring].get());
    ++reductions_issued;
    ++next_reduce;
  }
  if (pooled) ReleasePoolAfterReduction(unit);
  return Status::Ok();
}

// After the unit's last reduction (and accumulation), on the communication stream: zero the part of its pool buffer
// the unit used, then record reduce -> pool. The buffer is free for the next unit from here.
void Engine::Impl::ReleasePoolAfterReduction(int unit) {
  UnitState& u = units[static_cast<size_t>(unit)];
  const size_t i = static_cast<size_t>(u.pool_slot);
  void* data = grad_pool[i].data();
  const int64_t bytes = u.trainable_elems * ge;
  Device* dev = device.get();
  LaunchComm([dev, data, bytes](void* stream) { return dev->Zero(data, bytes, stream); });
  comm_stream->Record(pool_free[i].get());
  pool_owner[i] = -1;
  u.pool_slot = -1;
}

Status Engine::Impl::ReduceBucket(int bucket) {
  const Bucket& b = plan.buckets[static_cast<size_t>(bucket)];
  std::string what = "reduction of bucket " + std::to_string(bucket) + " (" + UnitName(b.unit) + ") at " + Where();
  char* g = grads.as<char>();
  const int64_t shard = b.shard;
  const Stage st = options.stage;
  const DType dt = gdt;
  Comm* c = comm;
  Device* dev = device.get();
  char* full = nullptr;  // stages 2-3: the unit's pool buffer at this bucket
  if (st == Stage::kGradients || st == Stage::kParameters) {
    const UnitState& u = units[static_cast<size_t>(b.unit)];
    full = GAt(grad_pool[static_cast<size_t>(u.pool_slot)].as<char>(), buckets[static_cast<size_t>(bucket)].unit_offset);
  }
  char* in_grads = GAt(g, st == Stage::kGradients || st == Stage::kParameters ? b.shard_offset : b.offset);
  char* mine = GAt(st == Stage::kOptimizerStates ? in_grads : full, rank * shard);  // this rank's reduced slice
  const int64_t padded = b.padded;
  // ZeRO++'s qgZ: the reduce-scatter quantized, inside each node then across nodes (comm_hierarchical.h).
  internal::HierarchicalComm* qgz = options.zeropp.qgz_bits > 0 ? hier.get() : nullptr;
  const int qgz_bits = options.zeropp.qgz_bits;
  void* qgz_staging_data = qgz_staging.data();
  LaunchComm([=, what = std::move(what)](void* stream) -> Status {
    CollectiveOptions co;
    co.what = what.c_str();
    co.stream = stream;
    auto reduce_scatter = [&](const void* send, void* recv) {
      return qgz != nullptr ? qgz->QuantizedReduceScatter(send, recv, shard, dt, qgz_bits, qgz_staging_data, co)
                            : c->ReduceScatter(send, recv, shard, dt, co);
    };
    switch (st) {
      case Stage::kDataParallel:
        return c->AllReduce(in_grads, in_grads, padded, dt, ReduceOp::kSum, co);
      case Stage::kOptimizerStates:
        return reduce_scatter(in_grads, mine);
      case Stage::kGradients:
      case Stage::kParameters:
        ZERO_RETURN_IF_ERROR(reduce_scatter(full, mine));
        return dev->Accumulate(in_grads, mine, dt, shard, stream);
      case Stage::kAuto:  // Open resolves it to a concrete stage
        return Status::Internal("a reduction with an unresolved Stage::kAuto");
    }
    return Status::Ok();
  });
  Log(Engine::Event::kReduce, b.unit, bucket);
  return Status::Ok();
}

void Engine::Impl::GatherUnit(int unit, char* dst) {
  const UnitPlan& up = plan.units[static_cast<size_t>(unit)];
  std::vector<int> all(up.trainable_buckets);
  all.insert(all.end(), up.frozen_buckets.begin(), up.frozen_buckets.end());
  // Buckets of a unit are consecutive in plan order (trainable, then frozen): name the range, like reductions do.
  std::string which = "bucket " + std::to_string(all.front());
  if (all.size() > 1) which = "buckets " + std::to_string(all.front()) + "-" + std::to_string(all.back());
  LaunchGathers(all, dst, "gather of " + which + " (" + UnitName(unit) + ") at " + Where());
  for (int bi : all) Log(Engine::Event::kGather, unit, bi);
}

// One task for the buckets of one unit (`dst`: the unit's full layout), issued as one group of all-gathers. With
// offloaded shards, this rank's shard of each bucket is first copied from host memory into its place in the
// gathered layout (offload H2D -> gather, in order on the communication stream) and gathered in place.
void Engine::Impl::LaunchGathers(const std::vector<int>& bucket_list, char* dst, const std::string& what_text) {
  std::vector<Comm::GatherItem> items;
  struct Copy {
    char* to;
    const char* from;
    int64_t bytes;
  };
  std::vector<Copy> copies;
  // Shards on the NVMe tier: read now (asynchronously), copied into place by the task below (engine_nvme.cc).
  std::shared_ptr<NvmeGather> from_nvme = nvme_layout.params ? StartNvmeGather(bucket_list, dst) : nullptr;
  for (int bi : bucket_list) {
    const Bucket& b = plan.buckets[static_cast<size_t>(bi)];
    char* out = PAt(dst, buckets[static_cast<size_t>(bi)].unit_offset);
    const char* src = from_nvme ? PAt(out, rank * b.shard) : ShardParamBase(b);
    if (offload_params && !from_nvme) {
      char* mine = PAt(out, rank * b.shard);
      copies.push_back({mine, src, b.shard * pe});
      src = mine;
    }
    items.push_back({src, out, b.shard});
  }
  const DType dt = pdt;
  Comm* c = comm;
  Device* dev = device.get();
  LaunchComm([=, this, what = what_text](void* stream) -> Status {
    if (from_nvme) ZERO_RETURN_IF_ERROR(FinishNvmeGather(*from_nvme, stream));
    for (const Copy& cp : copies) ZERO_RETURN_IF_ERROR(dev->Copy(cp.to, cp.from, cp.bytes, stream));
    CollectiveOptions co;
    co.what = what.c_str();
    co.stream = stream;
    return c->AllGatherMany(items, dt, co);
  });
  if (from_nvme) comm_stream->Record(nvme_gather_free[static_cast<size_t>(from_nvme->bounce)].get());
}

void Engine::Impl::DropSlot(GatherSlot& slot) {
  if (slot.unit < 0) return;
  device->RecordCompute(slot_free[static_cast<size_t>(slot.index)].get());  // compute -> gather slot
  units[static_cast<size_t>(slot.unit)].gather_slot = -1;
  slot.unit = -1;
  slot.prefetched = false;
}

void Engine::Impl::DropUnheldSlots() {
  for (GatherSlot& slot : slots) {
    if (slot.unit < 0) continue;
    const UnitState& u = units[static_cast<size_t>(slot.unit)];
    if (u.fwd_refs == 0 && u.bwd_refs == 0) DropSlot(slot);
  }
}

int Engine::Impl::FreeSlotFor(int unit, bool prefetch) const {
  (void)prefetch;  // a prefetch may take a large slot too: a demand for a large unit evicts (or passes) it
  const int64_t need = units[static_cast<size_t>(unit)].full_elems;
  int best = -1;
  for (size_t i = 0; i < slots.size(); ++i) {
    const GatherSlot& slot = slots[i];
    if (slot.unit >= 0 || slot.capacity < need) continue;
    if (best < 0 || slot.capacity < slots[static_cast<size_t>(best)].capacity) best = static_cast<int>(i);
  }
  return best;
}

int Engine::Impl::FreeSlot(int unit) {
  const int free = FreeSlotFor(unit, /*prefetch=*/false);
  if (free >= 0) return free;
  // Evict a prefetched unit that nobody holds yet (it is gathered again when acquired), from the smallest slot
  // that fits.
  const int64_t need = units[static_cast<size_t>(unit)].full_elems;
  int best = -1;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (!slots[i].prefetched || slots[i].capacity < need) continue;
    if (best < 0 || slots[i].capacity < slots[static_cast<size_t>(best)].capacity) best = static_cast<int>(i);
  }
  if (best >= 0) DropSlot(slots[static_cast<size_t>(best)]);
  return best;
}

Status Engine::Impl::EnsureResident(int unit, int* wait_slot) {
  *wait_slot = -1;
  UnitState& u = units[static_cast<size_t>(unit)];
  if (u.persistent) return Status::Ok();
  if (u.gather_slot >= 0) {
    slots[static_cast<size_t>(u.gather_slot)].prefetched = false;
    *wait_slot = u.gather_slot;
    return Status::Ok();
  }
  const int s = FreeSlot(unit);
  if (s < 0) {
    std::ostringstream os;
    os << "Acquire(" << unit << ") on " << Where() << ": every stage-3 gather slot that fits " << UnitName(unit)
       << " (" << FormatBytes(u.full_elems * pe) << ") holds an acquired unit; slots (unit, bytes):";
    for (const GatherSlot& slot : slots) os << " (" << slot.unit << ", " << FormatBytes(slot.capacity * pe) << ")";
    os << ". Raise Options.gather_slots, or large_gather_slots to fit more large units at once, or release units "
          "earlier";
    return Status::FailedPrecondition(os.str());
  }
  GatherInto(unit, s, /*prefetched=*/false);
  *wait_slot = s;
  return Status::Ok();
}

void Engine::Impl::GatherInto(int unit, int s, bool prefetched) {
  GatherSlot& slot = slots[static_cast<size_t>(s)];
  comm_stream->Wait(*slot_free[static_cast<size_t>(s)]);  // compute -> gather slot
  GatherSlotUnit(unit, slot.buffer.as<char>());  // GatherUnit, or ZeRO++'s hpZ / qwZ (engine_zeropp.cc)
  comm_stream->Record(slot_ready[static_cast<size_t>(s)].get());  // gather -> compute
  slot.unit = unit;
  slot.prefetched = prefetched;
  units[static_cast<size_t>(unit)].gather_slot = s;
}

Status Engine::Impl::Prefetch() {
  Trace& t = train_trace;
  if (options.prefetch_bytes == 0 || !t.recorded) return Status::Ok();
  int64_t budget = options.prefetch_bytes;
  for (const GatherSlot& slot : slots) {
    if (slot.prefetched) budget -= units[static_cast<size_t>(slot.unit)].full_elems * pe;
  }
  for (size_t j = t.pos; j < t.entries.size(); ++j) {
    const int next = t.entries[j].unit;
    UnitState& w = units[static_cast<size_t>(next)];
    if (w.persistent || w.gather_slot >= 0) continue;
    if (w.full_elems * pe > budget) break;
    const int s = FreeSlotFor(next, /*prefetch=*/true);
    if (s < 0) break;  // never evict for a prefetch
    GatherInto(next, s, /*prefetched=*/true);
    budget -= w.full_elems * pe;
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------------------------
// Stage-3 eval passes
//
// An eval pass may acquire any sequence of units, any number of times (a generation loop sweeps the blocks once per
// token, an early exit stops part-way, beam search repeats sweeps), as long as every rank makes the same sequence.
// Gathers stay identical across ranks because every decision below depends only on that shared sequence: the
// prediction eval_next[u] (the unit that followed u the last time), the slots' occupancy, and prefetch_bytes.
// Where the order repeats the next units are prefetched; where it does not, the stale prefetches are dropped and
// the unit is gathered on demand. A rank that acquires another unit than its peers (or makes another engine call)
// fails the check that precedes each eval Acquire's collectives, on every rank, instead of exchanging the shards of
// different units.

void Engine::Impl::LaunchEvalCheck(int unit) {
  std::vector<double> v(2 * kAgreeFields);
  AgreeVector(AgreeKind::kEvalAcquire, unit, Status::Ok(), v.data());
  for (int i = 0; i < kAgreeFields; ++i) v[kAgreeFields + i] = -v[i];
  Comm* c = comm;
  const int n = world;
  std::string where = Where();
  std::string what = "check of Acquire(" + std::to_string(unit) + ") in an eval pass at " + where;
  // The message names every rank's value, as Agree's does; it is composed on the communication stream.
  LaunchComm([c, n, v = std::move(v), what = std::move(what), where = std::move(where)](void*) -> Status {
    CollectiveOptions co;
    co.control = true;
    co.what = what.c_str();
    double out[2 * kAgreeFields];
    ZERO_RETURN_IF_ERROR(c->AllReduce(v.data(), out, 2 * kAgreeFields, DType::kF64, ReduceOp::kMax, co));
    int first = -1;
    for (int i = 0; i < kAgreeFields && first < 0; ++i) {
      if (i != kAgreeAny && out[i] != -out[kAgreeFields + i]) first = i;
    }
    if (first < 0) return Status::Ok();
    std::vector<double> all(static_cast<size_t>(n) * kAgreeFields);
    ZERO_RETURN_IF_ERROR(c->AllGather(v.data(), all.data(), kAgreeFields, DType::kF64, co));
    return Status::Mismatch(DescribeDisagreement(first, all, n, where) + " (" + what +
                            "); the engine is unusable now");
  });
}

std::vector<int> Engine::Impl::EvalChain(int unit) const {
  std::vector<int> chain;
  if (options.prefetch_bytes == 0) return chain;
  int64_t budget = options.prefetch_bytes;
  int free_slots = 0;
  for (const GatherSlot& slot : slots) free_slots += slot.unit < 0 || slot.prefetched ? 1 : 0;
  std::vector<char> seen(units.size(), 0);
  seen[static_cast<size_t>(unit)] = 1;
  for (int next = eval_next[static_cast<size_t>(unit)]; next >= 0 && !seen[static_cast<size_t>(next)];
       next = eval_next[static_cast<size_t>(next)]) {
    seen[static_cast<size_t>(next)] = 1;
    const UnitState& w = units[static_cast<size_t>(next)];
    if (w.persistent) continue;
    if (w.gather_slot >= 0 && !slots[static_cast<size_t>(w.gather_slot)].prefetched) continue;  // held
    if (w.full_elems * pe > budget || free_slots == 0) break;
    chain.push_back(next);
    budget -= w.full_elems * pe;
    --free_slots;
  }
  return chain;
}

Status Engine::Impl::AcquireEval(int unit, int* wait_slot) {
  // AcquireImpl has queued this Acquire's cross-rank check (LaunchEvalCheck) ahead of any gather below.
  if (eval_last >= 0 && eval_last != unit) eval_next[static_cast<size_t>(eval_last)] = unit;
  eval_last = unit;
  // Drop prefetched units that the prediction from here no longer reaches (the order did not repeat), so that
  // their slots serve this unit and the new prediction.
  const std::vector<int> chain = EvalChain(unit);
  for (GatherSlot& slot : slots) {
    if (!slot.prefetched || slot.unit == unit) continue;
    if (std::find(chain.begin(), chain.end(), slot.unit) == chain.end()) DropSlot(slot);
  }
  ZERO_RETURN_IF_ERROR(EnsureResident(unit, wait_slot));
  // Prefetch what is predicted and not resident, while slots are free (never evicting).
  for (int next : chain) {
    if (units[static_cast<size_t>(next)].gather_slot >= 0) continue;
    const int s = FreeSlotFor(next, /*prefetch=*/true);
    if (s < 0) break;  // in order: a later unit is not prefetched before an earlier one
    GatherInto(next, s, /*prefetched=*/true);
  }
  return Status::Ok();
}

}  // namespace zero

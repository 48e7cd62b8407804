// Engine: micro-steps whose units depend on the data (BeginMicroStep with units; README "Units that depend on the
// data"): a mixture of experts whose router sends no token of this rank's batch to some expert, an early exit, a
// branch a batch does not take.
//
// Without a declaration every rank must acquire the same units in the same order, because stage 3's gathers and
// every stage's reductions are collectives. With one, the ranks agree what may be used, and every collective follows
// that agreement instead of what each rank happens to acquire:
//
//   BeginMicroStep  one all-reduce (max) of each rank's 0/1 per unit: the union U of the declarations.
//   forward         stage 3 gathers the units of U in ascending order, on every rank: a rank gathers a unit it
//                   does not acquire and drops it at once ("passes" it). Acquire(u) passes the entries before u,
//                   gathers u (or finds it prefetched) and prefetches the entries after it.
//   the turn        at the first backward call (Acquire(u, kBackward), GradsReady, or the end of the micro-step):
//                   the rest of the forward gathers, one agreement (the same vector as every agreement, so that a
//                   rank still elsewhere fails at once), then one all-reduce of the units each rank used in forward:
//                   B. A unit this rank did not use is ready for its reductions at once, with zero gradients
//                   (zero_ready); in stages 2-3 a unit no rank used has nothing to reduce (skip_reduce: adding zeros
//                   to the shard changes no bit).
//   backward        stages 0-2: reductions in their one order (units descending) as units become ready, as without
//                   a declaration. Stage 3 has gathers too, and when each rank issues a reduction depends on its own
//                   GradsReady calls, so the two must be put in one order that every rank shares: the program
//                     G(b0) G(b1) R(units >= b0) G(b2) R(units >= b1) ... G(b_last) R(the rest)
//                   (b_k: B descending, without persistent units; R(u): u's reductions, zeros where this rank did not
//                   use u). Items go out strictly in that order: a gather when its unit is acquired (passing the
//                   gathers before it) or as a prefetch, a reduction once its unit is ready. Each unit's reduction
//                   waits one gather behind it, so a trainer that calls GradsReady(u) before it acquires the second
//                   used unit below u never waits; one that calls it later gets a status saying so.
//   Step / next     before their agreement: the turn if it has not run, and the rest of the forward gathers or the
//   BeginMicroStep  backward program.
//
// Every rank therefore issues the same collectives in the same order whatever it acquired, and the sums are those of
// an unsharded reference in which unused units add zero gradients.
#include <algorithm>
#include <string>
#include <vector>

#include "engine_impl.h"

namespace zero {

Status Engine::Impl::CheckDeclaration(const std::vector<int>* declared) const {
  if (declared == nullptr) return Status::Ok();
  std::vector<char> seen(units.size(), 0);
  for (int u : *declared) {
    if (u < 0 || u >= static_cast<int>(units.size())) {
      return Status::InvalidArgument("BeginMicroStep on " + Where() + ": declared unit " + std::to_string(u) +
                                     " does not exist; units are 0.." + std::to_string(units.size() - 1));
    }
    if (seen[static_cast<size_t>(u)]) {
      return Status::InvalidArgument("BeginMicroStep on " + Where() + ": unit " + std::to_string(u) +
                                     " is declared twice");
    }
    seen[static_cast<size_t>(u)] = 1;
  }
  return Status::Ok();
}

// 0/1 per unit from every rank, combined by maximum: the union. A control collective, waited for.
Status Engine::Impl::UnionOverRanks(const std::vector<char>& mine, const char* what, std::vector<char>* out) {
  const size_t n = mine.size();
  std::vector<int64_t> send(n), recv(n, 0);
  for (size_t i = 0; i < n; ++i) send[i] = mine[i] ? 1 : 0;
  CollectiveOptions co;
  co.control = true;
  co.what = what;
  Comm* c = comm;
  ZERO_RETURN_IF_ERROR(RunComm([&](void*) {
    return c->AllReduce(send.data(), recv.data(), static_cast<int64_t>(n), DType::kI64, ReduceOp::kMax, co);
  }));
  out->assign(n, 0);
  for (size_t i = 0; i < n; ++i) (*out)[i] = recv[i] != 0 ? 1 : 0;
  return Status::Ok();
}

Status Engine::Impl::StartDynamic(const std::vector<int>* declared) {
  DynamicMicroStep& d = dynamic;
  d.on = true;
  d.may_use.assign(units.size(), declared == nullptr ? 1 : 0);
  if (declared != nullptr) {
    for (int u : *declared) d.may_use[static_cast<size_t>(u)] = 1;
  }
  ZERO_RETURN_IF_ERROR(UnionOverRanks(d.may_use, "the units declared for this micro-step", &d.any_may_use));
  if (options.stage == Stage::kParameters) {
    d.index.assign(units.size(), -1);
    for (size_t u = 0; u < units.size(); ++u) {
      if (!d.any_may_use[u] || units[u].persistent) continue;
      d.index[u] = static_cast<int>(d.schedule.size());
      d.schedule.push_back(static_cast<int>(u));
    }
  }
  return Status::Ok();
}

// A gather this rank does not use: into a free slot, which is dropped at once (the next gather into it is ordered
// after this one by the slot's compute -> gather edge).
void Engine::Impl::GatherPassedThrough(int unit) {
  const int s = FreeSlotFor(unit, /*prefetch=*/false);
  GatherInto(unit, s, /*prefetched=*/false);
  DropSlot(slots[static_cast<size_t>(s)]);
}

Status Engine::Impl::PassThrough(size_t end) {
  DynamicMicroStep& d = dynamic;
  for (size_t j = d.issued; j < end; ++j) {
    const int unit = d.schedule[j];
    if (FreeSlotFor(unit, /*prefetch=*/false) < 0) {
      return Status::FailedPrecondition(
          "stage 3 on " + Where() + ": no gather slot is free to pass " + UnitName(unit) +
          " (a unit another rank uses here): every slot that fits it holds a unit this rank acquired. Release "
          "units before acquiring later ones, or raise Options.gather_slots");
    }
    GatherPassedThrough(unit);
  }
  d.issued = std::max(d.issued, end);
  return Status::Ok();
}

int64_t Engine::Impl::PrefetchedBytes() const {
  int64_t bytes = 0;
  for (const GatherSlot& slot : slots) {
    if (slot.prefetched) bytes += units[static_cast<size_t>(slot.unit)].full_elems * pe;
  }
  return bytes;
}

Status Engine::Impl::AcquireDynamic(int unit, Pass pass, int* wait_slot) {
  *wait_slot = -1;
  DynamicMicroStep& d = dynamic;
  UnitState& u = units[static_cast<size_t>(unit)];
  const bool backward = pass == Pass::kBackward;
  const std::string call = std::string("Acquire(") + std::to_string(unit) + (backward ? ", kBackward" : ", kForward") +
                           ") on " + Where();
  // Where this unit's gather is (forward schedule or backward program), and prefetched units before it: passed.
  const std::vector<int>& position = backward ? d.gather_pos : d.index;
  const int j = u.persistent ? -1 : position[static_cast<size_t>(unit)];
  for (GatherSlot& slot : slots) {
    if (!slot.prefetched || slot.unit == unit) continue;
    const int k = position[static_cast<size_t>(slot.unit)];
    if (j >= 0 && k < j) DropSlot(slot);
  }
  if (u.persistent) {
    // Nothing to gather; backward still moves the program (reductions that became ready, prefetch).
    return backward ? AdvanceProgram(-1, /*drain=*/false) : Status::Ok();
  }
  const size_t issued = backward ? d.next : d.issued;
  if (u.gather_slot >= 0) {  // acquired again within the pass, or prefetched
    slots[static_cast<size_t>(u.gather_slot)].prefetched = false;
    *wait_slot = u.gather_slot;
  } else {
    if (j < 0) {
      return Status::FailedPrecondition(
          call + ": no rank " + (backward ? "used " + UnitName(unit) + " in this micro-step's forward"
                                          : "declared " + UnitName(unit) + " for this micro-step") +
          ", so stage 3 does not gather it (a local error: nothing was issued)");
    }
    if (static_cast<size_t>(j) < issued) {
      return Status::FailedPrecondition(
          call + ": " + UnitName(unit) + " was already passed in this micro-step's " +
          (backward ? "backward" : "forward") + " order; with declared units stage 3 gathers each unit once per "
          "pass, in " + (backward ? "descending" : "ascending") +
          " unit order on every rank: acquire units in that order, and keep a unit acquired between two uses in one "
          "pass (a tied unit used at both ends must be persistent: Options.persist_bytes)");
    }
    if (backward) {
      ZERO_RETURN_IF_ERROR(AdvanceProgram(unit, /*drain=*/false));
    } else {
      ZERO_RETURN_IF_ERROR(PassThrough(static_cast<size_t>(j)));
      const int s = FreeSlot(unit);
      if (s < 0) {
        return Status::FailedPrecondition(call + ": every stage-3 gather slot that fits " + UnitName(unit) +
                                          " holds an acquired unit. Raise Options.gather_slots or release units "
                                          "earlier");
      }
      GatherInto(unit, s, /*prefetched=*/false);
      d.issued = static_cast<size_t>(j) + 1;
    }
    *wait_slot = u.gather_slot;
  }
  if (backward) return AdvanceProgram(-1, /*drain=*/false);
  // Forward: prefetch the next entries in order, within prefetch_bytes, never evicting (the same order on every
  // rank; how far a rank gets depends only on its own free slots, which changes when a gather is issued, not which).
  int64_t budget = options.prefetch_bytes - PrefetchedBytes();
  while (d.issued < d.schedule.size()) {
    const int next = d.schedule[d.issued];
    const UnitState& w = units[static_cast<size_t>(next)];
    if (w.full_elems * pe > budget) break;
    const int s = FreeSlotFor(next, /*prefetch=*/true);
    if (s < 0) break;
    GatherInto(next, s, /*prefetched=*/true);
    budget -= w.full_elems * pe;
    ++d.issued;
  }
  return Status::Ok();
}

Status Engine::Impl::AdvanceProgram(int demand, bool drain) {
  DynamicMicroStep& d = dynamic;
  const int target = demand >= 0 ? d.gather_pos[static_cast<size_t>(demand)] : -1;
  int64_t budget = options.prefetch_bytes - PrefetchedBytes();
  Status s;
  while (d.next < d.program.size()) {
    const DynamicMicroStep::Item item = d.program[d.next];
    const bool needed = drain || static_cast<int>(d.next) <= target;  // must go out now
    const UnitState& u = units[static_cast<size_t>(item.unit)];
    if (item.gather) {
      if (static_cast<int>(d.next) == target) {
        const int slot = FreeSlot(item.unit);
        if (slot < 0) {
          s = Status::FailedPrecondition("Acquire(" + std::to_string(item.unit) + ", kBackward) on " + Where() +
                                         ": every stage-3 gather slot that fits " + UnitName(item.unit) +
                                         " holds an acquired unit. Raise Options.gather_slots or release units "
                                         "earlier");
          break;
        }
        GatherInto(item.unit, slot, /*prefetched=*/false);
      } else if (needed) {  // a gather this rank passes
        if (FreeSlotFor(item.unit, /*prefetch=*/false) < 0) {
          s = Status::FailedPrecondition("stage 3 on " + Where() + ": no gather slot is free to pass " +
                                         UnitName(item.unit) +
                                         " (a unit another rank uses here): every slot that fits it holds a unit this "
                                         "rank acquired. Release units earlier, or raise Options.gather_slots");
          break;
        }
        GatherPassedThrough(item.unit);
      } else {  // prefetch, in order
        if (u.full_elems * pe > budget) break;
        const int slot = FreeSlotFor(item.unit, /*prefetch=*/true);
        if (slot < 0) break;
        GatherInto(item.unit, slot, /*prefetched=*/true);
        budget -= u.full_elems * pe;
      }
    } else {
      if (!ReadyToReduce(u)) {
        if (!needed) break;
        s = Status::FailedPrecondition(
            (drain ? "the end of the micro-step on " : "Acquire(" + std::to_string(demand) + ", kBackward) on ") +
            Where() + ": " + UnitName(item.unit) + " is not ready. With declared units, stage 3 issues each unit's "
            "reductions one gather behind it, in one order on every rank: call GradsReady(" +
            std::to_string(item.unit) + ") before acquiring the second used unit below it for backward");
        break;
      }
      s = ReduceUnit(item.unit);
      if (!s.ok()) break;
    }
    ++d.next;
  }
  if (!s.ok()) {
    // The other ranks go on with this program: a rank that cannot follow it tells them.
    poison = s;
    comm->Abort(s);
  }
  return s;
}

Status Engine::Impl::Turn() {
  DynamicMicroStep& d = dynamic;
  if (d.turned) return Status::Ok();
  d.turned = true;
  const bool stage3 = options.stage == Stage::kParameters;
  Status s;
  if (stage3) {
    for (size_t u = 0; u < units.size() && s.ok(); ++u) {
      if (units[u].fwd_refs > 0 && !units[u].persistent) {
        s = Status::FailedPrecondition("the first backward call on " + Where() + ": " +
                                       UnitName(static_cast<int>(u)) +
                                       " is still acquired for forward; with declared units release every unit "
                                       "before backward (stage 3 gathers it again in backward order)");
      }
    }
    for (GatherSlot& slot : slots) {
      if (slot.prefetched) DropSlot(slot);
    }
    if (s.ok()) s = PassThrough(d.schedule.size());
    // The other ranks go on to the turn's collectives: a rank that cannot follow tells them.
    if (!s.ok()) {
      poison = s;
      comm->Abort(s);
      return s;
    }
  }
  // The same vector as every agreement first: a rank still in forward, or already in Step, fails here at once.
  s = Agree(AgreeKind::kTurn, 0, Status::Ok());
  if (!s.ok()) {
    if (poison.ok()) poison = s;
    return s;
  }
  std::vector<char> mine(units.size(), 0);
  for (size_t u = 0; u < units.size(); ++u) mine[u] = units[u].used_forward ? 1 : 0;
  s = UnionOverRanks(mine, "the units used in this micro-step's forward", &d.any_used);
  if (!s.ok()) {
    if (poison.ok()) poison = s;
    return s;
  }
  const bool pooled = options.stage == Stage::kGradients || stage3;
  for (size_t u = 0; u < units.size(); ++u) {
    UnitState& us = units[u];
    if (us.trainable_elems == 0 || us.used_forward) continue;
    if (pooled && !d.any_used[u]) {
      us.skip_reduce = true;
    } else {
      us.zero_ready = true;
      // compute -> reduce: in stages 0-1 the unit's gradients from earlier micro-steps are in the buffer.
      device->RecordCompute(grads_done[u].get());
    }
  }
  if (stage3) {
    // The backward program (see the file comment).
    std::vector<int> used, reduced;
    for (int u = static_cast<int>(units.size()) - 1; u >= 0; --u) {
      const UnitState& us = units[static_cast<size_t>(u)];
      if (d.any_used[static_cast<size_t>(u)] && !us.persistent) used.push_back(u);
      if (us.trainable_elems > 0 && !us.skip_reduce) reduced.push_back(u);
    }
    d.gather_pos.assign(units.size(), -1);
    size_t r = 0;
    for (size_t k = 0; k < used.size(); ++k) {
      d.gather_pos[static_cast<size_t>(used[k])] = static_cast<int>(d.program.size());
      d.program.push_back({true, used[k]});
      if (k == 0) continue;
      while (r < reduced.size() && reduced[r] >= used[k - 1]) d.program.push_back({false, reduced[r++]});
    }
    while (r < reduced.size()) d.program.push_back({false, reduced[r++]});
  }
  s = IssueReadyReductions();
  if (!s.ok() && poison.ok()) poison = s;
  return s;
}

Status Engine::Impl::FinishDynamic() {
  ZERO_RETURN_IF_ERROR(Turn());
  if (options.stage != Stage::kParameters) return Status::Ok();
  for (GatherSlot& slot : slots) {
    if (slot.prefetched) DropSlot(slot);
  }
  return AdvanceProgram(-1, /*drain=*/true);
}

}  // namespace zero

// Engine: where a parameter, its shard, its master copy and its gradient live, and the checked views the trainer
// takes of them (Param, Grad): valid only while the protocol says the memory is the trainer's.
#include <string>

#include "engine_impl.h"

namespace zero {

char* Engine::Impl::FullParamBase(const Bucket& b) {
  DeviceBuffer& buf = b.trainable ? trainable_params : frozen_params;
  return PAt(buf.as<char>(), b.offset);
}

char* Engine::Impl::ShardParamBase(const Bucket& b) {
  DeviceBuffer& buf = b.trainable ? trainable_params : frozen_params;
  return PAt(buf.as<char>(), b.shard_offset);
}

char* Engine::Impl::UnitParamBase(int unit) {
  UnitState& u = units[static_cast<size_t>(unit)];
  if (u.persistent) return PAt(persistent_params.as<char>(), u.persistent_offset);
  if (u.gather_slot >= 0) return slots[static_cast<size_t>(u.gather_slot)].buffer.as<char>();
  if (u.full_scope.data() != nullptr) return u.full_scope.as<char>();
  return nullptr;
}

char* Engine::Impl::ParamPtr(int param) {
  const ParamLocation& loc = plan.params[static_cast<size_t>(param)];
  const Bucket& b = plan.buckets[static_cast<size_t>(loc.bucket)];
  if (options.stage != Stage::kParameters) return PAt(FullParamBase(b), loc.offset);
  char* base = UnitParamBase(b.unit);
  if (base == nullptr) return nullptr;
  return PAt(base, buckets[static_cast<size_t>(loc.bucket)].unit_offset + loc.offset);
}

float* Engine::Impl::MasterAt(int64_t opos, int64_t full_pos, int64_t shard_pos) {
  if (sep_master) return master.as<float>() + opos;
  return trainable_params.as<float>() + (options.stage == Stage::kParameters ? shard_pos : full_pos);
}

Status Engine::Impl::KnownParam(int param, const std::string& call) const {
  if (param >= 0 && param < static_cast<int>(specs.size())) return Status::Ok();
  return Status::InvalidArgument(call + " on " + Where() + ": unknown parameter; parameters are 0.." +
                                 std::to_string(specs.size() - 1) + " (ParamSpec order)");
}

TensorView Engine::Param(int param) const {
  TensorView v;
  (void)Param(param, &v);
  return v;
}

TensorView Engine::Grad(int param) const {
  TensorView v;
  (void)Grad(param, &v);
  return v;
}

Status Engine::Param(int param, TensorView* view) const {
  const Impl& e = *impl_;
  *view = TensorView();
  const std::string call = "Param(" + std::to_string(param) + ")";
  ZERO_RETURN_IF_ERROR(e.KnownParam(param, call));
  ZERO_RETURN_IF_ERROR(e.CheckUsable(/*allow_incomplete=*/true));
  ZERO_RETURN_IF_ERROR(impl_->WaitParams());  // post-step gather -> the trainer's read
  const ParamSpec& s = e.specs[static_cast<size_t>(param)];
  const int unit = e.plan.buckets[static_cast<size_t>(e.plan.params[static_cast<size_t>(param)].bucket)].unit;
  const UnitState& u = e.units[static_cast<size_t>(unit)];
  if (e.options.stage == Stage::kParameters && !u.persistent && u.fwd_refs == 0 && u.bwd_refs == 0 &&
      u.full_scope.data() == nullptr) {
    return Status::FailedPrecondition(
        call + " ('" + s.name + "', unit " + std::to_string(unit) + ") on " + e.Where() +
        ": not valid now. In stage 3 a parameter's view is valid while its unit is acquired (from Acquire(" +
        std::to_string(unit) + ", ...) to the matching Release), inside a GatherFull scope over the unit, or always "
        "for a persistent unit: call Acquire first (BeginEval for forward-only passes), and take views again after "
        "each Acquire");
  }
  view->numel = s.numel();
  view->shape = s.shape;
  view->dtype = e.pdt;
  view->backend = e.options.backend;
  view->data = impl_->ParamPtr(param);
  if (view->data == nullptr && view->numel > 0) {
    *view = TensorView();
    return Status::Internal(call + " on " + e.Where() + ": the unit is acquired but has no storage (a bug in zero)");
  }
  return Status::Ok();
}

Status Engine::Grad(int param, TensorView* view) const {
  const Impl& e = *impl_;
  *view = TensorView();
  const std::string call = "Grad(" + std::to_string(param) + ")";
  ZERO_RETURN_IF_ERROR(e.KnownParam(param, call));
  ZERO_RETURN_IF_ERROR(e.CheckUsable());
  const ParamSpec& s = e.specs[static_cast<size_t>(param)];
  const ParamLocation& loc = e.plan.params[static_cast<size_t>(param)];
  const Bucket& b = e.plan.buckets[static_cast<size_t>(loc.bucket)];
  const UnitState& u = e.units[static_cast<size_t>(b.unit)];
  const std::string name = call + " ('" + s.name + "', unit " + std::to_string(b.unit) + ") on " + e.Where();
  if (!s.trainable) return Status::FailedPrecondition(name + ": a frozen parameter (trainable = false) has no gradient");
  if (!u.grad_window) {
    const std::string unit = std::to_string(b.unit);
    return Status::FailedPrecondition(
        name + ": not valid now. A gradient view is valid from the unit's first Acquire(" + unit +
        ", kBackward) of a micro-step to GradsReady(" + unit + ")" +
        (e.in_eval ? "; eval passes have no gradients" : e.micro < 0 ? "; call BeginMicroStep first" : ""));
  }
  const Stage st = e.options.stage;
  view->numel = s.numel();
  view->shape = s.shape;
  view->backend = e.options.backend;
  view->dtype = e.gdt;
  if (st == Stage::kDataParallel || st == Stage::kOptimizerStates) {
    view->data = e.GAt(e.grads.as<char>(), b.offset + loc.offset);
  } else if (u.pool_slot >= 0) {
    view->data = e.GAt(e.grad_pool[static_cast<size_t>(u.pool_slot)].as<char>(),
                       e.buckets[static_cast<size_t>(loc.bucket)].unit_offset + loc.offset);
  }
  if (view->data == nullptr && view->numel > 0) {
    *view = TensorView();
    return Status::Internal(call + " on " + e.Where() + ": the gradient window is open but no buffer is bound "
                            "(a bug in zero)");
  }
  return Status::Ok();
}

}  // namespace zero

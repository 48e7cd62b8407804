// zero::TorchModule: ZeRO stages 0-3 for an existing libtorch module (the optional CMake component zero::torch).
//
// Built only when CMake finds libtorch; tested against Debian 12's libtorch-dev 1.13 (CPU), compiled against PyTorch's
// CUDA libtorch (parameters on the GPU with Backend::kCuda: README "libtorch"; not yet run on a GPU). The
// core library and the other zero headers know nothing of torch; this header forward-declares the two torch types
// it names, so including it costs nothing until the caller includes torch itself.
//
// Wrapping a module makes zero own its parameters: every named parameter becomes a ParamSpec (trainable iff
// requires_grad(); unit = its top-level child, in registration order, unless TorchOptions::unit_of says otherwise),
// InitParams copies the module's current values, and each parameter tensor is re-pointed (set_data) at zero's
// parameter buffer, so the module's own forward runs unchanged on zero's memory. The training loop changes by
// three calls:
//
//   std::unique_ptr<zero::TorchModule> zm;
//   CHECK_OK(zero::TorchModule::Wrap(model.ptr(), options, comm.get(), {}, &zm));
//   for step:
//     for micro in 0..M-1:
//       CHECK_OK(zm->BeginMicroStep(micro, micro == M - 1));
//       auto loss = loss_fn(model->forward(x), y);   // the module's forward, untouched
//       loss.backward();                              // gradients land in zero's buffers, reductions overlap
//     CHECK_OK(zm->Step(zero::StepArgs(), &result)); // instead of optimizer.step() / zero_grad()
//
// Gradients. When backward reaches a unit's first parameter (a tensor hook, which runs before accumulation), the
// unit is acquired for backward and every trainable parameter of it gets `.grad` = a view of zero's (zeroed)
// gradient buffer; torch's AccumulateGrad then adds into it in place. A post-hook on each parameter's
// AccumulateGrad node (after accumulation) counts the unit's parameters; after the last one the unit's GradsReady
// is called, so its reduction overlaps the rest of loss.backward(). If torch replaced .grad instead of adding (it
// does under create_graph=true), the post-hook copies the result into zero's buffer (fallback_copies() counts
// these). At the end of backward a callback completes, in plan order, the units used in forward whose parameters
// got no gradient.
//
// Units that depend on the data: every micro-step declares all units (Engine::BeginMicroStep with units), so a
// unit the forward did not use (a branch this batch did not take, on this rank only or on every rank) contributes
// zero gradients without holding back the reductions of the units below it. Stages 0-2 learn the units used from
// the autograd graph at the start of backward; stage 3 from the Forward calls, which come in ascending unit order
// and may leave units out; a unit whose weights are tied into a later use (an embedding that is also the output
// head) runs Forward again there, and must then be persistent (Options::persist_bytes; the engine says so).
// After a unit's GradsReady its parameters' .grad are reset to undefined: zero owns the gradient from then on
// (clipping is Options::clip_norm; the optimizer is Options::adamw / sgd). Frozen parameters never get a .grad.
//
// Stage 3 (Stage::kParameters) needs one call per unit in the model's forward code, around the code that uses
// the unit's parameters:
//
//   torch::Tensor h;
//   CHECK_OK(zm->Forward(1, x, [&](const torch::Tensor& in) { return block1->forward(in); }, &h));
//
// Forward gathers the unit (Acquire), points its parameters at the gathered copy, runs fn, releases the unit and
// points the parameters at nothing again; it puts identity autograd functions on the unit's input and output
// (FSDP2's scheme): the output's backward re-gathers the unit before its backward nodes run (they read the saved
// parameters, whose Storage is re-pointed in place), and the input's backward completes it (GradsReady, Release).
// Outside its Forward (and its backward) a stage-3 unit's parameters have no data: evaluate between steps with
// BeginEval, the Forward calls, EndEval (below). A unit's gradients are complete when backward has left every one of its Forward calls.
// In stages 0-2 Forward simply calls fn.
//
// Parameters are views of zero's buffers while the TorchModule lives; its destructor gives every parameter a
// private copy of its current value again (stage 3 gathers them first: collective), so the module stays usable.
// Do not move the module to another device or dtype, or replace its parameters, while it is wrapped.
//
// Errors: calls return Status. Backward outside a micro-step (BeginMicroStep not called, or called again after
// its backward) throws from loss.backward() with the reason, and Step returns the same status. Not thread-safe.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "zero/comm.h"
#include "zero/engine.h"
#include "zero/options.h"
#include "zero/status.h"

namespace at {
class Tensor;
}  // namespace at
namespace torch::nn {
class Module;
}  // namespace torch::nn

namespace zero {

struct TorchOptions {
  // Unit of a parameter, from its state_dict name ("encoder.layers.0.weight"); units must be 0..U-1 and are in
  // forward order. Empty: one unit per top-level child (a parameter of the root module is a unit of its own),
  // numbered in named_parameters() order.
  std::function<int(const std::string& name)> unit_of;
  // Weight-decay multiplier of a parameter, from its name. Empty: 1 for every parameter, as torch::optim::AdamW
  // with one parameter group.
  std::function<float(const std::string& name)> wd_mult_of;
};

class TorchModule {
 public:
  // Registers `module`'s parameters with a new Engine (collective: every rank wraps the same module structure),
  // copies their current values in (rank 0's values are not broadcast: initialize identically on every rank,
  // e.g. with torch::manual_seed) and re-points them at zero's buffers. `comm` must outlive the TorchModule.
  // Fails for a module already wrapped, a module without parameters, parameters that are not fp32 on the backend's
  // device (the CPU for kCpu; Comm::cuda_device() for kCuda, whose Comm must come from Comm::OpenNccl), 16-bit
  // options dtypes, Stage::kAuto, or a bad unit mapping.
  static Status Wrap(std::shared_ptr<torch::nn::Module> module, const Options& options, Comm* comm,
                     const TorchOptions& torch_options, std::unique_ptr<TorchModule>* out);
  ~TorchModule();
  TorchModule(const TorchModule&) = delete;
  TorchModule& operator=(const TorchModule&) = delete;

  // Starts micro-step `micro` of the current step (Engine::BeginMicroStep, declaring every unit; see "Units that
  // depend on the data" above). Call it before each forward that will be followed by backward.
  Status BeginMicroStep(int micro, bool is_last);
  // Runs unit `unit`'s forward, *output = fn(input), with the unit's parameters gathered (stage 3; see above).
  using UnitForward = std::function<at::Tensor(const at::Tensor&)>;
  Status Forward(int unit, const at::Tensor& input, const UnitForward& fn, at::Tensor* output);
  // Completes the micro-steps' bookkeeping, then Engine::Step: reduces what remains, clips, updates, and waits
  // until the parameters the module reads hold the new values.
  Status Step(const StepArgs& args, StepResult* result);

  // A forward-only pass between steps (validation), in any stage, with the training forward code: BeginEval, the
  // forward (stage 3: its Forward calls, each gathering its unit and dropping it after, so the pass needs one
  // unit's memory at a time, not the model's), EndEval. In an eval pass Forward runs fn without autograd
  // (torch::NoGradGuard) and attaches no hooks. Collective (Engine::BeginEval / EndEval); not inside a step's
  // micro-steps.
  Status BeginEval();
  Status EndEval();

  // Checkpoints and export under the parameters' state_dict names (the ParamSpec names; module buffers such as
  // BatchNorm statistics are not parameters and are not included). Collective, between steps; see Engine::Save,
  // Load and Export (README "Checkpoints"): a checkpoint loads at any world size and stage, also into an Engine
  // opened without torch from the same specs. Load also waits until the module's tensors hold the loaded values.
  Status Save(const std::string& root, const std::string& tag, std::string_view metadata = {});
  Status Load(const std::string& root, const std::string& tag = {}, std::string* metadata = nullptr);
  Status Export(const std::string& path, const ExportOptions& options = {});

  Engine& engine();
  // Spec index of a parameter by state_dict name; -1 if none.
  int ParamIndex(const std::string& name) const;
  // Gradients torch replaced instead of accumulating in place, copied into zero's buffer (see above).
  int64_t fallback_copies() const;
  // OK, or the first error a backward hook hit (it also poisons later calls).
  Status healthy() const;

  class Impl;

 private:
  explicit TorchModule(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zero

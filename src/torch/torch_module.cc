// zero::TorchModule (include/zero/torch.h): a libtorch module's parameters and gradients as views of an Engine's
// buffers, with the backward side of the engine's protocol driven from autograd hooks. The only translation unit
// of libzero_torch: torch headers are slow to compile, so everything torch-facing stays here.
#include "zero/torch.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>
#include <torch/torch.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR: TorchCurrentStream

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace zero {
namespace {

// Modules currently wrapped in this process. Wrapping one twice would give two engines the same tensors: the
// second engine would silently train copies. A process-wide registry is the only place that can see both wraps.
std::mutex& WrappedMutex() {
  static std::mutex m;
  return m;
}
std::set<const torch::nn::Module*>& Wrapped() {
  static std::set<const torch::nn::Module*> s;
  return s;
}

// An fp32 tensor of `shape` over `data` (zero's memory, or nothing yet: stage 3) on `device`, owning nothing. Built
// from a Storage rather than from_blob, which asks the CUDA runtime where a device pointer lives (and cannot
// answer for a null one).
at::Tensor TensorAt(void* data, const std::vector<int64_t>& shape, const c10::Device& device) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(n) * sizeof(float),
                       at::DataPtr(data, device), /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor t = torch::empty({0}, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  t.set_(storage, /*storage_offset=*/0, shape);
  return t;
}

// The cudaStream_t torch launches on for `device` now, as an integer (0: the legacy default stream, which is
// torch's default stream), where this libtorch can say (c10::Stream::native_handle, torch >= 2.2); -1 where not.
int64_t TorchCurrentStream([[maybe_unused]] const c10::Device& device) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 2)
  try {  // a libtorch whose CUDA backend cannot name its streams throws (c10::Error): then we cannot tell
    const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
    const auto handle = reinterpret_cast<intptr_t>(stream.native_handle());
    return handle == 1 ? 0 : static_cast<int64_t>(handle);  // cudaStreamLegacy is the legacy default stream too
  } catch (const std::exception&) {
    return -1;
  }
#else
  return -1;
#endif
}

}  // namespace

class TorchModule::Impl {
 public:
  // A parameter's AccumulateGrad node: a std::shared_ptr up to torch 2.x, an intrusive_ptr in later versions.
  using AccumulatorPtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));
  struct Param {
    std::string name;
    at::Tensor tensor;  // the module's parameter (same TensorImpl the module holds)
    std::vector<int64_t> shape;
    int unit = 0;
    bool trainable = true;
    AccumulatorPtr accumulator;  // kept alive: autograd holds it only weakly
    unsigned tensor_hook = 0;                             // Tensor::remove_hook key
    uintptr_t post_hook = 0;                              // Node::del_post_hook key
    void* grad_data = nullptr;                            // zero's gradient view this micro-step
  };
  struct Unit {
    std::vector<int> params;  // spec indices
    int trainable = 0;        // trainable parameters in the unit
    int accumulated = 0;      // this micro-step
    bool acquired = false;    // Acquire(u, kBackward) done this micro-step
    bool ready = false;       // GradsReady(u) done this micro-step
    bool in_graph = false;    // some trainable parameter is in a live autograd graph at the start of backward
    int forward_uses = 0;      // stage 3: Forward(u) calls this micro-step (a tied unit: more than one)
    int inputs_passed = 0;     // stage 3: of those, the ones whose input's backward (UnitInput) has run
    bool used = false;         // at the start of backward: used in this micro-step's forward (see StartBackward)
  };

  std::shared_ptr<torch::nn::Module> module;
  std::unique_ptr<Engine> engine;
  c10::Device device{c10::kCPU};  // where the parameters and zero's buffers are (Options::backend)
  int rank = 0;                   // the Comm's, for messages
  bool stage3 = false;  // parameters are views only while their unit is acquired
  std::vector<Param> params;
  std::vector<Unit> units;
  bool in_micro_step = false;    // BeginMicroStep called, its backward not finished
  bool in_eval = false;          // between BeginEval and EndEval
  bool backward_started = false;  // a hook of this micro-step ran
  int64_t fallback_copies = 0;
  Status error;  // first error of a hook; sticky

  ~Impl() { Unwrap(); }

  // Gives every parameter a private copy of its current value and forgets the module.
  void Unwrap() {
    if (!module) return;
    torch::NoGradGuard no_grad;
    FullParamsScope scope;
    if (stage3 && engine) {
      // Collective, like the destructor's every other effect: every rank unwraps together.
      std::vector<int> all(units.size());
      for (size_t u = 0; u < units.size(); ++u) all[u] = static_cast<int>(u);
      const Status s = engine->GatherFull(all, &scope);
      if (s.ok()) {
        for (size_t u = 0; u < units.size(); ++u) PointAtGatheredNoThrow(static_cast<int>(u));
      } else {
        std::fprintf(stderr, "zero::TorchModule: gathering the parameters to unwrap failed: %s\n",
                     s.ToString().c_str());
      }
    }
    for (Param& p : params) {
      // The hooks point at this object: remove them, so that a backward after unwrapping is plain torch.
      if (p.accumulator) {
        p.tensor.remove_hook(p.tensor_hook);
        p.accumulator->del_post_hook(p.post_hook);
        p.accumulator.reset();
      }
      p.tensor.mutable_grad() = at::Tensor();
      if (p.tensor.data_ptr() == nullptr) {
        // Stage 3 with an engine that could not gather (poisoned): the values are lost; say so by shape.
        p.tensor.set_data(torch::empty({0}, torch::TensorOptions().dtype(torch::kFloat32).device(device)));
      } else {
        p.tensor.set_data(p.tensor.detach().clone());
      }
    }
    std::lock_guard<std::mutex> lock(WrappedMutex());
    Wrapped().erase(module.get());
    module.reset();
  }

  // Records the first error and throws it into autograd (so loss.backward() stops with the reason).
  [[noreturn]] void Fail(Status s) {
    if (error.ok()) error = s;
    throw std::runtime_error("zero::TorchModule: " + s.ToString());
  }
  void Check(Status s) {
    if (!s.ok()) Fail(std::move(s));
  }

  // The start of this micro-step's backward. Micro-steps declare their units (Engine::BeginMicroStep with every
  // unit), so a unit this rank did not use in forward contributes zero gradients and needs no GradsReady: that is
  // what keeps a branch that a batch does not take from holding back the reductions of the units below it. Stage 3
  // knows the units used from its Forward calls; stages 0-2 run the module's own forward, so the units in the
  // autograd graph are acquired for forward here, before the first backward call turns the micro-step.
  void StartBackward() {
    if (backward_started) return;
    backward_started = true;
    // Runs when this backward's graph task finishes, on this thread.
    torch::autograd::Engine::get_default_engine().queue_callback([this] { EndOfBackward(); });
    MarkUnitsInGraph();
    for (int u = 0; u < static_cast<int>(units.size()); ++u) {
      Unit& unit = units[static_cast<size_t>(u)];
      unit.used = stage3 ? unit.forward_uses > 0 : unit.in_graph;
      if (!stage3 && unit.used) {
        Check(engine->Acquire(u, Pass::kForward));
        Check(engine->Release(u, Pass::kForward));
      }
    }
  }

  // Tensor hook, before AccumulateGrad adds: make the unit's gradient buffers the parameters' .grad.
  void BeforeAccumulate(int i) {
    if (!error.ok()) Fail(error);
    const Param& p = params[static_cast<size_t>(i)];
    if (!in_micro_step) {
      Fail(Status::FailedPrecondition(
          "backward reached parameter '" + p.name +
          "' outside a micro-step: call BeginMicroStep(micro, is_last) before each forward whose loss you "
          "backward, and backward once per micro-step"));
    }
    StartBackward();
    Unit& u = units[static_cast<size_t>(p.unit)];
    if (u.ready) {
      Fail(Status::FailedPrecondition("parameter '" + p.name + "' got a second gradient in one micro-step (unit " +
                                      std::to_string(p.unit) +
                                      " already reduced): backward once per micro-step, without retain_graph reuse"));
    }
    if (!u.acquired) AcquireForBackward(p.unit);
  }

  // Stage 3: a unit's parameters point at its gathered copy while it is acquired and at nothing otherwise. The
  // pointer is swapped inside the parameter's Storage, never by replacing the tensor: the autograd graph saves
  // the parameter and views of it (Linear saves weight.t()), which share that Storage object, so re-pointing
  // it before the unit's backward is what lets the saved tensors read the re-gathered values.
  void SetStorage(Param& q, void* data) const {
    q.tensor.storage().unsafeGetStorageImpl()->set_data_ptr_noswap(at::DataPtr(data, device));
  }
  // Stage 3, a unit's forward (training or eval): acquire it and point its parameters at the gathered copy.
  Status AcquireForForward(int unit) {
    ZERO_RETURN_IF_ERROR(engine->Acquire(unit, Pass::kForward));
    try {
      PointAtGathered(unit);
    } catch (const std::exception&) {
      return error;  // PointAtGathered recorded it
    }
    return Status::Ok();
  }
  void PointAtGathered(int unit) {
    for (int j : units[static_cast<size_t>(unit)].params) {
      Param& q = params[static_cast<size_t>(j)];
      const TensorView v = engine->Param(j);
      if (v.data == nullptr) Fail(Status::Internal("no parameter view for '" + q.name + "' after Acquire"));
      SetStorage(q, v.data);
    }
  }
  void PointAtGatheredNoThrow(int unit) {
    for (int j : units[static_cast<size_t>(unit)].params) {
      const TensorView v = engine->Param(j);
      if (v.data != nullptr) SetStorage(params[static_cast<size_t>(j)], v.data);
    }
  }
  void PointAtNothing(int unit) {
    for (int j : units[static_cast<size_t>(unit)].params) SetStorage(params[static_cast<size_t>(j)], nullptr);
  }

  // A parameter is in a live autograd graph iff some node holds an edge to its AccumulateGrad node, i.e. the
  // node has an owner besides `accumulator` (autograd's own reference from the parameter is weak). Over-
  // approximates (another live graph also counts), which only defers that unit's completion to the end of backward.
  void MarkUnitsInGraph() {
    for (Unit& u : units) u.in_graph = false;
    for (const Param& p : params) {
      if (p.trainable && p.accumulator.use_count() > 1) units[static_cast<size_t>(p.unit)].in_graph = true;
    }
  }

  void AcquireForBackward(int unit) {
    Unit& u = units[static_cast<size_t>(unit)];
    Check(engine->Acquire(unit, Pass::kBackward));
    u.acquired = true;
    if (stage3) PointAtGathered(unit);
    for (int j : u.params) {
      Param& q = params[static_cast<size_t>(j)];
      if (!q.trainable) continue;
      const TensorView g = engine->Grad(j);
      if (g.data == nullptr) Fail(Status::Internal("no gradient view for '" + q.name + "' after Acquire"));
      q.grad_data = g.data;
      // Defined and laid out like the parameter: AccumulateGrad adds in place (variable_grad += new_grad).
      q.tensor.mutable_grad() = TensorAt(g.data, q.shape, device);
    }
  }

  // Stage 3, backward reached the unit's output: gather it before its backward nodes run.
  void BeforeUnitBackward(int unit) {
    if (!error.ok()) Fail(error);
    if (!in_micro_step) Fail(Status::FailedPrecondition("backward reached unit " + std::to_string(unit) +
                                                        " outside a micro-step: call BeginMicroStep(micro, "
                                                        "is_last) before each forward, and backward once"));
    StartBackward();
    if (!units[static_cast<size_t>(unit)].acquired) AcquireForBackward(unit);
  }
  // Stage 3, backward left the unit through its input: its gradients are complete once backward has left every use
  // of it (a tied unit runs Forward more than once). A use whose input needed no gradient has no such hook: then the
  // last AccumulateGrad of the unit's parameters (AfterAccumulate), or the end of backward, completes it.
  void AfterUnitBackward(int unit) {
    if (!error.ok()) Fail(error);
    Unit& u = units[static_cast<size_t>(unit)];
    if (++u.inputs_passed < u.forward_uses) return;
    if (!u.ready) Complete(unit);
  }

  // Post-hook of the parameter's AccumulateGrad node: the gradient is in .grad now.
  void AfterAccumulate(int i) {
    Param& p = params[static_cast<size_t>(i)];
    at::Tensor& grad = p.tensor.mutable_grad();
    if (!grad.defined() || grad.data_ptr() != p.grad_data) {
      // torch replaced .grad (create_graph=true, or a hook that set it): grad = zero's buffer + new gradient, so
      // copying it into the buffer is the same as having added.
      if (grad.defined()) {
        torch::NoGradGuard no_grad;
        at::Tensor view = TensorAt(p.grad_data, p.shape, device);
        view.copy_(grad.detach());
        ++fallback_copies;
      }
    }
    Unit& u = units[static_cast<size_t>(p.unit)];
    if (++u.accumulated == u.trainable) Complete(p.unit);
  }

  // GradsReady + Release for the unit; its .grad views are no longer zero's to lend.
  void Complete(int unit) {
    Unit& u = units[static_cast<size_t>(unit)];
    if (!u.acquired) AcquireForBackward(unit);
    for (int j : u.params) {
      Param& q = params[static_cast<size_t>(j)];
      q.tensor.mutable_grad() = at::Tensor();
      q.grad_data = nullptr;
    }
    Check(engine->GradsReady(unit));
    u.ready = true;
    Check(engine->Release(unit, Pass::kBackward));
    if (stage3) PointAtNothing(unit);
  }

  // End of loss.backward(): units used in forward whose parameters got no gradient are completed in plan order,
  // i.e. the reduction order (descending units). Units not used contribute zeros without a call.
  void EndOfBackward() {
    if (!error.ok()) return;
    try {
      for (int unit = static_cast<int>(units.size()) - 1; unit >= 0; --unit) {
        Unit& u = units[static_cast<size_t>(unit)];
        if (!u.ready && u.used) Complete(unit);
        u.ready = true;
      }
    } catch (const std::exception&) {
      // error holds the status; the hook that throws next, or Step, reports it.
    }
    in_micro_step = false;
  }

  // The module's parameters must still be the ones wrapped: one registered (or replaced) after Wrap would be
  // trained by no one. Cheap: one pointer comparison per parameter.
  Status CheckRegistration() const {
    const auto named = module->named_parameters(/*recurse=*/true);
    for (const auto& item : named) {
      auto it = std::find_if(params.begin(), params.end(), [&](const Param& p) { return p.name == item.key(); });
      if (it == params.end()) {
        return Status::FailedPrecondition("parameter '" + item.key() +
                                          "' was registered after TorchModule::Wrap, so zero does not train it; "
                                          "register every parameter before wrapping");
      }
      if (it->tensor.unsafeGetTensorImpl() != item.value().unsafeGetTensorImpl()) {
        return Status::FailedPrecondition("parameter '" + item.key() +
                                          "' was replaced after TorchModule::Wrap; zero trains the wrapped tensor. "
                                          "Replace parameters before wrapping");
      }
    }
    if (named.size() != params.size()) {
      return Status::FailedPrecondition("the module has " + std::to_string(named.size()) +
                                        " parameters but " + std::to_string(params.size()) +
                                        " were wrapped: do not remove parameters from a wrapped module");
    }
    return Status::Ok();
  }

  // On CUDA the module's kernels must run on the engine's compute stream (Options::cuda_stream; null: the legacy
  // default stream, torch's default stream): zero orders its gathers and reductions after that stream only, so a
  // forward or backward under a torch stream guard for another stream would race them. Checked where this
  // libtorch can name its current stream.
  Status CheckStream(const std::string& call) const {
    if (device.is_cpu()) return Status::Ok();
    const int64_t current = TorchCurrentStream(device);
    const auto engine_stream = static_cast<int64_t>(reinterpret_cast<intptr_t>(engine->options().cuda_stream));
    if (current < 0 || current == engine_stream) return Status::Ok();
    std::ostringstream os;
    os << call << " on rank " << rank << ": torch's current CUDA stream on " << device.str() << " is 0x"
       << std::hex << current << ", not the engine's compute stream 0x" << engine_stream << std::dec
       << " (Options::cuda_stream; 0: the legacy default stream, torch's default): zero orders its gathers and "
          "reductions after that stream only. Pass at::cuda::getCurrentCUDAStream().stream() as "
          "Options::cuda_stream, or run the module on the stream you passed";
    return Status::FailedPrecondition(os.str());
  }

  // A micro-step whose loss never reached a parameter (no hook ran) still owes the engine its backward calls: in
  // stage 3 for the units its Forward calls ran (their gradients are zero).
  Status FinishMicroStep() {
    if (!in_micro_step) return Status::Ok();
    if (!backward_started) {
      for (Unit& u : units) u.used = stage3 && u.forward_uses > 0;
    }
    try {
      EndOfBackward();
    } catch (const std::exception&) {
    }
    return error;
  }
};

namespace {

// Identity functions at a stage-3 unit's boundaries (FSDP2's scheme). On the unit's output, backward first
// re-gathers the unit (Acquire(u, kBackward)) so that its backward nodes read full parameters; on its input,
// backward runs after the unit's nodes, so the unit is complete: GradsReady and Release.
struct UnitOutput : torch::autograd::Function<UnitOutput> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t impl, int64_t unit) {
    ctx->saved_data["impl"] = impl;
    ctx->saved_data["unit"] = unit;
    return x.view_as(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* impl = reinterpret_cast<TorchModule::Impl*>(ctx->saved_data["impl"].toInt());
    impl->BeforeUnitBackward(static_cast<int>(ctx->saved_data["unit"].toInt()));
    return {grads[0], at::Tensor(), at::Tensor()};
  }
};
struct UnitInput : torch::autograd::Function<UnitInput> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t impl, int64_t unit) {
    ctx->saved_data["impl"] = impl;
    ctx->saved_data["unit"] = unit;
    return x.view_as(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* impl = reinterpret_cast<TorchModule::Impl*>(ctx->saved_data["impl"].toInt());
    impl->AfterUnitBackward(static_cast<int>(ctx->saved_data["unit"].toInt()));
    return {grads[0], at::Tensor(), at::Tensor()};
  }
};

}  // namespace

TorchModule::TorchModule(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Status TorchModule::Forward(int unit, const at::Tensor& input, const UnitForward& fn, at::Tensor* output) {
  Impl& im = *impl_;
  ZERO_RETURN_IF_ERROR(im.error);
  if (output == nullptr) return Status::InvalidArgument("TorchModule::Forward: output is null");
  if (unit < 0 || unit >= static_cast<int>(im.units.size())) {
    return Status::InvalidArgument("TorchModule::Forward: unit " + std::to_string(unit) + " does not exist (" +
                                   std::to_string(im.units.size()) + " units)");
  }
  if (im.in_eval) {  // forward only, in every stage: no autograd, no hooks; stage 3 gathers the unit for fn
    if (im.stage3) {
      ZERO_RETURN_IF_ERROR(im.AcquireForForward(unit));
    }
    {
      torch::NoGradGuard no_grad;  // a graph would keep parameters whose storage points at nothing after this
      *output = fn(input);
    }
    if (!im.stage3) return Status::Ok();
    im.PointAtNothing(unit);
    return im.engine->Release(unit, Pass::kForward);
  }
  if (!im.stage3) {  // parameters are always there
    *output = fn(input);
    return Status::Ok();
  }
  if (!im.in_micro_step) {
    return Status::FailedPrecondition("TorchModule::Forward(" + std::to_string(unit) +
                                      ") outside a micro-step: call BeginMicroStep first (a forward-only pass "
                                      "between steps: BeginEval)");
  }
  Impl::Unit& u = im.units[static_cast<size_t>(unit)];
  // A unit used again (tied weights) is acquired again, which stage 3 allows for a persistent unit only (it gathers
  // each other unit once per pass). Refused here, before the engine sees it, so that the engine stays usable: a
  // persistent unit's parameter views are valid while it is not acquired, another's are not.
  if (u.forward_uses > 0 && im.engine->Param(u.params[0]).data == nullptr) {
    return Status::FailedPrecondition(
        "TorchModule::Forward(" + std::to_string(unit) + ") again in one micro-step (a tied use of unit " +
        std::to_string(unit) + ") on rank " + std::to_string(im.rank) +
        ": stage 3 gathers each unit once per pass, so a unit used twice must stay gathered; make it persistent "
        "(Options::persist_bytes at least its full parameter bytes)");
  }
  ZERO_RETURN_IF_ERROR(im.AcquireForForward(unit));
  const auto self = static_cast<int64_t>(reinterpret_cast<intptr_t>(&im));
  at::Tensor x = input;
  if (torch::GradMode::is_enabled() && input.requires_grad()) x = UnitInput::apply(input, self, unit);
  at::Tensor y = fn(x);
  ZERO_RETURN_IF_ERROR(im.engine->Release(unit, Pass::kForward));
  im.PointAtNothing(unit);
  if (torch::GradMode::is_enabled() && y.requires_grad()) y = UnitOutput::apply(y, self, unit);
  ++u.forward_uses;
  *output = y;
  return Status::Ok();
}
TorchModule::~TorchModule() = default;

Status TorchModule::Wrap(std::shared_ptr<torch::nn::Module> module, const Options& options, Comm* comm,
                         const TorchOptions& torch_options, std::unique_ptr<TorchModule>* out) {
  if (out == nullptr) return Status::InvalidArgument("TorchModule::Wrap: out is null");
  if (!module) return Status::InvalidArgument("TorchModule::Wrap: module is null");
  if (options.stage == Stage::kAuto) {
    return Status::InvalidArgument(
        "TorchModule::Wrap: choose the stage (Stage::kAuto is not supported: stage 3 needs Forward calls in the "
        "model code, so the choice cannot be made behind the trainer's back)");
  }
  if (options.param_dtype != DType::kF32 || options.grad_dtype != DType::kF32) {
    return Status::InvalidArgument("TorchModule::Wrap: param_dtype and grad_dtype must be kF32 (the wrapper "
                                   "re-points fp32 torch parameters at zero's buffers)");
  }
  const bool cuda = options.backend == Backend::kCuda;
  if (cuda && comm != nullptr && comm->cuda_device() < 0) {
    return Status::InvalidArgument("TorchModule::Wrap: Options.backend = kCuda needs a Comm from Comm::OpenNccl (this "
                                   "one moves host memory); use Backend::kCpu with it, for a module on the CPU");
  }
  const c10::Device device = cuda && comm != nullptr
                                 ? c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(comm->cuda_device()))
                                 : c10::Device(c10::kCPU);
  {
    std::lock_guard<std::mutex> lock(WrappedMutex());
    if (Wrapped().count(module.get()) != 0) {
      return Status::FailedPrecondition("TorchModule::Wrap: this module is already wrapped by a live TorchModule; "
                                        "destroy that one first (its parameters are views of its engine)");
    }
  }

  auto impl = std::make_unique<Impl>();
  impl->device = device;
  impl->rank = comm != nullptr ? comm->rank() : 0;
  std::vector<ParamSpec> specs;
  std::vector<std::string> unit_keys;  // default mapping: first name component, in order of appearance
  for (const auto& item : module->named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    const at::Tensor& t = item.value();
    if (t.scalar_type() != torch::kFloat32 || t.device() != device) {
      const std::string fix =
          cuda ? "; with Backend::kCuda every parameter must be fp32 on " + device.str() +
                     ", this rank's GPU (Comm::cuda_device()): module->to(torch::Device(torch::kCUDA, "
                     "comm->cuda_device())) before wrapping"
               : "; with Backend::kCpu every parameter must be fp32 on the CPU (a module on a GPU takes "
                 "Backend::kCuda and a Comm from Comm::OpenNccl)";
      return Status::InvalidArgument("TorchModule::Wrap: parameter '" + name + "' is " +
                                     std::string(c10::toString(t.scalar_type())) + " on " + t.device().str() + fix);
    }
    if (!t.is_contiguous()) {
      return Status::InvalidArgument("TorchModule::Wrap: parameter '" + name + "' is not contiguous");
    }
    int unit = 0;
    if (torch_options.unit_of) {
      unit = torch_options.unit_of(name);
    } else {
      const std::string key = name.substr(0, name.find('.'));
      auto it = std::find(unit_keys.begin(), unit_keys.end(), key);
      unit = static_cast<int>(it - unit_keys.begin());
      if (it == unit_keys.end()) unit_keys.push_back(key);
    }
    ParamSpec spec;
    spec.name = name;
    spec.shape = t.sizes().vec();
    spec.unit = unit;
    spec.trainable = t.requires_grad();
    if (torch_options.wd_mult_of) spec.wd_mult = torch_options.wd_mult_of(name);
    specs.push_back(spec);
    Impl::Param p;
    p.name = name;
    p.tensor = t;
    p.shape = spec.shape;
    p.unit = unit;
    p.trainable = spec.trainable;
    impl->params.push_back(std::move(p));
  }
  if (specs.empty()) return Status::InvalidArgument("TorchModule::Wrap: the module has no parameters");
  int num_units = 0;
  for (const ParamSpec& s : specs) num_units = std::max(num_units, s.unit + 1);
  for (const ParamSpec& s : specs) {
    if (s.unit < 0) {
      return Status::InvalidArgument("TorchModule::Wrap: unit_of('" + s.name + "') = " + std::to_string(s.unit) +
                                     "; units are 0..U-1");
    }
  }
  impl->units.resize(static_cast<size_t>(num_units));
  for (size_t i = 0; i < specs.size(); ++i) {
    Impl::Unit& u = impl->units[static_cast<size_t>(specs[i].unit)];
    u.params.push_back(static_cast<int>(i));
    if (specs[i].trainable) ++u.trainable;
  }
  for (int u = 0; u < num_units; ++u) {
    if (impl->units[static_cast<size_t>(u)].params.empty()) {
      return Status::InvalidArgument("TorchModule::Wrap: unit " + std::to_string(u) +
                                     " has no parameters; unit_of must use every unit in 0..U-1");
    }
  }

  ZERO_RETURN_IF_ERROR(Engine::Open(options, comm, specs, &impl->engine));
  Impl* raw = impl.get();
  ZERO_RETURN_IF_ERROR(raw->CheckStream("TorchModule::Wrap"));
  // torch reports errors by exception (c10::Error): a failed copy becomes Wrap's status, not an exception through
  // the engine.
  Status copy_error;
  ZERO_RETURN_IF_ERROR(impl->engine->InitParams([raw, &copy_error](int param, int64_t off, int64_t count, float* dst) {
    const Impl::Param& p = raw->params[static_cast<size_t>(param)];
    try {
      const at::Tensor src = p.tensor.detach().contiguous();
      if (src.device().is_cpu()) {
        std::memcpy(dst, src.data_ptr<float>() + off, static_cast<size_t>(count) * sizeof(float));
        return;
      }
      // On the GPU: this slice, copied to the host on torch's stream and waited for.
      const at::Tensor part = src.reshape({-1}).narrow(0, off, count).to(torch::kCPU);
      std::memcpy(dst, part.data_ptr<float>(), static_cast<size_t>(count) * sizeof(float));
    } catch (const std::exception& e) {
      if (copy_error.ok()) {
        copy_error = Status::Internal("TorchModule::Wrap: copying parameter '" + p.name + "' in failed: " + e.what());
      }
      std::memset(dst, 0, static_cast<size_t>(count) * sizeof(float));
    }
  }));
  ZERO_RETURN_IF_ERROR(copy_error);

  impl->module = module;  // from here on, ~Impl gives the parameters their own memory back
  // Re-point the parameters at zero's buffers (set_data keeps the Parameter object, its requires_grad and the
  // module's references; the same dtype and device keep its autograd metadata). Then hook the accumulators.
  try {
    torch::NoGradGuard no_grad;
    impl->stage3 = options.stage == Stage::kParameters;
    for (size_t i = 0; i < impl->params.size(); ++i) {
      Impl::Param& p = impl->params[i];
      p.tensor.mutable_grad() = at::Tensor();
      if (impl->stage3) {
        // A Storage of its own, pointing at nothing until the unit is acquired (Impl::PointAtGathered).
        p.tensor.set_data(TensorAt(nullptr, p.shape, device));
        continue;
      }
      const TensorView v = impl->engine->Param(static_cast<int>(i));
      if (v.data == nullptr) return Status::Internal("TorchModule::Wrap: no parameter view for '" + p.name + "'");
      p.tensor.set_data(TensorAt(v.data, p.shape, device));
    }
  } catch (const std::exception& e) {
    return Status::Internal(std::string("TorchModule::Wrap: pointing the parameters at zero's buffers failed: ") +
                            e.what());
  }
  for (size_t i = 0; i < impl->params.size(); ++i) {
    Impl::Param& p = impl->params[i];
    if (!p.trainable) continue;
    const int index = static_cast<int>(i);
    p.tensor_hook = p.tensor.register_hook([raw, index](const at::Tensor&) { raw->BeforeAccumulate(index); });
    struct PostHook : torch::autograd::FunctionPostHook {
      Impl* impl;
      int index;
      PostHook(Impl* i, int p) : impl(i), index(p) {}
      torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                                const torch::autograd::variable_list&) override {
        impl->AfterAccumulate(index);
        return outputs;
      }
    };
    p.accumulator = torch::autograd::impl::grad_accumulator(p.tensor);
    p.post_hook = p.accumulator->add_post_hook(std::make_unique<PostHook>(raw, index));
  }
  {
    std::lock_guard<std::mutex> lock(WrappedMutex());
    if (!Wrapped().insert(module.get()).second) {
      return Status::FailedPrecondition("TorchModule::Wrap: the module was wrapped concurrently by another call");
    }
  }
  out->reset(new TorchModule(std::move(impl)));
  return Status::Ok();
}

Status TorchModule::BeginMicroStep(int micro, bool is_last) {
  Impl& im = *impl_;
  ZERO_RETURN_IF_ERROR(im.error);
  ZERO_RETURN_IF_ERROR(im.FinishMicroStep());
  ZERO_RETURN_IF_ERROR(im.CheckRegistration());
  ZERO_RETURN_IF_ERROR(im.CheckStream("TorchModule::BeginMicroStep"));
  // Every unit may be used; which ones were is known at the start of backward (Impl::StartBackward).
  std::vector<int> all(im.units.size());
  for (size_t u = 0; u < all.size(); ++u) all[u] = static_cast<int>(u);
  ZERO_RETURN_IF_ERROR(im.engine->BeginMicroStep(micro, is_last, all));
  for (Impl::Unit& u : im.units) {
    u.accumulated = 0;
    u.acquired = false;
    u.ready = false;
    u.forward_uses = 0;
    u.inputs_passed = 0;
    u.used = false;
  }
  im.in_micro_step = true;
  im.backward_started = false;
  return Status::Ok();
}

Status TorchModule::Step(const StepArgs& args, StepResult* result) {
  Impl& im = *impl_;
  ZERO_RETURN_IF_ERROR(im.error);
  ZERO_RETURN_IF_ERROR(im.FinishMicroStep());
  ZERO_RETURN_IF_ERROR(im.CheckRegistration());
  ZERO_RETURN_IF_ERROR(im.engine->Step(args, result));
  // Step queues the post-step all-gather; torch reads the buffers directly, so wait for it here (Param waits).
  // Stage 3 gathers at Acquire.
  if (!im.stage3 && im.engine->Param(0).data == nullptr) return im.engine->healthy();
  return Status::Ok();
}

Status TorchModule::BeginEval() {
  Impl& im = *impl_;
  ZERO_RETURN_IF_ERROR(im.error);
  ZERO_RETURN_IF_ERROR(im.engine->BeginEval());  // refuses inside a training step, saying so
  im.in_eval = true;
  return Status::Ok();
}

Status TorchModule::EndEval() {
  Impl& im = *impl_;
  ZERO_RETURN_IF_ERROR(im.error);
  ZERO_RETURN_IF_ERROR(im.engine->EndEval());
  im.in_eval = false;
  return Status::Ok();
}

Status TorchModule::Save(const std::string& root, const std::string& tag, std::string_view metadata) {
  ZERO_RETURN_IF_ERROR(impl_->error);
  return impl_->engine->Save(root, tag, metadata);
}

Status TorchModule::Load(const std::string& root, const std::string& tag, std::string* metadata) {
  Impl& im = *impl_;
  ZERO_RETURN_IF_ERROR(im.error);
  ZERO_RETURN_IF_ERROR(im.engine->Load(root, tag, metadata));
  // Stages 0-2: the module reads the full buffers directly; Param waits for the post-load gather.
  if (!im.stage3 && im.engine->Param(0).data == nullptr) return im.engine->healthy();
  return Status::Ok();
}

Status TorchModule::Export(const std::string& path, const ExportOptions& options) {
  ZERO_RETURN_IF_ERROR(impl_->error);
  return impl_->engine->Export(path, options);  // empty names: the specs' names, i.e. the state_dict names
}

Engine& TorchModule::engine() { return *impl_->engine; }

int TorchModule::ParamIndex(const std::string& name) const {
  for (size_t i = 0; i < impl_->params.size(); ++i) {
    if (impl_->params[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

int64_t TorchModule::fallback_copies() const { return impl_->fallback_copies; }

Status TorchModule::healthy() const {
  if (!impl_->error.ok()) return impl_->error;
  return impl_->engine->healthy();
}

}  // namespace zero

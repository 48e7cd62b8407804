// Engine: opening (validation, cross-rank spec agreement, buffer allocation), the agreement check, and the public
// methods' guards (the parameter and gradient views are in engine_views.cc). The protocol itself is in engine_units.cc and engine_step.cc.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <limits>
#include <sstream>
#include <thread>

#include "buffer_plan.h"
#include "engine_impl.h"
#include "zero/estimate.h"

namespace zero {
namespace {

constexpr uint64_t kHashMask = (uint64_t{1} << 52) - 1;  // exact in a double

uint64_t Fnv1a(const void* data, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

// One line per option group and per spec: ranks compare these to name the first difference.
std::vector<std::string> DescribeConfig(const Options& o, const std::vector<ParamSpec>& specs, int world) {
  std::vector<std::string> lines;
  std::ostringstream os;
  os.precision(9);
  os << "world_size=" << world << " stage=" << static_cast<int>(o.stage) << " backend=" << static_cast<int>(o.backend)
     << " optimizer=" << static_cast<int>(o.optimizer) << " bucket_elements=" << o.bucket_elements
     << " clip_norm=" << o.clip_norm << " grad_pool_buffers=" << o.grad_pool_buffers
     << " gather_slots=" << o.gather_slots << " large_gather_slots=" << o.large_gather_slots << " overlap_reductions=" << o.overlap_reductions
     << " reductions_in_flight=" << o.reductions_in_flight << " param_dtype=" << DTypeName(o.param_dtype)
     << " grad_dtype=" << DTypeName(o.grad_dtype) << " loss_scale=" << static_cast<int>(o.loss_scale.mode) << "/"
     << o.loss_scale.initial << "/" << o.loss_scale.growth_interval << "/" << o.loss_scale.hysteresis << "/"
     << o.loss_scale.min_scale << " offload=" << o.offload_optimizer << "/" << o.offload_params << " prefetch_bytes=" << o.prefetch_bytes
     << " persist_bytes=" << o.persist_bytes << " keep_gathered_units=" << o.keep_gathered_units.size()
     << " reserved_bytes=" << o.reserved_bytes << " nvme=" << o.nvme_path << "|" << o.nvme_params << "/"
     << o.nvme_block_bytes << "/" << o.nvme_queue_depth << "/" << o.nvme_buffers
     << " host_budget_bytes=" << o.host_budget_bytes;
  const TransformerShape& am = o.activation_model;  // Stage::kAuto's activation reserve
  const ActivationOptions& ao = o.activation_options;
  os << " activation_model=" << am.layers << "/" << am.hidden << "/" << am.heads << "/" << am.kv_heads << "/" << am.ffn
     << "/" << am.vocab << "/" << am.lora_rank << "/" << am.lora_targets << " activation_options=" << ao.micro_batch
     << "/" << ao.seq_len << "/" << ao.recompute << "/" << DTypeName(ao.dtype) << "/" << ao.lora_dropout;
  lines.push_back(os.str());
  os.str("");
  os << "adamw(lr=" << o.adamw.lr << " betas=" << o.adamw.beta1 << "," << o.adamw.beta2 << " eps=" << o.adamw.eps
     << " wd=" << o.adamw.weight_decay << ") sgd(lr=" << o.sgd.lr << " momentum=" << o.sgd.momentum
     << " dampening=" << o.sgd.dampening << " wd=" << o.sgd.weight_decay << " nesterov=" << o.sgd.nesterov << ")";
  lines.push_back(os.str());
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& s = specs[i];
    os.str("");
    os << "param " << i << " '" << s.name << "': shape [";
    for (size_t d = 0; d < s.shape.size(); ++d) os << (d ? "," : "") << s.shape[d];
    os << "] unit " << s.unit << (s.trainable ? " trainable" : " frozen") << " lr_mult " << s.lr_mult
       << " wd_mult " << s.wd_mult;
    lines.push_back(os.str());
  }
  return lines;
}

std::string Join(const std::vector<std::string>& lines) {
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

std::vector<std::string> Split(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream is(text);
  for (std::string l; std::getline(is, l);) lines.push_back(l);
  return lines;
}

}  // namespace

Status ValidateOptions(const Options& o, int num_units) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("invalid Options: " + m); };
  if (o.backend != Backend::kCpu && o.backend != Backend::kCuda) return bad("backend must be kCpu or kCuda");
  if (o.cuda_stream != nullptr && o.backend != Backend::kCuda) {
    return bad("cuda_stream is set but backend is kCpu, whose compute stream is the calling thread; leave it null, "
               "or use Backend::kCuda with a Comm from Comm::OpenNccl");
  }
  if (static_cast<int>(o.stage) > 3 && o.stage != Stage::kAuto) return bad("stage must be one of Stage::k*");
  if (o.stage == Stage::kAuto) {
    if (o.reserved_bytes < 0 && o.activation_model.layers <= 0) {
      return bad("Stage::kAuto needs reserved_bytes: the device bytes per rank your activations and workspace take "
                 "(0 if none), which the engine leaves free; or activation_model to reserve their estimate");
    }
    if (o.offload_optimizer || o.offload_params || o.nvme_params) {
      return bad("Stage::kAuto chooses offload itself; leave offload_optimizer, offload_params and nvme_params false "
                 "(an nvme_path makes the NVMe tier a candidate), or choose the stage yourself");
    }
  } else if (o.reserved_bytes < -1) {
    return bad("reserved_bytes must be >= 0, or -1 (not given)");
  }
  if (o.optimizer != OptimizerKind::kAdamW && o.optimizer != OptimizerKind::kSgdMomentum) {
    return bad("optimizer must be kAdamW or kSgdMomentum");
  }
  if (o.bucket_elements < 1) return bad("bucket_elements must be >= 1 (default 2^25)");
  if (o.clip_norm < 0 || !std::isfinite(o.clip_norm)) return bad("clip_norm must be finite and >= 0 (0 disables)");
  if (o.grad_pool_buffers < 1) return bad("grad_pool_buffers must be >= 1 (default 2)");
  if (o.gather_slots < 1) return bad("gather_slots must be >= 1 (default 2)");
  if (o.large_gather_slots < 0 || o.large_gather_slots > o.gather_slots) {
    return bad("large_gather_slots must be in [0, gather_slots] (default 0: chosen by size)");
  }
  if (o.reductions_in_flight < 1) return bad("reductions_in_flight must be >= 1 (default 4)");
  if (o.prefetch_bytes < 0) return bad("prefetch_bytes must be >= 0");
  if (o.persist_bytes < 0) return bad("persist_bytes must be >= 0");
  if (o.device_capacity_bytes < 0) return bad("device_capacity_bytes must be >= 0 (0: unlimited)");
  if (o.cpu_threads < 0) return bad("cpu_threads must be >= 0 (0: cores per node / local ranks)");
  ZERO_RETURN_IF_ERROR(ValidateZeroPlusPlus(o));
  if (o.param_dtype != DType::kF32 && o.param_dtype != DType::kBF16 && o.param_dtype != DType::kF16) {
    return bad("param_dtype must be kF32, kBF16 or kF16");
  }
  if (o.grad_dtype != DType::kF32 && o.grad_dtype != DType::kBF16 && o.grad_dtype != DType::kF16) {
    return bad("grad_dtype must be kF32, kBF16 or kF16");
  }
  const LossScaleOptions& ls = o.loss_scale;
  auto pow2 = [](float x) {
    int e = 0;
    return x > 0 && std::isfinite(x) && std::frexp(x, &e) == 0.5f;
  };
  if (!pow2(ls.initial) || !pow2(ls.min_scale) || ls.min_scale > ls.initial) {
    return bad("loss_scale.initial and min_scale must be powers of two with min_scale <= initial (unscaling must be "
               "exact)");
  }
  if (ls.growth_interval < 1 || ls.hysteresis < 1) return bad("loss_scale.growth_interval and hysteresis must be >= 1");
  if (o.offload_optimizer && o.stage == Stage::kDataParallel) {
    return bad("offload_optimizer needs stage 1, 2 or 3 (stage 0 replicates the optimizer on every rank)");
  }
  if (o.offload_params && (o.stage != Stage::kParameters || !o.offload_optimizer)) {
    return bad("offload_params needs stage 3 with offload_optimizer");
  }
  if (!o.nvme_path.empty() && o.stage != Stage::kAuto && !o.offload_optimizer) {
    return bad("nvme_path needs offload_optimizer (stages 1-3): the NVMe tier holds the offloaded optimizer state");
  }
  if (o.nvme_params && (o.nvme_path.empty() || !o.offload_params)) {
    return bad("nvme_params needs nvme_path and offload_params (stage 3): it moves the offloaded parameter shards "
               "to the NVMe tier");
  }
  if (o.nvme_block_bytes < 4096 || o.nvme_block_bytes % 4096 != 0 || o.nvme_block_bytes > (int64_t{256} << 20)) {
    return bad("nvme_block_bytes must be a multiple of 4096 between 4 KiB and 256 MiB (default 1 MiB)");
  }
  if (o.nvme_queue_depth < 1 || o.nvme_queue_depth > 4096) {
    return bad("nvme_queue_depth must be in [1, 4096] (default 8)");
  }
  if (o.nvme_buffers < 2 || o.nvme_buffers > 64) return bad("nvme_buffers must be in [2, 64] (default 3)");
  if (o.host_budget_bytes < 0) return bad("host_budget_bytes must be >= 0 (0: not checked)");
  for (int u : o.keep_gathered_units) {
    if (u < 0 || u >= num_units) {
      return bad("keep_gathered_units names unit " + std::to_string(u) + ", but units are 0.." +
                 std::to_string(num_units - 1));
    }
  }
  const AdamWOptions& a = o.adamw;
  if (o.optimizer == OptimizerKind::kAdamW) {
    if (!(a.lr >= 0)) return bad("adamw.lr must be >= 0");
    if (!(a.beta1 >= 0 && a.beta1 < 1) || !(a.beta2 >= 0 && a.beta2 < 1)) return bad("adamw betas must be in [0, 1)");
    if (!(a.eps > 0)) return bad("adamw.eps must be > 0");
    if (!(a.weight_decay >= 0)) return bad("adamw.weight_decay must be >= 0");
  } else {
    const SgdOptions& s = o.sgd;
    if (!(s.lr >= 0)) return bad("sgd.lr must be >= 0");
    if (!(s.momentum >= 0)) return bad("sgd.momentum must be >= 0");
    if (!(s.weight_decay >= 0)) return bad("sgd.weight_decay must be >= 0");
    if (s.nesterov && (s.momentum <= 0 || s.dampening != 0)) {
      return bad("sgd.nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD)");
    }
  }
  return Status::Ok();
}

namespace {

const char* StageEnumName(Stage stage) {
  switch (stage) {
    case Stage::kDataParallel: return "Stage::kDataParallel";
    case Stage::kOptimizerStates: return "Stage::kOptimizerStates";
    case Stage::kGradients: return "Stage::kGradients";
    case Stage::kParameters: return "Stage::kParameters";
    case Stage::kAuto: return "Stage::kAuto";
  }
  return "?";
}

int DefaultThreads(int world) {
  int local = world;
  if (const char* env = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local = std::max(1, std::atoi(env));
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / local);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Agreement

void Engine::Impl::HashEvent(int a, int b) {
  const int v[2] = {a, b};
  trace_hash = Fnv1a(v, sizeof(v), trace_hash) & kHashMask;
}

std::string Engine::Impl::Where() const {
  std::ostringstream os;
  os << "rank " << rank << ", step " << step;
  if (micro >= 0) os << ", micro-step " << micro;
  return os.str();
}

std::string Engine::Impl::UnitName(int unit) const {
  const std::vector<int>& ps = plan.units[static_cast<size_t>(unit)].params;
  return "unit " + std::to_string(unit) + " ('" + specs[static_cast<size_t>(ps.front())].name + "'...)";
}

Status Engine::Impl::CheckUsable(bool allow_incomplete) const {
  if (!poison.ok()) return poison;
  if (!allow_incomplete && !incomplete.ok()) return incomplete;
  // Not comm->health(): that polls MPI from this thread while the communication thread may be inside a
  // collective, and Open MPI would then copy that collective's messages on this thread. Collectives run on the
  // communication stream only; their failures (including a peer's abort notice) arrive through its status.
  if (comm_stream != nullptr) {
    Status a = comm_stream->status();
    if (!a.ok()) return a;
  }
  return Status::Ok();
}

void Engine::Impl::LaunchComm(std::function<Status(void* stream)> task) {
  std::atomic<bool>* gate = test.gate;
  std::atomic<bool>* gate_waiting = test.gate_waiting;
  std::chrono::milliseconds stall{0};
  if (test.stall_rank == rank && test.stall.count() > 0) {
    stall = test.stall;
    test.stall = std::chrono::milliseconds(0);
  }
  comm_stream->Launch([gate, gate_waiting, stall, task = std::move(task)](void* stream) -> Status {
    if (gate != nullptr) {
      if (gate_waiting != nullptr) gate_waiting->store(true, std::memory_order_relaxed);
      while (!gate->load(std::memory_order_relaxed)) std::this_thread::yield();
    }
    if (stall.count() > 0) std::this_thread::sleep_for(stall);
    return task(stream);
  });
}

Status Engine::Impl::DrainComm() {
  Status s;
  if (device->backend() == Backend::kCpu) {
    s = comm_stream->Synchronize(wait_timeout);
  } else {
    // On CUDA, NCCL collectives run asynchronously on the stream: wait in slices and let the communicator's
    // watchdog (health) name a collective that exceeds its timeout. Only this thread issues to the NcclComm.
    const auto deadline = std::chrono::steady_clock::now() + wait_timeout;
    for (;;) {
      s = comm_stream->Synchronize(std::chrono::milliseconds(50));
      if (s.ok() || s.code() != StatusCode::kTimeout) break;
      if (Status h = comm->health(); !h.ok()) {
        s = h;
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) break;
    }
  }
  if (!s.ok() && poison.ok()) poison = s;
  return s;
}

Status Engine::Impl::RunComm(std::function<Status(void* stream)> task) {
  LaunchComm(std::move(task));
  return DrainComm();
}

Status Engine::Impl::WaitOnCompute(const zero::Event& event, const std::string& what) {
  Status s = device->WaitCompute(event, wait_timeout, what + " (waited for at " + Where() + ")");
  // The awaited work may have been skipped because an earlier collective failed: that failure is the news.
  if (Status a = comm_stream->status(); !a.ok()) s = a;
  if (!s.ok() && poison.ok()) poison = s;
  return s;
}

Status Engine::Impl::WaitOnHost(const zero::Event& event, const std::string& what) {
  Status s = event.Synchronize(wait_timeout, what + " (waited for at " + Where() + ")");
  if (Status a = comm_stream->status(); !a.ok()) s = a;
  if (!s.ok() && poison.ok()) poison = s;
  return s;
}

Status Engine::Impl::WaitParams() {
  if (!params_pending) return Status::Ok();
  ZERO_RETURN_IF_ERROR(WaitOnCompute(*params_ready, "the parameter all-gather after the step"));
  params_pending = false;
  return Status::Ok();
}

Status Engine::Impl::ValidUnit(int unit, const char* call) const {
  if (unit < 0 || unit >= static_cast<int>(units.size())) {
    return Status::InvalidArgument(std::string(call) + "(" + std::to_string(unit) + ") on " + Where() +
                                   ": unknown unit; units are 0.." + std::to_string(units.size() - 1));
  }
  return Status::Ok();
}

Status Engine::Impl::CheckUnitsDone(const std::string& call, bool need_grads) const {
  for (size_t u = 0; u < units.size(); ++u) {
    const UnitState& us = units[u];
    if (us.fwd_refs > 0 || us.bwd_refs > 0) {
      return Status::FailedPrecondition(call + ": " + UnitName(static_cast<int>(u)) +
                                        " is still acquired; Release it first");
    }
    if (need_grads && us.trainable_elems > 0 && !ReadyToReduce(us)) {
      return Status::FailedPrecondition(call + ": " + UnitName(static_cast<int>(u)) + " is not ready; call GradsReady " +
                                        (dynamic.on ? "for every unit this rank acquired in this micro-step"
                                                    : "for every unit in every micro-step"));
    }
  }
  return Status::Ok();
}

void Engine::Impl::AgreeVector(AgreeKind kind, int64_t arg, const Status& local, double* v) const {
  v[kAgreeKind] = static_cast<double>(kind);
  v[kAgreeStep] = static_cast<double>(step);
  v[kAgreeMicro] = static_cast<double>(kind == AgreeKind::kBeginMicroStep ? arg : micros_done);
  v[kAgreeIsLast] = micro_is_last ? 1 : 0;
  v[kAgreePlan] = static_cast<double>(plan.hash);
  v[kAgreeTrace] = static_cast<double>(trace_hash);
  v[kAgreeArg] = static_cast<double>(arg);
  v[kAgreeLocalError] = local.ok() ? 0 : 1;
  v[kAgreeAny] = 0;
}

std::string Engine::Impl::DescribeDisagreement(int first, const std::vector<double>& all, int world,
                                               const std::string& where) {
  static const char* kFieldNames[kAgreeFields] = {"call",     "optimizer step", "micro-step index",
                                                  "is_last",  "partition plan", "units used so far",
                                                  "argument", "local error",    "(not compared)"};
  auto field = [&](int r, int f) { return static_cast<int64_t>(all[static_cast<size_t>(r) * kAgreeFields + f]); };
  std::ostringstream os;
  os << "ranks disagree on the " << kFieldNames[first] << " at " << where << ":";
  for (int r = 0; r < world; ++r) os << (r ? "," : "") << " rank " << r << " has " << field(r, first);
  if (first == kAgreeKind) {
    os << " (1=BeginMicroStep 2=Step 3=BeginEval 4=EndEval 5=Acquire 6=GatherFull 7=ReleaseFull 8=InitParams "
          "9=Save 10=Load 11=Export 12=Acquire in an eval pass)";
  }
  if (first == kAgreeArg && field(0, kAgreeKind) == static_cast<int64_t>(AgreeKind::kEvalAcquire)) {
    os << " (the unit each rank acquired in its eval pass)";
  }
  os << ". Every rank must make the same engine calls, with the same micro-steps and units, in the same order";
  return os.str();
}

Status Engine::Impl::Agree(AgreeKind kind, int64_t arg, const Status& local, int64_t any, int64_t* any_max) {
  double v[2 * kAgreeFields];
  AgreeVector(kind, arg, local, v);
  v[kAgreeAny] = static_cast<double>(any);
  for (int i = 0; i < kAgreeFields; ++i) v[kAgreeFields + i] = -v[i];
  CollectiveOptions co;
  co.control = true;
  co.what = "agreement check";
  double out[2 * kAgreeFields];
  Status s = RunComm([&](void*) { return comm->AllReduce(v, out, 2 * kAgreeFields, DType::kF64, ReduceOp::kMax, co); });
  if (!s.ok()) {
    poison = s.WithContext("agreement check failed on " + Where());
    return poison;
  }
  int first = -1;
  for (int i = 0; i < kAgreeFields && first < 0; ++i) {
    if (i != kAgreeAny && out[i] != -out[kAgreeFields + i]) first = i;
  }
  if (any_max != nullptr) *any_max = static_cast<int64_t>(out[kAgreeAny]);
  if (first < 0) return local;  // every rank agrees (and had no local error, or every rank had one)
  // Something differs: collect every rank's vector so that every rank can name who disagrees.
  std::vector<double> all(static_cast<size_t>(world) * kAgreeFields);
  co.what = "agreement check (gathering the disagreement)";
  s = RunComm([&](void*) { return comm->AllGather(v, all.data(), kAgreeFields, DType::kF64, co); });
  if (!s.ok()) {
    poison = s.WithContext("agreement check failed on " + Where());
    return poison;
  }
  if (!local.ok()) return local;
  if (first == kAgreeLocalError) {
    for (int r = 0; r < world; ++r) {
      if (all[static_cast<size_t>(r) * kAgreeFields + kAgreeLocalError] != 0) {
        return Status::FailedPrecondition("rank " + std::to_string(r) + " rejected this call at " + Where() +
                                          "; see that rank's status (nothing was changed here)");
      }
    }
  }
  Status m = Status::Mismatch(DescribeDisagreement(first, all, world, Where()));
  // Units or steps that already diverged mean collectives may have been mismatched: the engine cannot go on.
  if (first == kAgreeStep || first == kAgreePlan || first == kAgreeTrace) poison = m;
  // A peer whose eval Acquire check met this call saw the same disagreement on its communication stream, which is
  // now broken: this rank cannot go on alone either.
  for (int r = 0; r < world; ++r) {
    if (all[static_cast<size_t>(r) * kAgreeFields + kAgreeKind] == static_cast<double>(AgreeKind::kEvalAcquire)) {
      poison = m;
    }
  }
  return m;
}

std::string Engine::Impl::OutOfMemoryAdvice(int64_t free_bytes) const {
  std::ostringstream os;
  os << "\nEngine memory on rank " << rank << " when the allocation failed:\n" << device->report().Table();
  const ModelDescription model = ModelDescription::FromSpecs(specs);
  MemoryEstimate need;
  if (Estimate(model, world, comm->topology().local_size, options, &need).ok()) {
    os << "This configuration needs " << FormatBytes(need.DeviceTotal()) << " of device memory per rank:\n"
       << need.Table();
  }
  if (free_bytes == std::numeric_limits<int64_t>::max()) return os.str();  // no capacity: the system refused
  AutoChoice choice;
  if (!ChooseConfiguration(model, world, options, free_bytes, &choice).ok()) return os.str();
  const std::string reserve = choice.reserved_bytes == 0 && options.reserved_bytes < 0
                                  ? "reserved_bytes not given, so nothing is left for activations; set it"
                                  : "reserved " + FormatBytes(choice.reserved_bytes);
  os << "Device memory available to the engine on rank " << rank << ": " << FormatBytes(choice.budget) << " (free "
     << FormatBytes(free_bytes) << ", " << reserve << ").\n";
  if (choice.chosen >= 0) {
    const AutoCandidate& c = choice.candidates[static_cast<size_t>(choice.chosen)];
    os << "Suggestion: " << ConfigurationName(c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params)
       << " fits (device " << FormatBytes(c.device_bytes) << ", host " << FormatBytes(c.host_bytes)
       << " per rank): set Options.stage = " << StageEnumName(c.stage)
       << ", offload_optimizer = " << (c.offload_optimizer ? "true" : "false")
       << ", offload_params = " << (c.offload_params ? "true" : "false")
       << (c.nvme ? std::string(", keep nvme_path, nvme_params = ") + (c.nvme_params ? "true" : "false") : "")
       << "; or Stage::kAuto with reserved_bytes to let Open choose.";
  } else {
    const AutoCandidate& c = choice.candidates.back();
    os << "No stage or offload setting fits: the smallest, "
       << ConfigurationName(c.stage, c.offload_optimizer, c.offload_params) << ", needs " << FormatBytes(c.device_bytes)
       << " per rank. Add ranks or device memory, or lower gather_slots, grad_pool_buffers or bucket_elements.";
  }
  return os.str();
}

// ---------------------------------------------------------------------------------------------------------------
// Open

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
// Work still queued on the communication stream uses the engine's buffers: let it finish (or fail) first.
Engine::~Engine() {
  if (impl_ == nullptr) return;
  if (impl_->copy_stream != nullptr) (void)impl_->copy_stream->Synchronize(impl_->wait_timeout);
  if (impl_->comm_stream != nullptr) (void)impl_->comm_stream->Synchronize(impl_->wait_timeout);
}

Status Engine::Open(const Options& options, Comm* comm, std::vector<ParamSpec> specs,
                    std::unique_ptr<Engine>* engine) {
  engine->reset();
  if (comm == nullptr) return Status::InvalidArgument("Engine::Open: comm is null");
  ZERO_RETURN_IF_ERROR(comm->health());
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  // Collective: every rank duplicates at the same point of the trainer's Comm (comm.h, "A trainer and its Engine").
  ZERO_RETURN_IF_ERROR(comm->Duplicate(&impl->own_comm).WithContext("Engine::Open on rank " +
                                                                     std::to_string(comm->rank())));
  comm = impl->own_comm.get();
  impl->comm = comm;
  impl->rank = comm->rank();
  impl->world = comm->world_size();
  const std::string where = "Engine::Open on rank " + std::to_string(impl->rank);

  // Validate locally, but agree on the outcome before returning so that no rank is left waiting.
  Status local = PartitionPlan::Build(specs, impl->world, options.bucket_elements, &impl->plan);
  if (local.ok()) local = ValidateOptions(options, static_cast<int>(impl->plan.units.size()));
  if (!local.ok()) local = local.WithContext(where);

  // Every rank must pass the same options and specs: compare hashes, then name the first difference.
  const std::string config = Join(DescribeConfig(options, specs, impl->world));
  const int64_t mine[2] = {static_cast<int64_t>(Fnv1a(config.data(), config.size()) & kHashMask),
                           local.ok() ? 0 : 1};
  std::vector<int64_t> all(2 * static_cast<size_t>(impl->world));
  CollectiveOptions co;
  co.control = true;
  co.what = "Engine::Open spec agreement";
  ZERO_RETURN_IF_ERROR(comm->AllGather(mine, all.data(), 2, DType::kI64, co));
  int differs = -1, failed = -1;
  for (int r = 0; r < impl->world; ++r) {
    if (differs < 0 && all[2 * static_cast<size_t>(r)] != all[0]) differs = r;
    if (failed < 0 && all[2 * static_cast<size_t>(r) + 1] != 0) failed = r;
  }
  if (differs > 0) {
    // Broadcast rank 0's and rank `differs`'s descriptions; every rank names the same first difference.
    std::string texts[2];
    const int roots[2] = {0, differs};
    for (int k = 0; k < 2; ++k) {
      int64_t len = impl->rank == roots[k] ? static_cast<int64_t>(config.size()) : 0;
      ZERO_RETURN_IF_ERROR(comm->Broadcast(&len, 1, DType::kI64, roots[k], co));
      texts[k] = impl->rank == roots[k] ? config : std::string(static_cast<size_t>(len), '\0');
      ZERO_RETURN_IF_ERROR(comm->Broadcast(texts[k].data(), len, DType::kU8, roots[k], co));
    }
    const std::vector<std::string> a = Split(texts[0]), b = Split(texts[1]);
    size_t i = 0;
    while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
    const std::string la = i < a.size() ? a[i] : "(no more params)";
    const std::string lb = i < b.size() ? b[i] : "(no more params)";
    return Status::Mismatch(where + ": ranks passed different options or param specs. First difference: rank 0 has '" +
                            la + "', rank " + std::to_string(differs) + " has '" + lb +
                            "'. Every rank must pass identical Options and ParamSpecs in the same order");
  }
  if (!local.ok()) return local;
  if (failed >= 0) {
    return Status::InvalidArgument(where + ": rank " + std::to_string(failed) +
                                   " rejected the options or specs; see its status");
  }

  Impl& e = *impl;
  e.specs = std::move(specs);
  e.threads = options.cpu_threads > 0 ? options.cpu_threads : DefaultThreads(e.world);

  // The device (a rank without its GPU fails here, and an agreement below tells the others).
  auto open_device = [&]() -> Status {
    if (options.backend == Backend::kCuda) {
      if (comm->cuda_device() < 0) {
        return Status::InvalidArgument("Options.backend = kCuda needs a Comm from Comm::OpenNccl, which moves device "
                                       "memory; this Comm moves host memory. Use Backend::kCpu with it");
      }
      ZERO_RETURN_IF_ERROR(NewCudaDevice(comm->cuda_device(), options.cuda_stream, &e.device));
    } else {
      if (comm->cuda_device() >= 0) {
        return Status::InvalidArgument("Options.backend = kCpu with a Comm from Comm::OpenNccl, which moves device "
                                       "memory only. Use Backend::kCuda, or Comm::OpenMpi for the CPU backend");
      }
      e.device = NewCpuDevice();
    }
    if (options.device_capacity_bytes > 0) e.device->set_capacity(options.device_capacity_bytes);
    e.device->set_threads(e.threads);
    return Status::Ok();
  };
  Status s = open_device();
  const int64_t free_bytes = s.ok() ? e.device->FreeBytes() : 0;

  // Stage::kAuto: every rank decides from the same inputs (options, specs, world size and the all-reduced minimum
  // of free memory), so every rank makes the same choice without exchanging it.
  if (options.stage == Stage::kAuto) {
    const int64_t mine[2] = {free_bytes, s.ok() ? 1 : 0};
    int64_t agreed[2] = {0, 0};
    co.what = "Engine::Open free memory agreement (Stage::kAuto)";
    ZERO_RETURN_IF_ERROR(comm->AllReduce(mine, agreed, 2, DType::kI64, ReduceOp::kMin, co));
    if (!s.ok()) return s.WithContext(where);
    if (agreed[1] == 0) return Status::Unavailable(where + ": another rank could not open its device; see its status");
    AutoChoice choice;
    ZERO_RETURN_IF_ERROR(ChooseConfiguration(ModelDescription::FromSpecs(e.specs), e.world, options, agreed[0], &choice)
                             .WithContext(where));
    if (choice.chosen < 0) {
      return Status::OutOfMemory(where + ": Stage::kAuto found no configuration that fits:\n" + choice.Explain());
    }
    e.options = choice.options;
    e.auto_choice = choice.Explain();
    if (e.rank == 0) {
      std::fprintf(stderr, "zero: Stage::kAuto chose %s for %d rank%s; %s",
                   ConfigurationName(choice.options).c_str(),
                   e.world, e.world == 1 ? "" : "s", e.auto_choice.c_str());
    }
  }
  const Options& opts = e.options;
  const Stage st = opts.stage;

  // Every buffer's size comes from the buffer plan (buffer_plan.h), which zero::Estimate sums too.
  const BufferPlan bp = PlanBuffers(opts, e.plan, comm->topology().local_size);

  // Unit layouts.
  e.buckets.resize(e.plan.buckets.size());
  e.units.resize(e.plan.units.size());
  for (size_t u = 0; u < e.plan.units.size(); ++u) {
    const UnitPlan& up = e.plan.units[u];
    int64_t off = 0;
    for (int b : up.trainable_buckets) {
      e.buckets[static_cast<size_t>(b)].unit_offset = off;
      off += e.plan.buckets[static_cast<size_t>(b)].padded;
    }
    for (int b : up.frozen_buckets) {
      e.buckets[static_cast<size_t>(b)].unit_offset = off;
      off += e.plan.buckets[static_cast<size_t>(b)].padded;
    }
    UnitState& us = e.units[u];
    us.trainable_elems = bp.unit_trainable_elems[u];
    us.full_elems = bp.unit_full_elems[u];
    us.persistent = bp.unit_persistent[u];
    us.persistent_offset = bp.unit_persistent_offset[u];
  }
  for (int u : opts.keep_gathered_units) e.units[static_cast<size_t>(u)].keep_gathered = true;
  e.eval_next.assign(e.units.size(), -1);
  for (int u = static_cast<int>(e.plan.units.size()) - 1; u >= 0; --u) {
    for (int b : e.plan.units[static_cast<size_t>(u)].trainable_buckets) e.reduce_order.push_back(b);
  }

  e.pdt = opts.param_dtype;
  e.pe = static_cast<int64_t>(DTypeSize(e.pdt));
  e.mixed = e.pdt != DType::kF32;
  e.offload = opts.offload_optimizer;
  e.offload_params = opts.offload_params;
  e.sep_master = e.mixed || e.offload;
  e.gdt = opts.grad_dtype;
  e.ge = static_cast<int64_t>(DTypeSize(e.gdt));
  e.pool_elems = bp.pool_elems;
  e.grad_pool.resize(static_cast<size_t>(bp.pool_buffers));
  e.pool_owner.assign(e.grad_pool.size(), -1);
  e.slots.resize(static_cast<size_t>(bp.gather_slots));
  // The NVMe tier: its layout, bounce buffers and files (engine_nvme.cc).
  e.nvme_layout = bp.nvme;
  e.nvme_bounce.resize(bp.nvme.on ? static_cast<size_t>(opts.nvme_buffers) : 0);
  e.nvme_gather_bounce.resize(static_cast<size_t>(bp.nvme.gather_bounces));
  for (const PlannedBuffer& b : bp.buffers) {
    if (b.kind != MemoryKind::kNvme) continue;
    MemoryUsage& u = e.nvme_usage;
    u.current[static_cast<int>(b.category)] += b.bytes;
    u.peak[static_cast<int>(b.category)] = u.current[static_cast<int>(b.category)];
    u.peak_total += b.bytes;
  }
  auto target = [&](const PlannedBuffer& b) -> DeviceBuffer* {
    const size_t i = static_cast<size_t>(b.index);
    switch (b.id) {
      case BufferId::kTrainableParams: return &e.trainable_params;
      case BufferId::kFrozenParams: return &e.frozen_params;
      case BufferId::kGrads: return &e.grads;
      case BufferId::kMaster: return &e.master;
      case BufferId::kState0: return &e.state0;
      case BufferId::kState1: return &e.state1;
      case BufferId::kHostGradStaging: return &e.host_grad[i];
      case BufferId::kHostParamStaging: return &e.host_copy[i];
      case BufferId::kGradPool: return &e.grad_pool[i];
      case BufferId::kPersistentParams: return &e.persistent_params;
      case BufferId::kGatherSlot: return &e.slots[i].buffer;
      case BufferId::kNormScratch: return &e.norm_scratch;
      case BufferId::kNvmeOptimizerFile: return nullptr;  // the tier's files (kNvme): not allocated
      case BufferId::kNvmeParamFile: return nullptr;
      case BufferId::kNvmeBounce: return &e.nvme_bounce[i];
      case BufferId::kNvmeGatherBounce: return &e.nvme_gather_bounce[i];
      case BufferId::kNvmeChecksums: return &e.nvme_checksums;
      case BufferId::kHpzSecondary: return &e.hpz_secondary;
      case BufferId::kQwzStaging: return &e.qwz_staging;
      case BufferId::kQgzStaging: return &e.qgz_staging;
    }
    return nullptr;
  };
  // ZeRO++: the node split is collective, so every rank makes it here, whatever its device did (agreed below).
  if (opts.zeropp.hpz || opts.zeropp.qwz || opts.zeropp.qgz_bits > 0) ZERO_RETURN_IF_ERROR(e.OpenZeroPlusPlus(bp));
  auto run = [&]() -> Status {
    for (const PlannedBuffer& b : bp.buffers) {
      if (b.kind == MemoryKind::kNvme) continue;
      ZERO_RETURN_IF_ERROR(e.device->Allocate(b.bytes, b.category, b.kind, b.what, target(b)));
    }
    // Streams and events (engine_impl.h's table).
    ZERO_RETURN_IF_ERROR(e.device->NewStream("communication stream", /*high_priority=*/false, &e.comm_stream));
    auto events = [&](size_t n, std::vector<std::unique_ptr<zero::Event>>* out) -> Status {
      out->resize(n);
      for (auto& ev : *out) ZERO_RETURN_IF_ERROR(e.device->NewEvent(&ev));
      return Status::Ok();
    };
    ZERO_RETURN_IF_ERROR(events(e.units.size(), &e.grads_done));
    ZERO_RETURN_IF_ERROR(events(e.grad_pool.size(), &e.pool_free));
    ZERO_RETURN_IF_ERROR(events(static_cast<size_t>(opts.reductions_in_flight), &e.in_flight));
    ZERO_RETURN_IF_ERROR(events(e.slots.size(), &e.slot_ready));
    ZERO_RETURN_IF_ERROR(events(e.slots.size(), &e.slot_free));
    for (size_t i = 0; i < e.slots.size(); ++i) {
      e.slots[i].index = static_cast<int>(i);
      e.slots[i].capacity = bp.slot_elems[i];
    }
    ZERO_RETURN_IF_ERROR(e.device->NewEvent(&e.params_ready));
    ZERO_RETURN_IF_ERROR(e.device->NewEvent(&e.optimizer_done));
    if (e.offload) {
      ZERO_RETURN_IF_ERROR(e.device->NewStream("offload copy stream", /*high_priority=*/false, &e.copy_stream));
      for (int i = 0; i < 2; ++i) {
        ZERO_RETURN_IF_ERROR(e.device->NewEvent(&e.d2h_done[i]));
        ZERO_RETURN_IF_ERROR(e.device->NewEvent(&e.h2d_done[i]));
      }
      ZERO_RETURN_IF_ERROR(e.device->NewEvent(&e.step_begin));
    }
    if (bp.nvme.on) {
      ZERO_RETURN_IF_ERROR(events(e.nvme_gather_bounce.size(), &e.nvme_gather_free));
      ZERO_RETURN_IF_ERROR(e.OpenNvme());
    }
    return Status::Ok();
  };
  e.wait_timeout = 2 * comm->timeout() + std::chrono::milliseconds(60'000);
  // Options::host_budget_bytes: the configuration's host buffers, checked before anything is allocated.
  bool over_host_budget = false;
  if (s.ok() && opts.host_budget_bytes > 0) {
    int64_t host = 0;
    for (const PlannedBuffer& b : bp.buffers) {
      if (b.kind == MemoryKind::kPinnedHost || b.kind == MemoryKind::kPageableHost) host += b.bytes;
    }
    if (host > opts.host_budget_bytes) {
      over_host_budget = true;
      s = Status::OutOfMemory(
          ConfigurationName(opts) + " needs " + FormatBytes(host) +
          " of host memory per rank, over Options::host_budget_bytes (" + FormatBytes(opts.host_budget_bytes) +
          "; zero::Estimate lists the buffers). " +
          (opts.nvme_path.empty() ? "Give Options::nvme_path: the NVMe tier keeps the optimizer state on a local disk, "
                                    "with host memory for a few buckets only; or raise the budget"
                                  : "Raise the budget, or lower bucket_elements or nvme_buffers (the bounce buffers "
                                    "hold nvme_buffers buckets)"));
    }
  }
  if (s.ok()) s = run();
  // Allocation can fail on one rank only (capacities may differ): agree before returning. The minimum of
  // rank * 64 + status code over the ranks that failed names the first of them and how it failed.
  const int64_t mine_failed = s.ok() ? int64_t{e.world} * 64 : int64_t{e.rank} * 64 + static_cast<int>(s.code());
  int64_t first_failed = 0;
  co.what = "Engine::Open allocation agreement";
  ZERO_RETURN_IF_ERROR(comm->AllReduce(&mine_failed, &first_failed, 1, DType::kI64, ReduceOp::kMin, co));
  if (!s.ok()) {
    if (s.code() == StatusCode::kOutOfMemory && !over_host_budget) {
      s = Status::OutOfMemory(s.message() + e.OutOfMemoryAdvice(free_bytes));
    }
    return s.WithContext(where + " (" + StageName(st) + ")");
  }
  if (first_failed < int64_t{e.world} * 64) {
    const int64_t r = first_failed / 64;
    const auto code = static_cast<StatusCode>(first_failed % 64);
    const std::string what = code == StatusCode::kOutOfMemory ? "ran out of memory"
                             : opts.nvme_path.empty()         ? "could not open its device"
                                                              : "could not open its device or its NVMe tier";
    const std::string msg = where + ": rank " + std::to_string(r) + " " + what + " (" + StatusCodeName(code) +
                            "); its status says why and what fits";
    if (code == StatusCode::kIoError) return Status::IoError(msg);  // the NVMe tier's directory or disk
    if (code == StatusCode::kInvalidArgument) return Status::InvalidArgument(msg);  // ... or its file system
    return code == StatusCode::kOutOfMemory ? Status::OutOfMemory(msg) : Status::Unavailable(msg);
  }
  e.ResetScaler();
  engine->reset(new Engine(std::move(impl)));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------------------------
// Public methods: guards, then the implementation.

Status Engine::InitParams(const FillFn& fill) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable(/*allow_incomplete=*/true));
  return impl_->InitParamsImpl(fill);
}

Status Engine::BeginMicroStep(int micro, bool is_last) { return impl_->BeginMicroStepImpl(micro, is_last, nullptr); }

Status Engine::BeginMicroStep(int micro, bool is_last, std::span<const int> units) {
  const std::vector<int> list(units.begin(), units.end());
  return impl_->BeginMicroStepImpl(micro, is_last, &list);
}

Status Engine::Impl::BeginMicroStepImpl(int micro_arg, bool is_last, const std::vector<int>* declared) {
  ZERO_RETURN_IF_ERROR(CheckUsable());
  // The end of a micro-step with declared units: its remaining collectives come first, on every rank alike.
  if (micro >= 0 && dynamic.on) ZERO_RETURN_IF_ERROR(FinishDynamic());
  Status local;
  if (in_eval) {
    local = Status::FailedPrecondition("BeginMicroStep on " + Where() + " inside an eval pass; call EndEval first");
  } else if (micro_arg != micros_done) {
    local = Status::FailedPrecondition("BeginMicroStep(" + std::to_string(micro_arg) + ") on " + Where() +
                                       ": expected micro-step " + std::to_string(micros_done) +
                                       " (micro-steps count from 0 after each Step)");
  } else if (micro >= 0 && micro_is_last) {
    local = Status::FailedPrecondition("BeginMicroStep after the last micro-step on " + Where() +
                                       "; call Step first");
  } else if (micro >= 0) {
    local = CheckUnitsDone("BeginMicroStep on " + Where(), /*need_grads=*/true);
  }
  if (local.ok()) local = CheckDeclaration(declared);
  // The agreement compares is_last too: set it for the check, restore on failure.
  const bool prev_last = micro_is_last;
  micro_is_last = is_last;
  int64_t any_declared = 0;
  Status s = Agree(AgreeKind::kBeginMicroStep, micro_arg, local, declared != nullptr ? 1 : 0, &any_declared);
  if (!s.ok()) {
    micro_is_last = prev_last;
    return s;
  }
  Trace& t = train_trace;
  if (t.recording) {  // the first micro-step's trace is complete
    t.recording = false;
    t.recorded = true;
  } else if (!t.recorded && options.stage == Stage::kParameters && any_declared == 0) {
    t.recording = true;
  }
  t.pos = 0;
  micro = micro_arg;
  micros_done = micro_arg + 1;
  next_reduce = 0;
  for (UnitState& u : units) {
    u.grads_ready = false;
    u.grad_window = false;
    u.used = u.used_forward = u.zero_ready = u.skip_reduce = false;
  }
  // Units kept gathered across the turn but not used in backward would hold their slot forever.
  DropUnheldSlots();
  dynamic = DynamicMicroStep();
  if (any_declared != 0) {
    s = StartDynamic(declared);
    if (!s.ok() && poison.ok()) poison = s;
    return s;
  }
  return Status::Ok();
}

float Engine::LossScale() const { return impl_->loss_scale; }

Status Engine::Acquire(int unit, Pass pass) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable());
  ZERO_RETURN_IF_ERROR(impl_->ValidUnit(unit, "Acquire"));
  return impl_->AcquireImpl(unit, pass);
}

Status Engine::Release(int unit, Pass pass) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable());
  ZERO_RETURN_IF_ERROR(impl_->ValidUnit(unit, "Release"));
  return impl_->ReleaseImpl(unit, pass);
}

Status Engine::GradsReady(int unit) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable());
  ZERO_RETURN_IF_ERROR(impl_->ValidUnit(unit, "GradsReady"));
  return impl_->GradsReadyImpl(unit);
}

Status Engine::Step(const StepArgs& args, StepResult* result) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable());
  if (impl_->micro >= 0 && impl_->dynamic.on) ZERO_RETURN_IF_ERROR(impl_->FinishDynamic());
  return impl_->StepImpl(args, result);
}

Status Engine::BeginEval() {
  Impl& e = *impl_;
  ZERO_RETURN_IF_ERROR(e.CheckUsable());
  Status local;
  if (e.in_eval) local = Status::FailedPrecondition("BeginEval on " + e.Where() + ": already in an eval pass");
  if (e.micro >= 0) {
    local = Status::FailedPrecondition("BeginEval on " + e.Where() +
                                       ": a training step is in progress; call Step first");
  }
  ZERO_RETURN_IF_ERROR(e.Agree(AgreeKind::kBeginEval, 0, local));
  e.in_eval = true;
  return Status::Ok();
}

Status Engine::EndEval() {
  Impl& e = *impl_;
  ZERO_RETURN_IF_ERROR(e.CheckUsable());
  Status local;
  if (!e.in_eval) local = Status::FailedPrecondition("EndEval on " + e.Where() + " without BeginEval");
  if (local.ok()) local = e.CheckUnitsDone("EndEval on " + e.Where(), /*need_grads=*/false);
  ZERO_RETURN_IF_ERROR(e.Agree(AgreeKind::kEndEval, 0, local));
  e.in_eval = false;
  // Eval-only gathers (prefetched, unused) must not survive into training.
  e.DropUnheldSlots();
  return Status::Ok();
}

const std::vector<ParamSpec>& Engine::specs() const { return impl_->specs; }
const Options& Engine::options() const { return impl_->options; }
int Engine::num_units() const { return static_cast<int>(impl_->units.size()); }
int64_t Engine::step() const { return impl_->step; }
MemoryReport Engine::Memory() const {
  MemoryReport r = impl_->device->report();
  r.nvme = impl_->nvme_usage;  // the NVMe tier's files: allocated at Open, constant
  return r;
}
// The communication thread updates the counters: let it finish what is queued first.
const CommCounters& Engine::comm_counters() const {
  (void)impl_->comm_stream->Synchronize(impl_->wait_timeout);
  if (impl_->hier == nullptr) return impl_->comm->counters();
  impl_->counter_sum = impl_->comm->counters();  // ZeRO++: the node Comms' traffic too
  impl_->counter_sum += impl_->hier->counters();
  return impl_->counter_sum;
}
Status Engine::healthy() const {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable());
  // With the communication stream idle, the communicator may be polled for a peer's abort notice. DrainComm, not a
  // plain wait: on CUDA a stalled collective is then named (and aborted) by the communicator's watchdog within the
  // timeout, as at every other drain.
  ZERO_RETURN_IF_ERROR(impl_->DrainComm());
  Status h = impl_->comm->health();
  if (!h.ok()) return h.WithContext("the communicator is broken");
  return Status::Ok();
}
const std::vector<Engine::Event>& Engine::TEST_events() const { return impl_->events; }
const std::string& Engine::auto_choice() const { return impl_->auto_choice; }

}  // namespace zero

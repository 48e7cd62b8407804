// Drives the toy model through a real Engine: the access adapters, a training loop, and gathering the final
// parameters on every rank for comparison against a reference. Two trainers: host loops (EngineAccess; on CUDA
// every view is copied to the host synchronously) and kernels on the engine's backend (EngineKernelAccess; on
// CUDA the compute stream has the model's kernels in flight while the communication stream works). TrainToyStep
// uses kernels on CUDA and host loops on the CPU unless told otherwise (ToyTrainer).
#pragma once

#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine_impl.h"
#include "kernels/cpu_kernels.h"
#include "testing/device_copy.h"
#include "testing/device_memory.h"
#include "testing/toy_kernel_model.h"
#include "testing/toy_model.h"
#include "zero/zero.h"

// Status assertions that print the status when they fail.
#define ZERO_ASSERT_OK(expr)                        \
  do {                                              \
    const ::zero::Status zero_s_ = (expr);          \
    ASSERT_TRUE(zero_s_.ok()) << zero_s_.ToString(); \
  } while (0)
#define ZERO_EXPECT_OK(expr)                        \
  do {                                              \
    const ::zero::Status zero_s_ = (expr);          \
    EXPECT_TRUE(zero_s_.ok()) << zero_s_.ToString(); \
  } while (0)

namespace zero {

// The engine's test hooks (src/engine_impl.h, EngineTestHooks).
struct EngineTestPeer {
  static EngineTestHooks& Hooks(Engine& engine) { return engine.impl_->test; }
  // The engine's state, read-only (use `const auto&`: the type is private to Engine).
  static const Engine::Impl& State(Engine& engine) { return *engine.impl_; }
};

}  // namespace zero

namespace zero::testing {

// The host waits for the trainer's own stream (Options::cuda_stream), where the engine's views become ready: the
// tests' synchronous copies run on the legacy stream, which does not wait for a non-blocking stream. Nothing to
// wait for on the CPU or with the legacy stream as the compute stream.
inline Status SyncTrainerStream(const Engine& engine) {
  if (engine.options().backend != Backend::kCuda || engine.options().cuda_stream == nullptr) return Status::Ok();
  return StreamSynchronize(engine.options().cuda_stream);
}

// A trainer's own CUDA stream (Options::cuda_stream): a non-blocking stream of the Comm's device, drained and
// destroyed when this goes. Declare it before the engines that compute on it, so that it outlives them.
class TrainerStream {
 public:
  TrainerStream() = default;
  ~TrainerStream() {
    if (stream_ == nullptr) return;
    (void)StreamSynchronize(stream_);
    DestroyStream(stream_);
  }
  TrainerStream(const TrainerStream&) = delete;
  TrainerStream& operator=(const TrainerStream&) = delete;
  Status Create(const Comm& comm) {
    ZERO_RETURN_IF_ERROR(CudaSetDevice(comm.cuda_device()));
    return NewNonBlockingStream(&stream_);
  }
  void* get() const { return stream_; }

 private:
  void* stream_ = nullptr;
};

// A view's elements widened exactly to fp32 on the host (copied from the device first on Backend::kCuda).
inline Status ReadWidened(const TensorView& v, std::vector<float>* out) {
  const int64_t bytes = v.numel * static_cast<int64_t>(DTypeSize(v.dtype));
  std::vector<char> raw(static_cast<size_t>(bytes));
  if (v.backend != Backend::kCpu) {
    ZERO_RETURN_IF_ERROR(CopyFromDevice(raw.data(), v.data, bytes));
  } else if (bytes > 0) {
    std::memcpy(raw.data(), v.data, static_cast<size_t>(bytes));
  }
  out->resize(static_cast<size_t>(v.numel));
  kernels::CastCpu(raw.data(), v.dtype, out->data(), DType::kF32, v.numel, 1);
  return Status::Ok();
}

// ToyAccess over an Engine; a failed call is a test failure (and a scratch buffer keeps the model running so
// that every rank keeps issuing the same collectives). On Backend::kCuda the views are device memory: the model
// works on host mirrors, parameters copied in at each Param call and gradients copied out at GradsReady.
class EngineAccess : public ToyAccess {
 public:
  explicit EngineAccess(Engine* engine)
      : engine_(engine),
        scratch_(4096, 0.0f),
        device_(engine->options().backend != Backend::kCpu),
        convert_(engine->options().param_dtype != DType::kF32),
        convert_grads_(engine->options().grad_dtype != DType::kF32),
        param_mirror_(engine->specs().size()),
        grad_mirror_(engine->specs().size()) {}
  void Acquire(int unit, bool backward) override {
    Check(engine_->Acquire(unit, backward ? Pass::kBackward : Pass::kForward));
  }
  void Release(int unit, bool backward) override {
    Check(engine_->Release(unit, backward ? Pass::kBackward : Pass::kForward));
  }
  void GradsReady(int unit) override {
    if (device_ || convert_grads_) {
      for (size_t p = 0; p < grad_mirror_.size(); ++p) {
        if (grad_mirror_[p].empty() || engine_->specs()[p].unit != unit) continue;
        const TensorView v = engine_->Grad(static_cast<int>(p));
        if (v.data != nullptr) {
          // The micro-step's fp32 sum, rounded once to grad_dtype, as a trainer's backward writes it.
          const int64_t bytes = v.numel * static_cast<int64_t>(DTypeSize(v.dtype));
          raw_.resize(static_cast<size_t>(bytes));
          kernels::CastCpu(grad_mirror_[p].data(), DType::kF32, raw_.data(), v.dtype, v.numel, 1);
          if (device_) {
            Check(SyncTrainerStream(*engine_));
            Check(CopyToDevice(v.data, raw_.data(), bytes));
          } else {
            std::memcpy(v.data, raw_.data(), static_cast<size_t>(bytes));
          }
        }
        grad_mirror_[p].clear();
      }
    }
    Check(engine_->GradsReady(unit));
  }
  float* Param(int p) override {
    const TensorView v = engine_->Param(p);
    float* d = OrScratch(v.as<float>(), "Param", p);
    if ((!device_ && !convert_) || d == scratch_.data()) return d;
    // Device memory is copied to the host; bf16/fp16 parameters are widened to fp32 (exactly).
    std::vector<float>& m = param_mirror_[static_cast<size_t>(p)];
    if (device_) Check(SyncTrainerStream(*engine_));
    Check(ReadWidened(v, &m));
    return m.data();
  }
  float* Grad(int p) override {
    float* g = GradOf(p);
    if (p == poison_) g[0] = std::numeric_limits<float>::infinity();
    return g;
  }
  // Every Grad(param) call writes +inf into the parameter's first gradient element: an overflow on this rank.
  void set_poison(int param) { poison_ = param; }
  bool failed() const { return failed_; }

 private:
  void Check(const Status& s) {
    if (!s.ok()) {
      failed_ = true;
      ADD_FAILURE() << s.ToString();
    }
  }
  float* GradOf(int p) {
    const TensorView v = engine_->Grad(p);
    float* d = OrScratch(v.as<float>(), "Grad", p);
    if ((!device_ && !convert_grads_) || d == scratch_.data()) return d;
    std::vector<float>& m = grad_mirror_[static_cast<size_t>(p)];
    // First use in this micro-step: start from the engine's (zeroed or accumulated) values.
    if (m.empty()) {
      if (device_) Check(SyncTrainerStream(*engine_));
      Check(ReadWidened(v, &m));
    }
    return m.data();
  }
  float* OrScratch(float* p, const char* what, int param) {
    if (p != nullptr) return p;
    failed_ = true;
    ADD_FAILURE() << what << "(" << param << ") returned an invalid view";
    return scratch_.data();
  }
  Engine* engine_;
  std::vector<float> scratch_;
  bool device_;
  bool convert_;
  bool convert_grads_;
  std::vector<char> raw_;
  std::vector<std::vector<float>> param_mirror_, grad_mirror_;
  int poison_ = -1;
  bool failed_ = false;
};

inline ToyKind ToyKindOf(DType dtype) {
  return dtype == DType::kBF16 ? kToyBf16 : dtype == DType::kF16 ? kToyF16 : kToyF32;
}

// ToyKernelAccess over an Engine: the kernel trainer reads the engine's Param views and adds into its Grad views
// where they are, on the engine's backend (CUDA: kernels on the compute stream, nothing copied to the host; CPU:
// loops). 16-bit gradient views: the model adds into an fp32 accumulator that starts from the view's values at
// the micro-step's first use and is rounded once into the view before GradsReady (EngineAccess's rule).
class EngineKernelAccess : public ToyKernelAccess {
 public:
  EngineKernelAccess(Engine* engine, ToyWorkspace* ws) : engine_(engine), ws_(ws) {}
  void Acquire(int unit, bool backward) override {
    Check(engine_->Acquire(unit, backward ? Pass::kBackward : Pass::kForward));
  }
  void Release(int unit, bool backward) override {
    Check(engine_->Release(unit, backward ? Pass::kBackward : Pass::kForward));
  }
  void GradsReady(int unit) override {
    for (int p = 0; p < kToyParams; ++p) {
      if (engine_->specs()[static_cast<size_t>(p)].unit != unit) continue;
      if (p == poison_) {
        ToyArgs a;
        a.dst = Grad(p);
        Run(ToyOp::kPoison, a);
      }
      if (!widened_[p]) continue;
      const TensorView v = engine_->Grad(p);
      if (v.data != nullptr) {
        ToyArgs a;
        a.src = ws_->GradAccumulator(p);
        a.dst = v.data;
        a.kind = ToyKindOf(v.dtype);
        a.count = v.numel;
        Run(ToyOp::kNarrow, a);
      }
      widened_[p] = false;
    }
    Check(engine_->GradsReady(unit));
  }
  ToyParam Param(int p) override {
    const TensorView v = engine_->Param(p);
    if (v.data == nullptr) return {Invalid("Param", p), kToyF32};
    return {v.data, ToyKindOf(v.dtype)};
  }
  float* Grad(int p) override {
    const TensorView v = engine_->Grad(p);
    if (v.data == nullptr) return Invalid("Grad", p);
    if (v.dtype == DType::kF32) return v.as<float>();
    float* acc = ws_->GradAccumulator(p);
    if (!widened_[p]) {
      ToyArgs a;
      a.src = v.data;
      a.dst = acc;
      a.kind = ToyKindOf(v.dtype);
      a.count = v.numel;
      Run(ToyOp::kWiden, a);
      widened_[p] = true;
    }
    return acc;
  }
  // Before its unit's GradsReady, +inf goes into the parameter's first gradient element: an overflow here.
  void set_poison(int param) { poison_ = param; }
  bool failed() const { return failed_; }

 private:
  void Check(const Status& s) {
    if (!s.ok()) {
      failed_ = true;
      ADD_FAILURE() << s.ToString();
    }
  }
  void Run(ToyOp op, const ToyArgs& a) { Check(RunToyOp(ws_->exec(), op, a, ws_->stream())); }
  float* Invalid(const char* what, int param) {
    failed_ = true;
    ADD_FAILURE() << what << "(" << param << ") returned an invalid view";
    return ws_->Scratch();
  }
  Engine* engine_;
  ToyWorkspace* ws_;
  bool widened_[kToyParams] = {};
  int poison_ = -1;
  bool failed_ = false;
};

// How TrainToyStep runs the toy model.
enum class ToyTrainer {
  kAuto,       // kKernels on CUDA, kHostLoops on the CPU; ZERO_TEST_TOY_TRAINER=host or =kernels overrides both
  kHostLoops,  // ToyForwardBackward on the host (EngineAccess: on CUDA every view is copied synchronously)
  kKernels,    // ToyKernelForwardBackward on the engine's backend (EngineKernelAccess)
};

inline ToyTrainer ResolveToyTrainer(ToyTrainer t, Backend backend) {
  if (t != ToyTrainer::kAuto) return t;
  if (const char* env = std::getenv("ZERO_TEST_TOY_TRAINER")) {  // the one debug knob of the harness
    if (std::string(env) == "host") return ToyTrainer::kHostLoops;
    if (std::string(env) == "kernels") return ToyTrainer::kKernels;
  }
  return backend == Backend::kCuda ? ToyTrainer::kKernels : ToyTrainer::kHostLoops;
}

struct ToyStepOptions {
  ToyTrainer trainer = ToyTrainer::kAuto;
  int poison_param = -1;  // when >= 0: this rank's gradient of that parameter overflows (+inf) in every micro-step
};

// Options for protocol tests: small buckets (several per unit), one thread.
inline Options SmallToyOptions(Stage stage) {
  Options o;
  o.stage = stage;
  o.bucket_elements = 64;
  o.cpu_threads = 1;
  return o;
}

// The toy model's options for suites that must reach every piece of state (checkpoints, the NVMe tier): buckets
// of 40 elements (several per unit, fragments that straddle parameters), clipping that engages, AdamW and SGD
// settings that move the parameters, and a loss scaler whose state changes within a short run. offload: 0 none,
// 1 the optimizer state, 2 the parameter shards too.
inline Options StateCoverageOptions(Stage stage, OptimizerKind optimizer, DType param_dtype, DType grad_dtype,
                                    int offload) {
  Options o;
  o.stage = stage;
  o.optimizer = optimizer;
  o.bucket_elements = 40;
  o.clip_norm = 0.5;
  o.adamw.lr = 1e-2f;
  o.adamw.eps = 1e-6f;
  o.adamw.weight_decay = 0.05f;
  o.sgd.lr = 0.2f;
  o.param_dtype = param_dtype;
  o.grad_dtype = grad_dtype;
  o.offload_optimizer = offload >= 1;
  o.offload_params = offload >= 2;
  o.loss_scale.initial = 1024.0f;
  o.loss_scale.growth_interval = 4;
  o.cpu_threads = 1;
  return o;
}

inline bool Contains(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

// Opens an engine over the toy model and initializes its parameters from ToyInit.
inline std::unique_ptr<Engine> OpenToyEngine(const Options& options, Comm* comm) {
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(options, comm, ToySpecs(), &engine);
  EXPECT_TRUE(s.ok()) << s.ToString();
  if (!s.ok()) return nullptr;
  s = engine->InitParams([](int p, int64_t off, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = ToyInit(p, off + i);
  });
  EXPECT_TRUE(s.ok()) << s.ToString();
  return engine;
}

// The `micros` micro-steps of step `step` on this rank's slices of the global batch, without the Step call.
inline void RunToyMicroSteps(Engine& engine, Comm& comm, int step, int micros, int global_batch,
                             const ToyStepOptions& options = {}) {
  if (ResolveToyTrainer(options.trainer, engine.options().backend) == ToyTrainer::kKernels) {
    ToyWorkspace* ws = nullptr;
    Status s = SharedToyWorkspace(engine.options().backend == Backend::kCuda ? ToyExec::kCuda : ToyExec::kCpu, &ws);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (!s.ok()) return;
    ws->set_stream(engine.options().cuda_stream);  // the trainer's stream: the engine's compute stream
    EngineKernelAccess access(&engine, ws);
    access.set_poison(options.poison_param);
    for (int m = 0; m < micros; ++m) {
      s = engine.BeginMicroStep(m, m == micros - 1);
      EXPECT_TRUE(s.ok()) << s.ToString();
      // Micro-step m in slot m % 2: the batch is made on the device while the previous one may still run.
      s = ws->Generate(m % 2, step, m, comm.rank(), comm.world_size(), global_batch);
      EXPECT_TRUE(s.ok()) << s.ToString();
      s = ToyKernelForwardBackward(*ws, m % 2, access, engine.LossScale());
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    return;
  }
  EngineAccess access(&engine);
  access.set_poison(options.poison_param);
  for (int m = 0; m < micros; ++m) {
    Status s = engine.BeginMicroStep(m, m == micros - 1);
    EXPECT_TRUE(s.ok()) << s.ToString();
    ToyForwardBackward(access, ToyMicroBatch(step, m, comm.rank(), comm.world_size(), global_batch),
                       engine.LossScale());
  }
}

// One optimizer step of `micros` micro-steps on this rank's slices of the global batch.
inline StepResult TrainToyStep(Engine& engine, Comm& comm, int step, int micros, int global_batch,
                               const ToyStepOptions& options = {}) {
  RunToyMicroSteps(engine, comm, step, micros, global_batch, options);
  StepResult r;
  Status s = engine.Step(StepArgs(), &r);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return r;
}

// Full copies of every parameter, on every rank (collective in stage 3).
inline std::vector<std::vector<float>> GatherToyParams(Engine& engine) {
  std::vector<int> all_units(static_cast<size_t>(engine.num_units()));
  for (int u = 0; u < engine.num_units(); ++u) all_units[static_cast<size_t>(u)] = u;
  FullParamsScope scope;
  Status s = engine.GatherFull(all_units, &scope);
  EXPECT_TRUE(s.ok()) << s.ToString();
  s = SyncTrainerStream(engine);  // stages 0-2: the optimizer wrote the parameters there
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::vector<std::vector<float>> out;
  for (int p = 0; p < static_cast<int>(engine.specs().size()); ++p) {
    TensorView v = engine.Param(p);
    const float* d = v.as<float>();
    if (d != nullptr && (v.backend != Backend::kCpu || v.dtype != DType::kF32)) {
      std::vector<float> host;
      s = ReadWidened(v, &host);
      EXPECT_TRUE(s.ok()) << s.ToString();
      out.push_back(std::move(host));
      continue;
    }
    out.emplace_back(d, d == nullptr ? d : d + v.numel);
  }
  s = scope.Close();
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

}  // namespace zero::testing

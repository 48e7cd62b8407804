// Drives the toy model through a real Engine: the access adapter, a training loop, and gathering the final
// parameters on every rank for comparison against a reference.
#pragma once

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine_impl.h"
#include "kernels/cpu_kernels.h"
#include "testing/device_copy.h"
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
    Check(ReadWidened(v, &m));
    return m.data();
  }
  float* Grad(int p) override {
    const TensorView v = engine_->Grad(p);
    float* d = OrScratch(v.as<float>(), "Grad", p);
    if ((!device_ && !convert_grads_) || d == scratch_.data()) return d;
    std::vector<float>& m = grad_mirror_[static_cast<size_t>(p)];
    // First use in this micro-step: start from the engine's (zeroed or accumulated) values.
    if (m.empty()) Check(ReadWidened(v, &m));
    return m.data();
  }
  bool failed() const { return failed_; }

 private:
  void Check(const Status& s) {
    if (!s.ok()) {
      failed_ = true;
      ADD_FAILURE() << s.ToString();
    }
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
  bool failed_ = false;
};

// Options for protocol tests: small buckets (several per unit), one thread.
inline Options SmallToyOptions(Stage stage) {
  Options o;
  o.stage = stage;
  o.bucket_elements = 64;
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

// One optimizer step of `micros` micro-steps on this rank's slices of the global batch.
inline StepResult TrainToyStep(Engine& engine, Comm& comm, int step, int micros, int global_batch) {
  EngineAccess access(&engine);
  for (int m = 0; m < micros; ++m) {
    Status s = engine.BeginMicroStep(m, m == micros - 1);
    EXPECT_TRUE(s.ok()) << s.ToString();
    ToyForwardBackward(access, ToyMicroBatch(step, m, comm.rank(), comm.world_size(), global_batch),
                       engine.LossScale());
  }
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

// BenchModel: the GPU benchmarks' stand-in for a trainer's model. Its parameters are zero::TransformerSpecs of a
// LLaMA shape (so memory and communication are a real model's); its compute is, per 2-D parameter W [out, in],
// one forward product Y = X·Wᵀ and two backward products dX = dY·W and dW += dYᵀ·X over T tokens, in bf16 with
// fp32 accumulation (cuBLAS, the legacy default stream: zero's compute stream). That is 6·T FLOPs per parameter,
// a transformer's linear layers; attention's T² terms, norms and activations are left out, and the products read
// fixed activations instead of the previous layer's output (the time is the same; the values do not matter).
//
// Two ways to train it: through zero (EngineStep: the engine's protocol, its gradient buffers, its optimizer) and
// without zero (PlainTrainer: the same products on cudaMalloc'd buffers, then the same fused AdamW kernel over
// one flat fp32 master with the bf16 copy written in the pass, then the gradients zeroed).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "zero/zero.h"

namespace zero::bench::gpu {

class BenchModel {
 public:
  // `tokens` = T, the rows of every product. Allocates the activations (and a cuBLAS handle) on the current device.
  static Status Create(const TransformerShape& shape, int64_t tokens, std::unique_ptr<BenchModel>* out);
  ~BenchModel();
  BenchModel(const BenchModel&) = delete;
  BenchModel& operator=(const BenchModel&) = delete;

  const std::vector<ParamSpec>& specs() const { return specs_; }
  int num_units() const { return num_units_; }
  int64_t tokens() const { return tokens_; }
  int64_t params() const { return params_; }
  // FLOPs of one forward + backward (6·T per parameter of the 2-D weights).
  double flops_per_step() const;
  // Device bytes the model holds itself (activations), for Options::reserved_bytes.
  int64_t activation_bytes() const { return activation_bytes_; }

  // The products of unit `u` on the legacy stream. param(p) is parameter p's bf16 data on the device; grad(p) its
  // gradient buffer (grad_dtype kF32 or kBF16), accumulated into.
  using ParamFn = std::function<const void*(int param)>;
  using GradFn = std::function<void*(int param)>;
  Status Forward(int unit, const ParamFn& param);
  Status Backward(int unit, const ParamFn& param, const GradFn& grad, DType grad_dtype);

 private:
  BenchModel() = default;
  std::vector<ParamSpec> specs_;
  std::vector<std::vector<int>> unit_params_;  // 2-D parameters per unit
  int num_units_ = 0;
  int64_t tokens_ = 0, params_ = 0, matrix_params_ = 0, activation_bytes_ = 0;
  void* blas_ = nullptr;  // cublasHandle_t
  void* x_ = nullptr;     // [T, max in] bf16
  void* dy_ = nullptr;    // [T, max out] bf16
  void* y_ = nullptr;     // [T, max out] bf16
  void* dx_ = nullptr;    // [T, max in] bf16
};

// CUDA timing events around every Acquire of a step and the products after it, on the legacy stream: before
// Acquire, after Acquire, after the unit's products, for each Acquire in call order (forward, then backward).
// After the step has drained, Stalls() is how long the compute stream waited at each Acquire (a gather it needed,
// or the host inside Acquire), Computes() how long the products after it took.
class StepTimeline {
 public:
  explicit StepTimeline(int acquires);
  ~StepTimeline();
  StepTimeline(const StepTimeline&) = delete;
  StepTimeline& operator=(const StepTimeline&) = delete;
  void Reset() { next_ = 0; }
  void Mark();  // records the next event
  std::vector<double> Stalls() const;
  std::vector<double> Computes() const;

 private:
  std::vector<cudaEvent_t> events_;
  size_t next_ = 0;
};

// One training step of `model` through `engine` (one micro-step): the protocol of include/zero/engine.h with the
// model's products between Acquire and Release, and Engine::Step. `timeline` (optional) is marked around every
// Acquire and after its products.
Status EngineStep(BenchModel& model, Engine& engine, StepTimeline* timeline = nullptr);

// A step without compute: the same protocol, each gradient filled by one kernel (FillPattern) instead of the
// products. What an optimizer-bound measurement (the offloaded step) needs.
Status GradFillStep(const std::vector<ParamSpec>& specs, int num_units, Engine& engine);

// The same model trained without zero: bf16 parameters, an fp32 master, AdamW state and gradients in plain device
// buffers, one flat range each; the step is forward, backward, kernels::AdamWCuda over everything (bf16 copy in
// the pass) and a memset of the gradients.
class PlainTrainer {
 public:
  static Status Create(BenchModel* model, DType grad_dtype, std::unique_ptr<PlainTrainer>* out);
  ~PlainTrainer();
  PlainTrainer(const PlainTrainer&) = delete;
  PlainTrainer& operator=(const PlainTrainer&) = delete;
  Status Step();
  int64_t device_bytes() const { return bytes_; }

 private:
  PlainTrainer() = default;
  BenchModel* model_ = nullptr;
  DType grad_dtype_ = DType::kF32;
  std::vector<int64_t> offset_;  // per parameter, in elements
  int64_t n_ = 0, bytes_ = 0;
  void* params_ = nullptr;  // bf16
  void* grads_ = nullptr;
  float* master_ = nullptr;
  float* m_ = nullptr;
  float* v_ = nullptr;
  int64_t step_ = 0;
};

}  // namespace zero::bench::gpu

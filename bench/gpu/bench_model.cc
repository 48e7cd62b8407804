// BenchModel, EngineStep and PlainTrainer (bench_model.h).
#include "bench/gpu/bench_model.h"

#include <cublas_v2.h>

#include <algorithm>
#include <string>

#include "bench/gpu/gpu_kernels.h"
#include "kernels/cuda_kernels.h"

namespace zero::bench::gpu {
namespace {

Status Cuda(cudaError_t rc, const char* what) {
  return rc == cudaSuccess ? Status::Ok() : Status::Internal(std::string(what) + ": " + cudaGetErrorString(rc));
}
Status Blas(cublasStatus_t rc, const char* what) {
  return rc == CUBLAS_STATUS_SUCCESS ? Status::Ok()
                                     : Status::Internal(std::string(what) + ": cuBLAS status " + std::to_string(rc));
}
cublasHandle_t Handle(void* h) { return static_cast<cublasHandle_t>(h); }
// The gradient buffer's element type as cuBLAS names it (the product writes the gradient in the engine's dtype).
cudaDataType GradType(DType d) {
  switch (d) {
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

}  // namespace

Status BenchModel::Create(const TransformerShape& shape, int64_t tokens, std::unique_ptr<BenchModel>* out) {
  std::unique_ptr<BenchModel> m(new BenchModel());
  ZERO_RETURN_IF_ERROR(TransformerSpecs(shape, &m->specs_));
  m->tokens_ = tokens;
  int64_t max_in = 1, max_out = 1;
  for (size_t p = 0; p < m->specs_.size(); ++p) {
    const ParamSpec& s = m->specs_[p];
    m->num_units_ = std::max(m->num_units_, s.unit + 1);
    m->params_ += s.numel();
    if (s.shape.size() == 2) {
      max_out = std::max(max_out, s.shape[0]);
      max_in = std::max(max_in, s.shape[1]);
      m->matrix_params_ += s.numel();
    }
  }
  m->unit_params_.resize(static_cast<size_t>(m->num_units_));
  for (size_t p = 0; p < m->specs_.size(); ++p) {
    if (m->specs_[p].shape.size() == 2) m->unit_params_[static_cast<size_t>(m->specs_[p].unit)].push_back(static_cast<int>(p));
  }
  const int64_t in_bytes = tokens * max_in * 2, out_bytes = tokens * max_out * 2;
  ZERO_RETURN_IF_ERROR(Cuda(cudaMalloc(&m->x_, static_cast<size_t>(in_bytes)), "cudaMalloc (activations)"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaMalloc(&m->dx_, static_cast<size_t>(in_bytes)), "cudaMalloc (activations)"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaMalloc(&m->y_, static_cast<size_t>(out_bytes)), "cudaMalloc (activations)"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaMalloc(&m->dy_, static_cast<size_t>(out_bytes)), "cudaMalloc (activations)"));
  m->activation_bytes_ = 2 * (in_bytes + out_bytes);
  ZERO_RETURN_IF_ERROR(Cuda(static_cast<cudaError_t>(FillPattern(m->x_, true, tokens * max_in, 1, 1.0f, nullptr)),
                            "filling activations"));
  ZERO_RETURN_IF_ERROR(Cuda(static_cast<cudaError_t>(FillPattern(m->dy_, true, tokens * max_out, 2, 1e-3f, nullptr)),
                            "filling activations"));
  cublasHandle_t h = nullptr;
  ZERO_RETURN_IF_ERROR(Blas(cublasCreate(&h), "cublasCreate"));
  m->blas_ = h;
  ZERO_RETURN_IF_ERROR(Blas(cublasSetStream(h, nullptr), "cublasSetStream"));  // the legacy stream: zero's compute
  ZERO_RETURN_IF_ERROR(Cuda(cudaDeviceSynchronize(), "BenchModel::Create"));
  *out = std::move(m);
  return Status::Ok();
}

BenchModel::~BenchModel() {
  if (blas_ != nullptr) cublasDestroy(Handle(blas_));
  for (void* p : {x_, dx_, y_, dy_}) cudaFree(p);
}

double BenchModel::flops_per_step() const { return 6.0 * static_cast<double>(tokens_) * static_cast<double>(matrix_params_); }

Status BenchModel::Forward(int unit, const ParamFn& param) {
  const float one = 1.0f, zero = 0.0f;
  const int t = static_cast<int>(tokens_);
  for (int p : unit_params_[static_cast<size_t>(unit)]) {
    const int out = static_cast<int>(specs_[static_cast<size_t>(p)].shape[0]);
    const int in = static_cast<int>(specs_[static_cast<size_t>(p)].shape[1]);
    // Row-major Y[T, out] = X[T, in]·Wᵀ is column-major Yᵀ = W_cmᵀ·Xᵀ with W_cm = Wᵀ [in, out] (bench_model.h).
    ZERO_RETURN_IF_ERROR(Blas(cublasGemmEx(Handle(blas_), CUBLAS_OP_T, CUBLAS_OP_N, out, t, in, &one, param(p),
                                           CUDA_R_16BF, in, x_, CUDA_R_16BF, in, &zero, y_, CUDA_R_16BF, out,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                              "forward product"));
  }
  return Status::Ok();
}

Status BenchModel::Backward(int unit, const ParamFn& param, const GradFn& grad, DType grad_dtype) {
  const float one = 1.0f, zero = 0.0f;
  const int t = static_cast<int>(tokens_);
  const std::vector<int>& ps = unit_params_[static_cast<size_t>(unit)];
  for (auto it = ps.rbegin(); it != ps.rend(); ++it) {
    const int p = *it;
    const int out = static_cast<int>(specs_[static_cast<size_t>(p)].shape[0]);
    const int in = static_cast<int>(specs_[static_cast<size_t>(p)].shape[1]);
    // dX[T, in] = dY[T, out]·W: column-major dXᵀ = W_cm·dYᵀ.
    ZERO_RETURN_IF_ERROR(Blas(cublasGemmEx(Handle(blas_), CUBLAS_OP_N, CUBLAS_OP_N, in, t, out, &one, param(p),
                                           CUDA_R_16BF, in, dy_, CUDA_R_16BF, out, &zero, dx_, CUDA_R_16BF, in,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                              "backward product (input)"));
    // dW[out, in] += dY[T, out]ᵀ·X[T, in]: column-major dWᵀ [in, out] += Xᵀ·dY.
    ZERO_RETURN_IF_ERROR(Blas(cublasGemmEx(Handle(blas_), CUBLAS_OP_N, CUBLAS_OP_T, in, out, t, &one, x_,
                                           CUDA_R_16BF, in, dy_, CUDA_R_16BF, out, &one, grad(p),
                                           GradType(grad_dtype), in, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                              "backward product (weight)"));
  }
  return Status::Ok();
}

StepTimeline::StepTimeline(int acquires) : events_(static_cast<size_t>(3 * acquires)) {
  for (cudaEvent_t& e : events_) cudaEventCreate(&e);
}

StepTimeline::~StepTimeline() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

void StepTimeline::Mark() {
  if (next_ < events_.size()) cudaEventRecord(events_[next_++], nullptr);
}

namespace {
std::vector<double> Elapsed(const std::vector<cudaEvent_t>& ev, size_t used, size_t from) {
  std::vector<double> out;
  for (size_t i = from; i + 1 < used; i += 3) {
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, ev[i], ev[i + 1]);
    out.push_back(ms * 1e-3);
  }
  return out;
}
}  // namespace

std::vector<double> StepTimeline::Stalls() const { return Elapsed(events_, next_, 0); }
std::vector<double> StepTimeline::Computes() const { return Elapsed(events_, next_, 1); }

Status EngineStep(BenchModel& model, Engine& engine, StepTimeline* timeline) {
  const DType gd = engine.options().grad_dtype;
  const auto param = [&](int p) -> const void* { return engine.Param(p).data; };
  const auto grad = [&](int p) -> void* { return engine.Grad(p).data; };
  const auto mark = [&] {
    if (timeline != nullptr) timeline->Mark();
  };
  if (timeline != nullptr) timeline->Reset();
  ZERO_RETURN_IF_ERROR(engine.BeginMicroStep(0, true));
  for (int u = 0; u < model.num_units(); ++u) {
    mark();
    ZERO_RETURN_IF_ERROR(engine.Acquire(u, Pass::kForward));
    mark();
    ZERO_RETURN_IF_ERROR(model.Forward(u, param));
    mark();
    ZERO_RETURN_IF_ERROR(engine.Release(u, Pass::kForward));
  }
  for (int u = model.num_units() - 1; u >= 0; --u) {
    mark();
    ZERO_RETURN_IF_ERROR(engine.Acquire(u, Pass::kBackward));
    mark();
    ZERO_RETURN_IF_ERROR(model.Backward(u, param, grad, gd));
    mark();
    ZERO_RETURN_IF_ERROR(engine.GradsReady(u));
    ZERO_RETURN_IF_ERROR(engine.Release(u, Pass::kBackward));
  }
  StepResult r;
  return engine.Step(StepArgs{}, &r);
}

Status GradFillStep(const std::vector<ParamSpec>& specs, int num_units, Engine& engine) {
  const bool bf16 = engine.options().grad_dtype == DType::kBF16;
  ZERO_RETURN_IF_ERROR(engine.BeginMicroStep(0, true));
  for (int u = 0; u < num_units; ++u) {
    ZERO_RETURN_IF_ERROR(engine.Acquire(u, Pass::kForward));
    ZERO_RETURN_IF_ERROR(engine.Release(u, Pass::kForward));
  }
  for (int u = num_units - 1; u >= 0; --u) {
    ZERO_RETURN_IF_ERROR(engine.Acquire(u, Pass::kBackward));
    for (size_t p = 0; p < specs.size(); ++p) {
      if (specs[p].unit != u || !specs[p].trainable) continue;
      const TensorView g = engine.Grad(static_cast<int>(p));
      ZERO_RETURN_IF_ERROR(Cuda(static_cast<cudaError_t>(FillPattern(g.data, bf16, g.numel, 7 + p, 1e-3f, nullptr)),
                                "filling a gradient"));
    }
    ZERO_RETURN_IF_ERROR(engine.GradsReady(u));
    ZERO_RETURN_IF_ERROR(engine.Release(u, Pass::kBackward));
  }
  StepResult r;
  return engine.Step(StepArgs{}, &r);
}

Status PlainTrainer::Create(BenchModel* model, DType grad_dtype, std::unique_ptr<PlainTrainer>* out) {
  std::unique_ptr<PlainTrainer> t(new PlainTrainer());
  t->model_ = model;
  t->grad_dtype_ = grad_dtype;
  for (const ParamSpec& s : model->specs()) {
    t->offset_.push_back(t->n_);
    t->n_ += (s.numel() + 63) / 64 * 64;  // 64-element aligned starts, like zero's buckets
  }
  const int64_t n = t->n_, gb = grad_dtype == DType::kBF16 ? 2 : 4;
  ZERO_RETURN_IF_ERROR(Cuda(cudaMalloc(&t->params_, static_cast<size_t>(n * 2)), "cudaMalloc (plain params)"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaMalloc(&t->grads_, static_cast<size_t>(n * gb)), "cudaMalloc (plain grads)"));
  for (float** p : {&t->master_, &t->m_, &t->v_}) {
    ZERO_RETURN_IF_ERROR(Cuda(cudaMalloc(p, static_cast<size_t>(n * 4)), "cudaMalloc (plain optimizer)"));
  }
  t->bytes_ = n * (2 + gb + 12);
  ZERO_RETURN_IF_ERROR(Cuda(static_cast<cudaError_t>(FillPattern(t->master_, false, n, 3, 0.02f, nullptr)), "fill"));
  ZERO_RETURN_IF_ERROR(Cuda(static_cast<cudaError_t>(FillPattern(t->params_, true, n, 3, 0.02f, nullptr)), "fill"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaMemset(t->m_, 0, static_cast<size_t>(n * 4)), "cudaMemset"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaMemset(t->v_, 0, static_cast<size_t>(n * 4)), "cudaMemset"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaMemset(t->grads_, 0, static_cast<size_t>(n * gb)), "cudaMemset"));
  ZERO_RETURN_IF_ERROR(Cuda(cudaDeviceSynchronize(), "PlainTrainer::Create"));
  *out = std::move(t);
  return Status::Ok();
}

PlainTrainer::~PlainTrainer() {
  for (void* p : {params_, grads_, static_cast<void*>(master_), static_cast<void*>(m_), static_cast<void*>(v_)}) {
    cudaFree(p);
  }
}

Status PlainTrainer::Step() {
  const int64_t gb = grad_dtype_ == DType::kBF16 ? 2 : 4;
  const auto param = [&](int p) -> const void* { return static_cast<char*>(params_) + offset_[static_cast<size_t>(p)] * 2; };
  const auto grad = [&](int p) -> void* { return static_cast<char*>(grads_) + offset_[static_cast<size_t>(p)] * gb; };
  for (int u = 0; u < model_->num_units(); ++u) ZERO_RETURN_IF_ERROR(model_->Forward(u, param));
  for (int u = model_->num_units() - 1; u >= 0; --u) ZERO_RETURN_IF_ERROR(model_->Backward(u, param, grad, grad_dtype_));
  ++step_;
  const auto c = kernels::MakeAdamWCoeffs(1e-4, 0.9, 0.999, 1e-8, 0.01, step_, 1.0);
  const int rc = kernels::AdamWCuda(c, master_, m_, v_, grads_,
                                    grad_dtype_ == DType::kBF16 ? kernels::GradKind::kBf16 : kernels::GradKind::kF32,
                                    params_, kernels::CopyKind::kBf16, n_, nullptr);
  ZERO_RETURN_IF_ERROR(Cuda(static_cast<cudaError_t>(rc), "AdamWCuda"));
  return Cuda(cudaMemsetAsync(grads_, 0, static_cast<size_t>(n_ * gb), nullptr), "cudaMemsetAsync (grads)");
}

}  // namespace zero::bench::gpu

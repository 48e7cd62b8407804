// Optimizer and gradient math, written once as element functors for the CPU (g++) and CUDA (nvcc).
//
// defines: ZERO_HD, AdamWCoeffs, AdamWElement, SgdCoeffs, SgdElement, MakeAdamWCoeffs, MakeSgdCoeffs
//
// Each functor updates one element; the CPU instantiation (optimizer_cpu.cc) runs it in a vectorizable loop,
// the CUDA one (optimizer.cu) in a grid-stride kernel. Scalars are folded once per call in double and rounded
// to float, so both instantiations and the tests' scalar references see the same float coefficients and the
// same operation order (the build disables FMA contraction, so results are bitwise reproducible).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ZERO_HD __host__ __device__ __forceinline__
#else
#define ZERO_HD inline
#endif

namespace zero::kernels {

// torch.optim.AdamW for one step t (1-based), fp32 state:
//   p = p * (1 - lr*wd);  m = m + (1-b1)*(g - m);  v = v*b2 + ((1-b2)*g)*g
//   p = p - (lr / (1 - b1^t)) * (m / (sqrt(v) / sqrt(1 - b2^t) + eps))
// with g = raw_grad * grad_scale (grad_scale folds averaging, clipping and loss-scale removal).
struct AdamWCoeffs {
  float decay;          // 1 - lr * weight_decay
  float one_minus_b1;   // 1 - beta1
  float beta2;
  float one_minus_b2;   // 1 - beta2
  float neg_step_size;  // -lr / (1 - beta1^t)
  float bc2_sqrt;       // sqrt(1 - beta2^t)
  float eps;
  float grad_scale;
};

inline AdamWCoeffs MakeAdamWCoeffs(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   int64_t step, double grad_scale) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamWCoeffs c;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.one_minus_b1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_b2 = static_cast<float>(1.0 - beta2);
  c.neg_step_size = static_cast<float>(-lr / bc1);
  c.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  c.eps = static_cast<float>(eps);
  c.grad_scale = static_cast<float>(grad_scale);
  return c;
}

struct AdamWElement {
  AdamWCoeffs c;
  ZERO_HD void operator()(float& p, float& m, float& v, float raw_grad) const {
    const float g = raw_grad * c.grad_scale;
    p = p * c.decay;
    m = m + c.one_minus_b1 * (g - m);
    v = v * c.beta2 + (c.one_minus_b2 * g) * g;
    const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
    p = p + c.neg_step_size * (m / denom);
  }
};

// torch.optim.SGD with momentum (coupled weight decay, dampening, optional Nesterov):
//   d = g + wd*p;  buf = first ? d : buf*momentum + (1-dampening)*d;  d = nesterov ? d + momentum*buf : buf
//   p = p - lr*d
struct SgdCoeffs {
  float neg_lr;
  float weight_decay;
  float momentum;
  float one_minus_dampening;
  float grad_scale;
  bool first_step;  // torch initializes the buffer to the first gradient
  bool nesterov;
};

inline SgdCoeffs MakeSgdCoeffs(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                               bool first_step, double grad_scale) {
  SgdCoeffs c;
  c.neg_lr = static_cast<float>(-lr);
  c.weight_decay = static_cast<float>(weight_decay);
  c.momentum = static_cast<float>(momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - dampening);
  c.grad_scale = static_cast<float>(grad_scale);
  c.first_step = first_step;
  c.nesterov = nesterov;
  return c;
}

struct SgdElement {
  SgdCoeffs c;
  ZERO_HD void operator()(float& p, float& buf, float raw_grad) const {
    float d = raw_grad * c.grad_scale;
    if (c.weight_decay != 0.0f) d = d + c.weight_decay * p;
    buf = c.first_step ? d : buf * c.momentum + c.one_minus_dampening * d;
    if (c.nesterov) {
      d = d + c.momentum * buf;
    } else {
      d = buf;
    }
    p = p + c.neg_lr * d;
  }
};

}  // namespace zero::kernels

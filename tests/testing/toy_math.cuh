// The toy model's math (testing/toy_model.h), written once for the CPU (g++) and CUDA (nvcc).
//
// defines: kVocab, kDim, kHidden, kToyUnits, kToyParams, ToyParamIndex, ToyExp, ToyExpm1, ToyTanh, ToyLog,
//          ToyTokenAt, ToyKind, ToyParam, ToyActs, ToyArgs, ToyOp, ToyOpCount, RunToyOpItem
//
// Two users: the scalar toy model (toy_model.cc) calls ToyTanh/ToyExp/ToyLog, and the kernel trainer
// (toy_kernel_model.h) runs the ToyOp items below, each a function of one work item (one token, one activation
// element or one gradient element), through a CPU loop (toy_kernels.cc) or a grid-stride CUDA kernel
// (toy_kernels.cu). Every item repeats the scalar model's operation order exactly (each gradient element adds the
// tokens' contributions in token order, each dot product runs in index order), and the build disables FMA
// contraction on both compilers (-ffp-contract=off, --fmad=false), so all three give the same bits.
//
// Why own transcendental functions: glibc's tanhf/expf/logf and CUDA's differ in the last bits, which would make a
// GPU trainer's gradients differ from the CPU reference's and rule out a bitwise comparison. These use only + - * /
// and bit manipulation, which IEEE 754 rounds identically everywhere; they stay within a few ulps of the true
// functions (toy_kernels_test checks the bound), which is all a toy model needs.
#pragma once

#include <cstdint>

#include "kernels/cast.cuh"  // ZERO_HD, FloatBits, BitsFloat, Bf16ToFloat, F16ToFloat, FloatToBf16, FloatToF16

namespace zero::testing {

inline constexpr int kVocab = 11;
inline constexpr int kDim = 7;
inline constexpr int kHidden = 13;
inline constexpr int kToyUnits = 4;
inline constexpr int kToyParams = 7;

// Parameter indices in ToySpecs() order.
enum ToyParamIndex : int { kToyEmbed = 0, kToyW1, kToyB1, kToyW2, kToyFrozen, kToyW3, kToyGain };

// ln 2 split so that k * kToyLn2Hi is exact for |k| < 2^9 (the low 9 bits of its significand are zero).
inline constexpr float kToyLn2Hi = 0.693145751953125f;
inline constexpr float kToyLn2Lo = 1.42860682030941723e-6f;

// exp(r) - 1 for |r| <= ln(2)/2: Taylor series to r^8 (the next term is below 2.2e-10 relative), Horner form.
ZERO_HD float ToyExpm1Small(float r) {
  return r *
         (1.0f + r * (0.5f + r * (1.0f / 6 +
                                  r * (1.0f / 24 +
                                       r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040 + r * (1.0f / 40320))))))));
}

// e^x: x = k ln2 + r with |r| <= ln(2)/2, e^x = 2^k (1 + expm1(r)). 0 below -87 (fp32's normal range ends near
// -87.3), infinity above 88.
ZERO_HD float ToyExp(float x) {
  if (x != x) return x;
  if (x < -87.0f) return 0.0f;
  if (x > 88.0f) return zero::kernels::BitsFloat(0x7f800000u);
  const float t = x * 1.44269504088896341f;
  const int k = static_cast<int>(t >= 0.0f ? t + 0.5f : t - 0.5f);  // round half away from zero
  const float kf = static_cast<float>(k);
  const float r = (x - kf * kToyLn2Hi) - kf * kToyLn2Lo;
  return (1.0f + ToyExpm1Small(r)) * zero::kernels::BitsFloat(static_cast<uint32_t>(k + 127) << 23);
}

// e^x - 1, accurate relative to the result near 0 too (tanh of small arguments needs that).
ZERO_HD float ToyExpm1(float x) {
  if (x >= -0.3465f && x <= 0.3465f) return ToyExpm1Small(x);
  return ToyExp(x) - 1.0f;
}

// tanh(x) = -m / (m + 2) with m = e^(-2|x|) - 1, sign restored; +-1 beyond |x| = 9 (where 1 - tanh < 2^-25).
ZERO_HD float ToyTanh(float x) {
  if (x != x) return x;
  const float a = x < 0.0f ? -x : x;
  float t = 1.0f;
  if (a <= 9.0f) {
    const float m = ToyExpm1(-2.0f * a);
    t = -m / (m + 2.0f);
  }
  return x < 0.0f ? -t : t;
}

// Natural logarithm: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s) with s = (m-1)/(m+1), series
// to s^11 (|s| <= 0.172: the next term is below 2e-11 relative).
ZERO_HD float ToyLog(float x) {
  if (x != x || x < 0.0f) return zero::kernels::BitsFloat(0x7fc00000u);  // NaN
  if (x == 0.0f) return zero::kernels::BitsFloat(0xff800000u);           // -inf
  if (x > 3.40282347e38f) return x;                                      // +inf
  int shift = 0;
  if (x < 1.17549435e-38f) {  // subnormal: scale into the normal range first
    x *= 8388608.0f;
    shift = 23;
  }
  const uint32_t u = zero::kernels::FloatBits(x);
  int e = static_cast<int>(u >> 23) - 127 - shift;
  float m = zero::kernels::BitsFloat((u & 0x7fffffu) | 0x3f800000u);
  if (m > 1.41421356f) {
    m *= 0.5f;
    ++e;
  }
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  const float poly = s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9 + s2 * (2.0f / 11)))));
  const float ef = static_cast<float>(e);
  return ef * kToyLn2Hi + ((2.0f * s + s * poly) + ef * kToyLn2Lo);
}

// Token and target `i` of `rank`'s part (of `world`) of micro-step `micro` of step `step`, whose global batch has
// `global` tokens split into equal contiguous parts by rank (ToyMicroBatch; the kernel trainer makes its batches
// on the device with it, so that no copy from the host waits between steps).
ZERO_HD void ToyTokenAt(int step, int micro, int rank, int world, int global, int i, int* token, int* target) {
  const int g = rank * (global / world) + i;
  const uint32_t k = static_cast<uint32_t>(step * 7919 + micro * 104729 + g * 31);
  *token = static_cast<int>((k * 2654435761u >> 7) % kVocab);
  *target = (*token * 3 + 1) % kVocab;  // a learnable rule: the target is a fixed function of the token
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel trainer's work items.

// How a parameter or a gradient view is stored (the engine's param_dtype / grad_dtype).
enum ToyKind : int { kToyF32 = 0, kToyBf16 = 1, kToyF16 = 2 };

// A parameter as the model reads it: fp32, bf16 or fp16 storage, widened exactly to fp32.
struct ToyParam {
  const void* data = nullptr;
  int kind = kToyF32;
  ZERO_HD float operator[](int64_t i) const {
    if (kind == kToyBf16) return zero::kernels::Bf16ToFloat(static_cast<const uint16_t*>(data)[i]);
    if (kind == kToyF16) return zero::kernels::F16ToFloat(static_cast<const uint16_t*>(data)[i]);
    return static_cast<const float*>(data)[i];
  }
};

// The activations of one micro-batch of n tokens, in the executor's memory (row-major per token).
struct ToyActs {
  float* x0 = nullptr;           // [n, D] embedding lookup
  float* h1 = nullptr;           // [n, H] tanh(x0 W1 + b1)
  float* x1 = nullptr;           // [n, D]
  float* t2 = nullptr;           // [n, D] tanh(x1 F)
  float* x2 = nullptr;           // [n, D]
  float* t3 = nullptr;           // [n, D] tanh(x2 W3)
  float* x3 = nullptr;           // [n, D]
  float* dl = nullptr;           // [n, V] logits, then d(loss * loss_scale)/d logits
  float* dx = nullptr;           // [n, D] the running input gradient
  float* dh = nullptr;           // [n, H] block 1's hidden gradient
  double* loss_parts = nullptr;  // [n] each token's loss, in fp64 as the scalar model adds them
  float* loss = nullptr;         // [1] the micro-batch's mean loss
};

enum class ToyOp : int {
  kMakeBatch,           // n items: tokens and targets from ToyTokenAt (batch_* fields)
  kEmbedForward,        // n*D items: x0 = E[token]
  kBlock1Forward,       // n items (tokens)
  kFrozenForward,       // n items
  kBlock2Forward,       // n items
  kHeadForward,         // n items: logits, loss part, dlogits (scaled by loss_scale)
  kLossSum,             // 1 item: the mean loss
  kHeadBackwardDx,      // n*D items: dx = dlogits E
  kHeadBackwardGrad,    // V*D items: dE += dlogits^T x3
  kBlock2BackwardGrad,  // D*D + 1 items: dW3, then dgain
  kBlock2BackwardDx,    // n items
  kFrozenBackwardDx,    // n items
  kBlock1BackwardDh,    // n items: dh
  kBlock1BackwardGrad,  // H*D + H + D*H items: dW2, db1, dW1
  kBlock1BackwardDx,    // n items
  kEmbedBackward,       // V*D items: dE[token] += dx
  kWiden,               // count items: f32 dst = src of `kind`, exactly
  kNarrow,              // count items: dst of `kind` = f32 src rounded to nearest even
  kPoison,              // 1 item: f32 dst[0] = +inf (an overflowing gradient, for the loss-scale tests)
};

// Everything an op reads and writes; each op uses a subset. Pointers are in the executor's memory.
struct ToyArgs {
  int n = 0;                                                                               // tokens in the micro-batch
  int* tokens = nullptr;                                                                   // [n]
  int* targets = nullptr;                                                                  // [n]
  int batch_step = 0, batch_micro = 0, batch_rank = 0, batch_world = 1, batch_global = 0;  // kMakeBatch
  ToyParam param[kToyParams];    // the parameters the op reads
  float* grad[kToyParams] = {};  // fp32 gradient accumulators the op adds into
  ToyActs acts;
  float loss_scale = 1.0f;
  // kWiden, kNarrow, kPoison
  const void* src = nullptr;
  void* dst = nullptr;
  int kind = kToyF32;
  int64_t count = 0;
};

inline int64_t ToyOpCount(ToyOp op, const ToyArgs& a) {
  const int64_t n = a.n;
  switch (op) {
    case ToyOp::kEmbedForward:
      return n * kDim;
    case ToyOp::kMakeBatch:
    case ToyOp::kBlock1Forward:
    case ToyOp::kFrozenForward:
    case ToyOp::kBlock2Forward:
    case ToyOp::kHeadForward:
    case ToyOp::kBlock2BackwardDx:
    case ToyOp::kFrozenBackwardDx:
    case ToyOp::kBlock1BackwardDh:
    case ToyOp::kBlock1BackwardDx:
      return n;
    case ToyOp::kLossSum:
    case ToyOp::kPoison:
      return 1;
    case ToyOp::kHeadBackwardDx:
      return n * kDim;
    case ToyOp::kHeadBackwardGrad:
    case ToyOp::kEmbedBackward:
      return int64_t{kVocab} * kDim;
    case ToyOp::kBlock2BackwardGrad:
      return int64_t{kDim} * kDim + 1;
    case ToyOp::kBlock1BackwardGrad:
      return int64_t{kHidden} * kDim + kHidden + int64_t{kDim} * kHidden;
    case ToyOp::kWiden:
    case ToyOp::kNarrow:
      return a.count;
  }
  return 0;
}

namespace toy_detail {

// The scalar model's MatVec for one output: sum_i x[i] * w[i * cols + j], i ascending.
ZERO_HD float Dot(const float* x, const ToyParam& w, int rows, int cols, int j) {
  float s = 0.0f;
  for (int i = 0; i < rows; ++i) s += x[i] * w[static_cast<int64_t>(i) * cols + j];
  return s;
}
// The scalar model's MatTVec for one output: sum_j w[i * cols + j] * dy[j], j ascending.
ZERO_HD float DotT(const float* dy, const ToyParam& w, int cols, int i) {
  float s = 0.0f;
  for (int j = 0; j < cols; ++j) s += w[static_cast<int64_t>(i) * cols + j] * dy[j];
  return s;
}

ZERO_HD void Block1Forward(const ToyArgs& a, int t) {
  const float* x0 = a.acts.x0 + t * kDim;
  float* h = a.acts.h1 + t * kHidden;
  for (int j = 0; j < kHidden; ++j) h[j] = Dot(x0, a.param[kToyW1], kDim, kHidden, j);
  for (int j = 0; j < kHidden; ++j) h[j] = ToyTanh(h[j] + a.param[kToyB1][j]);
  for (int d = 0; d < kDim; ++d) a.acts.x1[t * kDim + d] = x0[d] + Dot(h, a.param[kToyW2], kHidden, kDim, d);
}

// x_out = x_in + g * tanh(x_in W), with th = tanh(x_in W) kept for backward (g = 1 for the frozen block).
ZERO_HD void TanhResidualForward(const float* x_in, const ToyParam& w, float g, bool gained, float* th, float* x_out) {
  for (int d = 0; d < kDim; ++d) th[d] = Dot(x_in, w, kDim, kDim, d);
  for (int d = 0; d < kDim; ++d) {
    th[d] = ToyTanh(th[d]);
    x_out[d] = gained ? x_in[d] + g * th[d] : x_in[d] + th[d];
  }
}

ZERO_HD void HeadForward(const ToyArgs& a, int t) {
  float* logits = a.acts.dl + t * kVocab;
  const float* x3 = a.acts.x3 + t * kDim;
  for (int v = 0; v < kVocab; ++v) {
    float s = 0.0f;
    for (int d = 0; d < kDim; ++d) s += x3[d] * a.param[kToyEmbed][static_cast<int64_t>(v) * kDim + d];
    logits[v] = s;
  }
  float mx = logits[0];
  for (int v = 1; v < kVocab; ++v) mx = mx < logits[v] ? logits[v] : mx;  // std::max's choice
  float z = 0.0f;
  for (int v = 0; v < kVocab; ++v) z += ToyExp(logits[v] - mx);
  const int y = a.targets[t];
  a.acts.loss_parts[t] = static_cast<double>(ToyLog(z) + mx - logits[y]);
  const float inv_n = 1.0f / static_cast<float>(a.n);
  for (int v = 0; v < kVocab; ++v) {
    const float p = ToyExp(logits[v] - mx) / z;
    float g = (p - (v == y ? 1.0f : 0.0f)) * inv_n;
    if (a.loss_scale != 1.0f) g *= a.loss_scale;
    logits[v] = g;
  }
}

// dx += dxin with dxin = da W^T, da = dx * g * (1 - th^2) (g = 1 and no multiply for the frozen block).
ZERO_HD void TanhResidualBackwardDx(float* dx, const float* th, const ToyParam& w, float g, bool gained) {
  float da[kDim];
  for (int d = 0; d < kDim; ++d) da[d] = gained ? dx[d] * g * (1.0f - th[d] * th[d]) : dx[d] * (1.0f - th[d] * th[d]);
  float dxin[kDim];
  for (int i = 0; i < kDim; ++i) dxin[i] = DotT(da, w, kDim, i);
  for (int d = 0; d < kDim; ++d) dx[d] += dxin[d];
}

ZERO_HD void Block2BackwardGrad(const ToyArgs& a, int64_t item) {
  const float g = a.param[kToyGain][0];
  if (item == int64_t{kDim} * kDim) {  // dgain: tokens in order, then dimensions
    float s = a.grad[kToyGain][0];
    for (int t = 0; t < a.n; ++t) {
      for (int d = 0; d < kDim; ++d) s += a.acts.dx[t * kDim + d] * a.acts.t3[t * kDim + d];
    }
    a.grad[kToyGain][0] = s;
    return;
  }
  const int r = static_cast<int>(item / kDim), c = static_cast<int>(item % kDim);
  float s = a.grad[kToyW3][item];
  for (int t = 0; t < a.n; ++t) {
    const float th = a.acts.t3[t * kDim + c];
    const float da = a.acts.dx[t * kDim + c] * g * (1.0f - th * th);
    s += a.acts.x2[t * kDim + r] * da;
  }
  a.grad[kToyW3][item] = s;
}

ZERO_HD void Block1BackwardDh(const ToyArgs& a, int t) {
  const float* dx = a.acts.dx + t * kDim;
  const float* h = a.acts.h1 + t * kHidden;
  float* dh = a.acts.dh + t * kHidden;
  for (int i = 0; i < kHidden; ++i) dh[i] = DotT(dx, a.param[kToyW2], kDim, i);
  for (int j = 0; j < kHidden; ++j) dh[j] *= 1.0f - h[j] * h[j];
}

ZERO_HD void Block1BackwardGrad(const ToyArgs& a, int64_t item) {
  const int64_t w2_items = int64_t{kHidden} * kDim;
  if (item < w2_items) {  // dW2[i, j] += h[i] dx[j]
    const int i = static_cast<int>(item / kDim), j = static_cast<int>(item % kDim);
    float s = a.grad[kToyW2][item];
    for (int t = 0; t < a.n; ++t) s += a.acts.h1[t * kHidden + i] * a.acts.dx[t * kDim + j];
    a.grad[kToyW2][item] = s;
    return;
  }
  item -= w2_items;
  if (item < kHidden) {  // db1[j] += dh[j]
    float s = a.grad[kToyB1][item];
    for (int t = 0; t < a.n; ++t) s += a.acts.dh[t * kHidden + item];
    a.grad[kToyB1][item] = s;
    return;
  }
  item -= kHidden;  // dW1[i, j] += x0[i] dh[j]
  const int i = static_cast<int>(item / kHidden), j = static_cast<int>(item % kHidden);
  float s = a.grad[kToyW1][item];
  for (int t = 0; t < a.n; ++t) s += a.acts.x0[t * kDim + i] * a.acts.dh[t * kHidden + j];
  a.grad[kToyW1][item] = s;
}

}  // namespace toy_detail

// Runs work item `i` of `op` (i < ToyOpCount(op, a)). Items of one op are independent of each other.
ZERO_HD void RunToyOpItem(ToyOp op, const ToyArgs& a, int64_t i) {
  const int t = static_cast<int>(i);
  switch (op) {
    case ToyOp::kMakeBatch:
      ToyTokenAt(a.batch_step, a.batch_micro, a.batch_rank, a.batch_world, a.batch_global, t, a.tokens + t,
                 a.targets + t);
      return;
    case ToyOp::kEmbedForward: {
      const int64_t tok = i / kDim, d = i % kDim;
      a.acts.x0[i] = a.param[kToyEmbed][static_cast<int64_t>(a.tokens[tok]) * kDim + d];
      return;
    }
    case ToyOp::kBlock1Forward:
      toy_detail::Block1Forward(a, t);
      return;
    case ToyOp::kFrozenForward:
      toy_detail::TanhResidualForward(a.acts.x1 + t * kDim, a.param[kToyFrozen], 1.0f, false, a.acts.t2 + t * kDim,
                                      a.acts.x2 + t * kDim);
      return;
    case ToyOp::kBlock2Forward:
      toy_detail::TanhResidualForward(a.acts.x2 + t * kDim, a.param[kToyW3], a.param[kToyGain][0], true,
                                      a.acts.t3 + t * kDim, a.acts.x3 + t * kDim);
      return;
    case ToyOp::kHeadForward:
      toy_detail::HeadForward(a, t);
      return;
    case ToyOp::kLossSum: {
      double total = 0.0;
      for (int k = 0; k < a.n; ++k) total += a.acts.loss_parts[k];
      a.acts.loss[0] = static_cast<float>(total / a.n);
      return;
    }
    case ToyOp::kHeadBackwardDx: {  // dx[t, d] = sum_v dl[t, v] E[v, d]
      const int64_t tok = i / kDim, d = i % kDim;
      float s = 0.0f;
      for (int v = 0; v < kVocab; ++v) s += a.acts.dl[tok * kVocab + v] * a.param[kToyEmbed][v * kDim + d];
      a.acts.dx[i] = s;
      return;
    }
    case ToyOp::kHeadBackwardGrad: {  // dE[v, d] += dl[t, v] x3[t, d]
      const int64_t v = i / kDim, d = i % kDim;
      float s = a.grad[kToyEmbed][i];
      for (int k = 0; k < a.n; ++k) s += a.acts.dl[k * kVocab + v] * a.acts.x3[k * kDim + d];
      a.grad[kToyEmbed][i] = s;
      return;
    }
    case ToyOp::kBlock2BackwardGrad:
      toy_detail::Block2BackwardGrad(a, i);
      return;
    case ToyOp::kBlock2BackwardDx:
      toy_detail::TanhResidualBackwardDx(a.acts.dx + t * kDim, a.acts.t3 + t * kDim, a.param[kToyW3],
                                         a.param[kToyGain][0], true);
      return;
    case ToyOp::kFrozenBackwardDx:
      toy_detail::TanhResidualBackwardDx(a.acts.dx + t * kDim, a.acts.t2 + t * kDim, a.param[kToyFrozen], 1.0f, false);
      return;
    case ToyOp::kBlock1BackwardDh:
      toy_detail::Block1BackwardDh(a, t);
      return;
    case ToyOp::kBlock1BackwardGrad:
      toy_detail::Block1BackwardGrad(a, i);
      return;
    case ToyOp::kBlock1BackwardDx: {
      float* dx = a.acts.dx + t * kDim;
      const float* dh = a.acts.dh + t * kHidden;
      float dxin[kDim];
      for (int r = 0; r < kDim; ++r) dxin[r] = toy_detail::DotT(dh, a.param[kToyW1], kHidden, r);
      for (int d = 0; d < kDim; ++d) dx[d] += dxin[d];
      return;
    }
    case ToyOp::kEmbedBackward: {  // dE[token, d] += dx[t, d], tokens in order
      const int64_t v = i / kDim, d = i % kDim;
      float s = a.grad[kToyEmbed][i];
      for (int k = 0; k < a.n; ++k) {
        if (a.tokens[k] == v) s += a.acts.dx[k * kDim + d];
      }
      a.grad[kToyEmbed][i] = s;
      return;
    }
    case ToyOp::kWiden: {
      ToyParam src{a.src, a.kind};
      static_cast<float*>(a.dst)[i] = src[i];
      return;
    }
    case ToyOp::kNarrow: {
      const float x = static_cast<const float*>(a.src)[i];
      if (a.kind == kToyBf16) {
        static_cast<uint16_t*>(a.dst)[i] = zero::kernels::FloatToBf16(x);
      } else if (a.kind == kToyF16) {
        static_cast<uint16_t*>(a.dst)[i] = zero::kernels::FloatToF16(x);
      } else {
        static_cast<float*>(a.dst)[i] = x;
      }
      return;
    }
    case ToyOp::kPoison:
      static_cast<float*>(a.dst)[0] = zero::kernels::BitsFloat(0x7f800000u);
      return;
  }
}

}  // namespace zero::testing

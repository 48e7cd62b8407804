// The LoRA example model's element-wise and row-wise math, written once for the CPU (g++, model.cc) and CUDA
// (nvcc): each functor computes one element, one row or one column, and both the CPU model's OpenMP loops and a
// grid-stride CUDA kernel call it. Matrix products are not here (CBLAS sgemm on the CPU, cuBLAS on a GPU).
//
// defines: Bf16, Load, Store, Mix, Hash, Uniform01, Keep, RmsNormRow, RmsNormBackwardRow, RmsNormWeightGradCol,
//          RopeRow, CausalSoftmaxRow, CausalSoftmaxBackwardRow, SwiGluElement, SwiGluBackwardElement,
//          SoftmaxXentRow, XentGradRow, EmbedGatherRow, EmbedScatterCol, DropoutElement, DropoutBackwardElement,
//          AddElement, CastElement
//
// Storage and arithmetic: every array is read through Load and written through Store, so a functor works on fp32
// arrays (the CPU model) and on bf16 ones (what a GPU keeps for matrix-product inputs) with the arithmetic always
// in fp32; statistics (1/rms, losses) and gradients stay fp32 or wider. The operation order of each functor is the
// CPU model's, so the CPU model gives the same bits as before the functors existed.
//
// Layouts (model.cc's): activations row-major [N, features], row n = b * seq + t; attention scores and
// probabilities [B, H, T, T] with row (b * H + h) * T + t; a weight [out, in].
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cast.cuh"       // FloatToBf16, Bf16ToFloat
#include "kernels/optimizer.cuh"  // ZERO_HD

namespace lora::kernels {

// A bf16 value as stored: the upper 16 bits of an fp32 (binary-compatible with __nv_bfloat16 and cuBLAS's
// CUDA_R_16BF). A struct, not a uint16_t, so that Load/Store overload on it and not on every 16-bit integer.
struct Bf16 {
  uint16_t bits;
};

ZERO_HD float Load(float v) { return v; }
ZERO_HD float Load(Bf16 v) { return zero::kernels::Bf16ToFloat(v.bits); }
ZERO_HD void Store(float* dst, float v) { *dst = v; }
ZERO_HD void Store(Bf16* dst, float v) { dst->bits = zero::kernels::FloatToBf16(v); }

// Counter-based hashing (splitmix64's finalizer): the same value for (seed, stream, index) on every rank and on
// either device, so dropout masks need no state and no copies between forward and backward.
ZERO_HD uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
ZERO_HD uint64_t Hash(uint64_t seed, uint64_t stream, uint64_t index) { return Mix(Mix(Mix(seed) ^ stream) ^ index); }
// Uniform in [0, 1) with 24 bits: exact in float.
ZERO_HD float Uniform01(uint64_t h) { return static_cast<float>(h >> 40) * (1.0f / 16777216.0f); }

// LoRA dropout's keep decision for element i of one adapter's input (stream = layer * 7 + proj + 1).
ZERO_HD bool Keep(uint64_t seed, uint64_t stream, int64_t i, float dropout) {
  return Uniform01(Hash(seed, stream, static_cast<uint64_t>(i))) >= dropout;
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm: y = x / rms(x) * w per row of d, rms(x) = sqrt(mean(x^2) + eps); inv[n] = 1 / rms(x_n) kept for backward.
template <typename X, typename W, typename Y>
struct RmsNormRow {
  const X* x;  // [N, d]
  const W* w;  // [d]
  Y* y;        // [N, d]
  float* inv;  // [N]
  int d;
  float eps;
  ZERO_HD void operator()(int64_t n) const {
    const X* xr = x + n * d;
    float ss = 0.f;
    for (int j = 0; j < d; ++j) ss += Load(xr[j]) * Load(xr[j]);
    const float iv = 1.f / sqrtf(ss / static_cast<float>(d) + eps);
    inv[n] = iv;
    Y* yr = y + n * d;
    for (int j = 0; j < d; ++j) Store(yr + j, Load(xr[j]) * iv * Load(w[j]));
  }
};

// Per row: dx += d/dx of y = x * inv * w given dy (dx accumulates: the residual stream's gradient).
template <typename X, typename W>
struct RmsNormBackwardRow {
  const X* x;        // [N, d], the norm's input
  const W* w;        // [d]
  const float* inv;  // [N], from the forward
  const float* dy;   // [N, d]
  float* dx;         // [N, d], +=
  int d;
  ZERO_HD void operator()(int64_t n) const {
    const X* xr = x + n * d;
    const float* dyr = dy + n * d;
    float* dxr = dx + n * d;
    float dot = 0.f;  // sum_j dy_j w_j x_j
    for (int j = 0; j < d; ++j) dot += dyr[j] * Load(w[j]) * Load(xr[j]);
    const float iv = inv[n];
    const float c = dot * iv * iv * iv / static_cast<float>(d);
    for (int j = 0; j < d; ++j) dxr[j] += dyr[j] * Load(w[j]) * iv - Load(xr[j]) * c;
  }
};

// Per column j: dw[j] += sum_n dy[n, j] x[n, j] inv[n], summed in row order (one thread per column: no atomics,
// the same bits for any thread count).
template <typename X>
struct RmsNormWeightGradCol {
  const X* x;        // [N, d]
  const float* inv;  // [N]
  const float* dy;   // [N, d]
  float* dw;         // [d], +=
  int64_t rows;
  int d;
  ZERO_HD void operator()(int64_t j) const {
    float acc = 0.f;
    for (int64_t n = 0; n < rows; ++n) {
      const int64_t i = n * d + j;
      acc += dy[i] * Load(x[i]) * inv[n];
    }
    dw[j] += acc;
  }
};

// ---------------------------------------------------------------------------------------------------------
// RoPE, Hugging Face rotate-half: each head's pairs (j, j + hd/2) of row n rotate by the angle of position
// t = n % seq. inverse = true applies the transpose rotation (backward of the forward one). In place.
template <typename T>
struct RopeRow {
  T* x;              // [N, heads * hd]
  const float* cos;  // [seq, hd / 2]
  const float* sin;  // [seq, hd / 2]
  int seq;
  int heads;
  int hd;
  bool inverse;
  ZERO_HD void operator()(int64_t n) const {
    const int half = hd / 2;
    const float sign = inverse ? -1.f : 1.f;
    const int64_t t = n % seq;
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int h = 0; h < heads; ++h) {
      T* v = x + (n * heads + h) * hd;
      for (int j = 0; j < half; ++j) {
        const float a = Load(v[j]), b = Load(v[j + half]);
        Store(v + j, a * c[j] - sign * b * s[j]);
        Store(v + j + half, b * c[j] + sign * a * s[j]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Causal softmax of one attention row r = (b * H + h) * T + t, in place: scores[s] = q_t . k_s (unscaled) for
// s <= t on entry, probabilities softmax(scale * scores) for s <= t and 0 above the diagonal on return.
struct CausalSoftmaxRow {
  float* p;  // [rows, T]
  int T;
  float scale;  // 1 / sqrt(head_dim)
  ZERO_HD void operator()(int64_t r) const {
    const int t = static_cast<int>(r % T);
    float* row = p + r * T;
    float mx = -INFINITY;
    for (int s = 0; s <= t; ++s) {
      row[s] = row[s] * scale;
      mx = mx < row[s] ? row[s] : mx;
    }
    float sum = 0.f;
    for (int s = 0; s <= t; ++s) {
      row[s] = expf(row[s] - mx);
      sum += row[s];
    }
    const float inv = 1.f / sum;
    for (int s = 0; s <= t; ++s) row[s] *= inv;
    for (int s = t + 1; s < T; ++s) row[s] = 0.f;
  }
};

// Backward of one causal softmax row, in place: dp[s] = dout_t . v_s on entry, the gradient w.r.t. the unscaled
// scores on return, ds[s] = p[s] (dp[s] - sum_s' p[s'] dp[s']) * scale for s <= t, 0 above the diagonal.
struct CausalSoftmaxBackwardRow {
  const float* p;  // [rows, T], the forward's probabilities
  float* dp;       // [rows, T]
  int T;
  float scale;
  ZERO_HD void operator()(int64_t r) const {
    const int t = static_cast<int>(r % T);
    const float* pr = p + r * T;
    float* d = dp + r * T;
    float pdp = 0.f;
    for (int s = 0; s <= t; ++s) pdp += pr[s] * d[s];
    for (int s = 0; s <= t; ++s) d[s] = pr[s] * (d[s] - pdp) * scale;
    for (int s = t + 1; s < T; ++s) d[s] = 0.f;
  }
};

// ---------------------------------------------------------------------------------------------------------
// SwiGLU: h = silu(g) * u, silu(g) = g * sigmoid(g).
template <typename G, typename H>
struct SwiGluElement {
  const G* g;
  const G* u;
  H* h;
  ZERO_HD void operator()(int64_t i) const {
    const float gi = Load(g[i]);
    Store(h + i, gi / (1.f + expf(-gi)) * Load(u[i]));
  }
};

// dg = dh * u * sig * (1 + g (1 - sig)), du = dh * g * sig (written, not accumulated).
template <typename G>
struct SwiGluBackwardElement {
  const G* g;
  const G* u;
  const float* dh;
  float* dg;
  float* du;
  ZERO_HD void operator()(int64_t i) const {
    const float gi = Load(g[i]), sig = 1.f / (1.f + expf(-gi));
    du[i] = dh[i] * gi * sig;
    dg[i] = dh[i] * Load(u[i]) * sig * (1.f + gi * (1.f - sig));
  }
};

// ---------------------------------------------------------------------------------------------------------
// Cross-entropy, per row n of the logits [N, V]: softmax in place, loss[n] = -log(p[target]) in fp64 (0 for an
// ignored target, -1). Probabilities below 1e-30 are clamped so that the loss stays finite.
struct SoftmaxXentRow {
  float* logits;           // [N, V] in, probabilities out
  const int32_t* targets;  // [N], -1 = ignored
  double* loss;            // [N]
  int V;
  ZERO_HD void operator()(int64_t n) const {
    float* row = logits + n * V;
    float mx = row[0];
    for (int v = 1; v < V; ++v) mx = mx < row[v] ? row[v] : mx;
    float sum = 0.f;
    for (int v = 0; v < V; ++v) {
      row[v] = expf(row[v] - mx);
      sum += row[v];
    }
    const float inv = 1.f / sum;
    for (int v = 0; v < V; ++v) row[v] *= inv;
    const int32_t t = targets[n];
    const float pt = t >= 0 ? row[t] : 1.f;
    loss[n] = t >= 0 ? -log(static_cast<double>(pt < 1e-30f ? 1e-30f : pt)) : 0.0;
  }
};

// Per row, in place: dlogits = (p - onehot(target)) * coef, coef = loss_scale / counted targets; 0 when ignored.
struct XentGradRow {
  float* p;  // [N, V] probabilities in, dlogits out
  const int32_t* targets;
  int V;
  float coef;
  ZERO_HD void operator()(int64_t n) const {
    float* row = p + n * V;
    const int32_t t = targets[n];
    if (t < 0) {
      for (int v = 0; v < V; ++v) row[v] = 0.f;
      return;
    }
    for (int v = 0; v < V; ++v) row[v] *= coef;
    row[t] -= coef;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Embedding lookup, per row n: x[n] = emb[tokens[n]].
template <typename E, typename X>
struct EmbedGatherRow {
  const E* emb;  // [V, d]
  const int32_t* tokens;
  X* x;  // [N, d]
  int d;
  ZERO_HD void operator()(int64_t n) const {
    const E* e = emb + static_cast<int64_t>(tokens[n]) * d;
    X* xr = x + n * d;
    for (int j = 0; j < d; ++j) Store(xr + j, Load(e[j]));
  }
};

// Embedding gradient, per column j: de[tokens[n], j] += dx[n, j] for n in order. One thread per column: repeated
// tokens accumulate without atomics and in a fixed order.
struct EmbedScatterCol {
  const float* dx;  // [N, d]
  const int32_t* tokens;
  float* de;  // [V, d], +=
  int64_t rows;
  int d;
  ZERO_HD void operator()(int64_t j) const {
    for (int64_t n = 0; n < rows; ++n) de[static_cast<int64_t>(tokens[n]) * d + j] += dx[n * d + j];
  }
};

// ---------------------------------------------------------------------------------------------------------
// LoRA dropout on an adapter's input: out[i] = keep(i) ? x[i] / (1 - dropout) : 0.
template <typename X, typename Y>
struct DropoutElement {
  const X* x;
  Y* out;
  uint64_t seed;
  uint64_t stream;
  float dropout;
  float keep_scale;  // 1 / (1 - dropout)
  ZERO_HD void operator()(int64_t i) const {
    Store(out + i, Keep(seed, stream, i, dropout) ? Load(x[i]) * keep_scale : 0.f);
  }
};

// Its backward, accumulated: dx[i] += keep(i) ? dxd[i] / (1 - dropout) : 0.
struct DropoutBackwardElement {
  const float* dxd;
  float* dx;
  uint64_t seed;
  uint64_t stream;
  float dropout;
  float keep_scale;
  ZERO_HD void operator()(int64_t i) const {
    if (Keep(seed, stream, i, dropout)) dx[i] += dxd[i] * keep_scale;
  }
};

// Residual connection: x[i] += y[i].
template <typename Y>
struct AddElement {
  float* x;
  const Y* y;
  ZERO_HD void operator()(int64_t i) const { x[i] += Load(y[i]); }
};

// A conversion, y[i] = x[i] rounded to Y (to nearest even for bf16): a GPU's fp32 results become bf16 inputs of
// the next matrix product.
template <typename X, typename Y>
struct CastElement {
  const X* x;
  Y* y;
  ZERO_HD void operator()(int64_t i) const { Store(y + i, Load(x[i])); }
};

}  // namespace lora::kernels

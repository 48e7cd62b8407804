// The LoRA example model's element-wise and row-wise math, written once for the CPU (g++, model.cc) and CUDA
// (nvcc): each functor computes one element, one row or one column, and both the CPU model's OpenMP loops and a
// grid-stride CUDA kernel call it. Matrix products are not here (CBLAS sgemm on the CPU, cuBLAS on a GPU).
//
// defines: Bf16, Load, Store, Mix, Hash, Uniform01, Keep, kRowLanes, SerialRow, RmsNormRow, RmsNormBackwardRow,
//          RmsNormWeightGradCol, RopeRow, CausalSoftmaxRow, CausalSoftmaxBackwardRow, SwiGluElement,
//          SwiGluBackwardElement, SoftmaxXentRow, XentGradRow, EmbedGatherRow, EmbedScatterCol, DropoutElement,
//          DropoutBackwardElement, AddElement, CastElement, PermuteHeads
//
// Storage and arithmetic: every array is read through Load and written through Store, so a functor works on fp32
// arrays (the CPU model) and on bf16 ones (what a GPU keeps for matrix-product inputs) with the arithmetic always
// in fp32; statistics (1/rms, losses) stay fp32 or wider.
//
// Row functors (a norm, a softmax, a cross-entropy: a reduction over a row, then per-element work) are written over
// a row executor (SerialRow below), so that the CPU runs a row on one thread and a GPU on a block of threads with
// the same per-element math and the same summation order.
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
// Row executors. A row functor's Row(r, n) does row n's math through an executor r that provides
//   r.Sum(count, f)  the sum of f(i) for i < count, in the order below;
//   r.Max(count, f)  the largest f(i) (exact in any order);
//   r.For(count, f)  f(i) for every i < count (independent elements);
//   r.Leader()       true on the one thread that writes the row's scalars.
// f may write element i (it is called once per i). SerialRow runs a row on one thread (the CPU model, the tests);
// model_cuda_kernels.cuh's BlockRow runs it on a block of kRowLanes threads. Both sum in one order: lane l adds
// elements l, l + kRowLanes, l + 2 kRowLanes, ... to a partial that starts at 0, then the lanes combine pairwise
// (lane l += lane l + s, for s = kRowLanes / 2, ..., 1; lane 0 is the sum). So a row's sums have the same bits on
// either device whenever its elements do.
inline constexpr int kRowLanes = 256;

struct SerialRow {
  template <typename F>
  ZERO_HD float Sum(int64_t count, const F& f) const {
    float lane[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) lane[l] = 0.f;
    for (int64_t i = 0; i < count; ++i) lane[i & (kRowLanes - 1)] += f(i);
    for (int s = kRowLanes / 2; s > 0; s >>= 1) {
      for (int l = 0; l < s; ++l) lane[l] += lane[l + s];
    }
    return lane[0];
  }
  template <typename F>
  ZERO_HD float Max(int64_t count, const F& f) const {
    float m = -INFINITY;
    for (int64_t i = 0; i < count; ++i) {
      const float v = f(i);
      m = m < v ? v : m;
    }
    return m;
  }
  template <typename F>
  ZERO_HD void For(int64_t count, const F& f) const {
    for (int64_t i = 0; i < count; ++i) f(i);
  }
  ZERO_HD bool Leader() const { return true; }
};

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
  template <typename R>
  ZERO_HD void Row(const R& r, int64_t n) const {
    const X* xr = x + n * d;
    const float ss = r.Sum(d, [&](int64_t j) { return Load(xr[j]) * Load(xr[j]); });
    const float iv = 1.f / sqrtf(ss / static_cast<float>(d) + eps);
    if (r.Leader()) inv[n] = iv;
    Y* yr = y + n * d;
    r.For(d, [&](int64_t j) { Store(yr + j, Load(xr[j]) * iv * Load(w[j])); });
  }
  ZERO_HD void operator()(int64_t n) const { Row(SerialRow(), n); }
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
  template <typename R>
  ZERO_HD void Row(const R& r, int64_t n) const {
    const X* xr = x + n * d;
    const float* dyr = dy + n * d;
    float* dxr = dx + n * d;
    const float dot = r.Sum(d, [&](int64_t j) { return dyr[j] * Load(w[j]) * Load(xr[j]); });  // sum dy w x
    const float iv = inv[n];
    const float c = dot * iv * iv * iv / static_cast<float>(d);
    r.For(d, [&](int64_t j) { dxr[j] += dyr[j] * Load(w[j]) * iv - Load(xr[j]) * c; });
  }
  ZERO_HD void operator()(int64_t n) const { Row(SerialRow(), n); }
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
// Causal softmax of one attention row r = (b * H + h) * T + t: on entry s[r, j] = q_t . k_j (unscaled) for
// j <= t; on return p[r, j] = softmax(scale * s[r, :t+1])_j for j <= t and 0 above the diagonal, s[r, j <= t]
// overwritten (scratch). p may be s itself (P = float: in place, the CPU model), or a separate array (bf16: what a
// GPU keeps for the probabilities-times-values product and for backward).
template <typename P>
struct CausalSoftmaxRow {
  float* s;  // [rows, T]
  P* p;      // [rows, T]
  int T;
  float scale;  // 1 / sqrt(head_dim)
  template <typename R>
  ZERO_HD void Row(const R& r, int64_t row) const {
    const int t = static_cast<int>(row % T);
    float* sr = s + row * T;
    P* pr = p + row * T;
    const float mx = r.Max(t + 1, [&](int64_t j) {
      sr[j] = sr[j] * scale;
      return sr[j];
    });
    const float sum = r.Sum(t + 1, [&](int64_t j) {
      sr[j] = expf(sr[j] - mx);
      return sr[j];
    });
    const float inv = 1.f / sum;
    r.For(T, [&](int64_t j) { Store(pr + j, j <= t ? sr[j] * inv : 0.f); });
  }
  ZERO_HD void operator()(int64_t row) const { Row(SerialRow(), row); }
};

// Backward of one causal softmax row: on entry dp[r, j] = dout_t . v_j; on return ds[r, j] = p_j (dp_j - sum_j'
// p_j' dp_j') * scale, the gradient w.r.t. the unscaled scores, for j <= t and 0 above the diagonal. ds may be dp
// itself (D = float, in place) or a separate array (bf16, a GPU's operand for the next products).
template <typename P, typename D>
struct CausalSoftmaxBackwardRow {
  const P* p;  // [rows, T], the forward's probabilities
  float* dp;   // [rows, T]
  D* ds;       // [rows, T]
  int T;
  float scale;
  template <typename R>
  ZERO_HD void Row(const R& r, int64_t row) const {
    const int t = static_cast<int>(row % T);
    const P* pr = p + row * T;
    const float* d = dp + row * T;
    D* out = ds + row * T;
    const float pdp = r.Sum(t + 1, [&](int64_t j) { return Load(pr[j]) * d[j]; });
    r.For(T, [&](int64_t j) { Store(out + j, j <= t ? Load(pr[j]) * (d[j] - pdp) * scale : 0.f); });
  }
  ZERO_HD void operator()(int64_t row) const { Row(SerialRow(), row); }
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

// dg = dh * u * sig * (1 + g (1 - sig)), du = dh * g * sig (written, not accumulated; in D: fp32 on the CPU, bf16
// on a GPU, where they are the operands of the gate and up projections' backward products).
template <typename G, typename D>
struct SwiGluBackwardElement {
  const G* g;
  const G* u;
  const float* dh;
  D* dg;
  D* du;
  ZERO_HD void operator()(int64_t i) const {
    const float gi = Load(g[i]), sig = 1.f / (1.f + expf(-gi));
    Store(du + i, dh[i] * gi * sig);
    Store(dg + i, dh[i] * Load(u[i]) * sig * (1.f + gi * (1.f - sig)));
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
  template <typename R>
  ZERO_HD void Row(const R& r, int64_t n) const {
    float* row = logits + n * V;
    const float mx = r.Max(V, [&](int64_t v) { return row[v]; });
    const float sum = r.Sum(V, [&](int64_t v) {
      row[v] = expf(row[v] - mx);
      return row[v];
    });
    const float inv = 1.f / sum;
    r.For(V, [&](int64_t v) { row[v] *= inv; });
    if (!r.Leader()) return;
    const int32_t t = targets[n];
    const float pt = t >= 0 ? row[t] : 1.f;
    loss[n] = t >= 0 ? -log(static_cast<double>(pt < 1e-30f ? 1e-30f : pt)) : 0.0;
  }
  ZERO_HD void operator()(int64_t n) const { Row(SerialRow(), n); }
};

// Per row: d = (p - onehot(target)) * coef, coef = loss_scale / counted targets; 0 when ignored. d may be p itself
// (D = float: in place) or a separate array (bf16: a GPU's operand of the head's backward products).
template <typename D>
struct XentGradRow {
  const float* p;  // [N, V] probabilities
  D* d;            // [N, V] dlogits
  const int32_t* targets;
  int V;
  float coef;
  template <typename R>
  ZERO_HD void Row(const R& r, int64_t n) const {
    const float* pr = p + n * V;
    D* dr = d + n * V;
    const int32_t t = targets[n];
    r.For(V, [&](int64_t v) {
      const float scaled = pr[v] * coef;
      Store(dr + v, t < 0 ? 0.f : v == t ? scaled - coef : scaled);
    });
  }
  ZERO_HD void operator()(int64_t n) const { Row(SerialRow(), n); }
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

// Token-major <-> head-major: model.cc's activations are token-major, [B, T, heads, hd] (row n = b * T + t of
// [N, heads * hd]); a GPU's batched attention products read head-major [B, heads, T, hd], where one kv head's
// group of query heads is one contiguous [group * T, hd] matrix. out[i] = in[the same (b, t, head, j)], element i
// of the output; to_heads: token-major in, head-major out, else the reverse. RopeRow with heads = 1 rotates a
// head-major array too (its row n = (b * heads + h) * T + t has position n % T).
template <typename X, typename Y>
struct PermuteHeads {
  const X* in;
  Y* out;
  int seq;
  int heads;
  int hd;
  bool to_heads;
  ZERO_HD void operator()(int64_t i) const {
    const int64_t j = i % hd, row = i / hd;
    int64_t src;
    if (to_heads) {  // out row (b * heads + h) * seq + t
      const int64_t t = row % seq, bh = row / seq, h = bh % heads, b = bh / heads;
      src = ((b * seq + t) * heads + h) * hd + j;
    } else {  // out row (b * seq + t) * heads + h
      const int64_t h = row % heads, bt = row / heads, t = bt % seq, b = bt / seq;
      src = ((b * heads + h) * seq + t) * hd + j;
    }
    Store(out + i, Load(in[src]));
  }
};

}  // namespace lora::kernels

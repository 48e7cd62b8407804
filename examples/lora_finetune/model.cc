// The LLaMA-style decoder of model.h: forward and backward by hand, fp32, CBLAS sgemm + OpenMP. The element-,
// row- and column-wise math is model_kernels.cuh's functors (written once for the CPU and CUDA), run here in
// OpenMP loops; the matrix products and the attention's dot products are the CPU's own.
//
// Conventions: activations are row-major [N, features] with N = batch * seq and row n = b * seq + t; a linear
// weight W is [out, in] (Hugging Face), so y = x W^T. Backward walks the blocks in reverse, carrying the gradient
// of the residual stream in one [N, dim] buffer that each block updates in place.
//
// Memory: every activation and temporary comes from the pass's Workspace (model_workspace.h), allocated and freed
// as a stack. What is live when is what zero::EstimateActivations (src/estimate_activations.cc) counts, with the
// compute dtype fp32; model_cuda.cu keeps the same buffers in the same order, some of them in bf16.
#include "examples/lora_finetune/model.h"
#include "examples/lora_finetune/model_layout.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numbers>

#include "examples/lora_finetune/model_kernels.cuh"

// OpenBLAS's own thread pool: bounded by `threads` when the BLAS linked is OpenBLAS (weak: absent elsewhere).
extern "C" void openblas_set_num_threads(int) __attribute__((weak));

namespace lora {
namespace {

using namespace detail;  // the parameter table (model_layout.h)

bool Targeted(const LoraConfig& lora, int p) {
  const bool t[kNumProj] = {lora.q, lora.k, lora.v, lora.o, lora.gate, lora.up, lora.down};
  return lora.enabled && t[p];
}

}  // namespace

namespace detail {

Layout BuildLayout(const ModelConfig& m, const LoraConfig& lora) {
  Layout l;
  const bool base_trainable = !lora.enabled;
  auto add = [&](std::string name, std::vector<int64_t> shape, int unit, bool trainable) {
    l.params.push_back({std::move(name), std::move(shape), unit, trainable});
    return static_cast<int>(l.params.size()) - 1;
  };
  const int hd = m.dim / m.heads;
  const int qd = m.heads * hd, kvd = m.kv_heads * hd;
  const int in[kNumProj] = {m.dim, m.dim, m.dim, qd, m.dim, m.dim, m.ffn};
  const int out[kNumProj] = {qd, kvd, kvd, m.dim, m.ffn, m.ffn, m.dim};
  l.embed = add("model.embed_tokens.weight", {m.vocab, m.dim}, 0, base_trainable);
  for (int i = 0; i < m.layers; ++i) {
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    Block b;
    for (int p = 0; p < kNumProj; ++p) {
      if (p == kQ) b.ln1 = add(prefix + "input_layernorm.weight", {m.dim}, i + 1, base_trainable);
      if (p == kGate) b.ln2 = add(prefix + "post_attention_layernorm.weight", {m.dim}, i + 1, base_trainable);
      Linear& lin = b.proj[p];
      lin.in = in[p];
      lin.out = out[p];
      const std::string name = prefix + kProjName[p];
      lin.w = add(name + ".weight", {out[p], in[p]}, i + 1, base_trainable);
      if (Targeted(lora, p)) {
        lin.a = add(name + ".lora_A.weight", {lora.r, in[p]}, i + 1, true);
        lin.b = add(name + ".lora_B.weight", {out[p], lora.r}, i + 1, true);
      }
    }
    l.blocks.push_back(b);
  }
  l.norm = add("model.norm.weight", {m.dim}, m.layers + 1, base_trainable);
  return l;
}

}  // namespace detail

namespace {

using kernels::Hash;  // counter-based: the same value for (seed, stream, index) on every rank
using kernels::Uniform01;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "lora model: %s\n", what.c_str());
  std::abort();
}

int Threads(int threads) {
  threads = std::max(1, threads);
  if (openblas_set_num_threads != nullptr) openblas_set_num_threads(threads);
  return threads;
}

// y[M,N] = alpha * x[M,K] W[N,K]^T + beta * y
void MatMulNT(int M, int N, int K, float alpha, const float* x, const float* w, float beta, float* y) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, alpha, x, K, w, K, beta, y, N);
}
// y[M,N] = alpha * x[M,K] W[K,N] + beta * y
void MatMulNN(int M, int N, int K, float alpha, const float* x, const float* w, float beta, float* y) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, alpha, x, K, w, N, beta, y, N);
}
// y[M,N] = alpha * d[K,M]^T x[K,N] + beta * y   (weight gradients: dW[out,in] += dy^T x)
void MatMulTN(int M, int N, int K, float alpha, const float* d, const float* x, float beta, float* y) {
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, M, N, K, alpha, d, M, x, N, beta, y, N);
}

// f(i) for i in [0, count): the CPU instantiation of model_kernels.cuh's functors (a row functor's operator()
// runs its row on one thread, kernels::SerialRow).
template <typename F>
void ForEach(int threads, int64_t count, const F& f) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) f(i);
}

template <typename T>
using Buf = Buffer<T>;

void Zero(Buf<float>& b) { std::fill(b.get(), b.get() + b.size(), 0.f); }

// Everything one pass needs besides the parameters.
struct Pass {
  Pass(const ModelConfig& model, const LoraConfig& adapter, const Layout& lay, ParamAccess& acc, Workspace* w)
      : m(model), lora(adapter), layout(lay), access(acc), ws(w) {}
  const ModelConfig& m;
  const LoraConfig& lora;
  const Layout& layout;
  ParamAccess& access;
  Workspace* ws;  // every activation and temporary of the pass
  int n = 0, batch = 0, seq = 0, threads = 1;
  int omp_threads = 1;  // threads for the OpenMP loops: 1 for tiny passes, where a team costs more than it saves
  int hd = 0, qd = 0, kvd = 0;
  bool training = false;  // backward requested: dropout on, gradients written
  uint64_t dropout_seed = 0;
  float lora_scale = 0.f;  // alpha / r
  Buf<float> cos, sin;     // RoPE table [seq, hd / 2]

  bool Dropout() const { return training && lora.dropout > 0.f; }
  float* GradOrNull(int p) const { return layout.params[p].trainable ? access.Grad(p) : nullptr; }
};

// What one block keeps from its forward for its backward (its input is kept by the caller). Allocate takes them
// from the workspace in declaration order and Release frees them in reverse, so blocks stack.
struct BlockActs {
  Buf<float> inv1, xn1;           // 1/rms [N], normed input [N,D]
  Buf<float> q, k, v;             // after RoPE (q, k): [N,QD], [N,KVD], [N,KVD]
  Buf<float> probs;               // attention [B,H,T,T], zero above the diagonal
  Buf<float> att;                 // attention output [N,QD]
  Buf<float> x_mid, inv2, xn2;    // after the attention residual
  Buf<float> g, u, h;             // SwiGLU gate, up, silu(g) * u: [N,F]
  Buf<float> lora_u[kNumProj];    // A dropout(x): [N,r] per adapter

  void Allocate(const Pass& ps, int layer) {
    Workspace* w = ps.ws;
    const int64_t n = ps.n, nd = n * ps.m.dim, nf = n * ps.m.ffn;
    inv1 = Buf<float>(w, n);
    xn1 = Buf<float>(w, nd);
    q = Buf<float>(w, n * ps.qd);
    k = Buf<float>(w, n * ps.kvd);
    v = Buf<float>(w, n * ps.kvd);
    probs = Buf<float>(w, n * ps.m.heads * ps.seq);
    att = Buf<float>(w, n * ps.qd);
    x_mid = Buf<float>(w, nd);
    inv2 = Buf<float>(w, n);
    xn2 = Buf<float>(w, nd);
    g = Buf<float>(w, nf);
    u = Buf<float>(w, nf);
    h = Buf<float>(w, nf);
    for (int p = 0; p < kNumProj; ++p) {
      if (ps.layout.blocks[layer].proj[p].a >= 0) lora_u[p] = Buf<float>(w, n * ps.lora.r);
    }
  }
  void Release() {
    for (int p = kNumProj - 1; p >= 0; --p) lora_u[p].Reset();
    for (Buf<float>* b : {&h, &u, &g, &xn2, &inv2, &x_mid, &att, &probs, &v, &k, &q, &xn1, &inv1}) b->Reset();
  }
};

// The hash stream of the dropout mask of the adapter input of (layer, proj): the same in forward and backward.
uint64_t DropoutStream(int layer, int proj) { return static_cast<uint64_t>(layer) * kNumProj + proj + 1; }

// The adapter's input: x, or dropout(x) in training with dropout > 0 (then in *tmp).
const float* AdapterInput(const Pass& ps, int layer, int proj, const float* x, int in, Buf<float>* tmp) {
  if (!ps.Dropout()) return x;
  const int64_t total = static_cast<int64_t>(ps.n) * in;
  *tmp = Buf<float>(ps.ws, total);
  const float keep_scale = 1.f / (1.f - ps.lora.dropout);
  ForEach(ps.omp_threads, total,
          kernels::DropoutElement<float, float>{x, tmp->get(), ps.dropout_seed, DropoutStream(layer, proj),
                                                ps.lora.dropout, keep_scale});
  return tmp->get();
}

// y[N,out] = x W^T (+ s B A dropout(x)); keeps A dropout(x) in lora_u [N,r] (given when the projection is adapted).
void LinearForward(const Pass& ps, int layer, int proj, const float* x, float* y, float* lora_u) {
  const Linear& lin = ps.layout.blocks[layer].proj[proj];
  MatMulNT(ps.n, lin.out, lin.in, 1.f, x, ps.access.Param(lin.w), 0.f, y);
  if (lin.a < 0) return;
  Buf<float> tmp;
  const float* xd = AdapterInput(ps, layer, proj, x, lin.in, &tmp);
  MatMulNT(ps.n, ps.lora.r, lin.in, 1.f, xd, ps.access.Param(lin.a), 0.f, lora_u);
  MatMulNT(ps.n, lin.out, ps.lora.r, ps.lora_scale, lora_u, ps.access.Param(lin.b), 1.f, y);
}

// Given dy [N,out]: dx += dy W (+ the adapter's path); weight gradients into trainable Grad views.
void LinearBackward(const Pass& ps, int layer, int proj, const float* x, const float* dy, const float* lora_u,
                    float* dx) {
  const Linear& lin = ps.layout.blocks[layer].proj[proj];
  if (float* dw = ps.GradOrNull(lin.w)) MatMulTN(lin.out, lin.in, ps.n, 1.f, dy, x, 1.f, dw);
  MatMulNN(ps.n, lin.in, lin.out, 1.f, dy, ps.access.Param(lin.w), 1.f, dx);
  if (lin.a < 0) return;
  const int r = ps.lora.r;
  const float s = ps.lora_scale;
  if (float* db = ps.GradOrNull(lin.b)) MatMulTN(lin.out, r, ps.n, s, dy, lora_u, 1.f, db);
  Buf<float> du(ps.ws, static_cast<int64_t>(ps.n) * r);  // d(A xd) = s dy B
  MatMulNN(ps.n, r, lin.out, s, dy, ps.access.Param(lin.b), 0.f, du.get());
  Buf<float> tmp;
  const float* xd = AdapterInput(ps, layer, proj, x, lin.in, &tmp);
  if (float* da = ps.GradOrNull(lin.a)) MatMulTN(r, lin.in, ps.n, 1.f, du.get(), xd, 1.f, da);
  if (!ps.Dropout()) {
    MatMulNN(ps.n, lin.in, r, 1.f, du.get(), ps.access.Param(lin.a), 1.f, dx);
    return;
  }
  const int64_t total = static_cast<int64_t>(ps.n) * lin.in;
  Buf<float> dxd(ps.ws, total);
  MatMulNN(ps.n, lin.in, r, 1.f, du.get(), ps.access.Param(lin.a), 0.f, dxd.get());
  const float keep_scale = 1.f / (1.f - ps.lora.dropout);
  ForEach(ps.omp_threads, total,
          kernels::DropoutBackwardElement{dxd.get(), dx, ps.dropout_seed, DropoutStream(layer, proj), ps.lora.dropout,
                                          keep_scale});
}

// y = x / rms(x) * w per row; inv[n] = 1 / rms(x_n).
void RmsNormForward(const Pass& ps, const float* x, const float* w, float* y, float* inv) {
  ForEach(ps.omp_threads, ps.n, kernels::RmsNormRow<float, float, float>{x, w, y, inv, ps.m.dim, ps.m.norm_eps});
}

// dx += d/dx, dw += d/dw (dw may be null: frozen) of y = x * inv * w given dy.
void RmsNormBackward(const Pass& ps, const float* x, const float* w, const float* inv, const float* dy, float* dx,
                     float* dw) {
  ForEach(ps.omp_threads, ps.n, kernels::RmsNormBackwardRow<float, float>{x, w, inv, dy, dx, ps.m.dim});
  if (dw == nullptr) return;
  ForEach(ps.omp_threads, ps.m.dim, kernels::RmsNormWeightGradCol<float>{x, inv, dy, dw, ps.n, ps.m.dim});
}

// Rotates each head of x [N, heads * hd] by its position (Hugging Face rotate-half: pairs (j, j + hd/2)).
// inverse = true applies the transpose rotation (the backward of the forward rotation).
void Rope(const Pass& ps, float* x, int heads, bool inverse) {
  ForEach(ps.omp_threads, ps.n,
          kernels::RopeRow<float>{x, ps.cos.get(), ps.sin.get(), ps.seq, heads, ps.hd, inverse});
}

// Causal grouped-query attention: query head h reads kv head h / (heads / kv_heads). Per row of scores: the dot
// products q_t . k_s here, the causal softmax in kernels::CausalSoftmaxRow (in place), then the weighted sum of v.
void AttentionForward(const Pass& ps, BlockActs& a) {
  const int H = ps.m.heads, T = ps.seq, hd = ps.hd, group = ps.m.heads / ps.m.kv_heads;
  Zero(a.att);
  const kernels::CausalSoftmaxRow<float> softmax{a.probs.get(), a.probs.get(), T,
                                                 1.f / std::sqrt(static_cast<float>(hd))};
#pragma omp parallel for num_threads(ps.omp_threads) schedule(static)
  for (int bh = 0; bh < ps.batch * H; ++bh) {
    const int b = bh / H, h = bh % H, g = h / group;
    for (int t = 0; t < T; ++t) {
      const float* q = a.q.get() + (static_cast<int64_t>(b * T + t) * H + h) * hd;
      float* p = a.probs.get() + (static_cast<int64_t>(bh) * T + t) * T;
      for (int s = 0; s <= t; ++s) {
        const float* k = a.k.get() + (static_cast<int64_t>(b * T + s) * ps.m.kv_heads + g) * hd;
        float dot = 0.f;
        for (int j = 0; j < hd; ++j) dot += q[j] * k[j];
        p[s] = dot;
      }
      softmax(static_cast<int64_t>(bh) * T + t);
      float* o = a.att.get() + (static_cast<int64_t>(b * T + t) * H + h) * hd;
      for (int s = 0; s <= t; ++s) {
        const float* v = a.v.get() + (static_cast<int64_t>(b * T + s) * ps.m.kv_heads + g) * hd;
        for (int j = 0; j < hd; ++j) o[j] += p[s] * v[j];
      }
    }
  }
}

// From datt [N,QD]: dq [N,QD], dk and dv [N,KVD] (gradients w.r.t. the rotated q and k). First, per row of
// scores, dp[s] = datt_t . v_s and kernels::CausalSoftmaxBackwardRow turns it into ds (in place); then, parallel
// over (batch, kv head) so that the heads sharing a kv head accumulate into it from one thread, the products with
// q, k and datt.
void AttentionBackward(const Pass& ps, const BlockActs& a, const float* datt, float* dq, float* dk, float* dv) {
  const int H = ps.m.heads, KV = ps.m.kv_heads, T = ps.seq, hd = ps.hd, group = H / KV;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  Buf<float> ds(ps.ws, a.probs.size());  // [B,H,T,T]
  const kernels::CausalSoftmaxBackwardRow<float, float> softmax_backward{a.probs.get(), ds.get(), ds.get(), T, scale};
  const int64_t rows = static_cast<int64_t>(ps.batch) * H * T;
#pragma omp parallel for num_threads(ps.omp_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int t = static_cast<int>(r % T), h = static_cast<int>(r / T % H), b = static_cast<int>(r / T / H);
    const int g = h / group;
    const float* dout = datt + (static_cast<int64_t>(b * T + t) * H + h) * hd;
    float* dp = ds.get() + r * T;
    for (int s = 0; s <= t; ++s) {
      const float* v = a.v.get() + (static_cast<int64_t>(b * T + s) * KV + g) * hd;
      float dot = 0.f;
      for (int j = 0; j < hd; ++j) dot += dout[j] * v[j];
      dp[s] = dot;
    }
    softmax_backward(r);
  }
  std::fill(dk, dk + static_cast<int64_t>(ps.n) * ps.kvd, 0.f);
  std::fill(dv, dv + static_cast<int64_t>(ps.n) * ps.kvd, 0.f);
#pragma omp parallel for num_threads(ps.omp_threads) schedule(static)
  for (int bg = 0; bg < ps.batch * KV; ++bg) {
    const int b = bg / KV, g = bg % KV;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int t = 0; t < T; ++t) {
        const int64_t qrow = (static_cast<int64_t>(b * T + t) * H + h) * hd;
        const float* q = a.q.get() + qrow;
        const float* dout = datt + qrow;
        float* dqr = dq + qrow;
        const int64_t prow = ((static_cast<int64_t>(b) * H + h) * T + t) * T;
        const float* p = a.probs.get() + prow;
        const float* dsr = ds.get() + prow;
        for (int j = 0; j < hd; ++j) dqr[j] = 0.f;
        for (int s = 0; s <= t; ++s) {
          const int64_t krow = (static_cast<int64_t>(b * T + s) * KV + g) * hd;
          const float* k = a.k.get() + krow;
          for (int j = 0; j < hd; ++j) {
            dqr[j] += dsr[s] * k[j];
            dk[krow + j] += dsr[s] * q[j];
            dv[krow + j] += p[s] * dout[j];
          }
        }
      }
    }
  }
}

// x [N,D]: the residual stream, the block's input on entry and its output on return; a: allocated.
void BlockForward(const Pass& ps, int layer, float* x, BlockActs& a) {
  const Block& blk = ps.layout.blocks[layer];
  const int64_t nd = static_cast<int64_t>(ps.n) * ps.m.dim, nf = static_cast<int64_t>(ps.n) * ps.m.ffn;
  RmsNormForward(ps, x, ps.access.Param(blk.ln1), a.xn1.get(), a.inv1.get());
  LinearForward(ps, layer, kQ, a.xn1.get(), a.q.get(), a.lora_u[kQ].get());
  LinearForward(ps, layer, kK, a.xn1.get(), a.k.get(), a.lora_u[kK].get());
  LinearForward(ps, layer, kV, a.xn1.get(), a.v.get(), a.lora_u[kV].get());
  Rope(ps, a.q.get(), ps.m.heads, false);
  Rope(ps, a.k.get(), ps.m.kv_heads, false);
  AttentionForward(ps, a);
  Buf<float> tmp(ps.ws, nd);  // the o and down projections' outputs
  LinearForward(ps, layer, kO, a.att.get(), tmp.get(), a.lora_u[kO].get());
  ForEach(ps.omp_threads, nd, kernels::AddElement<float>{x, tmp.get()});
  std::copy(x, x + nd, a.x_mid.get());
  RmsNormForward(ps, x, ps.access.Param(blk.ln2), a.xn2.get(), a.inv2.get());
  LinearForward(ps, layer, kGate, a.xn2.get(), a.g.get(), a.lora_u[kGate].get());
  LinearForward(ps, layer, kUp, a.xn2.get(), a.u.get(), a.lora_u[kUp].get());
  ForEach(ps.omp_threads, nf, kernels::SwiGluElement<float, float>{a.g.get(), a.u.get(), a.h.get()});
  LinearForward(ps, layer, kDown, a.h.get(), tmp.get(), a.lora_u[kDown].get());
  ForEach(ps.omp_threads, nd, kernels::AddElement<float>{x, tmp.get()});
}

// dx: gradient w.r.t. the block's output on entry, w.r.t. its input on return. x_in: the block's input.
// Temporaries are scoped so that each is freed as soon as nothing needs it, in reverse order of allocation.
void BlockBackward(const Pass& ps, int layer, const float* x_in, const BlockActs& a, float* dx) {
  const Block& blk = ps.layout.blocks[layer];
  const int64_t n = ps.n, nd = n * ps.m.dim, nf = n * ps.m.ffn;
  {  // MLP branch: x_out = x_mid + down(silu(gate(xn2)) * up(xn2)).
    Buf<float> dg(ps.ws, nf), du(ps.ws, nf);
    {
      Buf<float> dh(ps.ws, nf);
      Zero(dh);
      LinearBackward(ps, layer, kDown, a.h.get(), dx, a.lora_u[kDown].get(), dh.get());
      ForEach(ps.omp_threads, nf,
              kernels::SwiGluBackwardElement<float, float>{a.g.get(), a.u.get(), dh.get(), dg.get(), du.get()});
    }
    Buf<float> dxn(ps.ws, nd);
    Zero(dxn);
    LinearBackward(ps, layer, kGate, a.xn2.get(), dg.get(), a.lora_u[kGate].get(), dxn.get());
    LinearBackward(ps, layer, kUp, a.xn2.get(), du.get(), a.lora_u[kUp].get(), dxn.get());
    RmsNormBackward(ps, a.x_mid.get(), ps.access.Param(blk.ln2), a.inv2.get(), dxn.get(), dx, ps.GradOrNull(blk.ln2));
  }
  // Attention branch: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
  Buf<float> dq(ps.ws, n * ps.qd), dk(ps.ws, n * ps.kvd), dv(ps.ws, n * ps.kvd);
  {
    Buf<float> datt(ps.ws, n * ps.qd);
    Zero(datt);
    LinearBackward(ps, layer, kO, a.att.get(), dx, a.lora_u[kO].get(), datt.get());
    AttentionBackward(ps, a, datt.get(), dq.get(), dk.get(), dv.get());
  }
  Rope(ps, dq.get(), ps.m.heads, true);
  Rope(ps, dk.get(), ps.m.kv_heads, true);
  Buf<float> dxn(ps.ws, nd);
  Zero(dxn);
  LinearBackward(ps, layer, kQ, a.xn1.get(), dq.get(), a.lora_u[kQ].get(), dxn.get());
  LinearBackward(ps, layer, kK, a.xn1.get(), dk.get(), a.lora_u[kK].get(), dxn.get());
  LinearBackward(ps, layer, kV, a.xn1.get(), dv.get(), a.lora_u[kV].get(), dxn.get());
  RmsNormBackward(ps, x_in, ps.access.Param(blk.ln1), a.inv1.get(), dxn.get(), dx, ps.GradOrNull(blk.ln1));
}

// The pass's fixed parts: sizes and the RoPE tables (the first buffers of the workspace).
void MakePass(Pass* ps, const Batch& batch, int threads) {
  const ModelConfig& m = ps->m;
  const std::string error = CheckConfig(m, ps->lora);
  if (!error.empty()) Die(error);
  if (batch.batch <= 0 || batch.seq <= 0 || batch.tokens == nullptr) Die("empty batch or null tokens");
  if (ps->ws->device()) Die("the CPU model needs a host workspace (Workspace::Host())");
  ps->ws->BeginPass();
  ps->batch = batch.batch;
  ps->seq = batch.seq;
  ps->n = batch.batch * batch.seq;
  ps->threads = Threads(threads);
  // Below ~16k elements per activation a loop takes microseconds, and an OpenMP barrier on a loaded core can
  // take milliseconds.
  ps->omp_threads = static_cast<int64_t>(ps->n) * std::max(m.dim, m.ffn) >= (1 << 14) ? ps->threads : 1;
  ps->hd = m.dim / m.heads;
  ps->qd = m.heads * ps->hd;
  ps->kvd = m.kv_heads * ps->hd;
  ps->lora_scale = ps->lora.enabled ? ps->lora.alpha / static_cast<float>(ps->lora.r) : 0.f;
  const int half = ps->hd / 2;
  ps->cos = Buf<float>(ps->ws, static_cast<int64_t>(ps->seq) * half);
  ps->sin = Buf<float>(ps->ws, static_cast<int64_t>(ps->seq) * half);
  for (int t = 0; t < ps->seq; ++t) {
    for (int j = 0; j < half; ++j) {
      // inv_freq_j = theta^(-2j/hd), computed in double then rounded, as the tables of HF's fp32 path.
      const double angle = t * std::pow(static_cast<double>(m.rope_theta), -2.0 * j / ps->hd);
      ps->cos[static_cast<int64_t>(t) * half + j] = static_cast<float>(std::cos(angle));
      ps->sin[static_cast<int64_t>(t) * half + j] = static_cast<float>(std::sin(angle));
    }
  }
  for (int i = 0; i < ps->n; ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= m.vocab) Die("token out of range at position " + std::to_string(i));
  }
}

// What a training pass keeps between a block's forward and its backward: every block's input, and without
// recomputation every block's activations.
struct Kept {
  std::vector<Buf<float>> inputs;
  std::vector<BlockActs> acts;
};

// The embedding and the blocks: x [N,D] becomes the last block's output. With `kept`, each block's input is
// copied into it, and its activations too unless recomputing; otherwise each block's activations live only
// during its forward.
void Blocks(const Pass& ps, const Batch& batch, Buf<float>& x, Kept* kept, bool recompute) {
  const int D = ps.m.dim, L = ps.m.layers;
  const int64_t nd = static_cast<int64_t>(ps.n) * D;
  ps.access.Acquire(0, false);
  ForEach(ps.omp_threads, ps.n,
          kernels::EmbedGatherRow<float, float>{ps.access.Param(ps.layout.embed), batch.tokens, x.get(), D});
  ps.access.Release(0, false);
  if (kept != nullptr) {
    kept->inputs.resize(static_cast<size_t>(L));
    kept->acts.resize(recompute ? 0 : static_cast<size_t>(L));
  }
  for (int l = 0; l < L; ++l) {
    ps.access.Acquire(l + 1, false);
    if (kept != nullptr) {
      Buf<float>& in = kept->inputs[static_cast<size_t>(l)];
      in = Buf<float>(ps.ws, nd);
      std::copy(x.get(), x.get() + nd, in.get());
    }
    if (kept != nullptr && !recompute) {
      BlockActs& a = kept->acts[static_cast<size_t>(l)];
      a.Allocate(ps, l);
      BlockForward(ps, l, x.get(), a);
    } else {
      BlockActs a;
      a.Allocate(ps, l);
      BlockForward(ps, l, x.get(), a);
      a.Release();
    }
    ps.access.Release(l + 1, false);
  }
}

// The final norm: xnf [N,D] and invf [N] from the last block's output x.
void FinalNorm(const Pass& ps, const float* x, Buf<float>* invf, Buf<float>* xnf) {
  const int final_unit = ps.m.layers + 1;
  *invf = Buf<float>(ps.ws, ps.n);
  *xnf = Buf<float>(ps.ws, static_cast<int64_t>(ps.n) * ps.m.dim);
  ps.access.Acquire(final_unit, false);
  RmsNormForward(ps, x, ps.access.Param(ps.layout.norm), xnf->get(), invf->get());
  ps.access.Release(final_unit, false);
}

}  // namespace

std::string CheckConfig(const ModelConfig& m, const LoraConfig& lora) {
  if (m.vocab <= 0 || m.dim <= 0 || m.layers < 0 || m.heads <= 0 || m.kv_heads <= 0 || m.ffn <= 0) {
    return "vocab, dim, heads, kv_heads and ffn must be positive and layers non-negative";
  }
  if (m.dim % m.heads != 0) return "dim (" + std::to_string(m.dim) + ") must be a multiple of heads";
  if ((m.dim / m.heads) % 2 != 0) return "head_dim = dim / heads must be even (RoPE rotates pairs)";
  if (m.heads % m.kv_heads != 0) return "kv_heads must divide heads (grouped-query attention)";
  if (lora.enabled && lora.r <= 0) return "LoRA rank r must be positive";
  if (lora.dropout < 0.f || lora.dropout >= 1.f) return "LoRA dropout must be in [0, 1)";
  return "";
}

std::vector<ParamInfo> Parameters(const ModelConfig& m, const LoraConfig& lora) { return BuildLayout(m, lora).params; }

namespace {

// How InitValue draws each parameter, precomputed once per configuration (InitParams calls it per element).
struct InitRule {
  enum Kind { kOne, kZero, kUniform, kNormal } kind;
  float scale;      // bound (uniform) or standard deviation (normal)
  uint64_t stream;  // FNV-1a of the name: a base weight draws the same values with and without adapters
};

bool SameConfig(const ModelConfig& a, const LoraConfig& la, const ModelConfig& b, const LoraConfig& lb) {
  return a.vocab == b.vocab && a.dim == b.dim && a.layers == b.layers && a.heads == b.heads &&
         a.kv_heads == b.kv_heads && a.ffn == b.ffn && la.enabled == lb.enabled && la.r == lb.r && la.q == lb.q &&
         la.k == lb.k && la.v == lb.v && la.o == lb.o && la.gate == lb.gate && la.up == lb.up && la.down == lb.down;
}

std::vector<InitRule> InitRules(const ModelConfig& m, const LoraConfig& lora) {
  std::vector<InitRule> rules;
  for (const ParamInfo& info : Parameters(m, lora)) {
    const std::string& name = info.name;
    auto ends_with = [&](const std::string& suffix) {
      return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    uint64_t stream = 1469598103934665603ull;
    for (char c : name) stream = (stream ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    if (ends_with("layernorm.weight") || name == "model.norm.weight") {
      rules.push_back({InitRule::kOne, 1.f, stream});
    } else if (ends_with("lora_B.weight")) {
      rules.push_back({InitRule::kZero, 0.f, stream});
    } else if (ends_with("lora_A.weight")) {
      rules.push_back({InitRule::kUniform, 1.f / std::sqrt(static_cast<float>(info.shape[1])), stream});
    } else {
      double std_dev = 0.02;
      if (ends_with("o_proj.weight") || ends_with("down_proj.weight"))
        std_dev /= std::sqrt(2.0 * std::max(1, m.layers));
      rules.push_back({InitRule::kNormal, static_cast<float>(std_dev), stream});
    }
  }
  return rules;
}

}  // namespace

float InitValue(const ModelConfig& m, const LoraConfig& lora, int param, int64_t i, uint64_t seed) {
  static thread_local ModelConfig cached_m;
  static thread_local LoraConfig cached_lora;
  static thread_local std::vector<InitRule> rules;
  if (rules.empty() || !SameConfig(m, lora, cached_m, cached_lora)) {
    rules = InitRules(m, lora);
    cached_m = m;
    cached_lora = lora;
  }
  const InitRule& rule = rules.at(param);
  switch (rule.kind) {
    case InitRule::kOne:
      return 1.f;
    case InitRule::kZero:
      return 0.f;
    case InitRule::kUniform:
      return (2.f * Uniform01(Hash(seed, rule.stream, static_cast<uint64_t>(i) * 2)) - 1.f) * rule.scale;
    case InitRule::kNormal:
      break;
  }
  // Box-Muller from two 53-bit uniforms.
  const uint64_t h1 = Hash(seed, rule.stream, static_cast<uint64_t>(i) * 2);
  const uint64_t h2 = Hash(seed, rule.stream, static_cast<uint64_t>(i) * 2 + 1);
  const double u1 = (static_cast<double>(h1 >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
  const double u2 = static_cast<double>(h2 >> 11) * 0x1.0p-53;
  const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  return static_cast<float>(z * rule.scale);
}

float Forward(const ModelConfig& m, const LoraConfig& lora, ParamAccess& access, const Batch& batch, bool backward,
              float loss_scale, uint64_t dropout_seed, int threads, const PassOptions& options) {
  std::unique_ptr<Workspace> own;
  Workspace* ws = options.workspace;
  if (ws == nullptr) ws = (own = Workspace::Host()).get();
  const Layout layout = BuildLayout(m, lora);
  Pass ps(m, lora, layout, access, ws);
  MakePass(&ps, batch, threads);
  ps.training = backward;
  ps.dropout_seed = dropout_seed;
  const int D = m.dim, V = m.vocab, L = m.layers;
  if (batch.targets == nullptr) Die("Forward needs targets");
  int count = 0;
  for (int n = 0; n < ps.n; ++n) {
    const int32_t t = batch.targets[n];
    if (t < -1 || t >= V) Die("target out of range at position " + std::to_string(n));
    count += t >= 0;
  }
  // The workspace as a stack, bottom up: the RoPE tables, x (the residual stream), dx (its gradient, below the
  // blocks' activations so that backward frees them from the top), each block's input and activations, the final
  // norm's output, dxnf and the logits.
  const int64_t nd = static_cast<int64_t>(ps.n) * D;
  Buf<float> x(ws, nd), dx;
  if (backward) dx = Buf<float>(ws, nd);
  Kept kept;
  Blocks(ps, batch, x, backward ? &kept : nullptr, options.recompute);
  Buf<float> invf, xnf;
  FinalNorm(ps, x.get(), &invf, &xnf);
  Buf<float> dxnf;
  if (backward) dxnf = Buf<float>(ws, nd);

  // Head (tied embedding): logits, then softmax in place; loss over non-ignored targets.
  Buf<float> probs(ws, static_cast<int64_t>(ps.n) * V);
  access.Acquire(0, false);
  MatMulNT(ps.n, V, D, 1.f, xnf.get(), access.Param(layout.embed), 0.f, probs.get());
  access.Release(0, false);
  double loss_sum = 0.0;
  {
    Buf<double> row_loss(ws, ps.n);
    ForEach(ps.omp_threads, ps.n, kernels::SoftmaxXentRow{probs.get(), batch.targets, row_loss.get(), V});
    for (int n = 0; n < ps.n; ++n) loss_sum += row_loss[n];
  }
  const float loss = count > 0 ? static_cast<float>(loss_sum / count) : 0.f;
  if (!backward) return loss;

  // dlogits = (softmax - onehot) * loss_scale / count on counted rows, 0 elsewhere (probs reused in place).
  const float coef = count > 0 ? loss_scale / static_cast<float>(count) : 0.f;
  ForEach(ps.omp_threads, ps.n, kernels::XentGradRow<float>{probs.get(), probs.get(), batch.targets, V, coef});
  access.Acquire(0, true);
  if (float* de = ps.GradOrNull(layout.embed)) MatMulTN(V, D, ps.n, 1.f, probs.get(), xnf.get(), 1.f, de);
  MatMulNN(ps.n, D, V, 1.f, probs.get(), access.Param(layout.embed), 0.f, dxnf.get());
  access.Release(0, true);
  probs.Reset();

  const int final_unit = L + 1;
  Zero(dx);
  access.Acquire(final_unit, true);
  RmsNormBackward(ps, x.get(), access.Param(layout.norm), invf.get(), dxnf.get(), dx.get(),
                  ps.GradOrNull(layout.norm));
  access.GradsReady(final_unit);
  access.Release(final_unit, true);
  dxnf.Reset();
  xnf.Reset();
  invf.Reset();

  for (int l = L - 1; l >= 0; --l) {
    const size_t i = static_cast<size_t>(l);
    access.Acquire(l + 1, true);
    if (options.recompute) {
      // The block's forward again, from its kept input, with the same dropout masks: the same activations.
      BlockActs a;
      a.Allocate(ps, l);
      {
        Buf<float> xs(ws, nd);
        std::copy(kept.inputs[i].get(), kept.inputs[i].get() + nd, xs.get());
        BlockForward(ps, l, xs.get(), a);
      }
      BlockBackward(ps, l, kept.inputs[i].get(), a, dx.get());
      a.Release();
    } else {
      BlockBackward(ps, l, kept.inputs[i].get(), kept.acts[i], dx.get());
      kept.acts[i].Release();
    }
    kept.inputs[i].Reset();
    access.GradsReady(l + 1);
    access.Release(l + 1, true);
  }

  access.Acquire(0, true);
  if (float* de = ps.GradOrNull(layout.embed)) {
    // Parallel over columns: rows of repeated tokens accumulate into the same embedding row in position order.
    ForEach(ps.omp_threads, D, kernels::EmbedScatterCol{dx.get(), batch.tokens, de, ps.n, D});
  }
  access.GradsReady(0);
  access.Release(0, true);
  return loss;
}

void Logits(const ModelConfig& m, const LoraConfig& lora, ParamAccess& access, const Batch& batch,
            std::vector<float>* logits, int threads, Workspace* workspace) {
  std::unique_ptr<Workspace> own;
  Workspace* ws = workspace;
  if (ws == nullptr) ws = (own = Workspace::Host()).get();
  const Layout layout = BuildLayout(m, lora);
  Pass ps(m, lora, layout, access, ws);
  MakePass(&ps, batch, threads);
  Buf<float> x(ws, static_cast<int64_t>(ps.n) * m.dim);
  Blocks(ps, batch, x, nullptr, false);
  Buf<float> invf, xnf;
  FinalNorm(ps, x.get(), &invf, &xnf);
  logits->resize(static_cast<size_t>(ps.n) * m.vocab);
  access.Acquire(0, false);
  MatMulNT(ps.n, m.vocab, m.dim, 1.f, xnf.get(), access.Param(layout.embed), 0.f, logits->data());
  access.Release(0, false);
}

}  // namespace lora

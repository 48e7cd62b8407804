// The LoRA example's model on CUDA (model_cuda.h): model.cc's passes, step for step, with cuBLAS for the matrix
// products (bf16 operands, fp32 accumulation and results) and model_kernels.cuh's functors, the CPU model's own
// element- and row-wise math, run by one grid-stride kernel template. Everything is enqueued on the legacy
// default stream (zero's compute stream); device buffers are stream-ordered (cudaMallocAsync / cudaFreeAsync).
//
// Precision: parameters and every matrix-product operand are bf16; products, the residual stream, 1/rms, the
// attention probabilities, logits, losses and gradients are fp32. An fp32 result that feeds another product is
// rounded once to bf16 (CastElement). Attention runs as per-(batch, head) GEMMs over the full T x T scores, which
// the causal softmax zeroes above the diagonal; clear first, fast later (a fused kernel needs a measured reason
// and a CPU twin, DESIGN.md).
//
// Conventions are model.cc's: activations row-major [N, features], row n = b * seq + t; weights [out, in].
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "examples/lora_finetune/model_cuda.h"
#include "examples/lora_finetune/model_layout.h"
#include "examples/lora_finetune/model_kernels.cuh"
#include "kernels/launch.cuh"

namespace lora {
namespace {

using kernels::Bf16;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "lora cuda model: %s\n", what.c_str());
  std::abort();
}

void CudaCheck(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess)
    Die(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " + cudaGetErrorString(e));
}
void CublasCheck(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    Die(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": cuBLAS status " +
        std::to_string(static_cast<int>(s)));
  }
}
#define LORA_CUDA(call) CudaCheck((call), #call, __FILE__, __LINE__)
#define LORA_CUBLAS(call) CublasCheck((call), #call, __FILE__, __LINE__)

// zero's compute stream on the CUDA backend: the legacy default stream.
const cudaStream_t kStream = nullptr;

template <typename F>
__global__ void ForEachKernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(i);
  }
}

// f(i) for i in [0, n): the CUDA instantiation of a model_kernels.cuh functor (model.cc's ForEach is the CPU one).
template <typename F>
void ForEach(int64_t n, const F& f) {
  if (n <= 0) return;
  ForEachKernel<<<zero::kernels::BlocksFor(n), zero::kernels::kThreads, 0, kStream>>>(n, f);
  LORA_CUDA(cudaGetLastError());
}

// A stream-ordered device array: allocated and freed on kStream, so it may be dropped while kernels that use it
// are still queued.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(int64_t n) : n_(n) {
    if (n > 0) LORA_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&p_), static_cast<size_t>(n) * sizeof(T), kStream));
  }
  ~DeviceArray() { Reset(); }
  DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_) {
    o.p_ = nullptr;
    o.n_ = 0;
  }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      Reset();
      p_ = o.p_;
      n_ = o.n_;
      o.p_ = nullptr;
      o.n_ = 0;
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return p_; }
  int64_t size() const { return n_; }
  void Zero() {
    if (n_ > 0) LORA_CUDA(cudaMemsetAsync(p_, 0, static_cast<size_t>(n_) * sizeof(T), kStream));
  }

 private:
  void Reset() {
    if (p_ != nullptr) cudaFreeAsync(p_, kStream);  // a failure here surfaces at the next checked call
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  int64_t n_ = 0;
};

template <typename T>
DeviceArray<T> Zeros(int64_t n) {
  DeviceArray<T> a(n);
  a.Zero();
  return a;
}

template <typename T>
DeviceArray<T> ToDevice(const T* host, int64_t n) {
  DeviceArray<T> a(n);
  if (n > 0) {
    LORA_CUDA(cudaMemcpyAsync(a.get(), host, static_cast<size_t>(n) * sizeof(T), cudaMemcpyHostToDevice, kStream));
  }
  return a;
}

template <typename T>
DeviceArray<T> Copy(const T* device, int64_t n) {
  DeviceArray<T> a(n);
  if (n > 0) {
    LORA_CUDA(cudaMemcpyAsync(a.get(), device, static_cast<size_t>(n) * sizeof(T), cudaMemcpyDeviceToDevice, kStream));
  }
  return a;
}

// x [n] fp32 rounded to bf16: an fp32 result becoming the operand of the next product.
DeviceArray<Bf16> ToBf16(const float* x, int64_t n) {
  DeviceArray<Bf16> y(n);
  ForEach(n, kernels::CastElement<float, Bf16>{x, y.get()});
  return y;
}

// One cuBLAS handle per thread, on kStream, created on first use.
cublasHandle_t Blas() {
  struct Handle {
    cublasHandle_t h = nullptr;
    Handle() {
      LORA_CUBLAS(cublasCreate(&h));
      LORA_CUBLAS(cublasSetStream(h, kStream));
    }
    ~Handle() { cublasDestroy(h); }
  };
  thread_local Handle handle;
  return handle.h;
}

// Row-major C[M,N] = alpha op(A) op(B) + beta C, with A [M,K] (stored [K,M] when ta) and B [K,N] (stored [N,K]
// when tb) bf16, C fp32, leading dimensions the row strides in elements, fp32 accumulation. cuBLAS is
// column-major and a row-major matrix read column-major is its transpose, so this asks for
// C^T = op(B)^T op(A)^T: the operands swap, each keeps its transpose flag.
void Gemm(bool ta, bool tb, int M, int N, int K, float alpha, const Bf16* A, int lda, const Bf16* B, int ldb,
          float beta, float* C, int ldc) {
  LORA_CUBLAS(cublasGemmEx(Blas(), tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B,
                           CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT));
}
// model.cc's three products, contiguous operands.
// y[M,N] = alpha x[M,K] W[N,K]^T + beta y
void MatMulNT(int M, int N, int K, float alpha, const Bf16* x, const Bf16* w, float beta, float* y) {
  Gemm(false, true, M, N, K, alpha, x, K, w, K, beta, y, N);
}
// y[M,N] = alpha x[M,K] W[K,N] + beta y
void MatMulNN(int M, int N, int K, float alpha, const Bf16* x, const Bf16* w, float beta, float* y) {
  Gemm(false, false, M, N, K, alpha, x, K, w, N, beta, y, N);
}
// y[M,N] = alpha d[K,M]^T x[K,N] + beta y
void MatMulTN(int M, int N, int K, float alpha, const Bf16* d, const Bf16* x, float beta, float* y) {
  Gemm(true, false, M, N, K, alpha, d, M, x, N, beta, y, N);
}

// Parameter indices: model.cc's table (model_layout.h), so both models index parameters alike.
using namespace detail;  // the parameter table: model_layout.h, built by model.cc's BuildLayout

// Everything one pass needs besides the parameters (model.cc's Pass, on the device).
struct Pass {
  Pass(const ModelConfig& model, const LoraConfig& adapter, const Layout& lay, CudaParamAccess& acc)
      : m(model), lora(adapter), layout(lay), access(acc) {}
  const ModelConfig& m;
  const LoraConfig& lora;
  const Layout& layout;
  CudaParamAccess& access;
  int n = 0, batch = 0, seq = 0;
  int hd = 0, qd = 0, kvd = 0;
  bool training = false;
  uint64_t dropout_seed = 0;
  float lora_scale = 0.f;
  DeviceArray<float> cos, sin;   // RoPE table [seq, hd / 2], model.cc's values
  DeviceArray<int32_t> tokens;   // [N]
  DeviceArray<int32_t> targets;  // [N], Forward only

  bool Dropout() const { return training && lora.dropout > 0.f; }
  const Bf16* P(int p) const { return static_cast<const Bf16*>(access.Param(p)); }
  float* GradOrNull(int p) const { return layout.params[p].trainable ? access.Grad(p) : nullptr; }
};

struct BlockActs {
  DeviceArray<float> x_in, inv1;   // block input [N,D] (fp32 residual stream), 1/rms [N]
  DeviceArray<Bf16> xn1;           // normed [N,D]
  DeviceArray<Bf16> q, k, v;       // after RoPE (q, k): [N,QD], [N,KVD], [N,KVD]
  DeviceArray<float> probs;        // [B,H,T,T], zero above the diagonal
  DeviceArray<Bf16> att;           // attention output [N,QD]
  DeviceArray<float> x_mid, inv2;  // after the attention residual
  DeviceArray<Bf16> xn2;
  DeviceArray<float> g, u;             // SwiGLU gate and up products [N,F]
  DeviceArray<Bf16> h;                 // silu(g) * u [N,F]
  DeviceArray<Bf16> lora_u[kNumProj];  // A dropout(x) [N,r] per adapter
};

uint64_t DropoutStream(int layer, int proj) { return static_cast<uint64_t>(layer) * kNumProj + proj + 1; }

// The adapter's input: x, or dropout(x) in training with dropout > 0 (then written to *tmp).
const Bf16* AdapterInput(const Pass& ps, int layer, int proj, const Bf16* x, int in, DeviceArray<Bf16>* tmp) {
  if (!ps.Dropout()) return x;
  const int64_t total = static_cast<int64_t>(ps.n) * in;
  *tmp = DeviceArray<Bf16>(total);
  ForEach(total, kernels::DropoutElement<Bf16, Bf16>{x, tmp->get(), ps.dropout_seed, DropoutStream(layer, proj),
                                                     ps.lora.dropout, 1.f / (1.f - ps.lora.dropout)});
  return tmp->get();
}

// y[N,out] = x W^T (+ s B A dropout(x)); keeps A dropout(x) (bf16) in *lora_u.
void LinearForward(const Pass& ps, int layer, int proj, const Bf16* x, float* y, DeviceArray<Bf16>* lora_u) {
  const Linear& lin = ps.layout.blocks[layer].proj[proj];
  MatMulNT(ps.n, lin.out, lin.in, 1.f, x, ps.P(lin.w), 0.f, y);
  if (lin.a < 0) return;
  const int r = ps.lora.r;
  DeviceArray<Bf16> tmp;
  const Bf16* xd = AdapterInput(ps, layer, proj, x, lin.in, &tmp);
  DeviceArray<float> u(static_cast<int64_t>(ps.n) * r);
  MatMulNT(ps.n, r, lin.in, 1.f, xd, ps.P(lin.a), 0.f, u.get());
  *lora_u = ToBf16(u.get(), u.size());
  MatMulNT(ps.n, lin.out, r, ps.lora_scale, lora_u->get(), ps.P(lin.b), 1.f, y);
}

// Given dy [N,out] (fp32): dx += dy W (+ the adapter's path); weight gradients into trainable Grad views.
void LinearBackward(const Pass& ps, int layer, int proj, const Bf16* x, const float* dy,
                    const DeviceArray<Bf16>& lora_u, float* dx) {
  const Linear& lin = ps.layout.blocks[layer].proj[proj];
  const DeviceArray<Bf16> dyb = ToBf16(dy, static_cast<int64_t>(ps.n) * lin.out);
  if (float* dw = ps.GradOrNull(lin.w)) MatMulTN(lin.out, lin.in, ps.n, 1.f, dyb.get(), x, 1.f, dw);
  MatMulNN(ps.n, lin.in, lin.out, 1.f, dyb.get(), ps.P(lin.w), 1.f, dx);
  if (lin.a < 0) return;
  const int r = ps.lora.r;
  const float s = ps.lora_scale;
  if (float* db = ps.GradOrNull(lin.b)) MatMulTN(lin.out, r, ps.n, s, dyb.get(), lora_u.get(), 1.f, db);
  DeviceArray<float> du(static_cast<int64_t>(ps.n) * r);  // d(A xd) = s dy B
  MatMulNN(ps.n, r, lin.out, s, dyb.get(), ps.P(lin.b), 0.f, du.get());
  const DeviceArray<Bf16> dub = ToBf16(du.get(), du.size());
  DeviceArray<Bf16> tmp;
  const Bf16* xd = AdapterInput(ps, layer, proj, x, lin.in, &tmp);
  if (float* da = ps.GradOrNull(lin.a)) MatMulTN(r, lin.in, ps.n, 1.f, dub.get(), xd, 1.f, da);
  if (!ps.Dropout()) {
    MatMulNN(ps.n, lin.in, r, 1.f, dub.get(), ps.P(lin.a), 1.f, dx);
    return;
  }
  const int64_t total = static_cast<int64_t>(ps.n) * lin.in;
  DeviceArray<float> dxd(total);
  MatMulNN(ps.n, lin.in, r, 1.f, dub.get(), ps.P(lin.a), 0.f, dxd.get());
  ForEach(total, kernels::DropoutBackwardElement{dxd.get(), dx, ps.dropout_seed, DropoutStream(layer, proj),
                                                 ps.lora.dropout, 1.f / (1.f - ps.lora.dropout)});
}

// y (bf16) = x / rms(x) * w per row; inv[n] = 1 / rms(x_n).
void RmsNormForward(const Pass& ps, const float* x, const Bf16* w, Bf16* y, float* inv) {
  ForEach(ps.n, kernels::RmsNormRow<float, Bf16, Bf16>{x, w, y, inv, ps.m.dim, ps.m.norm_eps});
}

// dx += d/dx, dw += d/dw (dw may be null: frozen) of y = x * inv * w given dy.
void RmsNormBackward(const Pass& ps, const float* x, const Bf16* w, const float* inv, const float* dy, float* dx,
                     float* dw) {
  ForEach(ps.n, kernels::RmsNormBackwardRow<float, Bf16>{x, w, inv, dy, dx, ps.m.dim});
  if (dw == nullptr) return;
  ForEach(ps.m.dim, kernels::RmsNormWeightGradCol<float>{x, inv, dy, dw, ps.n, ps.m.dim});
}

void Rope(const Pass& ps, float* x, int heads, bool inverse) {
  ForEach(ps.n, kernels::RopeRow<float>{x, ps.cos.get(), ps.sin.get(), ps.seq, heads, ps.hd, inverse});
}

// Offsets of head h's [T, hd] slice of batch b in a [N, heads * hd] activation (row stride heads * hd).
int64_t HeadOffset(int b, int h, int T, int heads, int hd) { return (static_cast<int64_t>(b) * T * heads + h) * hd; }
// Offset of (b, h)'s [T, T] block of [B, H, T, T] scores.
int64_t ScoreOffset(int b, int h, int T, int H) { return (static_cast<int64_t>(b) * H + h) * T * T; }

// Causal grouped-query attention, per (batch, query head) h reading kv head h / (heads / kv_heads):
// scores = q k^T (GEMM), causal softmax (kernels::CausalSoftmaxRow, scaled there), att = probs v (GEMM).
void AttentionForward(const Pass& ps, BlockActs& a) {
  const int H = ps.m.heads, KV = ps.m.kv_heads, T = ps.seq, hd = ps.hd, group = H / KV;
  a.probs = DeviceArray<float>(static_cast<int64_t>(ps.batch) * H * T * T);
  for (int b = 0; b < ps.batch; ++b) {
    for (int h = 0; h < H; ++h) {
      Gemm(false, true, T, T, hd, 1.f, a.q.get() + HeadOffset(b, h, T, H, hd), H * hd,
           a.k.get() + HeadOffset(b, h / group, T, KV, hd), KV * hd, 0.f, a.probs.get() + ScoreOffset(b, h, T, H), T);
    }
  }
  ForEach(static_cast<int64_t>(ps.batch) * H * T,
          kernels::CausalSoftmaxRow{a.probs.get(), T, 1.f / std::sqrt(static_cast<float>(hd))});
  const DeviceArray<Bf16> pb = ToBf16(a.probs.get(), a.probs.size());
  DeviceArray<float> att(static_cast<int64_t>(ps.n) * ps.qd);
  for (int b = 0; b < ps.batch; ++b) {
    for (int h = 0; h < H; ++h) {
      Gemm(false, false, T, hd, T, 1.f, pb.get() + ScoreOffset(b, h, T, H), T,
           a.v.get() + HeadOffset(b, h / group, T, KV, hd), KV * hd, 0.f, att.get() + HeadOffset(b, h, T, H, hd),
           H * hd);
    }
  }
  a.att = ToBf16(att.get(), att.size());
}

// From datt [N,QD] (fp32): dq [N,QD], dk and dv [N,KVD] (gradients w.r.t. the rotated q and k; dk and dv are
// overwritten). dp = datt v^T (GEMM), ds by kernels::CausalSoftmaxBackwardRow, then dq = ds k, dk += ds^T q and
// dv += p^T datt (GEMMs; the heads of a group accumulate into their kv head in order).
void AttentionBackward(const Pass& ps, const BlockActs& a, const float* datt, float* dq, float* dk, float* dv) {
  const int H = ps.m.heads, KV = ps.m.kv_heads, T = ps.seq, hd = ps.hd, group = H / KV;
  const DeviceArray<Bf16> dob = ToBf16(datt, static_cast<int64_t>(ps.n) * ps.qd);
  DeviceArray<float> ds(a.probs.size());
  for (int b = 0; b < ps.batch; ++b) {
    for (int h = 0; h < H; ++h) {
      Gemm(false, true, T, T, hd, 1.f, dob.get() + HeadOffset(b, h, T, H, hd), H * hd,
           a.v.get() + HeadOffset(b, h / group, T, KV, hd), KV * hd, 0.f, ds.get() + ScoreOffset(b, h, T, H), T);
    }
  }
  ForEach(static_cast<int64_t>(ps.batch) * H * T,
          kernels::CausalSoftmaxBackwardRow{a.probs.get(), ds.get(), T, 1.f / std::sqrt(static_cast<float>(hd))});
  const DeviceArray<Bf16> dsb = ToBf16(ds.get(), ds.size());
  const DeviceArray<Bf16> pb = ToBf16(a.probs.get(), a.probs.size());
  LORA_CUDA(cudaMemsetAsync(dk, 0, static_cast<size_t>(ps.n) * ps.kvd * sizeof(float), kStream));
  LORA_CUDA(cudaMemsetAsync(dv, 0, static_cast<size_t>(ps.n) * ps.kvd * sizeof(float), kStream));
  for (int b = 0; b < ps.batch; ++b) {
    for (int h = 0; h < H; ++h) {
      const int64_t so = ScoreOffset(b, h, T, H), qo = HeadOffset(b, h, T, H, hd),
                    ko = HeadOffset(b, h / group, T, KV, hd);
      Gemm(false, false, T, hd, T, 1.f, dsb.get() + so, T, a.k.get() + ko, KV * hd, 0.f, dq + qo, H * hd);
      Gemm(true, false, T, hd, T, 1.f, dsb.get() + so, T, a.q.get() + qo, H * hd, 1.f, dk + ko, KV * hd);
      Gemm(true, false, T, hd, T, 1.f, pb.get() + so, T, dob.get() + qo, H * hd, 1.f, dv + ko, KV * hd);
    }
  }
}

// x [N,D]: the residual stream, block input on entry, output on return.
void BlockForward(const Pass& ps, int layer, DeviceArray<float>& x, BlockActs& a) {
  const Block& blk = ps.layout.blocks[layer];
  const int64_t nd = static_cast<int64_t>(ps.n) * ps.m.dim, nf = static_cast<int64_t>(ps.n) * ps.m.ffn;
  a.x_in = Copy(x.get(), nd);
  a.inv1 = DeviceArray<float>(ps.n);
  a.xn1 = DeviceArray<Bf16>(nd);
  RmsNormForward(ps, x.get(), ps.P(blk.ln1), a.xn1.get(), a.inv1.get());
  DeviceArray<float> q(static_cast<int64_t>(ps.n) * ps.qd), k(static_cast<int64_t>(ps.n) * ps.kvd),
      v(static_cast<int64_t>(ps.n) * ps.kvd);
  LinearForward(ps, layer, kQ, a.xn1.get(), q.get(), &a.lora_u[kQ]);
  LinearForward(ps, layer, kK, a.xn1.get(), k.get(), &a.lora_u[kK]);
  LinearForward(ps, layer, kV, a.xn1.get(), v.get(), &a.lora_u[kV]);
  Rope(ps, q.get(), ps.m.heads, false);
  Rope(ps, k.get(), ps.m.kv_heads, false);
  a.q = ToBf16(q.get(), q.size());
  a.k = ToBf16(k.get(), k.size());
  a.v = ToBf16(v.get(), v.size());
  AttentionForward(ps, a);
  DeviceArray<float> tmp(nd);
  LinearForward(ps, layer, kO, a.att.get(), tmp.get(), &a.lora_u[kO]);
  ForEach(nd, kernels::AddElement<float>{x.get(), tmp.get()});
  a.x_mid = Copy(x.get(), nd);
  a.inv2 = DeviceArray<float>(ps.n);
  a.xn2 = DeviceArray<Bf16>(nd);
  RmsNormForward(ps, x.get(), ps.P(blk.ln2), a.xn2.get(), a.inv2.get());
  a.g = DeviceArray<float>(nf);
  a.u = DeviceArray<float>(nf);
  a.h = DeviceArray<Bf16>(nf);
  LinearForward(ps, layer, kGate, a.xn2.get(), a.g.get(), &a.lora_u[kGate]);
  LinearForward(ps, layer, kUp, a.xn2.get(), a.u.get(), &a.lora_u[kUp]);
  ForEach(nf, kernels::SwiGluElement<float, Bf16>{a.g.get(), a.u.get(), a.h.get()});
  LinearForward(ps, layer, kDown, a.h.get(), tmp.get(), &a.lora_u[kDown]);
  ForEach(nd, kernels::AddElement<float>{x.get(), tmp.get()});
}

// dx: gradient w.r.t. the block's output on entry, w.r.t. its input on return.
void BlockBackward(const Pass& ps, int layer, const BlockActs& a, DeviceArray<float>& dx) {
  const Block& blk = ps.layout.blocks[layer];
  const int64_t nd = static_cast<int64_t>(ps.n) * ps.m.dim, nf = static_cast<int64_t>(ps.n) * ps.m.ffn;
  // MLP branch: x_out = x_mid + down(silu(gate(xn2)) * up(xn2)).
  DeviceArray<float> dh = Zeros<float>(nf), dg(nf), du(nf);
  LinearBackward(ps, layer, kDown, a.h.get(), dx.get(), a.lora_u[kDown], dh.get());
  ForEach(nf, kernels::SwiGluBackwardElement<float>{a.g.get(), a.u.get(), dh.get(), dg.get(), du.get()});
  DeviceArray<float> dxn = Zeros<float>(nd);
  LinearBackward(ps, layer, kGate, a.xn2.get(), dg.get(), a.lora_u[kGate], dxn.get());
  LinearBackward(ps, layer, kUp, a.xn2.get(), du.get(), a.lora_u[kUp], dxn.get());
  RmsNormBackward(ps, a.x_mid.get(), ps.P(blk.ln2), a.inv2.get(), dxn.get(), dx.get(), ps.GradOrNull(blk.ln2));
  // Attention branch: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
  DeviceArray<float> datt = Zeros<float>(static_cast<int64_t>(ps.n) * ps.qd);
  LinearBackward(ps, layer, kO, a.att.get(), dx.get(), a.lora_u[kO], datt.get());
  DeviceArray<float> dq(static_cast<int64_t>(ps.n) * ps.qd), dk(static_cast<int64_t>(ps.n) * ps.kvd),
      dv(static_cast<int64_t>(ps.n) * ps.kvd);
  AttentionBackward(ps, a, datt.get(), dq.get(), dk.get(), dv.get());
  Rope(ps, dq.get(), ps.m.heads, true);
  Rope(ps, dk.get(), ps.m.kv_heads, true);
  dxn.Zero();
  LinearBackward(ps, layer, kQ, a.xn1.get(), dq.get(), a.lora_u[kQ], dxn.get());
  LinearBackward(ps, layer, kK, a.xn1.get(), dk.get(), a.lora_u[kK], dxn.get());
  LinearBackward(ps, layer, kV, a.xn1.get(), dv.get(), a.lora_u[kV], dxn.get());
  RmsNormBackward(ps, a.x_in.get(), ps.P(blk.ln1), a.inv1.get(), dxn.get(), dx.get(), ps.GradOrNull(blk.ln1));
}

void MakePass(Pass* ps, const Batch& batch) {
  const std::string error = CheckConfig(ps->m, ps->lora);
  if (!error.empty()) Die(error);
  if (batch.batch <= 0 || batch.seq <= 0 || batch.tokens == nullptr) Die("empty batch or null tokens");
  const ModelConfig& m = ps->m;
  ps->batch = batch.batch;
  ps->seq = batch.seq;
  ps->n = batch.batch * batch.seq;
  ps->hd = m.dim / m.heads;
  ps->qd = m.heads * ps->hd;
  ps->kvd = m.kv_heads * ps->hd;
  ps->lora_scale = ps->lora.enabled ? ps->lora.alpha / static_cast<float>(ps->lora.r) : 0.f;
  const int half = ps->hd / 2;
  std::vector<float> cos(static_cast<size_t>(ps->seq) * half), sin(cos.size());
  for (int t = 0; t < ps->seq; ++t) {
    for (int j = 0; j < half; ++j) {
      // model.cc's table: inv_freq_j = theta^(-2j/hd) in double, then rounded.
      const double angle = t * std::pow(static_cast<double>(m.rope_theta), -2.0 * j / ps->hd);
      cos[static_cast<size_t>(t) * half + j] = static_cast<float>(std::cos(angle));
      sin[static_cast<size_t>(t) * half + j] = static_cast<float>(std::sin(angle));
    }
  }
  ps->cos = ToDevice(cos.data(), static_cast<int64_t>(cos.size()));
  ps->sin = ToDevice(sin.data(), static_cast<int64_t>(sin.size()));
  for (int i = 0; i < ps->n; ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= m.vocab) Die("token out of range at position " + std::to_string(i));
  }
  ps->tokens = ToDevice(batch.tokens, ps->n);
}

// The forward protocol up to the final norm's output xnf [N,D] (bf16); activations into acts (every block's
// when keep, else one reused set), x_final, invf.
void Trunk(const Pass& ps, bool keep, std::vector<BlockActs>* acts, DeviceArray<float>* x_final,
           DeviceArray<float>* invf, DeviceArray<Bf16>* xnf) {
  const int D = ps.m.dim;
  const int64_t nd = static_cast<int64_t>(ps.n) * D;
  DeviceArray<float> x(nd);
  ps.access.Acquire(0, false);
  ForEach(ps.n, kernels::EmbedGatherRow<Bf16, float>{ps.P(ps.layout.embed), ps.tokens.get(), x.get(), D});
  ps.access.Release(0, false);
  acts->resize(keep ? static_cast<size_t>(ps.m.layers) : 1);
  for (int l = 0; l < ps.m.layers; ++l) {
    ps.access.Acquire(l + 1, false);
    BlockForward(ps, l, x, (*acts)[keep ? static_cast<size_t>(l) : 0]);
    ps.access.Release(l + 1, false);
  }
  const int final_unit = ps.m.layers + 1;
  ps.access.Acquire(final_unit, false);
  *invf = DeviceArray<float>(ps.n);
  *xnf = DeviceArray<Bf16>(nd);
  RmsNormForward(ps, x.get(), ps.P(ps.layout.norm), xnf->get(), invf->get());
  ps.access.Release(final_unit, false);
  *x_final = std::move(x);
}

}  // namespace

bool CudaModelAvailable(std::string* why) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error so that later runtime calls (zero's CPU backend checks) start clean
    if (why != nullptr) *why = std::string("no usable CUDA device: ") + cudaGetErrorString(e);
    return false;
  }
  if (count == 0) {
    if (why != nullptr) *why = "no CUDA GPU visible";
    return false;
  }
  return true;
}

float ForwardCuda(const ModelConfig& m, const LoraConfig& lora, CudaParamAccess& access, const Batch& batch,
                  bool backward, float loss_scale, uint64_t dropout_seed) {
  const Layout layout = BuildLayout(m, lora);
  Pass ps(m, lora, layout, access);
  MakePass(&ps, batch);
  ps.training = backward;
  ps.dropout_seed = dropout_seed;
  const int D = m.dim, V = m.vocab;
  if (batch.targets == nullptr) Die("Forward needs targets");
  int count = 0;
  for (int n = 0; n < ps.n; ++n) {
    const int32_t t = batch.targets[n];
    if (t < -1 || t >= V) Die("target out of range at position " + std::to_string(n));
    count += t >= 0;
  }
  ps.targets = ToDevice(batch.targets, ps.n);
  std::vector<BlockActs> acts;
  DeviceArray<float> x_final, invf;
  DeviceArray<Bf16> xnf;
  Trunk(ps, backward, &acts, &x_final, &invf, &xnf);

  // Head (tied embedding): logits, then softmax in place and the loss per row.
  DeviceArray<float> probs(static_cast<int64_t>(ps.n) * V);
  access.Acquire(0, false);
  MatMulNT(ps.n, V, D, 1.f, xnf.get(), ps.P(layout.embed), 0.f, probs.get());
  access.Release(0, false);
  DeviceArray<double> row_loss_dev(ps.n);
  ForEach(ps.n, kernels::SoftmaxXentRow{probs.get(), ps.targets.get(), row_loss_dev.get(), V});
  std::vector<double> row_loss(static_cast<size_t>(ps.n));
  LORA_CUDA(cudaMemcpyAsync(row_loss.data(), row_loss_dev.get(), row_loss.size() * sizeof(double),
                            cudaMemcpyDeviceToHost, kStream));
  LORA_CUDA(cudaStreamSynchronize(kStream));  // the loss is the host's: one wait per pass
  double loss_sum = 0.0;
  for (const double l : row_loss) loss_sum += l;
  const float loss = count > 0 ? static_cast<float>(loss_sum / count) : 0.f;
  if (!backward) return loss;

  // dlogits = (softmax - onehot) * loss_scale / count on counted rows, 0 elsewhere.
  const float coef = count > 0 ? loss_scale / static_cast<float>(count) : 0.f;
  ForEach(ps.n, kernels::XentGradRow{probs.get(), ps.targets.get(), V, coef});
  DeviceArray<Bf16> dlogits = ToBf16(probs.get(), probs.size());
  probs = DeviceArray<float>();
  const int64_t nd = static_cast<int64_t>(ps.n) * D;
  DeviceArray<float> dxnf(nd);
  access.Acquire(0, true);
  if (float* de = ps.GradOrNull(layout.embed)) MatMulTN(V, D, ps.n, 1.f, dlogits.get(), xnf.get(), 1.f, de);
  MatMulNN(ps.n, D, V, 1.f, dlogits.get(), ps.P(layout.embed), 0.f, dxnf.get());
  access.Release(0, true);
  dlogits = DeviceArray<Bf16>();

  const int final_unit = m.layers + 1;
  DeviceArray<float> dx = Zeros<float>(nd);
  access.Acquire(final_unit, true);
  RmsNormBackward(ps, x_final.get(), ps.P(layout.norm), invf.get(), dxnf.get(), dx.get(), ps.GradOrNull(layout.norm));
  access.GradsReady(final_unit);
  access.Release(final_unit, true);

  for (int l = m.layers - 1; l >= 0; --l) {
    access.Acquire(l + 1, true);
    BlockBackward(ps, l, acts[static_cast<size_t>(l)], dx);
    access.GradsReady(l + 1);
    access.Release(l + 1, true);
    acts[static_cast<size_t>(l)] = BlockActs();
  }

  access.Acquire(0, true);
  if (float* de = ps.GradOrNull(layout.embed)) {
    // One thread per column: repeated tokens accumulate in position order, without atomics.
    ForEach(D, kernels::EmbedScatterCol{dx.get(), ps.tokens.get(), de, ps.n, D});
  }
  access.GradsReady(0);
  access.Release(0, true);
  return loss;
}

void LogitsCuda(const ModelConfig& m, const LoraConfig& lora, CudaParamAccess& access, const Batch& batch,
                std::vector<float>* logits) {
  const Layout layout = BuildLayout(m, lora);
  Pass ps(m, lora, layout, access);
  MakePass(&ps, batch);
  std::vector<BlockActs> acts;
  DeviceArray<float> x_final, invf;
  DeviceArray<Bf16> xnf;
  Trunk(ps, false, &acts, &x_final, &invf, &xnf);
  DeviceArray<float> out(static_cast<int64_t>(ps.n) * m.vocab);
  access.Acquire(0, false);
  MatMulNT(ps.n, m.vocab, m.dim, 1.f, xnf.get(), ps.P(layout.embed), 0.f, out.get());
  access.Release(0, false);
  logits->resize(static_cast<size_t>(out.size()));
  LORA_CUDA(
      cudaMemcpyAsync(logits->data(), out.get(), logits->size() * sizeof(float), cudaMemcpyDeviceToHost, kStream));
  LORA_CUDA(cudaStreamSynchronize(kStream));
}

}  // namespace lora

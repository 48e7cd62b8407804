// The LoRA example's model on CUDA (model_cuda.h): model.cc's passes, step for step, with cuBLAS for the matrix
// products (bf16 operands, fp32 accumulation and results) and model_kernels.cuh's functors, the CPU model's own
// element- and row-wise math. Everything is enqueued on the legacy default stream (zero's compute stream).
//
// Precision: parameters and every matrix-product operand are bf16, the attention probabilities included;
// products, the residual stream, 1/rms, the gate and up outputs, logits, losses and gradients are fp32. An fp32
// result that feeds another product is rounded once to bf16 (CastElement, or the functor that produces it).
//
// Speed (../shared/gpu/REVIEW.md D7):
//   - attention is one strided-batched GEMM per product, over (batch, kv head): q, k, v and their gradients are
//     kept head-major, [B, heads, T, hd] (kernels::PermuteHeads), where the query heads sharing a kv head are
//     one contiguous [group * T, hd] matrix, so grouped-query attention needs no per-head loop (and dk, dv sum
//     over the group inside the product). The products cover the full T x T scores, which the causal softmax
//     zeroes above the diagonal;
//   - row functors (RMSNorm, the causal softmax and its backward, cross-entropy over the vocabulary) run a block
//     of kRowLanes threads per row (BlockRow, model_cuda_kernels.cuh), summing in the order the CPU's SerialRow
//     does;
//   - activations come from a Workspace (model_workspace.h) whose arena is one stream-ordered allocation, sized by
//     the first pass; later passes allocate nothing. Its peak is the activation memory lora_finetune reports.
//
// Memory: the same buffers as model.cc, allocated and freed in the same order (a stack), some in bf16, plus the
// fp32 staging of products stored in bf16 and the head-major copies; zero::EstimateActivations
// (src/estimate_activations.cc) counts them with the compute dtype bf16.
//
// Conventions are model.cc's: activations row-major [N, features], row n = b * seq + t; weights [out, in].
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "examples/lora_finetune/model_cuda.h"
#include "examples/lora_finetune/model_cuda_kernels.cuh"
#include "examples/lora_finetune/model_kernels.cuh"
#include "examples/lora_finetune/model_layout.h"
#include "kernels/launch.cuh"

namespace lora {
namespace {

using kernels::Bf16;
using kernels::kRowLanes;

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

// kernel<<<grid, block, 0, kStream>>>(args...). In tests/lora_cuda_model_emulated_test this file is compiled for
// the CPU against host-only stand-ins of the CUDA runtime and cuBLAS (tests/testing/fake_cuda) and the same kernel
// source runs through the CPU emulation of a launch (tests/testing/cuda_emulation.h, a block's threads as fibers),
// queued on the stream like the stand-in's copies and GEMMs (its deferred mode runs them only when something waits),
// with its arguments copied at the launch as a real launch copies them, and device memory readable while it runs.
// The stand-in first checks the configuration as the runtime does (fake_cuda::CheckLaunch), so that a launch a GPU
// refuses (an empty grid, grid.y beyond 65535, more than 1024 threads) fails here at the launch check as well.
#if defined(ZERO_CUDA_EMULATION)
bool LaunchConfigOk(dim3 g, dim3 b) { return fake_cuda::CheckLaunch(g.x, g.y, g.z, b.x, b.y, b.z) == cudaSuccess; }
#define LORA_LAUNCH(kernel, grid, block, ...)                                                                          \
  (LaunchConfigOk(dim3(grid), dim3(block))                                                                             \
       ? (void)fake_cuda::Enqueue(kStream,                                                                             \
                                  [=] { zero::testing::EmulateFibers(dim3(grid), dim3(block), kernel, __VA_ARGS__); }) \
       : (void)0)
#else
#define LORA_LAUNCH(kernel, grid, block, ...) kernel<<<grid, block, 0, kStream>>>(__VA_ARGS__)
#endif

// f(i) for i in [0, n): the CUDA instantiation of an element functor (model.cc's ForEach is the CPU one).
template <typename F>
void ForEach(int64_t n, const F& f) {
  if (n <= 0) return;
  LORA_LAUNCH(ForEachKernel<F>, zero::kernels::BlocksFor(n), zero::kernels::kThreads, n, f);
  LORA_CUDA(cudaGetLastError());
}

// f.Row(r, row) for every row: one block per row (a grid-stride loop over rows beyond the grid).
template <typename F>
void ForEachRow(int64_t rows, const F& f) {
  if (rows <= 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, zero::kernels::kMaxBlocks));
  LORA_LAUNCH(RowKernel<F>, blocks, kRowLanes, rows, f);
  LORA_CUDA(cudaGetLastError());
}

// Device memory for a Workspace: stream-ordered, so the arena (or a buffer outside it) may be released while
// kernels that use it are still queued. A device without memory pools (some virtualized GPUs refuse
// cudaMallocAsync) gets cudaMalloc and cudaFree, which waits for the device's queued work before it frees.
class DeviceMemory : public RawMemory {
 public:
  void* Allocate(int64_t bytes) override {
    void* p = nullptr;
    if (Pools()) {
      LORA_CUDA(cudaMallocAsync(&p, static_cast<size_t>(bytes), kStream));
    } else {
      LORA_CUDA(cudaMalloc(&p, static_cast<size_t>(bytes)));
    }
    return p;
  }
  void Free(void* p) override {  // a failure surfaces at the next checked call
    if (Pools()) {
      cudaFreeAsync(p, kStream);
    } else {
      cudaFree(p);
    }
  }
  bool device() const override { return true; }

 private:
  // Whether the current device has stream-ordered memory pools, asked once per memory (one device's workspace).
  bool Pools() {
    if (pools_ < 0) {
      int device = 0, v = 0;
      LORA_CUDA(cudaGetDevice(&device));
      pools_ = cudaDeviceGetAttribute(&v, cudaDevAttrMemoryPoolsSupported, device) == cudaSuccess && v != 0 ? 1 : 0;
      (void)cudaGetLastError();
    }
    return pools_ == 1;
  }
  int pools_ = -1;
};

template <typename T>
using Buf = Buffer<T>;

template <typename T>
void Zero(Buf<T>& b) {
  if (b.size() > 0) LORA_CUDA(cudaMemsetAsync(b.get(), 0, static_cast<size_t>(b.bytes()), kStream));
}

template <typename T>
void Upload(Buf<T>& b, const T* host) {
  if (b.size() > 0) {
    LORA_CUDA(cudaMemcpyAsync(b.get(), host, static_cast<size_t>(b.bytes()), cudaMemcpyHostToDevice, kStream));
  }
}

void CopyDevice(float* dst, const float* src, int64_t n) {
  if (n > 0) LORA_CUDA(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float), cudaMemcpyDeviceToDevice, kStream));
}

void ToBf16(const float* x, Bf16* y, int64_t n) { ForEach(n, kernels::CastElement<float, Bf16>{x, y}); }

// One cuBLAS handle per thread and device, on kStream, created on first use. A handle belongs to the device that
// was current at cublasCreate: a thread whose passes run on a second device (a test or trainer driving two GPUs from
// one thread) gets a second handle instead of launching the first device's products on the wrong one.
cublasHandle_t Blas() {
  struct Handles {
    std::vector<cublasHandle_t> by_device;
    ~Handles() {
      int current = 0;
      if (cudaGetDevice(&current) != cudaSuccess) return;  // the runtime is gone at exit: nothing left to release
      for (size_t d = 0; d < by_device.size(); ++d) {
        if (by_device[d] == nullptr || cudaSetDevice(static_cast<int>(d)) != cudaSuccess) continue;
        cublasDestroy(by_device[d]);
      }
      (void)cudaSetDevice(current);
    }
  };
  thread_local Handles handles;
  int device = 0;
  LORA_CUDA(cudaGetDevice(&device));
  const size_t d = static_cast<size_t>(device);
  if (d >= handles.by_device.size()) handles.by_device.resize(d + 1);
  cublasHandle_t& h = handles.by_device[d];
  if (h == nullptr) {
    LORA_CUBLAS(cublasCreate(&h));
    LORA_CUBLAS(cublasSetStream(h, kStream));
  }
  return h;
}

// Row-major C[M,N] = alpha op(A) op(B) + beta C, `batch` times at element strides sa, sb, sc, with A [M,K]
// (stored [K,M] when ta) and B [K,N] (stored [N,K] when tb) bf16, C fp32, leading dimensions the row strides in
// elements, fp32 accumulation. cuBLAS is column-major and a row-major matrix read column-major is its transpose,
// so this asks for C^T = op(B)^T op(A)^T: the operands swap, each keeps its transpose flag.
void GemmBatched(bool ta, bool tb, int M, int N, int K, float alpha, const Bf16* A, int lda, int64_t sa,
                 const Bf16* B, int ldb, int64_t sb, float beta, float* C, int ldc, int64_t sc, int batch) {
  LORA_CUBLAS(cublasGemmStridedBatchedEx(Blas(), tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M,
                                         K, &alpha, B, CUDA_R_16BF, ldb, sb, A, CUDA_R_16BF, lda, sa, &beta, C,
                                         CUDA_R_32F, ldc, sc, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
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
  Pass(const ModelConfig& model, const LoraConfig& adapter, const Layout& lay, CudaParamAccess& acc, Workspace* w)
      : m(model), lora(adapter), layout(lay), access(acc), ws(w) {}
  const ModelConfig& m;
  const LoraConfig& lora;
  const Layout& layout;
  CudaParamAccess& access;
  Workspace* ws;
  int n = 0, batch = 0, seq = 0;
  int hd = 0, qd = 0, kvd = 0;
  bool training = false;
  uint64_t dropout_seed = 0;
  float lora_scale = 0.f;
  // Allocated in this order (a stack): the batch's token ids and targets [N], the RoPE tables [seq, hd / 2].
  Buf<int32_t> tokens, targets;
  Buf<float> cos, sin;

  bool Dropout() const { return training && lora.dropout > 0.f; }
  const Bf16* P(int p) const { return static_cast<const Bf16*>(access.Param(p)); }
  float* GradOrNull(int p) const { return layout.params[p].trainable ? access.Grad(p) : nullptr; }
  float AttentionScale() const { return 1.f / std::sqrt(static_cast<float>(hd)); }
};

// model.cc's BlockActs, with bf16 operands and q, k, v head-major.
struct BlockActs {
  Buf<float> inv1;                // 1/rms [N]
  Buf<Bf16> xn1;                  // normed [N,D]
  Buf<Bf16> q, k, v;              // after RoPE (q, k), head-major: [B,H,T,hd], [B,KV,T,hd], [B,KV,T,hd]
  Buf<Bf16> probs;                // [B,H,T,T], zero above the diagonal
  Buf<Bf16> att;                  // attention output, token-major [N,QD]
  Buf<float> x_mid, inv2;         // after the attention residual
  Buf<Bf16> xn2;
  Buf<float> g, u;                // SwiGLU gate and up products [N,F]
  Buf<Bf16> h;                    // silu(g) * u [N,F]
  Buf<Bf16> lora_u[kNumProj];     // A dropout(x) [N,r] per adapter

  void Allocate(const Pass& ps, int layer) {
    Workspace* w = ps.ws;
    const int64_t n = ps.n, nd = n * ps.m.dim, nf = n * ps.m.ffn;
    inv1 = Buf<float>(w, n);
    xn1 = Buf<Bf16>(w, nd);
    q = Buf<Bf16>(w, n * ps.qd);
    k = Buf<Bf16>(w, n * ps.kvd);
    v = Buf<Bf16>(w, n * ps.kvd);
    probs = Buf<Bf16>(w, n * ps.m.heads * ps.seq);
    att = Buf<Bf16>(w, n * ps.qd);
    x_mid = Buf<float>(w, nd);
    inv2 = Buf<float>(w, n);
    xn2 = Buf<Bf16>(w, nd);
    g = Buf<float>(w, nf);
    u = Buf<float>(w, nf);
    h = Buf<Bf16>(w, nf);
    for (int p = 0; p < kNumProj; ++p) {
      if (ps.layout.blocks[layer].proj[p].a >= 0) lora_u[p] = Buf<Bf16>(w, n * ps.lora.r);
    }
  }
  void Release() {
    for (int p = kNumProj - 1; p >= 0; --p) lora_u[p].Reset();
    h.Reset();
    u.Reset();
    g.Reset();
    xn2.Reset();
    inv2.Reset();
    x_mid.Reset();
    att.Reset();
    probs.Reset();
    v.Reset();
    k.Reset();
    q.Reset();
    xn1.Reset();
    inv1.Reset();
  }
};

uint64_t DropoutStream(int layer, int proj) { return static_cast<uint64_t>(layer) * kNumProj + proj + 1; }

// The adapter's input: x, or dropout(x) in training with dropout > 0 (then in *tmp).
const Bf16* AdapterInput(const Pass& ps, int layer, int proj, const Bf16* x, int in, Buf<Bf16>* tmp) {
  if (!ps.Dropout()) return x;
  const int64_t total = static_cast<int64_t>(ps.n) * in;
  *tmp = Buf<Bf16>(ps.ws, total);
  ForEach(total, kernels::DropoutElement<Bf16, Bf16>{x, tmp->get(), ps.dropout_seed, DropoutStream(layer, proj),
                                                     ps.lora.dropout, 1.f / (1.f - ps.lora.dropout)});
  return tmp->get();
}

// y[N,out] = x W^T (+ s B A dropout(x)); keeps A dropout(x) (bf16) in lora_u (given when adapted).
void LinearForward(const Pass& ps, int layer, int proj, const Bf16* x, float* y, Bf16* lora_u) {
  const Linear& lin = ps.layout.blocks[layer].proj[proj];
  MatMulNT(ps.n, lin.out, lin.in, 1.f, x, ps.P(lin.w), 0.f, y);
  if (lin.a < 0) return;
  const int r = ps.lora.r;
  Buf<Bf16> tmp;
  const Bf16* xd = AdapterInput(ps, layer, proj, x, lin.in, &tmp);
  Buf<float> u(ps.ws, static_cast<int64_t>(ps.n) * r);
  MatMulNT(ps.n, r, lin.in, 1.f, xd, ps.P(lin.a), 0.f, u.get());
  ToBf16(u.get(), lora_u, u.size());
  MatMulNT(ps.n, lin.out, r, ps.lora_scale, lora_u, ps.P(lin.b), 1.f, y);
}

// Given dy [N,out] (bf16): dx += dy W (+ the adapter's path); weight gradients into trainable Grad views.
void LinearBackward(const Pass& ps, int layer, int proj, const Bf16* x, const Bf16* dy, const Bf16* lora_u,
                    float* dx) {
  const Linear& lin = ps.layout.blocks[layer].proj[proj];
  if (float* dw = ps.GradOrNull(lin.w)) MatMulTN(lin.out, lin.in, ps.n, 1.f, dy, x, 1.f, dw);
  MatMulNN(ps.n, lin.in, lin.out, 1.f, dy, ps.P(lin.w), 1.f, dx);
  if (lin.a < 0) return;
  const int r = ps.lora.r;
  const float s = ps.lora_scale;
  if (float* db = ps.GradOrNull(lin.b)) MatMulTN(lin.out, r, ps.n, s, dy, lora_u, 1.f, db);
  Buf<float> du(ps.ws, static_cast<int64_t>(ps.n) * r);  // d(A xd) = s dy B
  MatMulNN(ps.n, r, lin.out, s, dy, ps.P(lin.b), 0.f, du.get());
  Buf<Bf16> dub(ps.ws, du.size());
  ToBf16(du.get(), dub.get(), du.size());
  Buf<Bf16> tmp;
  const Bf16* xd = AdapterInput(ps, layer, proj, x, lin.in, &tmp);
  if (float* da = ps.GradOrNull(lin.a)) MatMulTN(r, lin.in, ps.n, 1.f, dub.get(), xd, 1.f, da);
  if (!ps.Dropout()) {
    MatMulNN(ps.n, lin.in, r, 1.f, dub.get(), ps.P(lin.a), 1.f, dx);
    return;
  }
  const int64_t total = static_cast<int64_t>(ps.n) * lin.in;
  Buf<float> dxd(ps.ws, total);
  MatMulNN(ps.n, lin.in, r, 1.f, dub.get(), ps.P(lin.a), 0.f, dxd.get());
  ForEach(total, kernels::DropoutBackwardElement{dxd.get(), dx, ps.dropout_seed, DropoutStream(layer, proj),
                                                 ps.lora.dropout, 1.f / (1.f - ps.lora.dropout)});
}

// The same with an fp32 dy (the residual stream's gradient), rounded to bf16 first.
void LinearBackwardF32(const Pass& ps, int layer, int proj, const Bf16* x, const float* dy, const Bf16* lora_u,
                       float* dx) {
  const int64_t count = static_cast<int64_t>(ps.n) * ps.layout.blocks[layer].proj[proj].out;
  Buf<Bf16> dyb(ps.ws, count);
  ToBf16(dy, dyb.get(), count);
  LinearBackward(ps, layer, proj, x, dyb.get(), lora_u, dx);
}

// y (bf16) = x / rms(x) * w per row; inv[n] = 1 / rms(x_n).
void RmsNormForward(const Pass& ps, const float* x, const Bf16* w, Bf16* y, float* inv) {
  ForEachRow(ps.n, kernels::RmsNormRow<float, Bf16, Bf16>{x, w, y, inv, ps.m.dim, ps.m.norm_eps});
}

// dx += d/dx, dw += d/dw (dw may be null: frozen) of y = x * inv * w given dy.
void RmsNormBackward(const Pass& ps, const float* x, const Bf16* w, const float* inv, const float* dy, float* dx,
                     float* dw) {
  ForEachRow(ps.n, kernels::RmsNormBackwardRow<float, Bf16>{x, w, inv, dy, dx, ps.m.dim});
  if (dw == nullptr) return;
  ForEach(ps.m.dim, kernels::RmsNormWeightGradCol<float>{x, inv, dy, dw, ps.n, ps.m.dim});
}

// RoPE on `rows` rows of `heads` heads: token-major [N, heads * hd] (rows = N), or head-major with heads = 1
// (rows = B * heads * T: row (b * heads + h) * T + t has position t).
void Rope(const Pass& ps, float* x, int64_t rows, int heads, bool inverse) {
  ForEach(rows, kernels::RopeRow<float>{x, ps.cos.get(), ps.sin.get(), ps.seq, heads, ps.hd, inverse});
}

// x [N, heads * hd] token-major -> y [B, heads, T, hd] head-major (to_heads), or back.
template <typename X, typename Y>
void Permute(const Pass& ps, const X* x, Y* y, int heads, bool to_heads) {
  ForEach(static_cast<int64_t>(ps.n) * heads * ps.hd, kernels::PermuteHeads<X, Y>{x, y, ps.seq, heads, ps.hd, to_heads});
}

// Causal grouped-query attention over head-major q, k, v: per (batch, kv head g), with the group's query heads
// as one [group * T, hd] matrix Q_g, the scores Q_g K_g^T [group * T, T] (rows (b * H + h) * T + t of [B,H,T,T]),
// the causal softmax into bf16 probabilities P_g, and P_g V_g; the output back to token-major bf16 for o_proj.
void AttentionForward(const Pass& ps, BlockActs& a) {
  const int H = ps.m.heads, KV = ps.m.kv_heads, T = ps.seq, hd = ps.hd, group = H / KV, gT = group * T;
  const int batch = ps.batch * KV;
  Buf<float> att(ps.ws, static_cast<int64_t>(ps.n) * ps.qd);  // head-major fp32
  {
    Buf<float> scores(ps.ws, a.probs.size());
    GemmBatched(false, true, gT, T, hd, 1.f, a.q.get(), hd, int64_t{gT} * hd, a.k.get(), hd, int64_t{T} * hd, 0.f,
                scores.get(), T, int64_t{gT} * T, batch);
    ForEachRow(static_cast<int64_t>(ps.batch) * H * T,
               kernels::CausalSoftmaxRow<Bf16>{scores.get(), a.probs.get(), T, ps.AttentionScale()});
  }
  GemmBatched(false, false, gT, hd, T, 1.f, a.probs.get(), T, int64_t{gT} * T, a.v.get(), hd, int64_t{T} * hd, 0.f,
              att.get(), hd, int64_t{gT} * hd, batch);
  Permute(ps, att.get(), a.att.get(), H, /*to_heads=*/false);
}

// From datt [N,QD] (fp32, token-major): dq [N,QD], dk and dv [N,KVD], bf16 token-major, the gradients w.r.t. the
// rotated q and k (RoPE's inverse applied here, head-major). Per (batch, kv head): dP = dO V^T, the softmax's
// backward into bf16 dS, then dQ = dS K, dK = dS^T Q and dV = P^T dO, each one batched product; dK and dV sum
// over the group's query heads inside the product.
void AttentionBackward(const Pass& ps, const BlockActs& a, const float* datt, Bf16* dq, Bf16* dk, Bf16* dv) {
  const int H = ps.m.heads, KV = ps.m.kv_heads, T = ps.seq, hd = ps.hd, group = H / KV, gT = group * T;
  const int batch = ps.batch * KV;
  const int64_t n = ps.n;
  Buf<float> dq32(ps.ws, n * ps.qd), dk32(ps.ws, n * ps.kvd), dv32(ps.ws, n * ps.kvd);  // head-major
  {
    Buf<Bf16> dob(ps.ws, n * ps.qd);
    Permute(ps, datt, dob.get(), H, /*to_heads=*/true);
    Buf<Bf16> dsb(ps.ws, a.probs.size());
    {
      Buf<float> ds(ps.ws, a.probs.size());
      GemmBatched(false, true, gT, T, hd, 1.f, dob.get(), hd, int64_t{gT} * hd, a.v.get(), hd, int64_t{T} * hd, 0.f,
                  ds.get(), T, int64_t{gT} * T, batch);
      ForEachRow(static_cast<int64_t>(ps.batch) * H * T,
                 kernels::CausalSoftmaxBackwardRow<Bf16, Bf16>{a.probs.get(), ds.get(), dsb.get(), T,
                                                               ps.AttentionScale()});
    }
    GemmBatched(false, false, gT, hd, T, 1.f, dsb.get(), T, int64_t{gT} * T, a.k.get(), hd, int64_t{T} * hd, 0.f,
                dq32.get(), hd, int64_t{gT} * hd, batch);
    GemmBatched(true, false, T, hd, gT, 1.f, dsb.get(), T, int64_t{gT} * T, a.q.get(), hd, int64_t{gT} * hd, 0.f,
                dk32.get(), hd, int64_t{T} * hd, batch);
    GemmBatched(true, false, T, hd, gT, 1.f, a.probs.get(), T, int64_t{gT} * T, dob.get(), hd, int64_t{gT} * hd,
                0.f, dv32.get(), hd, int64_t{T} * hd, batch);
  }
  Rope(ps, dq32.get(), static_cast<int64_t>(ps.batch) * H * T, 1, /*inverse=*/true);
  Rope(ps, dk32.get(), static_cast<int64_t>(ps.batch) * KV * T, 1, /*inverse=*/true);
  Permute(ps, dq32.get(), dq, H, /*to_heads=*/false);
  Permute(ps, dk32.get(), dk, KV, /*to_heads=*/false);
  Permute(ps, dv32.get(), dv, KV, /*to_heads=*/false);
}

// x [N,D]: the residual stream, the block's input on entry and its output on return; a: allocated.
void BlockForward(const Pass& ps, int layer, float* x, BlockActs& a) {
  const Block& blk = ps.layout.blocks[layer];
  const int64_t n = ps.n, nd = n * ps.m.dim, nf = n * ps.m.ffn;
  RmsNormForward(ps, x, ps.P(blk.ln1), a.xn1.get(), a.inv1.get());
  {
    // The products in fp32, RoPE in fp32 (token-major, as the CPU model), then bf16 head-major.
    Buf<float> q(ps.ws, n * ps.qd), k(ps.ws, n * ps.kvd), v(ps.ws, n * ps.kvd);
    LinearForward(ps, layer, kQ, a.xn1.get(), q.get(), a.lora_u[kQ].get());
    LinearForward(ps, layer, kK, a.xn1.get(), k.get(), a.lora_u[kK].get());
    LinearForward(ps, layer, kV, a.xn1.get(), v.get(), a.lora_u[kV].get());
    Rope(ps, q.get(), n, ps.m.heads, false);
    Rope(ps, k.get(), n, ps.m.kv_heads, false);
    Permute(ps, q.get(), a.q.get(), ps.m.heads, /*to_heads=*/true);
    Permute(ps, k.get(), a.k.get(), ps.m.kv_heads, /*to_heads=*/true);
    Permute(ps, v.get(), a.v.get(), ps.m.kv_heads, /*to_heads=*/true);
  }
  AttentionForward(ps, a);
  Buf<float> tmp(ps.ws, nd);  // the o and down projections' outputs
  LinearForward(ps, layer, kO, a.att.get(), tmp.get(), a.lora_u[kO].get());
  ForEach(nd, kernels::AddElement<float>{x, tmp.get()});
  CopyDevice(a.x_mid.get(), x, nd);
  RmsNormForward(ps, x, ps.P(blk.ln2), a.xn2.get(), a.inv2.get());
  LinearForward(ps, layer, kGate, a.xn2.get(), a.g.get(), a.lora_u[kGate].get());
  LinearForward(ps, layer, kUp, a.xn2.get(), a.u.get(), a.lora_u[kUp].get());
  ForEach(nf, kernels::SwiGluElement<float, Bf16>{a.g.get(), a.u.get(), a.h.get()});
  LinearForward(ps, layer, kDown, a.h.get(), tmp.get(), a.lora_u[kDown].get());
  ForEach(nd, kernels::AddElement<float>{x, tmp.get()});
}

// dx: gradient w.r.t. the block's output on entry, w.r.t. its input on return. x_in: the block's input.
// model.cc's BlockBackward, with the same temporaries in the same scopes.
void BlockBackward(const Pass& ps, int layer, const float* x_in, const BlockActs& a, float* dx) {
  const Block& blk = ps.layout.blocks[layer];
  const int64_t n = ps.n, nd = n * ps.m.dim, nf = n * ps.m.ffn;
  {  // MLP branch: x_out = x_mid + down(silu(gate(xn2)) * up(xn2)).
    Buf<Bf16> dg(ps.ws, nf), du(ps.ws, nf);
    {
      Buf<float> dh(ps.ws, nf);
      Zero(dh);
      LinearBackwardF32(ps, layer, kDown, a.h.get(), dx, a.lora_u[kDown].get(), dh.get());
      ForEach(nf, kernels::SwiGluBackwardElement<float, Bf16>{a.g.get(), a.u.get(), dh.get(), dg.get(), du.get()});
    }
    Buf<float> dxn(ps.ws, nd);
    Zero(dxn);
    LinearBackward(ps, layer, kGate, a.xn2.get(), dg.get(), a.lora_u[kGate].get(), dxn.get());
    LinearBackward(ps, layer, kUp, a.xn2.get(), du.get(), a.lora_u[kUp].get(), dxn.get());
    RmsNormBackward(ps, a.x_mid.get(), ps.P(blk.ln2), a.inv2.get(), dxn.get(), dx, ps.GradOrNull(blk.ln2));
  }
  // Attention branch: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
  Buf<Bf16> dq(ps.ws, n * ps.qd), dk(ps.ws, n * ps.kvd), dv(ps.ws, n * ps.kvd);
  {
    Buf<float> datt(ps.ws, n * ps.qd);
    Zero(datt);
    LinearBackwardF32(ps, layer, kO, a.att.get(), dx, a.lora_u[kO].get(), datt.get());
    AttentionBackward(ps, a, datt.get(), dq.get(), dk.get(), dv.get());
  }
  Buf<float> dxn(ps.ws, nd);
  Zero(dxn);
  LinearBackward(ps, layer, kQ, a.xn1.get(), dq.get(), a.lora_u[kQ].get(), dxn.get());
  LinearBackward(ps, layer, kK, a.xn1.get(), dk.get(), a.lora_u[kK].get(), dxn.get());
  LinearBackward(ps, layer, kV, a.xn1.get(), dv.get(), a.lora_u[kV].get(), dxn.get());
  RmsNormBackward(ps, x_in, ps.P(blk.ln1), a.inv1.get(), dxn.get(), dx, ps.GradOrNull(blk.ln1));
}

void MakePass(Pass* ps, const Batch& batch) {
  const std::string error = CheckConfig(ps->m, ps->lora);
  if (!error.empty()) Die(error);
  if (batch.batch <= 0 || batch.seq <= 0 || batch.tokens == nullptr) Die("empty batch or null tokens");
  if (!ps->ws->device()) Die("the CUDA model needs a device workspace (NewCudaWorkspace())");
  const ModelConfig& m = ps->m;
  for (int i = 0; i < batch.batch * batch.seq; ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= m.vocab) Die("token out of range at position " + std::to_string(i));
  }
  ps->ws->BeginPass();
  ps->batch = batch.batch;
  ps->seq = batch.seq;
  ps->n = batch.batch * batch.seq;
  ps->hd = m.dim / m.heads;
  ps->qd = m.heads * ps->hd;
  ps->kvd = m.kv_heads * ps->hd;
  ps->lora_scale = ps->lora.enabled ? ps->lora.alpha / static_cast<float>(ps->lora.r) : 0.f;
  ps->tokens = Buf<int32_t>(ps->ws, ps->n);
  Upload(ps->tokens, batch.tokens);
  if (batch.targets != nullptr) {
    ps->targets = Buf<int32_t>(ps->ws, ps->n);
    Upload(ps->targets, batch.targets);
  }
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
  ps->cos = Buf<float>(ps->ws, static_cast<int64_t>(cos.size()));
  ps->sin = Buf<float>(ps->ws, static_cast<int64_t>(sin.size()));
  Upload(ps->cos, cos.data());
  Upload(ps->sin, sin.data());
}

// model.cc's Kept: each block's input, and its activations unless recomputing.
struct Kept {
  std::vector<Buf<float>> inputs;
  std::vector<BlockActs> acts;
};

// model.cc's Blocks: the embedding and the blocks, keeping what backward needs when `kept` is given.
void Blocks(const Pass& ps, Buf<float>& x, Kept* kept, bool recompute) {
  const int D = ps.m.dim, L = ps.m.layers;
  const int64_t nd = static_cast<int64_t>(ps.n) * D;
  ps.access.Acquire(0, false);
  ForEach(ps.n, kernels::EmbedGatherRow<Bf16, float>{ps.P(ps.layout.embed), ps.tokens.get(), x.get(), D});
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
      CopyDevice(in.get(), x.get(), nd);
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

void FinalNorm(const Pass& ps, const float* x, Buf<float>* invf, Buf<Bf16>* xnf) {
  const int final_unit = ps.m.layers + 1;
  *invf = Buf<float>(ps.ws, ps.n);
  *xnf = Buf<Bf16>(ps.ws, static_cast<int64_t>(ps.n) * ps.m.dim);
  ps.access.Acquire(final_unit, false);
  RmsNormForward(ps, x, ps.P(ps.layout.norm), xnf->get(), invf->get());
  ps.access.Release(final_unit, false);
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

std::unique_ptr<Workspace> NewCudaWorkspace() { return std::make_unique<Workspace>(std::make_unique<DeviceMemory>()); }

float ForwardCuda(const ModelConfig& m, const LoraConfig& lora, CudaParamAccess& access, const Batch& batch,
                  bool backward, float loss_scale, uint64_t dropout_seed, const PassOptions& options) {
  std::unique_ptr<Workspace> own;
  Workspace* ws = options.workspace;
  if (ws == nullptr) ws = (own = NewCudaWorkspace()).get();
  const Layout layout = BuildLayout(m, lora);
  const int D = m.dim, V = m.vocab, L = m.layers;
  if (batch.targets == nullptr) Die("Forward needs targets");
  int count = 0;
  for (int n = 0; n < batch.batch * batch.seq; ++n) {
    const int32_t t = batch.targets[n];
    if (t < -1 || t >= V) Die("target out of range at position " + std::to_string(n));
    count += t >= 0;
  }
  Pass ps(m, lora, layout, access, ws);
  MakePass(&ps, batch);
  ps.training = backward;
  ps.dropout_seed = dropout_seed;
  // The workspace stack as model.cc's: x and dx below the blocks, then the blocks, the final norm, dxnf, logits.
  const int64_t nd = static_cast<int64_t>(ps.n) * D;
  Buf<float> x(ws, nd), dx;
  if (backward) dx = Buf<float>(ws, nd);
  Kept kept;
  Blocks(ps, x, backward ? &kept : nullptr, options.recompute);
  Buf<float> invf;
  Buf<Bf16> xnf;
  FinalNorm(ps, x.get(), &invf, &xnf);
  Buf<float> dxnf;
  if (backward) dxnf = Buf<float>(ws, nd);

  // Head (tied embedding): logits, then softmax in place and the loss per row (a block per row).
  Buf<float> probs(ws, static_cast<int64_t>(ps.n) * V);
  access.Acquire(0, false);
  MatMulNT(ps.n, V, D, 1.f, xnf.get(), ps.P(layout.embed), 0.f, probs.get());
  access.Release(0, false);
  double loss_sum = 0.0;
  {
    Buf<double> row_loss(ws, ps.n);
    ForEachRow(ps.n, kernels::SoftmaxXentRow{probs.get(), ps.targets.get(), row_loss.get(), V});
    std::vector<double> host(static_cast<size_t>(ps.n));
    LORA_CUDA(cudaMemcpyAsync(host.data(), row_loss.get(), host.size() * sizeof(double), cudaMemcpyDeviceToHost,
                              kStream));
    LORA_CUDA(cudaStreamSynchronize(kStream));  // the loss is the host's: one wait per pass
    for (const double l : host) loss_sum += l;
  }
  const float loss = count > 0 ? static_cast<float>(loss_sum / count) : 0.f;
  if (!backward) return loss;

  {
    // dlogits = (softmax - onehot) * loss_scale / count on counted rows, 0 elsewhere, in bf16 for the products.
    const float coef = count > 0 ? loss_scale / static_cast<float>(count) : 0.f;
    Buf<Bf16> dlogits(ws, probs.size());
    ForEachRow(ps.n, kernels::XentGradRow<Bf16>{probs.get(), dlogits.get(), ps.targets.get(), V, coef});
    access.Acquire(0, true);
    if (float* de = ps.GradOrNull(layout.embed)) MatMulTN(V, D, ps.n, 1.f, dlogits.get(), xnf.get(), 1.f, de);
    MatMulNN(ps.n, D, V, 1.f, dlogits.get(), ps.P(layout.embed), 0.f, dxnf.get());
    access.Release(0, true);
  }
  probs.Reset();

  const int final_unit = L + 1;
  Zero(dx);
  access.Acquire(final_unit, true);
  RmsNormBackward(ps, x.get(), ps.P(layout.norm), invf.get(), dxnf.get(), dx.get(), ps.GradOrNull(layout.norm));
  access.GradsReady(final_unit);
  access.Release(final_unit, true);
  dxnf.Reset();
  xnf.Reset();
  invf.Reset();

  for (int l = L - 1; l >= 0; --l) {
    const size_t i = static_cast<size_t>(l);
    access.Acquire(l + 1, true);
    if (options.recompute) {
      BlockActs a;
      a.Allocate(ps, l);
      {
        Buf<float> xs(ws, nd);
        CopyDevice(xs.get(), kept.inputs[i].get(), nd);
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
    // One thread per column: repeated tokens accumulate in position order, without atomics.
    ForEach(D, kernels::EmbedScatterCol{dx.get(), ps.tokens.get(), de, ps.n, D});
  }
  access.GradsReady(0);
  access.Release(0, true);
  return loss;
}

void LogitsCuda(const ModelConfig& m, const LoraConfig& lora, CudaParamAccess& access, const Batch& batch,
                std::vector<float>* logits, Workspace* workspace) {
  std::unique_ptr<Workspace> own;
  Workspace* ws = workspace;
  if (ws == nullptr) ws = (own = NewCudaWorkspace()).get();
  const Layout layout = BuildLayout(m, lora);
  Pass ps(m, lora, layout, access, ws);
  const Batch no_targets{batch.batch, batch.seq, batch.tokens, nullptr};
  MakePass(&ps, no_targets);
  Buf<float> x(ws, static_cast<int64_t>(ps.n) * m.dim);
  Blocks(ps, x, nullptr, false);
  Buf<float> invf;
  Buf<Bf16> xnf;
  FinalNorm(ps, x.get(), &invf, &xnf);
  Buf<float> out(ws, static_cast<int64_t>(ps.n) * m.vocab);
  access.Acquire(0, false);
  MatMulNT(ps.n, m.vocab, m.dim, 1.f, xnf.get(), ps.P(layout.embed), 0.f, out.get());
  access.Release(0, false);
  logits->resize(static_cast<size_t>(out.size()));
  LORA_CUDA(
      cudaMemcpyAsync(logits->data(), out.get(), logits->size() * sizeof(float), cudaMemcpyDeviceToHost, kStream));
  LORA_CUDA(cudaStreamSynchronize(kStream));
}

}  // namespace lora

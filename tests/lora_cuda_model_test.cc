// The LoRA example's CUDA model (model_cuda.h) against its CPU model (model.h) on the same bf16-representable
// parameters: loss, logits and every trainable gradient, for full training and for LoRA with dropout, and on two
// devices in turn from one thread (where there are two; the emulation has them); its per-block recomputation (the
// same bits as without); and its measured activation peak against zero::EstimateActivations (compute dtype bf16),
// within 10% (the bound; the estimate counts this model's buffers one by one, so the two should agree to
// the byte, as they do for the CPU model in lora_activation_test), at several batch sizes and sequence lengths, with
// and without recomputation, with the arena sized by the first pass. Runs only where a CUDA GPU is usable;
// elsewhere every case skips and says why (built without CUDA, or no GPU). Compiled a second time as
// lora_cuda_model_emulated_test against the model built for the CPU (tests/testing/fake_cuda/model_cuda_emulated.cc):
// there every case runs on every CI machine, GPU or not.
//
// Tolerances: the CPU model is fp32 throughout; the GPU rounds every matrix-product operand to bf16 (unit roundoff
// 2^-8 = 3.9e-3), the attention probabilities included, and accumulates in fp32. Each layer adds a few such
// roundings whose errors are independent, so outputs differ by a few 1e-3 relative: logits within 2e-2 of the
// largest |logit|, the loss within 1e-2 relative, each gradient tensor within 5e-2 relative in L2 norm (gradients
// pass through twice as many rounded products). Row reductions (norms, softmaxes, cross-entropy) sum in the same
// order on both (kernels::SerialRow and the GPU's block-per-row executor), so they add no difference of their own
// beyond expf's last bit. A wrong index, sign or transpose is off by O(1).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "examples/lora_finetune/model.h"
#include "examples/lora_finetune/model_cuda.h"
#include "examples/lora_finetune/model_kernels.cuh"
#include "zero/estimate.h"

#if ZERO_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace lora {
namespace {

using kernels::Bf16;

// Host parameters rounded to bf16 (so both models see identical values) and fp32 gradients.
struct HostModel {
  HostModel(const ModelConfig& m, const LoraConfig& l) : infos(Parameters(m, l)) {
    for (size_t p = 0; p < infos.size(); ++p) {
      int64_t numel = 1;
      for (int64_t d : infos[p].shape) numel *= d;
      std::vector<float> v(static_cast<size_t>(numel));
      const bool lora_b = infos[p].name.find("lora_B") != std::string::npos;
      for (int64_t i = 0; i < numel; ++i) {
        // lora_B starts at 0; make it non-zero so the adapters' gradient paths carry signal.
        const float x =
            lora_b ? 0.02f * static_cast<float>((i * 7) % 11 - 5) : InitValue(m, l, static_cast<int>(p), i, 5);
        Bf16 b;
        kernels::Store(&b, x);
        v[static_cast<size_t>(i)] = kernels::Load(b);
      }
      params.push_back(std::move(v));
      grads.emplace_back(infos[p].trainable ? params.back().size() : 0, 0.f);
    }
  }
  std::vector<ParamInfo> infos;
  std::vector<std::vector<float>> params, grads;
};

class CpuAccess : public ParamAccess {
 public:
  explicit CpuAccess(HostModel* h) : h_(h) {}
  void Acquire(int, bool) override {}
  void Release(int, bool) override {}
  void GradsReady(int) override {}
  const float* Param(int p) override { return h_->params[p].data(); }
  float* Grad(int p) override { return h_->grads[p].data(); }

 private:
  HostModel* h_;
};

#if ZERO_WITH_CUDA
void Check(cudaError_t e) { ASSERT_EQ(e, cudaSuccess) << cudaGetErrorString(e); }

// The same values on the device: bf16 parameters, fp32 gradients (zeroed).
class DeviceModel : public CudaParamAccess {
 public:
  explicit DeviceModel(const HostModel& h) {
    for (size_t p = 0; p < h.params.size(); ++p) {
      std::vector<Bf16> b(h.params[p].size());
      for (size_t i = 0; i < b.size(); ++i) kernels::Store(&b[i], h.params[p][i]);
      void* dp = nullptr;
      Check(cudaMalloc(&dp, b.size() * sizeof(Bf16)));
      Check(cudaMemcpy(dp, b.data(), b.size() * sizeof(Bf16), cudaMemcpyHostToDevice));
      params_.push_back(dp);
      float* dg = nullptr;
      if (!h.grads[p].empty()) {
        Check(cudaMalloc(reinterpret_cast<void**>(&dg), h.grads[p].size() * sizeof(float)));
        Check(cudaMemset(dg, 0, h.grads[p].size() * sizeof(float)));
      }
      grads_.push_back(dg);
      sizes_.push_back(h.grads[p].size());
    }
  }
  ~DeviceModel() override {
    for (void* p : params_) cudaFree(p);
    for (float* g : grads_) cudaFree(g);
  }
  void Acquire(int, bool) override {}
  void Release(int, bool) override {}
  void GradsReady(int) override {}
  const void* Param(int p) override { return params_[p]; }
  float* Grad(int p) override { return grads_[p]; }
  void ZeroGrads() {
    for (size_t p = 0; p < grads_.size(); ++p) {
      if (grads_[p] != nullptr) Check(cudaMemset(grads_[p], 0, sizes_[p] * sizeof(float)));
    }
  }
  std::vector<float> HostGrad(int p) const {
    std::vector<float> g(sizes_[p]);
    if (!g.empty()) Check(cudaMemcpy(g.data(), grads_[p], g.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return g;
  }

 private:
  std::vector<void*> params_;
  std::vector<float*> grads_;
  std::vector<size_t> sizes_;
};
#endif

// On `device` (current for the comparison, then device 0 again).
void CompareWithCpu(const ModelConfig& m, const LoraConfig& l, int on_device = 0) {
  std::string why;
  if (!CudaModelAvailable(&why)) GTEST_SKIP() << "needs a CUDA GPU: " << why;
#if ZERO_WITH_CUDA
  SCOPED_TRACE("device " + std::to_string(on_device));
  Check(cudaSetDevice(on_device));
  struct BackToDevice0 {
    ~BackToDevice0() { (void)cudaSetDevice(0); }
  } back;
  HostModel host(m, l);
  DeviceModel device(host);
  CpuAccess cpu(&host);
  const int batch = 2, seq = 12;
  std::vector<int32_t> tokens(batch * seq), targets(batch * seq);
  for (int i = 0; i < batch * seq; ++i) {
    tokens[i] = (i * 37 + 11) % m.vocab;
    targets[i] = i % 6 == 5 ? -1 : (i * 53 + 2) % m.vocab;
  }
  const Batch b{batch, seq, tokens.data(), targets.data()};
  const float loss_scale = 4.f;

  std::vector<float> want_logits, got_logits;
  Logits(m, l, cpu, b, &want_logits, 1);
  LogitsCuda(m, l, device, b, &got_logits);
  ASSERT_EQ(got_logits.size(), want_logits.size());
  double max_abs = 0, max_err = 0;
  for (size_t i = 0; i < want_logits.size(); ++i) {
    max_abs = std::max(max_abs, std::fabs(double{want_logits[i]}));
    max_err = std::max(max_err, std::fabs(double{got_logits[i]} - want_logits[i]));
  }
  EXPECT_LE(max_err, 2e-2 * max_abs) << "logits";

  const float want = Forward(m, l, cpu, b, /*backward=*/true, loss_scale, 9, 1);
  const float got = ForwardCuda(m, l, device, b, /*backward=*/true, loss_scale, 9);
  EXPECT_NEAR(got, want, 1e-2 * std::fabs(want)) << "loss";
  for (size_t p = 0; p < host.infos.size(); ++p) {
    if (!host.infos[p].trainable) continue;
    const std::vector<float> g = device.HostGrad(static_cast<int>(p));
    const std::vector<float>& w = host.grads[p];
    double diff = 0, norm = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      diff += (double{g[i]} - w[i]) * (double{g[i]} - w[i]);
      norm += double{w[i]} * w[i];
    }
    EXPECT_LE(std::sqrt(diff), 5e-2 * std::sqrt(norm) + 1e-6) << host.infos[p].name;
  }
#endif
}

ModelConfig SmallModel() {
  ModelConfig m;
  m.vocab = 61;
  m.dim = 48;
  m.layers = 2;
  m.heads = 6;
  m.kv_heads = 2;
  m.ffn = 80;
  return m;
}

TEST(LoraCudaModelTest, FullTrainingMatchesCpu) { CompareWithCpu(SmallModel(), LoraConfig()); }

LoraConfig AllAdaptersWithDropout() {
  LoraConfig l;
  l.enabled = true;
  l.r = 4;
  l.dropout = 0.1f;
  l.gate = l.up = l.down = true;
  return l;
}

TEST(LoraCudaModelTest, LoraWithDropoutMatchesCpu) { CompareWithCpu(SmallModel(), AllAdaptersWithDropout()); }

// Rows longer than a block's kRowLanes threads (the norms over dim, the cross-entropy over the vocabulary): each
// lane then sums several elements before the lanes combine, the path a real vocabulary (49152) always takes and
// the small model above never does on a GPU.
TEST(LoraCudaModelTest, RowsLongerThanABlockMatchCpu) {
  ModelConfig m = SmallModel();
  m.vocab = 2 * kernels::kRowLanes + 37;
  m.dim = 264;  // > kRowLanes, 6 heads of 44
  CompareWithCpu(m, AllAdaptersWithDropout());
}

// One thread, two devices in turn: a cuBLAS handle belongs to the device current when it was created, so the
// model needs one per device (a handle of device 0 driving device 1's products is refused by the stand-in, and on
// GPUs launches on the wrong device). Emulated with two stand-in devices; on a machine with one GPU it skips.
TEST(LoraCudaModelTest, OneThreadDrivesTwoDevices) {
  std::string why;
  if (!CudaModelAvailable(&why)) GTEST_SKIP() << "needs a CUDA GPU: " << why;
#if ZERO_WITH_CUDA
#if ZERO_CUDA_EMULATION
  fake_cuda::SetDeviceCount(2);
  struct OneDeviceAgain {
    ~OneDeviceAgain() { fake_cuda::SetDeviceCount(1); }
  } restore;
#endif
  int devices = 0;
  Check(cudaGetDeviceCount(&devices));
  if (devices < 2) GTEST_SKIP() << "needs two CUDA GPUs, found " << devices;
  for (int device : {0, 1, 0}) {
    CompareWithCpu(SmallModel(), LoraConfig(), device);
    if (HasFatalFailure()) return;
  }
#endif
}

// Recomputation runs the same kernels on the same inputs: the same loss and gradients, bit for bit.
TEST(LoraCudaModelTest, RecomputationGivesTheSameBits) {
  std::string why;
  if (!CudaModelAvailable(&why)) GTEST_SKIP() << "needs a CUDA GPU: " << why;
#if ZERO_WITH_CUDA
  const ModelConfig m = SmallModel();
  for (const LoraConfig& l : {LoraConfig(), AllAdaptersWithDropout()}) {
    SCOPED_TRACE(l.enabled ? "lora, dropout" : "pretraining");
    HostModel host(m, l);
    DeviceModel device(host);
    const int batch = 2, seq = 20;
    std::vector<int32_t> tokens(batch * seq), targets(batch * seq);
    for (int i = 0; i < batch * seq; ++i) {
      tokens[i] = (i * 29 + 5) % m.vocab;
      targets[i] = (i * 41 + 1) % m.vocab;
    }
    const Batch b{batch, seq, tokens.data(), targets.data()};
    std::vector<std::vector<float>> grads[2];
    float loss[2];
    for (int recompute = 0; recompute < 2; ++recompute) {
      device.ZeroGrads();
      loss[recompute] = ForwardCuda(m, l, device, b, true, 4.f, 7, PassOptions{recompute == 1, nullptr});
      for (size_t p = 0; p < host.infos.size(); ++p) grads[recompute].push_back(device.HostGrad(static_cast<int>(p)));
    }
    EXPECT_EQ(std::memcmp(&loss[0], &loss[1], sizeof(float)), 0) << loss[0] << " vs " << loss[1];
    for (size_t p = 0; p < host.infos.size(); ++p) {
      ASSERT_EQ(grads[0][p].size(), grads[1][p].size());
      EXPECT_EQ(std::memcmp(grads[0][p].data(), grads[1][p].data(), grads[0][p].size() * sizeof(float)), 0)
          << host.infos[p].name;
    }
  }
#endif
}

// The measured activation peak (the workspace's high-water mark of live bytes) against the estimate.
TEST(LoraCudaModelTest, ActivationPeakMatchesTheEstimate) {
  std::string why;
  if (!CudaModelAvailable(&why)) GTEST_SKIP() << "needs a CUDA GPU: " << why;
#if ZERO_WITH_CUDA
  const ModelConfig m = SmallModel();
  // Few and short shapes, still several of each so that the peak's dependence on both is checked. Both numbers are
  // the host's arithmetic (the workspace's accounting, the estimate), the same on a GPU as in the emulation, so
  // larger shapes there would add only launches: this case also runs under compute-sanitizer's tools on the GPU,
  // where each launch costs milliseconds.
  const std::vector<int> batches = {1, 3}, seqs = {8, 24};
  for (const LoraConfig& l : {LoraConfig(), AllAdaptersWithDropout()}) {
    HostModel host(m, l);
    DeviceModel device(host);
    for (int batch : batches) {
      for (int seq : seqs) {
        std::vector<int32_t> tokens(static_cast<size_t>(batch * seq)), targets(tokens.size());
        for (size_t i = 0; i < tokens.size(); ++i) {
          tokens[i] = static_cast<int32_t>((i * 37 + 11) % static_cast<size_t>(m.vocab));
          targets[i] = static_cast<int32_t>((i * 53 + 2) % static_cast<size_t>(m.vocab));
        }
        const Batch b{batch, seq, tokens.data(), targets.data()};
        for (bool recompute : {false, true}) {
          SCOPED_TRACE(std::string(l.enabled ? "lora" : "pretraining") + " batch " + std::to_string(batch) +
                       " seq " + std::to_string(seq) + (recompute ? " recompute" : " stored"));
          auto ws = NewCudaWorkspace();
          ForwardCuda(m, l, device, b, true, 1.f, 3, PassOptions{recompute, ws.get()});
          const int64_t outside = ws->outside_allocations();
          ws->ResetPeak();
          ForwardCuda(m, l, device, b, true, 1.f, 3, PassOptions{recompute, ws.get()});
          EXPECT_EQ(ws->outside_allocations(), outside) << "the second pass allocated outside the arena";
          zero::TransformerShape shape;
          shape.layers = m.layers;
          shape.hidden = m.dim;
          shape.heads = m.heads;
          shape.kv_heads = m.kv_heads;
          shape.ffn = m.ffn;
          shape.vocab = m.vocab;
          shape.tied = true;
          if (l.enabled) {
            shape.lora_rank = l.r;
            shape.lora_targets = 0x7f;  // all seven projections
          }
          zero::ActivationOptions o;
          o.micro_batch = batch;
          o.seq_len = seq;
          o.recompute = recompute;
          o.dtype = zero::DType::kBF16;
          o.lora_dropout = l.enabled && l.dropout > 0.f;
          zero::ActivationEstimate e;
          ASSERT_TRUE(zero::EstimateActivations(shape, o, &e).ok());
          const int64_t measured = ws->peak_bytes();
          std::printf("cuda %-11s batch %d seq %3d %-9s measured %9lld estimated %9lld ratio %.4f\n",
                      l.enabled ? "lora" : "pretraining", batch, seq, recompute ? "recompute" : "stored",
                      static_cast<long long>(measured), static_cast<long long>(e.peak),
                      static_cast<double>(e.peak) / static_cast<double>(measured));
          EXPECT_LE(std::llabs(e.peak - measured), measured / 10);
          EXPECT_EQ(ws->live_bytes(), 0);
        }
      }
    }
  }
#endif
}

}  // namespace
}  // namespace lora

// Activation memory of the LoRA example's CPU model (examples/lora_finetune/model.h), measured, against
// zero::EstimateActivations; and per-block recomputation, which must change memory and nothing else.
//   * The measurement is the model's own: every activation and temporary of a pass comes from its Workspace,
//     whose peak_bytes() is the high-water mark of the live bytes.
//   * The estimate must be within 10% of it (the bound) at several batch sizes and sequence lengths, with
//     and without recomputation, for pretraining and for LoRA with dropout. The estimate counts the model's
//     buffers one by one (src/estimate_activations.cc), so on this model the two agree to the byte, which is
//     checked too; the ratios are printed.
//   * Recomputation gives the same loss and gradients bit for bit (the same operations in the same order, dropout
//     masks hashed), and a lower peak once there are two blocks or more.
//   * The workspace is used as a stack (every buffer freed in reverse order of allocation): its extent equals the
//     live high-water mark up to alignment, and a second pass allocates nothing outside the arena.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "examples/lora_finetune/model.h"
#include "zero/estimate.h"

namespace lora {
namespace {

struct Arrays : ParamAccess {
  Arrays(const ModelConfig& m, const LoraConfig& l) : infos(Parameters(m, l)) {
    for (size_t p = 0; p < infos.size(); ++p) {
      int64_t n = 1;
      for (int64_t d : infos[p].shape) n *= d;
      std::vector<float> v(static_cast<size_t>(n));
      const bool lora_b = infos[p].name.find("lora_B") != std::string::npos;
      for (int64_t i = 0; i < n; ++i) {
        // lora_B starts at 0; non-zero values make the adapters' backward carry signal.
        v[static_cast<size_t>(i)] = lora_b ? 0.01f * static_cast<float>((i * 5) % 7 - 3)
                                           : InitValue(m, l, static_cast<int>(p), i, 3);
      }
      params.push_back(std::move(v));
      grads.emplace_back(infos[p].trainable ? params.back().size() : 0, 0.f);
    }
  }
  void Acquire(int, bool) override {}
  void Release(int, bool) override {}
  void GradsReady(int) override {}
  const float* Param(int p) override { return params[static_cast<size_t>(p)].data(); }
  float* Grad(int p) override { return grads[static_cast<size_t>(p)].data(); }
  void ZeroGrads() {
    for (auto& g : grads) std::fill(g.begin(), g.end(), 0.f);
  }
  std::vector<ParamInfo> infos;
  std::vector<std::vector<float>> params, grads;
};

struct Tokens {
  Tokens(int batch, int seq, int vocab) : tokens(static_cast<size_t>(batch * seq)), targets(tokens.size()) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = static_cast<int32_t>((i * 131 + 7) % static_cast<size_t>(vocab));
      targets[i] = i % 9 == 4 ? -1 : static_cast<int32_t>((i * 71 + 3) % static_cast<size_t>(vocab));
    }
    b = Batch{batch, seq, tokens.data(), targets.data()};
  }
  std::vector<int32_t> tokens, targets;
  Batch b;
};

ModelConfig Model() {
  ModelConfig m;
  m.vocab = 256;
  m.dim = 64;
  m.layers = 3;
  m.heads = 4;
  m.kv_heads = 2;
  m.ffn = 172;
  return m;
}

LoraConfig Adapters(bool all) {
  LoraConfig l;
  l.enabled = true;
  l.r = 8;
  l.dropout = 0.1f;
  if (all) l.gate = l.up = l.down = true;
  return l;
}

zero::TransformerShape Shape(const ModelConfig& m, const LoraConfig& l) {
  zero::TransformerShape s;
  s.layers = m.layers;
  s.hidden = m.dim;
  s.heads = m.heads;
  s.kv_heads = m.kv_heads;
  s.ffn = m.ffn;
  s.vocab = m.vocab;
  s.tied = true;
  if (l.enabled) {
    s.lora_rank = l.r;
    const bool on[7] = {l.q, l.k, l.v, l.o, l.gate, l.up, l.down};  // zero::LoraTarget's bit order
    s.lora_targets = 0;
    for (int p = 0; p < 7; ++p) s.lora_targets |= on[p] ? 1u << p : 0u;
  }
  return s;
}

int64_t Estimated(const ModelConfig& m, const LoraConfig& l, int batch, int seq, bool recompute) {
  zero::ActivationOptions o;
  o.micro_batch = batch;
  o.seq_len = seq;
  o.recompute = recompute;
  o.dtype = zero::DType::kF32;  // the CPU model computes in fp32
  o.lora_dropout = l.enabled && l.dropout > 0.f;
  zero::ActivationEstimate e;
  const zero::Status s = zero::EstimateActivations(Shape(m, l), o, &e);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return e.peak;
}

TEST(LoraActivationTest, EstimateWithinTenPercentOfMeasuredPeak) {
  const ModelConfig m = Model();
  struct Variant {
    const char* name;
    LoraConfig lora;
  };
  for (const Variant& v : {Variant{"pretraining", LoraConfig()}, Variant{"lora q,k,v,o", Adapters(false)},
                           Variant{"lora all, dropout", Adapters(true)}}) {
    Arrays params(m, v.lora);
    for (int batch : {1, 2, 4}) {
      for (int seq : {16, 64, 128}) {
        const Tokens t(batch, seq, m.vocab);
        int64_t peak[2] = {0, 0};
        for (bool recompute : {false, true}) {
          SCOPED_TRACE(std::string(v.name) + " batch " + std::to_string(batch) + " seq " + std::to_string(seq) +
                       (recompute ? " recompute" : " stored"));
          auto ws = Workspace::Host();
          Forward(m, v.lora, params, t.b, /*backward=*/true, 1.f, 5, 1, PassOptions{recompute, ws.get()});
          const int64_t measured = ws->peak_bytes();
          const int64_t estimated = Estimated(m, v.lora, batch, seq, recompute);
          peak[recompute] = measured;
          std::printf("%-18s batch %d seq %3d %-9s measured %9lld estimated %9lld ratio %.4f\n", v.name, batch, seq,
                      recompute ? "recompute" : "stored", static_cast<long long>(measured),
                      static_cast<long long>(estimated), static_cast<double>(estimated) / measured);
          EXPECT_GT(measured, 0);
          EXPECT_LE(std::llabs(estimated - measured), measured / 10);
          // Tighter than the issue asks: the formula is this model's buffers, so any drift between the two (a
          // buffer added to the model, a term changed in the estimate) shows here first.
          EXPECT_EQ(estimated, measured);
          EXPECT_EQ(ws->live_bytes(), 0);  // the pass freed everything
        }
        EXPECT_LT(peak[1], peak[0]) << "recomputation saves memory with " << m.layers << " blocks";
      }
    }
  }
}

TEST(LoraActivationTest, RecomputationGivesTheSameBits) {
  const ModelConfig m = Model();
  for (const LoraConfig& l : {LoraConfig(), Adapters(true)}) {
    SCOPED_TRACE(l.enabled ? "lora, dropout" : "pretraining");
    Arrays a(m, l), b(m, l);
    const Tokens t(2, 24, m.vocab);
    const float loss_a = Forward(m, l, a, t.b, true, 8.f, 11, 2, PassOptions{false, nullptr});
    const float loss_b = Forward(m, l, b, t.b, true, 8.f, 11, 2, PassOptions{true, nullptr});
    EXPECT_EQ(std::memcmp(&loss_a, &loss_b, sizeof(float)), 0) << loss_a << " vs " << loss_b;
    int compared = 0;
    for (size_t p = 0; p < a.infos.size(); ++p) {
      if (!a.infos[p].trainable) continue;
      ASSERT_EQ(a.grads[p].size(), b.grads[p].size());
      double norm = 0;
      for (float g : a.grads[p]) norm += double{g} * g;
      EXPECT_GT(norm, 0.0) << a.infos[p].name << ": no gradient, nothing compared";
      EXPECT_EQ(std::memcmp(a.grads[p].data(), b.grads[p].data(), a.grads[p].size() * sizeof(float)), 0)
          << a.infos[p].name;
      ++compared;
    }
    EXPECT_GT(compared, 0);
  }
}

TEST(LoraActivationTest, WorkspaceIsUsedAsAStackAndSizedOnce) {
  const ModelConfig m = Model();
  const LoraConfig l = Adapters(true);
  Arrays params(m, l);
  const Tokens t(2, 32, m.vocab);
  for (bool recompute : {false, true}) {
    auto ws = Workspace::Host();
    Forward(m, l, params, t.b, true, 1.f, 1, 1, PassOptions{recompute, ws.get()});
    const int64_t first_outside = ws->outside_allocations();
    EXPECT_GT(first_outside, 0);  // the arena starts empty: the first pass sizes it
    // Reverse-order frees leave no holes: the stack's extent is the live peak plus at most one alignment gap per
    // buffer (a pass never holds 200 at once).
    EXPECT_GE(ws->stack_peak_bytes(), ws->peak_bytes());
    EXPECT_LE(ws->stack_peak_bytes(), ws->peak_bytes() + 200 * Workspace::kAlignment);
    ws->ResetPeak();
    Forward(m, l, params, t.b, true, 1.f, 1, 1, PassOptions{recompute, ws.get()});
    EXPECT_EQ(ws->outside_allocations(), first_outside) << "the second pass fits in the arena";
    EXPECT_GE(ws->arena_bytes(), ws->stack_peak_bytes());
    // Evaluation passes hold less than training ones, and fit in the same arena.
    const int64_t train_peak = ws->peak_bytes();
    ws->ResetPeak();
    Forward(m, l, params, t.b, false, 1.f, 1, 1, PassOptions{recompute, ws.get()});
    EXPECT_LT(ws->peak_bytes(), train_peak);
    EXPECT_EQ(ws->outside_allocations(), first_outside);
  }
}

}  // namespace
}  // namespace lora

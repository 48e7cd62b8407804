// The LoRA example's model (examples/lora_finetune/model.h) over plain arrays: gradients against finite
// differences, the unit access protocol, adapter algebra (B = 0, merged weights) and a few SGD steps.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "examples/lora_finetune/model.h"

namespace lora {
namespace {

struct Event {
  char kind;  // 'A'cquire, 'R'elease, 'G'radsReady
  int unit;
  bool backward;
  bool operator==(const Event&) const = default;
};

// Parameters and gradients in one array each, with the protocol recorded and checked as it happens.
class ArrayAccess : public ParamAccess {
 public:
  ArrayAccess(const ModelConfig& m, const LoraConfig& l, uint64_t seed) : infos(Parameters(m, l)) {
    params.resize(infos.size());
    grads.resize(infos.size());
    grad_calls.assign(infos.size(), 0);
    acquired.assign(NumUnits(m), 0);
    for (size_t p = 0; p < infos.size(); ++p) {
      int64_t numel = 1;
      for (int64_t d : infos[p].shape) numel *= d;
      params[p].resize(numel);
      for (int64_t i = 0; i < numel; ++i) params[p][i] = InitValue(m, l, static_cast<int>(p), i, seed);
      if (infos[p].trainable) grads[p].assign(numel, 0.f);
    }
  }
  void Acquire(int unit, bool backward) override {
    EXPECT_EQ(acquired.at(unit), 0) << "unit " << unit << " acquired twice without a release";
    acquired[unit] = 1;
    events.push_back({'A', unit, backward});
  }
  void Release(int unit, bool backward) override {
    EXPECT_EQ(acquired.at(unit), 1) << "unit " << unit << " released but not acquired";
    acquired[unit] = 0;
    events.push_back({'R', unit, backward});
  }
  void GradsReady(int unit) override {
    EXPECT_EQ(acquired.at(unit), 1) << "GradsReady(" << unit << ") outside an acquisition";
    events.push_back({'G', unit, true});
  }
  const float* Param(int p) override {
    EXPECT_EQ(acquired.at(infos.at(p).unit), 1) << infos[p].name << " read while its unit is released";
    return params[p].data();
  }
  float* Grad(int p) override {
    ++grad_calls.at(p);
    EXPECT_EQ(acquired.at(infos[p].unit), 1) << infos[p].name << " gradient outside an acquisition";
    return infos[p].trainable ? grads[p].data() : nullptr;
  }

  int Index(const std::string& name) const {
    for (size_t p = 0; p < infos.size(); ++p) {
      if (infos[p].name == name) return static_cast<int>(p);
    }
    ADD_FAILURE() << "no parameter " << name;
    return -1;
  }
  void ZeroGrads() {
    for (auto& g : grads) std::fill(g.begin(), g.end(), 0.f);
  }
  // Every parameter random and O(1) so that every gradient is far from zero (InitValue's 0.02 and B = 0 would
  // make most gradients vanish, which a gradient check cannot tell from a bug).
  void Randomize(uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (size_t p = 0; p < infos.size(); ++p) {
      const std::string& n = infos[p].name;
      const bool norm = n.find("norm") != std::string::npos;
      const float std_dev = n.find("embed") != std::string::npos ? 1.f : 0.3f;
      for (float& v : params[p]) v = norm ? 1.f + 0.2f * normal(rng) : std_dev * normal(rng);
    }
  }

  std::vector<ParamInfo> infos;
  std::vector<std::vector<float>> params, grads;  // grads empty for frozen parameters
  std::vector<int> grad_calls;
  std::vector<int> acquired;
  std::vector<Event> events;
};

struct Data {
  std::vector<int32_t> tokens, targets;
  Batch batch{};
};

// Random tokens; targets are the next token, the last position of each sequence and a few others ignored (-1).
Data MakeData(int vocab, int batch, int seq, uint64_t seed) {
  Data d;
  std::mt19937_64 rng(seed);
  for (int i = 0; i < batch * seq; ++i) d.tokens.push_back(static_cast<int32_t>(rng() % vocab));
  for (int b = 0; b < batch; ++b) {
    for (int t = 0; t < seq; ++t) {
      const bool ignore = t == seq - 1 || (b * seq + t) % 7 == 3;
      d.targets.push_back(ignore ? -1 : d.tokens[b * seq + t + 1]);
    }
  }
  d.batch = {batch, seq, d.tokens.data(), d.targets.data()};
  return d;
}

ModelConfig Tiny() {
  ModelConfig m;
  m.vocab = 24;
  m.dim = 16;
  m.layers = 2;
  m.heads = 4;
  m.kv_heads = 2;  // grouped-query attention: two query heads per kv head
  m.ffn = 24;
  return m;
}

LoraConfig AllTargets(float dropout = 0.f) {
  LoraConfig l;
  l.enabled = true;
  l.r = 4;
  l.alpha = 8.f;
  l.dropout = dropout;
  l.gate = l.up = l.down = true;
  return l;
}

// Gradient check of every trainable parameter (up to kSamples elements each, spread evenly) against central
// differences of the fp32 loss. fd(h) has truncation error f'''h^2/6; Richardson's (4 fd(h/2) - fd(h)) / 3 cancels
// it to O(h^4). What is left is the rounding of the fp32 loss: a perturbation changes the rounding of every
// intermediate, so the loss (~3) moves by ~1e-6 on its own; divided by 2 * h/2 = 1e-2 and amplified 4/3 by the
// extrapolation that is ~1e-4 absolute (measured: at most 5e-4 where |fd| < 1). Strongly curved directions
// (gradients ~15 in the dropout case) keep a little truncation (measured: 2.4e-3 relative where |fd| > 0.1).
// Hence |analytic - fd| <= 2e-3 + 1e-2 |fd|, 4x above both, while a wrong term (a missing factor, a transposed
// index, a dropped branch) is off by O(|fd|). Returns the max relative error over elements with |fd| > 1e-2.
double GradCheck(const ModelConfig& m, const LoraConfig& l) {
  ArrayAccess acc(m, l, 7);
  acc.Randomize(11);
  const Data d = MakeData(m.vocab, 2, 6, 3);
  const uint64_t dseed = 99;
  const bool training = l.dropout > 0.f;  // with dropout: the loss of the training pass (its masks)
  Forward(m, l, acc, d.batch, true, 1.f, dseed, 2);
  const std::vector<std::vector<float>> analytic = acc.grads;
  auto loss = [&]() { return static_cast<double>(Forward(m, l, acc, d.batch, training, 1.f, dseed, 2)); };
  constexpr int kSamples = 24;
  const float h = 1e-2f;
  double max_rel = 0.0, max_rel_large = 0.0, max_abs = 0.0;
  for (size_t p = 0; p < acc.infos.size(); ++p) {
    if (!acc.infos[p].trainable) continue;
    const int64_t numel = static_cast<int64_t>(acc.params[p].size());
    const int64_t samples = std::min<int64_t>(numel, kSamples);
    double max_fd = 0.0;
    for (int64_t s = 0; s < samples; ++s) {
      const int64_t i = s * numel / samples;
      float& v = acc.params[p][i];
      const float saved = v;
      auto central = [&](float step) {
        v = saved + step;
        const double up = loss();
        v = saved - step;
        const double down = loss();
        v = saved;
        return (up - down) / (2.0 * step);
      };
      const double fd_h = central(h), fd_h2 = central(h / 2);
      const double fd = (4.0 * fd_h2 - fd_h) / 3.0;
      const double a = analytic[p][i];
      max_fd = std::max(max_fd, std::abs(fd));
      EXPECT_LE(std::abs(a - fd), 2e-3 + 1e-2 * std::abs(fd))
          << acc.infos[p].name << "[" << i << "]: analytic " << a << " finite difference " << fd;
      if (std::abs(fd) > 1e-2) max_rel = std::max(max_rel, std::abs(a - fd) / std::abs(fd));
      if (std::abs(fd) > 1e-1) max_rel_large = std::max(max_rel_large, std::abs(a - fd) / std::abs(fd));
      max_abs = std::max(max_abs, std::abs(a - fd));
    }
    EXPECT_GT(max_fd, 1e-3) << acc.infos[p].name << ": gradient vanishes, the check would prove nothing";
  }
  std::printf("max |analytic - fd| %.3g; max relative error %.3g where |fd| > 1e-2, %.3g where |fd| > 1e-1\n", max_abs,
              max_rel, max_rel_large);
  return max_rel;
}

TEST(LoraModel, ParametersFollowHuggingFaceNames) {
  ModelConfig m;
  LoraConfig l;
  std::vector<ParamInfo> base = Parameters(m, l);
  ASSERT_EQ(base.size(), 2u + 9u * m.layers);
  EXPECT_EQ(base[0].name, "model.embed_tokens.weight");
  EXPECT_EQ(base[0].shape, (std::vector<int64_t>{256, 64}));
  EXPECT_EQ(base[2].name, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(base[3].shape, (std::vector<int64_t>{32, 64}));  // k_proj: kv_heads * head_dim = 2 * 16
  EXPECT_EQ(base.back().name, "model.norm.weight");
  EXPECT_EQ(base.back().unit, m.layers + 1);
  for (const ParamInfo& p : base) EXPECT_TRUE(p.trainable) << p.name;
  l.enabled = true;
  std::vector<ParamInfo> with = Parameters(m, l);
  ASSERT_EQ(with.size(), base.size() + 8u * m.layers);  // q, k, v, o: A and B each
  int adapters = 0;
  for (const ParamInfo& p : with) {
    const bool adapter = p.name.find("lora_") != std::string::npos;
    EXPECT_EQ(p.trainable, adapter) << p.name;
    adapters += adapter;
  }
  EXPECT_EQ(adapters, 8 * m.layers);
  EXPECT_EQ(with[3].name, "model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(with[3].shape, (std::vector<int64_t>{8, 64}));
  EXPECT_EQ(with[4].name, "model.layers.0.self_attn.q_proj.lora_B.weight");
  EXPECT_EQ(with[4].shape, (std::vector<int64_t>{64, 8}));
  EXPECT_EQ(with[4].unit, 1);
  EXPECT_NE(CheckConfig(ModelConfig{.heads = 4, .kv_heads = 3}, l), "");
}

TEST(LoraModel, InitValueIsDeterministic) {
  const ModelConfig m = Tiny();
  const LoraConfig l = AllTargets();
  ArrayAccess a(m, l, 5), b(m, l, 5), c(m, l, 6);
  EXPECT_EQ(a.params, b.params);
  EXPECT_NE(a.params[0], c.params[0]);
  const int embed = a.Index("model.embed_tokens.weight");
  double ss = 0.0;
  for (float v : a.params[embed]) ss += v * v;
  EXPECT_NEAR(std::sqrt(ss / a.params[embed].size()), 0.02, 0.003);
  for (float v : a.params[a.Index("model.layers.1.post_attention_layernorm.weight")]) EXPECT_EQ(v, 1.f);
  for (float v : a.params[a.Index("model.layers.0.mlp.up_proj.lora_B.weight")]) EXPECT_EQ(v, 0.f);
  for (float v : a.params[a.Index("model.layers.0.mlp.up_proj.lora_A.weight")]) EXPECT_LE(std::abs(v), 0.25f);
}

TEST(LoraModel, GradientsMatchFiniteDifferencesPretraining) {
  const double rel = GradCheck(Tiny(), LoraConfig());
  std::printf("pretraining: max relative error %.3g\n", rel);
}

TEST(LoraModel, GradientsMatchFiniteDifferencesLora) {
  const double rel = GradCheck(Tiny(), AllTargets());
  std::printf("lora (all seven projections): max relative error %.3g\n", rel);
}

TEST(LoraModel, GradientsMatchFiniteDifferencesLoraDropout) {
  // The masks are hashed from dropout_seed, so the training pass's loss is a fixed function to differentiate.
  const double rel = GradCheck(Tiny(), AllTargets(0.25f));
  std::printf("lora with dropout 0.25: max relative error %.3g\n", rel);
}

std::vector<Event> ExpectedForward(int layers) {
  std::vector<Event> e;
  for (int u = 0; u <= layers + 1; ++u) {
    e.push_back({'A', u, false});
    e.push_back({'R', u, false});
  }
  e.push_back({'A', 0, false});
  e.push_back({'R', 0, false});
  return e;
}

TEST(LoraModel, AccessProtocol) {
  for (bool lora : {false, true}) {
    const ModelConfig m = Tiny();
    LoraConfig l = AllTargets();
    l.enabled = lora;
    ArrayAccess acc(m, l, 1);
    const Data d = MakeData(m.vocab, 2, 5, 1);
    Forward(m, l, acc, d.batch, true, 1.f, 0, 2);
    std::vector<Event> expected = ExpectedForward(m.layers);
    expected.push_back({'A', 0, true});  // the head
    expected.push_back({'R', 0, true});
    for (int u = m.layers + 1; u >= 1; --u) {
      expected.push_back({'A', u, true});
      expected.push_back({'G', u, true});
      expected.push_back({'R', u, true});
    }
    expected.push_back({'A', 0, true});  // the lookup: unit 0's last backward use
    expected.push_back({'G', 0, true});
    expected.push_back({'R', 0, true});
    EXPECT_EQ(acc.events, expected) << "lora " << lora;
    std::map<int, int> ready, acquired_unit0;
    for (const Event& e : acc.events) {
      if (e.kind == 'G') ++ready[e.unit];
      if (e.kind == 'A' && e.unit == 0) ++acquired_unit0[e.backward];
    }
    for (int u = 0; u < NumUnits(m); ++u) EXPECT_EQ(ready[u], 1) << "GradsReady(" << u << ")";
    EXPECT_EQ(acquired_unit0[0], 2);  // tied: lookup and head, in each pass
    EXPECT_EQ(acquired_unit0[1], 2);

    acc.events.clear();
    Forward(m, l, acc, d.batch, false, 1.f, 0, 2);
    EXPECT_EQ(acc.events, ExpectedForward(m.layers));
    acc.events.clear();
    std::vector<float> logits;
    Logits(m, l, acc, d.batch, &logits, 2);
    EXPECT_EQ(acc.events, ExpectedForward(m.layers));
    EXPECT_EQ(logits.size(), static_cast<size_t>(10 * m.vocab));
  }
}

TEST(LoraModel, FrozenBaseGetsNoGradient) {
  const ModelConfig m = Tiny();
  const LoraConfig l = AllTargets();
  ArrayAccess acc(m, l, 2);
  acc.Randomize(2);
  const auto before = acc.params;
  const Data d = MakeData(m.vocab, 2, 5, 2);
  Forward(m, l, acc, d.batch, true, 1.f, 0, 2);
  for (size_t p = 0; p < acc.infos.size(); ++p) {
    if (acc.infos[p].trainable) {
      EXPECT_GT(acc.grad_calls[p], 0) << acc.infos[p].name;
      EXPECT_TRUE(std::any_of(acc.grads[p].begin(), acc.grads[p].end(), [](float g) { return g != 0.f; }))
          << acc.infos[p].name;
    } else {
      EXPECT_EQ(acc.grad_calls[p], 0) << acc.infos[p].name;
    }
  }
  EXPECT_EQ(acc.params, before);
}

// Copies the base parameters of `from` (by name) into `to`; adapters of `to` keep their values.
void CopyBase(const ArrayAccess& from, ArrayAccess* to) {
  for (size_t p = 0; p < to->infos.size(); ++p) {
    if (to->infos[p].name.find("lora_") == std::string::npos)
      to->params[p] = from.params[from.Index(to->infos[p].name)];
  }
}

std::vector<float> LogitsOf(const ModelConfig& m, const LoraConfig& l, ArrayAccess& acc, const Data& d) {
  std::vector<float> out;
  Logits(m, l, acc, d.batch, &out, 2);
  return out;
}

TEST(LoraModel, ZeroAdapterEqualsBase) {
  const ModelConfig m = Tiny();
  const LoraConfig l = AllTargets();
  ArrayAccess adapted(m, l, 4), base(m, LoraConfig(), 4);  // InitValue: lora_B = 0, same base values by name
  const int a = adapted.Index("model.layers.1.self_attn.v_proj.weight");
  EXPECT_EQ(adapted.params[a], base.params[base.Index("model.layers.1.self_attn.v_proj.weight")]);
  const Data d = MakeData(m.vocab, 2, 6, 4);
  EXPECT_EQ(LogitsOf(m, l, adapted, d), LogitsOf(m, LoraConfig(), base, d));  // bitwise: W x + 0
}

TEST(LoraModel, MergedWeightsEqualAdapter) {
  const ModelConfig m = Tiny();
  const LoraConfig l = AllTargets();
  ArrayAccess adapted(m, l, 8);
  std::mt19937_64 rng(8);
  std::normal_distribution<float> normal(0.f, 0.02f);
  for (size_t p = 0; p < adapted.infos.size(); ++p) {
    if (adapted.infos[p].name.find("lora_B") != std::string::npos) {
      for (float& v : adapted.params[p]) v = normal(rng);
    }
  }
  ArrayAccess merged(m, LoraConfig(), 8);
  CopyBase(adapted, &merged);
  const Data d = MakeData(m.vocab, 2, 6, 8);
  const std::vector<float> unmerged = LogitsOf(m, LoraConfig(), merged, d);
  // W' = W + (alpha / r) B A, in double.
  const float s = l.alpha / l.r;
  for (size_t p = 0; p < merged.infos.size(); ++p) {
    const std::string& name = merged.infos[p].name;
    const std::string stem = name.substr(0, name.size() - std::string(".weight").size());
    bool has = false;
    for (const ParamInfo& info : adapted.infos) has |= info.name == stem + ".lora_A.weight";
    if (!has) continue;
    const std::vector<float>& A = adapted.params[adapted.Index(stem + ".lora_A.weight")];
    const std::vector<float>& B = adapted.params[adapted.Index(stem + ".lora_B.weight")];
    const int64_t out = merged.infos[p].shape[0], in = merged.infos[p].shape[1];
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t i = 0; i < in; ++i) {
        double acc = 0.0;
        for (int k = 0; k < l.r; ++k) acc += static_cast<double>(B[o * l.r + k]) * A[k * in + i];
        merged.params[p][o * in + i] = static_cast<float>(merged.params[p][o * in + i] + s * acc);
      }
    }
  }
  const std::vector<float> want = LogitsOf(m, l, adapted, d), got = LogitsOf(m, LoraConfig(), merged, d);
  ASSERT_EQ(want.size(), got.size());
  double max_diff = 0.0, max_change = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs(want[i] - got[i])));
    max_change = std::max(max_change, static_cast<double>(std::abs(want[i] - unmerged[i])));
  }
  EXPECT_LE(max_diff, 1e-5);
  EXPECT_GT(max_change, 1e-4) << "the adapter barely changes the logits: the comparison would prove nothing";
}

TEST(LoraModel, LossScaleScalesGradients) {
  const ModelConfig m = Tiny();
  ArrayAccess acc(m, LoraConfig(), 3);
  acc.Randomize(3);
  const Data d = MakeData(m.vocab, 2, 5, 3);
  const float l1 = Forward(m, LoraConfig(), acc, d.batch, true, 1.f, 0, 1);
  const auto g1 = acc.grads;
  acc.ZeroGrads();
  const float l2 = Forward(m, LoraConfig(), acc, d.batch, true, 1024.f, 0, 1);
  EXPECT_EQ(l1, l2);  // the returned loss is unscaled
  for (size_t p = 0; p < g1.size(); ++p) {
    for (size_t i = 0; i < g1[p].size(); ++i) {
      EXPECT_NEAR(acc.grads[p][i], 1024.f * g1[p][i], 1e-3f * 1024.f * std::abs(g1[p][i]) + 1e-6f);
    }
  }
}

// The gradient checks run tiny passes on one thread; a pass large enough for the OpenMP loops (model.cc runs them
// on one thread below ~16k elements per activation) must give the same loss and gradients on two threads.
TEST(LoraModel, ThreadsAgree) {
  ModelConfig m;  // the defaults: dim 64, ffn 172, GQA 4/2
  m.vocab = 64;
  const LoraConfig l = AllTargets(0.1f);
  const Data d = MakeData(m.vocab, 4, 64, 5);
  ArrayAccess one(m, l, 5), two(m, l, 5);
  one.Randomize(5);
  two.Randomize(5);
  const float loss1 = Forward(m, l, one, d.batch, true, 1.f, 3, 1);
  const float loss2 = Forward(m, l, two, d.batch, true, 1.f, 3, 2);
  EXPECT_NEAR(loss1, loss2, 1e-5f * std::abs(loss1));
  for (size_t p = 0; p < one.grads.size(); ++p) {
    float scale = 0.f;
    for (float g : one.grads[p]) scale = std::max(scale, std::abs(g));
    for (size_t i = 0; i < one.grads[p].size(); ++i) {
      ASSERT_NEAR(one.grads[p][i], two.grads[p][i], 1e-4f * scale) << one.infos[p].name << "[" << i << "]";
    }
  }
}

TEST(LoraModel, AllTargetsIgnoredGiveZeroLoss) {
  const ModelConfig m = Tiny();
  ArrayAccess acc(m, LoraConfig(), 3);
  Data d = MakeData(m.vocab, 1, 4, 3);
  std::fill(d.targets.begin(), d.targets.end(), -1);
  EXPECT_EQ(Forward(m, LoraConfig(), acc, d.batch, true, 1.f, 0, 1), 0.f);
  for (const auto& g : acc.grads) {
    for (float v : g) EXPECT_EQ(v, 0.f);
  }
}

// Plain SGD on one repeated batch; returns last loss / first loss and checks that frozen parameters stay put.
float Train(const ModelConfig& m, const LoraConfig& l, ArrayAccess& acc, const Data& d, float lr, int steps) {
  const auto before = acc.params;
  float first = 0.f, last = 0.f;
  for (int step = 0; step < steps; ++step) {
    acc.ZeroGrads();
    last = Forward(m, l, acc, d.batch, true, 1.f, static_cast<uint64_t>(step), 2);
    if (step == 0) first = last;
    for (size_t p = 0; p < acc.params.size(); ++p) {
      for (size_t i = 0; i < acc.grads[p].size(); ++i) acc.params[p][i] -= lr * acc.grads[p][i];
    }
  }
  for (size_t p = 0; p < acc.params.size(); ++p) {
    if (!acc.infos[p].trainable) {
      EXPECT_EQ(acc.params[p], before[p]) << acc.infos[p].name;
    }
  }
  std::printf("SGD %s: loss %.4f -> %.4f in %d steps\n", l.enabled ? "lora" : "pretraining", first, last, steps);
  return last / first;
}

// Pretraining fits a batch; then adapters on the frozen, pretrained base fit another one.
TEST(LoraModel, SgdLossFalls) {
  const ModelConfig m = Tiny();
  ArrayAccess base(m, LoraConfig(), 21);
  EXPECT_LT(Train(m, LoraConfig(), base, MakeData(m.vocab, 2, 8, 21), 1.0f, 60), 0.7f);
  const LoraConfig l = AllTargets(0.1f);
  ArrayAccess adapted(m, l, 22);
  CopyBase(base, &adapted);
  EXPECT_LT(Train(m, l, adapted, MakeData(m.vocab, 2, 8, 22), 1.0f, 60), 0.6f);
}

}  // namespace
}  // namespace lora

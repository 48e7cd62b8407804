// Units that depend on the data (BeginMicroStep with units; README "Units that depend on the data"): a small
// mixture of experts whose top-1 router sends each rank's tokens to different experts in every micro-step, trained
// at stages 0-3, with accumulation, optimizer offload and a checkpoint in the middle, at 1-4 ranks.
//
// The model (units in forward order): 0 embed [V, D]; per layer l a router unit (frozen scale s [D], router
// Wr [D, X]) followed by X expert units (W1 [D, H], W2 [H, D]); last the head [D, V]. Per token:
//   x = E[t];  per layer: r = (x * s) Wr;  e = layer 0: Route0(t) (known before the forward), layer 1: argmax r;
//   g = sigmoid(r[e]);  x += g * tanh(x W1_e) W2_e;   loss = cross-entropy(x Wh), mean over the micro-batch.
// A rank acquires only the experts its tokens reach, each once per pass in unit order, and calls GradsReady only
// for what it acquired. Its declaration is exact for layer 0 (routing by token) and every expert for layer 1 (the
// router decides during the forward), so unions of every size occur.
//
// The reference: the same model trained by a trainer that acquires every unit on every rank in a fixed order,
// without declarations (experts without tokens do no work), at the same stage: the contract under which every stage
// is checked bitwise against the unsharded reference (engine_equivalence_test; optimizer offload is bitwise the
// same as without). fp32 results must be bitwise equal to it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

constexpr int kV = 13, kD = 6, kH = 5, kX = 3, kLayers = 2;
constexpr int kGlobalTokens = 12;  // per micro-step, split evenly across 1-4 ranks
constexpr int kMicros = 2;

int EmbedUnit() { return 0; }
int RouterUnit(int l) { return 1 + l * (kX + 1); }
int ExpertUnit(int l, int e) { return RouterUnit(l) + 1 + e; }
int HeadUnit() { return 1 + kLayers * (kX + 1); }

// Parameter indices, in spec order.
struct Ids {
  int embed = 0, head = 0;
  int scale[kLayers] = {}, router[kLayers] = {}, w1[kLayers][kX] = {}, w2[kLayers][kX] = {};
};

std::vector<ParamSpec> MoeSpecs(Ids* ids) {
  std::vector<ParamSpec> specs;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, int unit, bool trainable = true) {
    specs.push_back({name, std::move(shape), unit, trainable});
    return static_cast<int>(specs.size()) - 1;
  };
  // (Names through a stream: GCC 12's -Wrestrict misfires on "literal" + std::to_string(...) chains.)
  auto name = [](int l, const char* what, int e = -1) {
    std::ostringstream os;
    os << 'l' << l;
    if (e >= 0) os << ".e" << e;
    os << '.' << what;
    return os.str();
  };
  ids->embed = add("embed", {kV, kD}, EmbedUnit());
  for (int l = 0; l < kLayers; ++l) {
    ids->scale[l] = add(name(l, "scale"), {kD}, RouterUnit(l), /*trainable=*/false);
    ids->router[l] = add(name(l, "router"), {kD, kX}, RouterUnit(l));
    for (int e = 0; e < kX; ++e) {
      ids->w1[l][e] = add(name(l, "w1", e), {kD, kH}, ExpertUnit(l, e));
      ids->w2[l][e] = add(name(l, "w2", e), {kH, kD}, ExpertUnit(l, e));
    }
  }
  ids->head = add("head", {kD, kV}, HeadUnit());
  return specs;
}

float Hash01(uint64_t z) {  // splitmix64 -> [0, 1)
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 11) / 9007199254740992.0);
}

// Initial values: small weights; scales near 1; the router of layer 1 leans against expert 2 so that in some
// micro-steps no rank routes a token there.
float MoeInit(const std::vector<ParamSpec>& specs, int p, int64_t i) {
  const std::string& name = specs[static_cast<size_t>(p)].name;
  const float u = Hash01((static_cast<uint64_t>(p) << 32) ^ static_cast<uint64_t>(i)) - 0.5f;
  if (name.find("scale") != std::string::npos) return 1.0f + 0.2f * u;
  if (name == "l1.router" && i % kX == 2) return -0.8f + 0.1f * u;
  return 0.6f * u;
}

struct Token {
  int t, y;
};

// Layer 0 routes by token: expert 2 only takes the rarest token, so that in some micro-steps no rank's tokens reach
// it (and no rank declares it).
int Route0(int t) { return t == kV - 1 ? 2 : t % 2; }

// Rank `rank`'s tokens of micro-step `micro` of step `step`.
std::vector<Token> Batch(int step, int micro, int rank, int world) {
  const int n = kGlobalTokens / world;
  std::vector<Token> out;
  for (int i = 0; i < n; ++i) {
    const uint64_t k = (static_cast<uint64_t>(step) * kMicros + micro) * kGlobalTokens + rank * n + i;
    const int t = static_cast<int>(Hash01(k * 2 + 1) * kV);
    out.push_back({t, (t * 5 + 3) % kV});
  }
  return out;
}

struct Mode {
  bool declared = true;        // BeginMicroStep with units, acquire only what the tokens reach
  bool shuffle_ready = false;  // GradsReady of a layer's experts after all of them, in another order
  bool defer_ready = false;    // every GradsReady at the end of backward (stage 3 refuses that, saying why)
};

// What a micro-step saw: the experts each rank's tokens reached (for the test's own coverage checks).
struct Seen {
  bool expert_used[kLayers][kX] = {};
};

class MoeTrainer {
 public:
  MoeTrainer(Engine* engine, const Ids& ids) : e_(engine), ids_(ids) {}

  // On Backend::kCuda the views are device memory: the model works on host mirrors, a parameter copied in at each
  // P, a gradient copied in at G (the model adds to it) and back before its unit's GradsReady.
  float* P(int p) {
    TensorView v;
    Check(e_->Param(p, &v));
    if (v.backend == Backend::kCpu) return v.as<float>();
    std::vector<float>& h = params_[p];
    h.assign(static_cast<size_t>(v.numel), 0.0f);
    if (ok_ && v.numel > 0) Check(CopyFromDevice(h.data(), v.data, v.numel * 4));
    return h.data();
  }
  float* G(int p) {
    TensorView v;
    Check(e_->Grad(p, &v));
    if (v.backend == Backend::kCpu) return v.as<float>();
    std::vector<float>& h = grads_[p];
    h.assign(static_cast<size_t>(v.numel), 0.0f);
    if (ok_ && v.numel > 0) {
      Check(CopyFromDevice(h.data(), v.data, v.numel * 4));
      dirty_[p] = v.data;
    }
    return h.data();
  }
  void Check(const Status& s) {
    if (!s.ok() && ok_) {
      ok_ = false;
      ADD_FAILURE() << s.ToString();
    }
  }
  bool ok() const { return ok_; }

  // One micro-step of forward and backward on `batch`.
  void MicroStep(int micro, bool last, const std::vector<Token>& batch, const Mode& mode, Seen* seen) {
    const int n = static_cast<int>(batch.size());
    // Layer 0's routing is known from the tokens: declare exactly the experts they reach; every layer-1 expert.
    bool used0[kX] = {};
    for (const Token& tok : batch) used0[Route0(tok.t)] = true;
    std::vector<int> declared = {EmbedUnit(), RouterUnit(0), RouterUnit(1), HeadUnit()};
    for (int e = 0; e < kX; ++e) {
      if (used0[e]) declared.push_back(ExpertUnit(0, e));
      declared.push_back(ExpertUnit(1, e));
    }
    std::sort(declared.begin(), declared.end());
    Check(mode.declared ? e_->BeginMicroStep(micro, last, declared) : e_->BeginMicroStep(micro, last));
    if (!ok_) return;

    // Forward, saving what backward needs.
    std::vector<std::vector<float>> x(kLayers + 1, std::vector<float>(static_cast<size_t>(n * kD)));
    std::vector<std::vector<float>> xs(kLayers, std::vector<float>(static_cast<size_t>(n * kD)));
    std::vector<std::vector<float>> r(kLayers, std::vector<float>(static_cast<size_t>(n * kX)));
    std::vector<std::vector<int>> route(kLayers, std::vector<int>(static_cast<size_t>(n)));
    std::vector<std::vector<float>> gate(kLayers, std::vector<float>(static_cast<size_t>(n)));
    std::vector<std::vector<float>> h(kLayers, std::vector<float>(static_cast<size_t>(n * kH)));
    std::vector<std::vector<float>> o(kLayers, std::vector<float>(static_cast<size_t>(n * kD), 0.0f));
    Acquire(EmbedUnit(), false);
    const float* E = P(ids_.embed);
    for (int i = 0; i < n && ok_; ++i) {
      for (int d = 0; d < kD; ++d) x[0][i * kD + d] = E[batch[i].t * kD + d];
    }
    Release(EmbedUnit(), false);
    for (int l = 0; l < kLayers && ok_; ++l) {
      Acquire(RouterUnit(l), false);
      const float *s = P(ids_.scale[l]), *wr = P(ids_.router[l]);
      bool reached[kX] = {};
      for (int i = 0; i < n && ok_; ++i) {
        for (int d = 0; d < kD; ++d) xs[l][i * kD + d] = x[l][i * kD + d] * s[d];
        int best = 0;
        for (int k = 0; k < kX; ++k) {
          float acc = 0;
          for (int d = 0; d < kD; ++d) acc += xs[l][i * kD + d] * wr[d * kX + k];
          r[l][i * kX + k] = acc;
          if (acc > r[l][i * kX + best]) best = k;
        }
        route[l][i] = l == 0 ? Route0(batch[i].t) : best;
        gate[l][i] = 1.0f / (1.0f + std::exp(-r[l][i * kX + route[l][i]]));
        reached[route[l][i]] = true;
      }
      Release(RouterUnit(l), false);
      x[l + 1] = x[l];
      for (int ex = 0; ex < kX && ok_; ++ex) {
        if (seen != nullptr && reached[ex]) seen->expert_used[l][ex] = true;
        if (mode.declared && !reached[ex]) continue;
        Acquire(ExpertUnit(l, ex), false);
        const float *w1 = P(ids_.w1[l][ex]), *w2 = P(ids_.w2[l][ex]);
        for (int i = 0; i < n && ok_; ++i) {
          if (route[l][i] != ex) continue;
          for (int j = 0; j < kH; ++j) {
            float acc = 0;
            for (int d = 0; d < kD; ++d) acc += x[l][i * kD + d] * w1[d * kH + j];
            h[l][i * kH + j] = std::tanh(acc);
          }
          for (int d = 0; d < kD; ++d) {
            float acc = 0;
            for (int j = 0; j < kH; ++j) acc += h[l][i * kH + j] * w2[j * kD + d];
            o[l][i * kD + d] = acc;
            x[l + 1][i * kD + d] += gate[l][i] * acc;
          }
        }
        Release(ExpertUnit(l, ex), false);
      }
    }
    // Head: loss and dlogits.
    std::vector<float> dx(static_cast<size_t>(n * kD), 0.0f);
    Acquire(HeadUnit(), false);
    std::vector<float> dlog(static_cast<size_t>(n * kV));
    {
      const float* wh = P(ids_.head);
      for (int i = 0; i < n && ok_; ++i) {
        float mx = -1e30f, z = 0;
        for (int v = 0; v < kV; ++v) {
          float acc = 0;
          for (int d = 0; d < kD; ++d) acc += x[kLayers][i * kD + d] * wh[d * kV + v];
          dlog[i * kV + v] = acc;
          mx = std::max(mx, acc);
        }
        for (int v = 0; v < kV; ++v) z += std::exp(dlog[i * kV + v] - mx);
        for (int v = 0; v < kV; ++v) {
          dlog[i * kV + v] = (std::exp(dlog[i * kV + v] - mx) / z - (v == batch[i].y ? 1.0f : 0.0f)) / n;
        }
      }
    }
    Release(HeadUnit(), false);

    // Backward, units descending.
    deferred_.clear();
    Acquire(HeadUnit(), true);
    {
      const float* wh = P(ids_.head);
      float* gwh = G(ids_.head);
      for (int i = 0; i < n && ok_; ++i) {
        for (int d = 0; d < kD; ++d) {
          float acc = 0;
          for (int v = 0; v < kV; ++v) {
            gwh[d * kV + v] += x[kLayers][i * kD + d] * dlog[i * kV + v];
            acc += wh[d * kV + v] * dlog[i * kV + v];
          }
          dx[i * kD + d] = acc;
        }
      }
    }
    Ready(HeadUnit());
    Release(HeadUnit(), true);
    for (int l = kLayers - 1; l >= 0 && ok_; --l) {
      // dx holds d loss / d x[l + 1]; the identity path passes it on, each expert adds its part.
      const std::vector<float> dnext = dx;
      std::vector<float> dr(static_cast<size_t>(n * kX), 0.0f);
      std::vector<int> done;
      for (int ex = kX - 1; ex >= 0 && ok_; --ex) {
        bool reached = false;
        for (int i = 0; i < n; ++i) reached = reached || route[l][i] == ex;
        if (mode.declared && !reached) continue;
        Acquire(ExpertUnit(l, ex), true);
        const float *w1 = P(ids_.w1[l][ex]), *w2 = P(ids_.w2[l][ex]);
        float *g1 = G(ids_.w1[l][ex]), *g2 = G(ids_.w2[l][ex]);
        for (int i = 0; i < n && ok_; ++i) {
          if (route[l][i] != ex) continue;
          float dgate = 0;
          float dh[kH];
          for (int d = 0; d < kD; ++d) dgate += dnext[i * kD + d] * o[l][i * kD + d];
          for (int j = 0; j < kH; ++j) {
            float acc = 0;
            for (int d = 0; d < kD; ++d) {
              const float dout = gate[l][i] * dnext[i * kD + d];
              g2[j * kD + d] += h[l][i * kH + j] * dout;
              acc += w2[j * kD + d] * dout;
            }
            dh[j] = acc * (1.0f - h[l][i * kH + j] * h[l][i * kH + j]);
          }
          for (int d = 0; d < kD; ++d) {
            float acc = 0;
            for (int j = 0; j < kH; ++j) {
              g1[d * kH + j] += x[l][i * kD + d] * dh[j];
              acc += w1[d * kH + j] * dh[j];
            }
            dx[i * kD + d] += acc;
          }
          const int k = route[l][i];
          dr[i * kX + k] = dgate * gate[l][i] * (1.0f - gate[l][i]);
        }
        if (mode.shuffle_ready) {
          done.push_back(ExpertUnit(l, ex));
        } else {
          Ready(ExpertUnit(l, ex));
        }
        Release(ExpertUnit(l, ex), true);
      }
      // GradsReady in another order than the reduction order (stages 0-2 only: stage 3 wants it one gather behind).
      std::reverse(done.begin(), done.end());
      for (int unit : done) Ready(unit);
      Acquire(RouterUnit(l), true);
      const float *s = P(ids_.scale[l]), *wr = P(ids_.router[l]);
      float* gr = G(ids_.router[l]);
      for (int i = 0; i < n && ok_; ++i) {
        for (int d = 0; d < kD; ++d) {
          float acc = 0;
          for (int k = 0; k < kX; ++k) {
            gr[d * kX + k] += xs[l][i * kD + d] * dr[i * kX + k];
            acc += wr[d * kX + k] * dr[i * kX + k];
          }
          dx[i * kD + d] += acc * s[d];
        }
      }
      Ready(RouterUnit(l));
      Release(RouterUnit(l), true);
    }
    Acquire(EmbedUnit(), true);
    float* ge = G(ids_.embed);
    for (int i = 0; i < n && ok_; ++i) {
      for (int d = 0; d < kD; ++d) ge[batch[i].t * kD + d] += dx[i * kD + d];
    }
    Ready(EmbedUnit());
    Release(EmbedUnit(), true);
    for (int unit : deferred_) {
      if (ok_) Check(e_->GradsReady(unit));
    }
  }

 private:
  void Acquire(int unit, bool backward) {
    if (ok_) Check(e_->Acquire(unit, backward ? Pass::kBackward : Pass::kForward));
  }
  void Release(int unit, bool backward) {
    if (ok_) Check(e_->Release(unit, backward ? Pass::kBackward : Pass::kForward));
  }
  void Ready(int unit) {
    for (auto it = dirty_.begin(); it != dirty_.end();) {  // the host mirrors of this unit's gradients, back
      if (e_->specs()[static_cast<size_t>(it->first)].unit == unit) {
        const std::vector<float>& h = grads_[it->first];
        if (ok_) Check(CopyToDevice(it->second, h.data(), static_cast<int64_t>(h.size()) * 4));
        it = dirty_.erase(it);
      } else {
        ++it;
      }
    }
    if (defer_) {
      deferred_.push_back(unit);
    } else if (ok_) {
      Check(e_->GradsReady(unit));
    }
  }

 public:
  bool defer_ = false;

 private:
  Engine* e_;
  Ids ids_;
  bool ok_ = true;
  std::vector<int> deferred_;
  std::map<int, std::vector<float>> params_, grads_;  // host mirrors (Backend::kCuda)
  std::map<int, void*> dirty_;                        // mirrored gradients not yet copied back: their device view
};

struct Config {
  Stage stage;
  bool offload;
  bool shuffle_ready;
  Backend backend = Backend::kCpu;
};

std::string Name(const ::testing::TestParamInfo<Config>& info) {
  std::ostringstream os;
  os << "stage" << static_cast<int>(info.param.stage) << (info.param.offload ? "_offload" : "")
     << (info.param.shuffle_ready ? "_any_order" : "") << (info.param.backend == Backend::kCuda ? "_cuda" : "");
  return os.str();
}

std::unique_ptr<Engine> OpenMoe(Comm* comm, Stage stage, bool offload, Ids* ids, int pool_buffers = 3,
                                Backend backend = Backend::kCpu) {
  const std::vector<ParamSpec> specs = MoeSpecs(ids);
  Options o;
  o.backend = backend;
  o.stage = stage;
  o.offload_optimizer = offload;
  o.bucket_elements = 32;  // several buckets per unit
  o.cpu_threads = 1;
  o.clip_norm = 1.0;
  o.adamw.lr = 0.05;
  o.grad_pool_buffers = pool_buffers;
  o.gather_slots = 3;
  o.prefetch_bytes = 2 * kD * kH * 4;  // about one expert ahead
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, comm, specs, &engine);
  EXPECT_TRUE(s.ok()) << s.ToString();
  if (!s.ok()) return nullptr;
  s = engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = MoeInit(specs, p, off + i);
  });
  EXPECT_TRUE(s.ok()) << s.ToString();
  return engine;
}

// Trains steps [first, last) of the schedule; `seen` (optional) collects which experts were reached per step.
void Train(Engine& engine, Comm& comm, const Ids& ids, const Mode& mode, int first, int last,
           std::vector<std::vector<Seen>>* seen = nullptr) {
  MoeTrainer trainer(&engine, ids);
  trainer.defer_ = mode.defer_ready;
  for (int step = first; step < last && trainer.ok(); ++step) {
    std::vector<Seen> per_micro(kMicros);
    for (int m = 0; m < kMicros && trainer.ok(); ++m) {
      trainer.MicroStep(m, m == kMicros - 1, Batch(step, m, comm.rank(), comm.world_size()), mode, &per_micro[m]);
    }
    if (!trainer.ok()) return;
    StepResult r;
    ZERO_EXPECT_OK(engine.Step(StepArgs(), &r));
    if (seen != nullptr) seen->push_back(per_micro);
  }
}

constexpr int kSteps = 6;

class MoeTest : public ::testing::TestWithParam<Config> {};

TEST_P(MoeTest, DeclaredUnitsTrainBitwiseLikeEveryUnitOnEveryRank) {
  const Config c = GetParam();
  ZERO_BACKEND_COMM(comm, c.backend);
  Ids ids;
  // The reference: every unit on every rank, no declaration, the same stage (and backend).
  auto dense = OpenMoe(comm.get(), c.stage, false, &ids, 3, c.backend);
  ASSERT_NE(dense, nullptr);
  Train(*dense, *comm, ids, Mode{false, false}, 0, kSteps);
  const auto want = GatherToyParams(*dense);

  auto engine = OpenMoe(comm.get(), c.stage, c.offload, &ids, 3, c.backend);
  ASSERT_NE(engine, nullptr);
  std::vector<std::vector<Seen>> seen;
  Train(*engine, *comm, ids, Mode{true, c.shuffle_ready}, 0, kSteps, &seen);
  const auto got = GatherToyParams(*engine);
  ASSERT_EQ(got.size(), want.size());
  for (size_t p = 0; p < want.size(); ++p) {
    ASSERT_EQ(got[p], want[p]) << "parameter " << engine->specs()[p].name << " (fp32: bitwise)";
  }

  // The run covered what it is about: routing that differs between micro-steps, and (with several ranks) experts
  // that no rank's tokens reached in some micro-step.
  int unreached_everywhere = 0, differs = 0;
  for (const auto& step : seen) {
    for (int l = 0; l < kLayers; ++l) {
      for (int ex = 0; ex < kX; ++ex) {
        int64_t mine = step[0].expert_used[l][ex] ? 1 : 0, any = 0;
        ZERO_ASSERT_OK(comm->AllReduce(&mine, &any, 1, DType::kI64, ReduceOp::kMax));
        unreached_everywhere += any == 0;
        differs += step[0].expert_used[l][ex] != step[1].expert_used[l][ex];
      }
    }
  }
  EXPECT_GT(unreached_everywhere, 0) << "no micro-step left an expert unused on every rank";
  EXPECT_GT(differs, 0) << "routing never changed between micro-steps";
}

INSTANTIATE_TEST_SUITE_P(Stages, MoeTest,
                         ::testing::Values(Config{Stage::kDataParallel, false, false},
                                           Config{Stage::kDataParallel, false, true},
                                           Config{Stage::kOptimizerStates, false, true},
                                           Config{Stage::kOptimizerStates, true, false},
                                           Config{Stage::kGradients, false, false},
                                           Config{Stage::kGradients, false, true},
                                           Config{Stage::kGradients, true, false},
                                           Config{Stage::kParameters, false, false},
                                           Config{Stage::kParameters, true, false},
                                           // Backend::kCuda: the union gathers and reductions on its streams.
                                           Config{Stage::kDataParallel, false, true, Backend::kCuda},
                                           Config{Stage::kOptimizerStates, true, false, Backend::kCuda},
                                           Config{Stage::kGradients, false, true, Backend::kCuda},
                                           Config{Stage::kParameters, false, false, Backend::kCuda},
                                           Config{Stage::kParameters, true, false, Backend::kCuda}),
                         Name);

// Stage 3 gathers only the union of the declarations: an expert that no rank declared costs no gather, so the
// declared run moves fewer all-gather elements than the dense one.
TEST(MoeCommTest, Stage3GathersOnlyTheDeclaredUnion) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  Ids ids;
  auto dense = OpenMoe(comm.get(), Stage::kParameters, false, &ids);
  auto declared = OpenMoe(comm.get(), Stage::kParameters, false, &ids);
  ASSERT_NE(dense, nullptr);
  ASSERT_NE(declared, nullptr);
  const CommCounters d0 = dense->comm_counters(), s0 = declared->comm_counters();
  Train(*dense, *comm, ids, Mode{false, false}, 0, 2);
  Train(*declared, *comm, ids, Mode{true, false}, 0, 2);
  const int64_t dense_gathered = dense->comm_counters().all_gather - d0.all_gather;
  const int64_t declared_gathered = declared->comm_counters().all_gather - s0.all_gather;
  EXPECT_LT(declared_gathered, dense_gathered);
  EXPECT_GT(declared_gathered, 0);
}

// A checkpoint in the middle of a declared run, loaded into an engine of another stage, continues bitwise like the
// uninterrupted run of that stage (the state is the same whatever the units were).
TEST(MoeCheckpointTest, SaveAtStage3LoadAtStage2) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  Ids ids;
  std::ostringstream dir;
  dir << ::testing::TempDir() << "/moe_ckpt_" << comm->world_size();
  const std::string root = dir.str();
  auto straight = OpenMoe(comm.get(), Stage::kGradients, false, &ids);
  ASSERT_NE(straight, nullptr);
  Train(*straight, *comm, ids, Mode{true, false}, 0, kSteps);
  const auto want = GatherToyParams(*straight);

  auto first = OpenMoe(comm.get(), Stage::kParameters, true, &ids);
  ASSERT_NE(first, nullptr);
  Train(*first, *comm, ids, Mode{true, false}, 0, kSteps / 2);
  if (comm->rank() == 0) std::filesystem::remove_all(root);
  ZERO_ASSERT_OK(comm->Barrier());
  ZERO_ASSERT_OK(first->Save(root, "half"));
  first.reset();
  auto second = OpenMoe(comm.get(), Stage::kGradients, false, &ids);
  ASSERT_NE(second, nullptr);
  ZERO_ASSERT_OK(second->Load(root));
  Train(*second, *comm, ids, Mode{true, false}, kSteps / 2, kSteps);
  EXPECT_EQ(GatherToyParams(*second), want);
}

// Stage 3 puts each unit's reduction one gather behind it: a trainer that calls every GradsReady at the end of
// backward gets a status saying what to do instead, on every rank (the others are told through the communicator),
// never a hang. Stages 0-2 take GradsReady in any order (DeclaredUnitsTrainBitwiseLikeEveryUnitOnEveryRank).
TEST(MoeProtocolTest, GradsReadyAtTheEndOfBackwardIsRefusedAtStage3NamingTheFix) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  Ids ids;
  auto engine = OpenMoe(comm.get(), Stage::kParameters, false, &ids);
  ASSERT_NE(engine, nullptr);
  ::testing::TestPartResultArray failures;
  {
    ::testing::ScopedFakeTestPartResultReporter reporter(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ALL_THREADS, &failures);
    Train(*engine, *comm, ids, Mode{true, false, true}, 0, 1);
  }
  ASSERT_GT(failures.size(), 0) << "GradsReady at the end of backward was accepted at stage 3";
  const std::string first = failures.GetTestPartResult(0).message();
  EXPECT_TRUE(first.find("before acquiring the second used unit below it for backward") != std::string::npos ||
              first.find("aborted the communicator") != std::string::npos)
      << first;
  EXPECT_FALSE(engine->healthy().ok());
}

// Stages 0-2 accept the same trainer: their reductions wait for GradsReady in reduction order. In stage 2 every unit
// waiting for its reduction holds a gradient pool buffer, so the pool must hold every unit used (here: all 10).
TEST(MoeProtocolTest, GradsReadyAtTheEndOfBackwardWorksAtStages0To2) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  Ids ids;
  for (Stage stage : {Stage::kDataParallel, Stage::kOptimizerStates, Stage::kGradients}) {
    SCOPED_TRACE(static_cast<int>(stage));
    auto dense = OpenMoe(comm.get(), stage, false, &ids);
    auto deferred = OpenMoe(comm.get(), stage, false, &ids, /*pool_buffers=*/10);
    ASSERT_NE(dense, nullptr);
    ASSERT_NE(deferred, nullptr);
    Train(*dense, *comm, ids, Mode{false, false, false}, 0, 2);
    Train(*deferred, *comm, ids, Mode{true, false, true}, 0, 2);
    EXPECT_EQ(GatherToyParams(*deferred), GatherToyParams(*dense));
  }
}

}  // namespace
}  // namespace zero::testing

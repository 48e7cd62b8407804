// The LoRA example's model trained through zero's engine (the trainer's path, in-process): fine-tuning changes
// only the adapters (the frozen base stays bit for bit), the loss falls, and the stage does not matter — stage 0
// and stage 3 give the same loss curve at the world size of this run (bitwise on the CPU backend: the reductions
// run in the same fixed ring order), and both match a one-rank run of the same global batch within fp32 noise.
// Since the suite runs at 1 and 2 ranks, that covers stages 0 and 3 at world sizes 1 and 2 against one reference.
// Merging: inside a GatherFull scope, adapters folded into their projections (merge.h) give the adapted model's
// logits, and the engine's own parameters are left untouched.
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "examples/lora_finetune/data.h"
#include "examples/lora_finetune/merge.h"
#include "examples/lora_finetune/model.h"
#include "testing/engine_harness.h"
#include "testing/mpi_env.h"

namespace zero::testing {
namespace {

lora::ModelConfig TinyModel() {
  lora::ModelConfig m;
  m.dim = 32;
  m.layers = 2;
  m.heads = 4;
  m.kv_heads = 2;
  m.ffn = 64;
  return m;
}

class ModelAccess : public lora::ParamAccess {
 public:
  explicit ModelAccess(Engine* e) : e_(e) {}
  void Acquire(int unit, bool backward) override { Check(e_->Acquire(unit, backward ? Pass::kBackward : Pass::kForward)); }
  void Release(int unit, bool backward) override { Check(e_->Release(unit, backward ? Pass::kBackward : Pass::kForward)); }
  void GradsReady(int unit) override { Check(e_->GradsReady(unit)); }
  const float* Param(int p) override { return e_->Param(p).as<float>(); }
  float* Grad(int p) override { return e_->Grad(p).as<float>(); }

 private:
  static void Check(const Status& s) { ASSERT_TRUE(s.ok()) << s.ToString(); }
  Engine* e_;
};

struct Result {
  std::vector<double> losses;                 // per step, averaged over ranks
  std::vector<std::vector<float>> params;     // every parameter after training, full
  std::vector<std::vector<float>> initial;    // every parameter after InitParams, full
};

// `steps` LoRA steps on a fixed synthetic corpus; the global batch (4 sequences per micro-step) is split over
// this run's ranks, or taken whole when `single` (a one-rank reference computed on every rank alike).
Result FineTune(Stage stage, Comm* comm, int steps, bool single) {
  const lora::ModelConfig model = TinyModel();
  lora::LoraConfig lc;
  lc.enabled = true;
  lc.r = 4;
  lc.alpha = 8;
  const std::vector<lora::ParamInfo> infos = lora::Parameters(model, lc);
  std::vector<ParamSpec> specs;
  for (const lora::ParamInfo& p : infos) specs.push_back({p.name, p.shape, p.unit, p.trainable});
  Options o;
  o.stage = stage;
  o.adamw.lr = 1e-2f;
  o.cpu_threads = 1;
  o.bucket_elements = 4096;
  std::unique_ptr<Comm> own;
  Comm* c = comm;
  if (single) {
    own = Comm::Single();
    c = own.get();
  }
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, c, specs, &engine);
  EXPECT_TRUE(s.ok()) << s.ToString();
  Result r;
  if (!s.ok()) return r;
  // The base is "pretrained" by its init; adapters start at their own init (B = 0).
  s = engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = lora::InitValue(model, lc, p, off + i, 7);
  });
  EXPECT_TRUE(s.ok()) << s.ToString();
  r.initial = GatherToyParams(*engine);
  std::vector<std::string> docs;
  EXPECT_TRUE(lora::LoadDocuments(lora::Corpus::kSynthetic, lora::CorpusOptions(), &docs).ok());
  const lora::Split split = lora::SplitDocuments(docs, 20);
  lora::SamplerOptions so;
  so.batch = single ? 4 : 4 / c->world_size();
  so.seq_len = 16;
  so.rank = c->rank();
  so.world = c->world_size();
  lora::BatchSampler sampler;
  EXPECT_TRUE(lora::BatchSampler::Create(split.train, so, &sampler).ok());
  std::vector<int32_t> in(static_cast<size_t>(so.batch * so.seq_len)), tg(in.size());
  ModelAccess access(engine.get());
  for (int step = 0; step < steps; ++step) {
    EXPECT_TRUE(engine->BeginMicroStep(0, true).ok());
    sampler.Sample(step, in.data(), tg.data());
    const lora::Batch b{static_cast<int>(so.batch), static_cast<int>(so.seq_len), in.data(), tg.data()};
    double loss = lora::Forward(model, lc, access, b, true, engine->LossScale(), 0, 1);
    StepResult res;
    s = engine->Step(StepArgs(), &res);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (!single) {
      double sum = 0;
      MPI_Allreduce(&loss, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
      loss = sum / c->world_size();
    }
    r.losses.push_back(loss);
  }
  r.params = GatherToyParams(*engine);
  for (size_t p = 0; p < infos.size(); ++p) {
    if (infos[p].trainable) continue;
    EXPECT_EQ(std::memcmp(r.params[p].data(), r.initial[p].data(), r.params[p].size() * 4), 0)
        << infos[p].name << " (frozen) changed during fine-tuning";
  }
  return r;
}

TEST(LoraEngineTest, AdaptersTrainBaseStaysAndStagesAgree) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  // The batch of 4 sequences must split evenly.
  if (4 % comm->world_size() != 0) GTEST_FAIL() << "run with 1, 2 or 4 ranks";
  constexpr int kSteps = 12;
  const Result s0 = FineTune(Stage::kDataParallel, comm.get(), kSteps, false);
  const Result s3 = FineTune(Stage::kParameters, comm.get(), kSteps, false);
  ASSERT_EQ(s0.losses.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(s3.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_LT(s3.losses.back(), s3.losses.front()) << "fine-tuning did not lower the loss";
  // Same ring order for stage 0's all-reduce and stage 3's reduce-scatter: the same bits.
  EXPECT_EQ(s0.losses, s3.losses);
  EXPECT_EQ(s0.params, s3.params);
  // Against one rank taking the whole batch: the per-rank mean losses are averaged instead of one mean over all
  // tokens (equal token counts per rank make those the same number up to rounding), and gradients are summed in
  // another order: fp32 noise, growing slowly over the steps. Bound: 1e-4 relative.
  const Result one = FineTune(Stage::kParameters, comm.get(), kSteps, true);
  for (int i = 0; i < kSteps; ++i) {
    EXPECT_NEAR(s3.losses[static_cast<size_t>(i)], one.losses[static_cast<size_t>(i)],
                1e-4 * std::abs(one.losses[static_cast<size_t>(i)]))
        << "step " << i;
  }
}

// The merge subcommand's core, per stage: full parameters from GatherFull, the adapted logits, the folded model's
// logits. The adapters are random and O(1) so that B A moves the logits (checked), which a fresh B = 0 would not.
void CheckMerge(Stage stage, Comm* comm) {
  const lora::ModelConfig model = TinyModel();
  lora::LoraConfig lc;
  lc.enabled = true;
  lc.r = 4;
  lc.alpha = 8;
  lc.gate = true;  // an MLP projection too: [ffn, dim], not square like q / o
  const std::vector<lora::ParamInfo> infos = lora::Parameters(model, lc);
  std::vector<ParamSpec> specs;
  for (const lora::ParamInfo& p : infos) specs.push_back({p.name, p.shape, p.unit, p.trainable});
  Options o;
  o.stage = stage;
  o.cpu_threads = 1;
  o.bucket_elements = 4096;
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, comm, specs, &engine);
  ASSERT_TRUE(s.ok()) << s.ToString();
  s = engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = lora::InitValue(model, lc, p, off + i, 7);
      // lora_B's init is 0: give it the magnitude of a trained adapter (a deterministic function of the index).
      const bool is_b = infos[static_cast<size_t>(p)].name.find("lora_B") != std::string::npos;
      dst[i] = is_b ? 0.05f * static_cast<float>(((off + i) * 37 + p) % 17 - 8) : v;
    }
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<std::vector<float>> before = GatherToyParams(*engine);
  std::vector<int32_t> tokens, targets;
  for (int i = 0; i < 3 * 10; ++i) tokens.push_back((i * 11 + 5) % model.vocab), targets.push_back(-1);
  const lora::Batch batch{3, 10, tokens.data(), targets.data()};

  FullParamsScope scope;
  std::vector<int> units;
  for (int u = 0; u < lora::NumUnits(model); ++u) units.push_back(u);
  ASSERT_TRUE(engine->GatherFull(units, &scope).ok());
  std::vector<const float*> adapted;
  for (size_t p = 0; p < infos.size(); ++p) adapted.push_back(engine->Param(static_cast<int>(p)).as<float>());
  lora::FullAccess adapted_access(adapted);
  std::vector<float> want, got, base_only;
  lora::Logits(model, lc, adapted_access, batch, &want, 1);
  const lora::MergedModel merged = lora::Merge(model, lc, adapted, 1);
  lora::FullAccess merged_access(merged.params);
  lora::Logits(model, lora::LoraConfig(), merged_access, batch, &got, 1);
  // The base alone: the merged layout with the unfolded projections.
  const std::vector<lora::ParamInfo> plain = lora::Parameters(model, lora::LoraConfig());
  std::vector<const float*> base_ptrs;
  int folded = 0;
  for (size_t p = 0; p < plain.size(); ++p) {
    for (size_t q = 0; q < infos.size(); ++q) {
      if (infos[q].name == plain[p].name) base_ptrs.push_back(adapted[q]);
    }
    folded += merged.folded[p].empty() ? 0 : 1;
  }
  lora::FullAccess base_access(base_ptrs);
  lora::Logits(model, lora::LoraConfig(), base_access, batch, &base_only, 1);
  ASSERT_TRUE(scope.Close().ok());
  EXPECT_EQ(folded, 5 * model.layers) << "q, k, v, o and gate of every block";

  double diff = 0, max_abs = 0, effect = 0;
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::abs(got[i] - want[i])));
    max_abs = std::max(max_abs, static_cast<double>(std::abs(want[i])));
    effect = std::max(effect, static_cast<double>(std::abs(base_only[i] - want[i])));
  }
  // Merged and adapted differ only in fp32 rounding, (W + s B A) x against W x + s B (A x): sums of <= 64 products
  // per layer, a few 2^-24 relative each; 1e-5 of the largest logit leaves an order of magnitude of headroom over
  // that (main.cc's merge uses the same bound), while a wrong fold moves logits by about `effect`.
  EXPECT_LE(diff, 1e-5 * max_abs) << "merged logits differ from adapter logits (max |logit| " << max_abs << ")";
  EXPECT_GT(effect, 1e-2 * max_abs) << "the adapter barely moves the logits: the comparison would prove nothing";
  // Merging reads the gathered parameters and writes only its copies.
  EXPECT_EQ(GatherToyParams(*engine), before) << "Merge wrote into the engine's parameters";
}

TEST(LoraEngineTest, MergedLogitsEqualAdapterLogits) {
  auto comm = WorldComm();
  ASSERT_NE(comm, nullptr);
  for (Stage stage : {Stage::kDataParallel, Stage::kParameters}) {
    SCOPED_TRACE(static_cast<int>(stage));
    CheckMerge(stage, comm.get());
  }
}

}  // namespace
}  // namespace zero::testing

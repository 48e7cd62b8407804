// zero::Estimate against the ZeRO paper's worked example and against the engine's own accounting (byte for byte,
// over stages x dtypes x optimizers x offload x world 1-4, with the toy model's frozen and tied units); Stage::kAuto
// with capacities just below and just above each configuration's need, in its order (every on-device
// configuration, stage 3 included, before any offloaded one), also when ranks see different free memory and with
// the activation estimate as its reserve; zero::EstimateActivations' parts and invariants (tests/
// lora_activation_test.cc measures it against a model); zero::PlanTraining's choice against its documented rule;
// and the out-of-memory status with its report and a suggestion that, applied, opens.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "testing/engine_harness.h"
#include "testing/mpi_env.h"
#include "zero/estimate.h"

namespace zero::testing {
namespace {

constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();

int64_t RoundUp(int64_t x, int64_t q) { return (x + q - 1) / q * q; }

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string Gb1(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", static_cast<double>(bytes) / 1e9);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// The ZeRO paper's worked example (Rajbhandari et al. 2019, section 5): mixed-precision Adam, Ψ = 7.5e9, N = 64.

struct PaperCase {
  DType grad_dtype;
  const char* gb[4];  // stages 0-3, GB = 1e9 bytes, one decimal
};

TEST(PaperExampleTest, MatchesTheZeroPaperAndDesignTable) {
  const int64_t psi = 7'500'000'000;
  const int n = 64;
  const int64_t padded = RoundUp(psi, 64 * n);  // the single bucket's padding: 1,280 elements
  for (const PaperCase& c : {PaperCase{DType::kF16, {"120.0", "31.4", "16.6", "1.9"}},
                             PaperCase{DType::kF32, {"135.0", "46.4", "16.9", "2.1"}}}) {
    const int64_t p = 2, g = static_cast<int64_t>(DTypeSize(c.grad_dtype)), k = 12;
    const int64_t exact[4] = {(p + g + k) * padded, (p + g) * padded + k * padded / n,
                              p * padded + (g + k) * padded / n, (p + g + k) * padded / n};
    for (int st = 0; st <= 3; ++st) {
      SCOPED_TRACE("stage " + std::to_string(st) + ", grad " + DTypeName(c.grad_dtype));
      Options o;
      o.stage = static_cast<Stage>(st);
      o.param_dtype = DType::kBF16;
      o.grad_dtype = c.grad_dtype;
      MemoryEstimate e;
      ZERO_ASSERT_OK(Estimate(ModelDescription::FromParamCount(psi), n, o, &e));
      EXPECT_TRUE(e.model_state_only);
      EXPECT_EQ(e.trainable_padded, padded);
      EXPECT_EQ(e.DeviceTotal(), exact[st]);
      EXPECT_EQ(Gb1(e.DeviceTotal()), c.gb[st]);
      EXPECT_EQ(e.HostTotal(), 0);
      EXPECT_NE(e.Table().find("model states only"), std::string::npos) << e.Table();
    }
  }
}

TEST(PaperExampleTest, OffloadMovesTheOptimizerToTheHost) {
  Options o;
  o.stage = Stage::kParameters;
  o.param_dtype = DType::kBF16;
  o.offload_optimizer = true;
  const int64_t padded = RoundUp(7'500'000'000, 64 * 64);
  MemoryEstimate e;
  ZERO_ASSERT_OK(Estimate(ModelDescription::FromParamCount(7'500'000'000), 64, o, &e));
  EXPECT_EQ(e.Device(MemoryCategory::kOptimizer), 0);
  EXPECT_EQ(e.Host(MemoryCategory::kOptimizer), 12 * padded / 64);
  EXPECT_EQ(e.DeviceTotal(), (2 + 4) * padded / 64);
}

// ---------------------------------------------------------------------------------------------------------------
// The model description.

TEST(TransformerSpecsTest, Llama7bHasItsParameterCount) {
  TransformerShape t;
  t.layers = 32;
  t.hidden = 4096;
  t.heads = 32;
  t.ffn = 11008;
  t.vocab = 32000;
  std::vector<ParamSpec> specs;
  ZERO_ASSERT_OK(TransformerSpecs(t, &specs));
  int64_t n = 0;
  for (const ParamSpec& p : specs) n += p.numel();
  EXPECT_EQ(n, 6'738'415'616);  // LLaMA-7B
  EXPECT_EQ(specs.size(), 1u + 32 * 9 + 2);
  EXPECT_EQ(specs.back().name, "lm_head.weight");
  EXPECT_EQ(specs.back().unit, 33);
  t.tied = true;
  specs.clear();
  ZERO_ASSERT_OK(TransformerSpecs(t, &specs));
  int64_t tied = 0;
  for (const ParamSpec& p : specs) tied += p.numel();
  EXPECT_EQ(tied, n - 32000 * 4096);
  // Grouped-query attention: k and v are hidden / heads * kv_heads wide (LLaMA-2-70B: 8 of 64 heads).
  t = TransformerShape{80, 8192, 64, 8, 28672, 32000, false, false};
  specs.clear();
  ZERO_ASSERT_OK(TransformerSpecs(t, &specs));
  n = 0;
  for (const ParamSpec& p : specs) n += p.numel();
  EXPECT_EQ(n, 68'976'648'192);  // LLaMA-2-70B
  EXPECT_EQ(specs[3].shape, (std::vector<int64_t>{1024, 8192}));  // layer 0's k_proj
}

TEST(TransformerSpecsTest, BadShapesNameTheField) {
  std::vector<ParamSpec> specs;
  TransformerShape t{2, 100, 3, 0, 8, 10, false, false};
  Status s = TransformerSpecs(t, &specs);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "heads (3) must divide hidden (100)")) << s.ToString();
  t = TransformerShape{2, 96, 12, 5, 8, 10, false, false};
  s = TransformerSpecs(t, &specs);
  EXPECT_TRUE(Contains(s, "kv_heads (5) must divide heads (12)")) << s.ToString();
  t = TransformerShape{2, 96, 12, 4, 0, 10, false, false};
  EXPECT_TRUE(Contains(TransformerSpecs(t, &specs), "ffn")) << s.ToString();
}

TEST(EstimateTest, RejectsAutoAndBadInput) {
  Options o;
  o.stage = Stage::kAuto;
  MemoryEstimate e;
  Status s = Estimate(ModelDescription::FromSpecs(ToySpecs()), 2, o, &e);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "ChooseConfiguration")) << s.ToString();
  o.stage = Stage::kGradients;
  EXPECT_EQ(Estimate(ModelDescription::FromSpecs(ToySpecs()), 0, o, &e).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Estimate(ModelDescription::FromParamCount(0), 2, o, &e).code(), StatusCode::kInvalidArgument);
  o.offload_params = true;  // needs stage 3 with offload_optimizer, as in Engine::Open
  s = Estimate(ModelDescription::FromSpecs(ToySpecs()), 2, o, &e);
  EXPECT_TRUE(Contains(s, "offload_params needs stage 3")) << s.ToString();
}

// ---------------------------------------------------------------------------------------------------------------
// Estimate == the engine's accounting, exactly.

struct Config {
  Stage stage;
  bool offload_optimizer, offload_params;
  DType param_dtype, grad_dtype;
  OptimizerKind optimizer;
  bool variant;  // small buckets, persistent units, no overlap, 3 pool buffers, 2 gather slots
};

std::string Describe(const Config& c) {
  return ConfigurationName(c.stage, c.offload_optimizer, c.offload_params) + " param " + DTypeName(c.param_dtype) +
         " grad " + DTypeName(c.grad_dtype) + (c.optimizer == OptimizerKind::kAdamW ? " adamw" : " sgd") +
         (c.variant ? " variant" : "");
}

Options ToOptions(const Config& c, Backend backend) {
  Options o;
  o.stage = c.stage;
  o.backend = backend;
  o.offload_optimizer = c.offload_optimizer;
  o.offload_params = c.offload_params;
  o.param_dtype = c.param_dtype;
  o.grad_dtype = c.grad_dtype;
  o.optimizer = c.optimizer;
  o.cpu_threads = 1;
  if (c.variant) {
    o.bucket_elements = 64;
    o.persist_bytes = 600;  // the frozen unit and the last one (R(57) elements) at 1 rank in 16 bits
    o.overlap_reductions = false;
    o.grad_pool_buffers = 3;
    o.gather_slots = 2;
  }
  return o;
}

std::vector<Config> Matrix() {
  std::vector<Config> out;
  const std::pair<DType, DType> dtypes[] = {{DType::kF32, DType::kF32},
                                             {DType::kBF16, DType::kF32},
                                             {DType::kF16, DType::kF16},
                                             {DType::kBF16, DType::kBF16},
                                             {DType::kF32, DType::kBF16}};
  for (int st = 0; st <= 3; ++st) {
    for (int off = 0; off <= 2; ++off) {
      if (off > 0 && st == 0) continue;  // stage 0 replicates the optimizer: no offload
      if (off == 2 && st != 3) continue;
      for (const auto& [pd, gd] : dtypes) {
        for (OptimizerKind opt : {OptimizerKind::kAdamW, OptimizerKind::kSgdMomentum}) {
          for (bool variant : {false, true}) {
            out.push_back({static_cast<Stage>(st), off >= 1, off == 2, pd, gd, opt, variant});
          }
        }
      }
    }
  }
  return out;
}

void ExpectSame(const MemoryReport& m, const MemoryEstimate& e) {
  for (int c = 0; c < kNumMemoryCategories; ++c) {
    const MemoryCategory cat = static_cast<MemoryCategory>(c);
    EXPECT_EQ(m.device.Current(cat), e.Device(cat)) << "device " << MemoryCategoryName(cat);
    EXPECT_EQ(m.host.Current(cat), e.Host(cat)) << "host " << MemoryCategoryName(cat);
  }
  EXPECT_EQ(m.device.peak_total, e.DeviceTotal());  // nothing beyond the planned buffers, ever
  EXPECT_EQ(m.host.peak_total, e.HostTotal());
}

class EstimateAccountingTest : public ::testing::TestWithParam<Backend> {};

TEST_P(EstimateAccountingTest, EqualsEngineAccountingAcrossTheMatrix) {
  ZERO_BACKEND_COMM(comm, GetParam());
  const int n = comm->world_size();
  int opened = 0;
  for (const Config& c : Matrix()) {
    SCOPED_TRACE(Describe(c));
    const Options o = ToOptions(c, GetParam());
    MemoryEstimate e;
    ZERO_ASSERT_OK(Estimate(ModelDescription::FromSpecs(ToySpecs()), n, o, &e));
    ASSERT_FALSE(e.model_state_only);
    int64_t items = 0;
    for (const MemoryEstimate::Item& it : e.items) items += it.bytes;
    EXPECT_EQ(items, e.DeviceTotal() + e.HostTotal());
    auto engine = OpenToyEngine(o, comm.get());
    ASSERT_NE(engine, nullptr);
    ++opened;
    {
      SCOPED_TRACE("after Open");
      ExpectSame(engine->Memory(), e);
    }
    TrainToyStep(*engine, *comm, 0, 2, 24);
    {
      SCOPED_TRACE("after a step");
      ExpectSame(engine->Memory(), e);
    }
    if (::testing::Test::HasFailure()) break;  // one configuration's diff is enough to read
  }
  EXPECT_EQ(opened, 160);
}

INSTANTIATE_TEST_SUITE_P(Backends, EstimateAccountingTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); });

// The same for a small transformer (several buckets per unit, tied head, GQA) at stage 3 and stage 2 + offload:
// the shape expansion and the estimate go through the engine too.
TEST(EstimateAccountingTest, TransformerShapeEqualsAccounting) {
  auto comm = WorldComm();
  TransformerShape t{2, 32, 4, 2, 40, 50, true, false};
  std::vector<ParamSpec> specs;
  ZERO_ASSERT_OK(TransformerSpecs(t, &specs));
  for (int which = 0; which < 2; ++which) {
    Options o;
    o.stage = which == 0 ? Stage::kParameters : Stage::kGradients;
    o.offload_optimizer = which == 1;
    o.param_dtype = DType::kBF16;
    o.bucket_elements = 1000;
    o.cpu_threads = 1;
    MemoryEstimate e;
    ZERO_ASSERT_OK(Estimate(ModelDescription::FromSpecs(specs), comm->world_size(), o, &e));
    std::unique_ptr<Engine> engine;
    ZERO_ASSERT_OK(Engine::Open(o, comm.get(), specs, &engine));
    ExpectSame(engine->Memory(), e);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Stage::kAuto.

constexpr int64_t kReserved = 4096;

Options AutoBase() {
  Options o;
  o.bucket_elements = 1 << 20;
  o.cpu_threads = 1;
  o.param_dtype = DType::kBF16;
  o.reserved_bytes = kReserved;
  return o;
}

// Every rank's (stage, offload_optimizer, offload_params) of its engine, gathered: all must be equal.
void ExpectSameChoiceEverywhere(Comm& comm, const Options& chosen) {
  const int64_t mine[3] = {static_cast<int64_t>(chosen.stage), chosen.offload_optimizer, chosen.offload_params};
  std::vector<int64_t> all(3 * static_cast<size_t>(comm.world_size()));
  CollectiveOptions co;
  co.control = true;
  ZERO_ASSERT_OK(comm.AllGather(mine, all.data(), 3, DType::kI64, co));
  for (int r = 0; r < comm.world_size(); ++r) {
    for (int k = 0; k < 3; ++k) EXPECT_EQ(all[3 * static_cast<size_t>(r) + k], mine[k]) << "rank " << r;
  }
}

// The index a correct kAuto picks for a budget: the first candidate whose need fits (by the test's own loop).
int FirstFit(const AutoChoice& all, int64_t budget) {
  for (size_t j = 0; j < all.candidates.size(); ++j) {
    if (all.candidates[j].device_bytes <= budget) return static_cast<int>(j);
  }
  return -1;
}

// Stage::kAuto's order: on the device first (stage 3 included), then offloaded.
const char* const kOrder[] = {"stage 0", "stage 1", "stage 2", "stage 3", "stage 2 + optimizer offload",
                              "stage 3 + optimizer offload", "stage 3 + parameter offload"};

// The candidates a correct kAuto can ever choose at some capacity: those needing less than every candidate before
// them in the order (bit i: candidate i).
int ChoosableSet(const AutoChoice& all) {
  int set = 0;
  int64_t least_before = kUnlimited;
  for (size_t i = 0; i < all.candidates.size(); ++i) {
    if (all.candidates[i].device_bytes < least_before) set |= 1 << i;
    least_before = std::min(least_before, all.candidates[i].device_bytes);
  }
  return set;
}

// Opens with Stage::kAuto at capacity = each candidate's need + reserve, and one byte less: the engine must pick
// the first candidate (in the documented order) whose need fits, identically on every rank, and allocate exactly
// its estimate. `toy`: the specs are the toy model's, so the chosen engine also trains a step. Returns the set of
// candidates chosen (bit i: candidate i).
int CheckAutoAtEachNeed(Comm& comm, const std::vector<ParamSpec>& specs, const Options& base, bool toy) {
  const int n = comm.world_size();
  AutoChoice all;
  EXPECT_TRUE(ChooseConfiguration(ModelDescription::FromSpecs(specs), n, base, kUnlimited, &all).ok());
  EXPECT_EQ(all.candidates.size(), 7u);
  if (all.candidates.size() != 7u) return 0;
  EXPECT_EQ(all.chosen, 0);  // unlimited memory: stage 0
  for (size_t i = 0; i < 7; ++i) {
    const AutoCandidate& c = all.candidates[i];
    EXPECT_EQ(ConfigurationName(c.stage, c.offload_optimizer, c.offload_params), kOrder[i]);
  }
  int chosen = 0, no_fit = 0;
  for (size_t i = 0; i < all.candidates.size(); ++i) {
    for (int64_t delta : {int64_t{0}, int64_t{-1}}) {
      const int64_t need = all.candidates[i].device_bytes;
      const int expected = FirstFit(all, need + delta);
      SCOPED_TRACE(std::string(kOrder[i]) + (delta == 0 ? ": capacity = need + reserve" : ": one byte less") +
                   ", expect " + (expected < 0 ? "none" : kOrder[expected]));
      Options o = base;
      o.stage = Stage::kAuto;
      o.device_capacity_bytes = need + base.reserved_bytes + delta;
      std::unique_ptr<Engine> engine;
      Status s = Engine::Open(o, &comm, specs, &engine);
      if (expected < 0) {
        ++no_fit;
        EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
        EXPECT_TRUE(Contains(s, "Stage::kAuto found no configuration that fits")) << s.ToString();
        continue;
      }
      EXPECT_TRUE(s.ok()) << s.ToString();
      if (!s.ok()) continue;
      chosen |= 1 << expected;
      const AutoCandidate& want = all.candidates[static_cast<size_t>(expected)];
      EXPECT_EQ(engine->options().stage, want.stage);
      EXPECT_EQ(engine->options().offload_optimizer, want.offload_optimizer);
      EXPECT_EQ(engine->options().offload_params, want.offload_params);
      EXPECT_EQ(engine->Memory().device.Total(), want.device_bytes);
      EXPECT_LE(engine->Memory().device.Total() + base.reserved_bytes, o.device_capacity_bytes);
      EXPECT_TRUE(Has(engine->auto_choice(), "fits, chosen")) << engine->auto_choice();
      ExpectSameChoiceEverywhere(comm, engine->options());
      if (toy && delta == 0) {
        EXPECT_TRUE(engine->InitParams([](int p, int64_t off, int64_t cnt, float* dst) {
          for (int64_t k = 0; k < cnt; ++k) dst[k] = ToyInit(p, off + k);
        }).ok());
        TrainToyStep(*engine, comm, 0, 1, 24);  // the chosen configuration trains
      }
    }
  }
  EXPECT_GE(no_fit, 1);  // the smallest configuration, one byte short, fits nowhere
  return chosen;
}

TEST(AutoTest, ChoosesTheFirstThatFitsJustAboveAndJustBelowEachNeed) {
  auto comm = WorldComm();
  const int chosen = CheckAutoAtEachNeed(*comm, ToySpecs(), AutoBase(), /*toy=*/true);
  EXPECT_NE(chosen & 1, 0);  // stage 0 at its own need
}

// A deeper model in fp32 (small units, so stage 3's gather slots are cheap): at 4 ranks stage 3 and its offloads
// become the first fits too.
TEST(AutoTest, DeepModelReachesStage3) {
  auto comm = WorldComm();
  std::vector<ParamSpec> specs;
  ZERO_ASSERT_OK(TransformerSpecs(TransformerShape{24, 32, 4, 2, 64, 64, false, false}, &specs));
  Options base = AutoBase();
  base.param_dtype = DType::kF32;
  base.bucket_elements = 4096;
  const int chosen = CheckAutoAtEachNeed(*comm, specs, base, /*toy=*/false);
  AutoChoice all;
  ZERO_ASSERT_OK(ChooseConfiguration(ModelDescription::FromSpecs(specs), comm->world_size(), base, kUnlimited, &all));
  // Each configuration that needs less than everything before it in the order is chosen at its own need, and no
  // other ever is.
  EXPECT_EQ(chosen, ChoosableSet(all));
  if (comm->world_size() == 4) {
    // Stage 3 and its offloads are reached; stage 2 + optimizer offload, which keeps full parameters, needs more
    // than stage 3 here, so stage 3 (earlier now) takes its place.
    for (int i : {0, 1, 2, 3, 5, 6}) EXPECT_NE(chosen & (1 << i), 0) << kOrder[i] << " never chosen";
    EXPECT_GT(all.candidates[4].device_bytes, all.candidates[3].device_bytes);
    EXPECT_EQ(chosen & (1 << 4), 0);
  }
}

// The decision itself, without an engine, at the ZeRO paper's scale: LLaMA-7B in fp32 on 64 ranks. Each
// capacity chooses the first configuration of the order whose need fits; stage 3 needs less than stage 2 +
// optimizer offload, so it is chosen wherever the latter would fit: an offloaded configuration only when nothing
// on the device fits.
TEST(AutoTest, EachConfigurationIsChosenAtItsNeedAtScale) {
  ModelDescription m;
  ZERO_ASSERT_OK(TransformerSpecs(TransformerShape{32, 4096, 32, 0, 11008, 32000, false, false}, &m.specs));
  Options o;
  o.reserved_bytes = int64_t{6} << 30;
  AutoChoice all;
  ZERO_ASSERT_OK(ChooseConfiguration(m, 64, o, kUnlimited, &all));
  ASSERT_EQ(all.candidates.size(), 7u);
  for (size_t i = 0; i < all.candidates.size(); ++i) {
    SCOPED_TRACE(kOrder[i]);
    EXPECT_EQ(ConfigurationName(all.candidates[i].stage, all.candidates[i].offload_optimizer,
                                all.candidates[i].offload_params),
              kOrder[i]);
    for (int64_t delta : {int64_t{0}, int64_t{-1}}) {
      AutoChoice c;
      const int64_t budget = all.candidates[i].device_bytes + delta;
      ZERO_ASSERT_OK(ChooseConfiguration(m, 64, o, budget + o.reserved_bytes, &c));
      EXPECT_EQ(c.chosen, FirstFit(all, budget));
      if (c.chosen >= 0) {
        EXPECT_EQ(c.options.stage, all.candidates[static_cast<size_t>(c.chosen)].stage);
      }
    }
  }
  // On the device, memory falls stage by stage; offload then saves more.
  for (size_t i = 1; i < 4; ++i) EXPECT_LT(all.candidates[i].device_bytes, all.candidates[i - 1].device_bytes);
  EXPECT_LT(all.candidates[3].device_bytes, all.candidates[4].device_bytes);  // stage 3 < stage 2 + offload
  EXPECT_LT(all.candidates[5].device_bytes, all.candidates[3].device_bytes);
  EXPECT_LT(all.candidates[6].device_bytes, all.candidates[5].device_bytes);
  AutoChoice c;
  ZERO_ASSERT_OK(ChooseConfiguration(m, 64, o, all.candidates[4].device_bytes + o.reserved_bytes, &c));
  EXPECT_EQ(c.chosen, 3) << "stage 3 on the device, not stage 2 + optimizer offload";
}

TEST(AutoTest, RanksWithDifferentFreeMemoryChooseAlikeFromTheMinimum) {
  auto comm = WorldComm();
  const int n = comm->world_size();
  const int rank = comm->rank();
  AutoChoice all;
  ZERO_ASSERT_OK(ChooseConfiguration(ModelDescription::FromSpecs(ToySpecs()), n, AutoBase(), kUnlimited, &all));
  const int64_t need0 = all.candidates[0].device_bytes;
  // One rank (the last, then the first) has one byte less than stage 0 needs; the others plenty.
  for (int poor : {n - 1, 0}) {
    SCOPED_TRACE("rank " + std::to_string(poor) + " has the least memory");
    Options o = AutoBase();
    o.stage = Stage::kAuto;
    o.device_capacity_bytes = rank == poor ? need0 + kReserved - 1 : need0 * 10 + int64_t{1000} * rank;
    std::unique_ptr<Engine> engine;
    ZERO_ASSERT_OK(Engine::Open(o, comm.get(), ToySpecs(), &engine));
    const int expected = FirstFit(all, need0 - 1);
    ASSERT_GE(expected, 1);
    EXPECT_EQ(engine->options().stage, all.candidates[static_cast<size_t>(expected)].stage);
    EXPECT_EQ(engine->options().offload_optimizer, all.candidates[static_cast<size_t>(expected)].offload_optimizer);
    ExpectSameChoiceEverywhere(*comm, engine->options());
    // Every rank reports the same minimum free memory it decided from.
    EXPECT_TRUE(Has(engine->auto_choice(), "smallest free memory of any rank " + FormatBytes(need0 + kReserved - 1)))
        << engine->auto_choice();
    TrainToyStep(*engine, *comm, 0, 1, 24);
  }
}

TEST(AutoTest, NeedsReservedBytesAndNoOffloadFlags) {
  auto comm = WorldComm();
  Options o = AutoBase();
  o.stage = Stage::kAuto;
  o.reserved_bytes = -1;
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "Stage::kAuto needs reserved_bytes")) << s.ToString();
  EXPECT_TRUE(Contains(s, "or activation_model")) << s.ToString();
  EXPECT_TRUE(Contains(s, "rank " + std::to_string(comm->rank()))) << s.ToString();
  o.reserved_bytes = 0;
  o.offload_optimizer = true;
  s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  EXPECT_TRUE(Contains(s, "chooses offload itself")) << s.ToString();
  // Without a capacity the CPU backend's memory is unlimited: stage 0.
  o.offload_optimizer = false;
  ZERO_ASSERT_OK(Engine::Open(o, comm.get(), ToySpecs(), &engine));
  EXPECT_EQ(engine->options().stage, Stage::kDataParallel);
  EXPECT_TRUE(Has(engine->auto_choice(), "unlimited")) << engine->auto_choice();
}

// ---------------------------------------------------------------------------------------------------------------
// Activation memory (tests/lora_activation_test.cc measures it on the LoRA example's model).

ActivationOptions Micro(int64_t batch, int64_t seq, bool recompute, DType dtype = DType::kBF16) {
  ActivationOptions a;
  a.micro_batch = batch;
  a.seq_len = seq;
  a.recompute = recompute;
  a.dtype = dtype;
  return a;
}

TEST(ActivationEstimateTest, Llama7bKeepsItsPerTokenBytes) {
  const TransformerShape t{32, 4096, 32, 0, 11008, 32000, false, false};
  const int64_t D = 4096, F = 11008, H = 32, T = 2048;
  ActivationEstimate e;
  ZERO_ASSERT_OK(EstimateActivations(t, Micro(1, T, false), &e));
  EXPECT_EQ(e.tokens, T);
  // Per token and block in bf16 (src/estimate_activations.cc): the fp32 input, x_mid and 1/rms twice (4D + 4D +
  // 8), the bf16 normed inputs, q, k, v and attention output (2D each: 2D + 6D + 2D + 2D), gate and up in fp32
  // and their product in bf16 (10F), the bf16 probabilities (2HT): about 47 D + 2HT, Korthikanti's 34 D + 5HT for
  // a GPT layer.
  EXPECT_EQ(e.block_input + e.block_kept, T * (20 * D + 10 * F + 2 * H * T + 8));
  EXPECT_EQ(e.kept, 32 * (e.block_input + e.block_kept));
  // The logits are fp32 [tokens, vocab], and their bf16 gradient beside them.
  EXPECT_EQ(e.head, 4 * T + 2 * T * D + 4 * T * D + 4 * T * 32000 + 2 * T * 32000);
  EXPECT_GE(e.peak, e.fixed + e.kept + std::max({e.block_forward_temp, e.block_backward_temp, e.head}));
  EXPECT_NE(e.Table().find("peak"), std::string::npos);
  // Recomputation keeps the blocks' inputs only, plus one block's activations at a time.
  ActivationEstimate r;
  ZERO_ASSERT_OK(EstimateActivations(t, Micro(1, T, true), &r));
  EXPECT_EQ(r.kept, 32 * 4 * T * D);
  EXPECT_EQ(r.block_kept, e.block_kept);
  EXPECT_LT(r.peak, e.peak / 4);
  EXPECT_GE(r.peak, r.fixed + r.kept + r.block_kept);
  // fp32 compute (the CPU model) stores every operand in 4 bytes and needs no narrow copies.
  ActivationEstimate f;
  ZERO_ASSERT_OK(EstimateActivations(t, Micro(1, T, false, DType::kF32), &f));
  EXPECT_EQ(f.block_input + f.block_kept, T * (32 * D + 12 * F + 4 * H * T + 8));
  EXPECT_GT(f.peak, e.peak);
}

TEST(ActivationEstimateTest, GrowsWithTheMicroBatchAndTheSequence) {
  const TransformerShape t{30, 576, 9, 3, 1536, 49152, true, false};  // SmolLM2-135M
  int64_t last = 0;
  for (int64_t b : {1, 2, 4, 8}) {
    ActivationEstimate e, twice;
    ZERO_ASSERT_OK(EstimateActivations(t, Micro(b, 512, false), &e));
    ZERO_ASSERT_OK(EstimateActivations(t, Micro(2 * b, 512, false), &twice));
    EXPECT_GT(e.peak, last);
    // Everything but the RoPE tables is per token: twice the sequences, at most twice the bytes.
    EXPECT_LE(twice.peak, 2 * e.peak);
    EXPECT_GT(twice.peak, 2 * e.peak - e.fixed);
    last = e.peak;
  }
  // The attention probabilities grow with T^2 per sequence: doubling T more than doubles a block's activations.
  ActivationEstimate s1, s2;
  ZERO_ASSERT_OK(EstimateActivations(t, Micro(1, 1024, false), &s1));
  ZERO_ASSERT_OK(EstimateActivations(t, Micro(1, 2048, false), &s2));
  EXPECT_GT(s2.block_kept, 2 * s1.block_kept);
  // LoRA adapters add their A x per targeted projection; dropout adds temporaries, not kept bytes.
  TransformerShape lora = t;
  lora.lora_rank = 16;
  ActivationOptions with_dropout = Micro(1, 1024, false);
  with_dropout.lora_dropout = true;
  ActivationEstimate l, ld;
  ZERO_ASSERT_OK(EstimateActivations(lora, Micro(1, 1024, false), &l));
  ZERO_ASSERT_OK(EstimateActivations(lora, with_dropout, &ld));
  EXPECT_EQ(l.block_kept - s1.block_kept, 4 * 2 * 1024 * 16);  // q, k, v, o: bf16 [tokens, r] each
  EXPECT_EQ(ld.block_kept, l.block_kept);
  EXPECT_GE(ld.block_backward_temp, l.block_backward_temp);
}

TEST(ActivationEstimateTest, BadInputNamesTheField) {
  ActivationEstimate e;
  Status s = EstimateActivations(TransformerShape{2, 64, 0, 0, 128, 100, false, false}, Micro(1, 16, false), &e);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "heads must be given")) << s.ToString();
  const TransformerShape t{2, 64, 4, 2, 128, 100, false, false};
  EXPECT_TRUE(Contains(EstimateActivations(t, Micro(0, 16, false), &e), "micro_batch")) << s.ToString();
  EXPECT_TRUE(Contains(EstimateActivations(t, Micro(1, 0, false), &e), "seq_len")) << s.ToString();
  EXPECT_TRUE(Contains(EstimateActivations(t, Micro(1, 8, false, DType::kI64), &e), "dtype")) << s.ToString();
  TransformerShape bad_lora = t;
  bad_lora.lora_rank = 4;
  bad_lora.lora_targets = 1u << 9;
  EXPECT_TRUE(Contains(EstimateActivations(bad_lora, Micro(1, 8, false), &e), "lora_targets")) << s.ToString();
}

TEST(TransformerSpecsTest, LoraAdaptersFreezeTheBase) {
  TransformerShape t{2, 64, 4, 2, 128, 100, true, false};
  t.lora_rank = 8;
  t.lora_targets = kLoraQ | kLoraV | kLoraDown;
  std::vector<ParamSpec> specs;
  ZERO_ASSERT_OK(TransformerSpecs(t, &specs));
  int64_t trainable = 0;
  for (const ParamSpec& p : specs) {
    const bool adapter = p.name.find("lora_") != std::string::npos;
    EXPECT_EQ(p.trainable, adapter) << p.name;
    if (p.trainable) trainable += p.numel();
  }
  // q: A [8, 64], B [64, 8]; v: A [8, 64], B [32, 8]; down: A [8, 128], B [64, 8]; per layer.
  EXPECT_EQ(trainable, 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8 + 8 * 128 + 64 * 8));
  EXPECT_EQ(specs[3].name, "model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(specs[3].unit, 1);
}

// Stage::kAuto reserves the activation estimate when Options::activation_model is given, with reserved_bytes
// (not given here) only for anything else.
TEST(AutoTest, ReservesTheActivationEstimate) {
  auto comm = WorldComm();
  const int n = comm->world_size();
  const TransformerShape t{4, 32, 4, 2, 64, 64, true, false};
  std::vector<ParamSpec> specs;
  ZERO_ASSERT_OK(TransformerSpecs(t, &specs));
  Options o = AutoBase();
  o.param_dtype = DType::kF32;
  o.bucket_elements = 4096;
  o.reserved_bytes = -1;
  o.activation_model = t;
  o.activation_options = Micro(2, 32, false, DType::kF32);
  ActivationEstimate act;
  ZERO_ASSERT_OK(EstimateActivations(t, o.activation_options, &act));
  AutoChoice all;
  ZERO_ASSERT_OK(ChooseConfiguration(ModelDescription::FromSpecs(specs), n, o, kUnlimited, &all));
  EXPECT_EQ(all.activation_bytes, act.peak);
  EXPECT_EQ(all.reserved_bytes, act.peak);
  for (size_t i : {size_t{0}, size_t{2}}) {
    // Capacity = the candidate's need + the activation estimate: kAuto (no reserved_bytes given) picks it, or an
    // earlier one that needs no more; one byte less and it does not.
    const int64_t need = all.candidates[i].device_bytes;
    for (int64_t delta : {int64_t{0}, int64_t{-1}}) {
      Options a = o;
      a.stage = Stage::kAuto;
      a.device_capacity_bytes = need + act.peak + delta;
      std::unique_ptr<Engine> engine;
      ZERO_ASSERT_OK(Engine::Open(a, comm.get(), specs, &engine));
      const int want = FirstFit(all, need + delta);
      ASSERT_GE(want, 0);
      EXPECT_EQ(engine->options().stage, all.candidates[static_cast<size_t>(want)].stage) << kOrder[i] << delta;
      EXPECT_TRUE(Has(engine->auto_choice(), "activation estimate " + FormatBytes(act.peak))) << engine->auto_choice();
      EXPECT_LE(engine->Memory().device.Total() + act.peak, a.device_capacity_bytes);
    }
  }
  // reserved_bytes, when given too, adds to the estimate.
  o.reserved_bytes = 1000;
  AutoChoice both;
  ZERO_ASSERT_OK(ChooseConfiguration(ModelDescription::FromSpecs(specs), n, o, int64_t{1} << 30, &both));
  EXPECT_EQ(both.reserved_bytes, act.peak + 1000);
  EXPECT_EQ(both.budget, (int64_t{1} << 30) - act.peak - 1000);
}

// ---------------------------------------------------------------------------------------------------------------
// PlanTraining: the whole answer.

// PlanTraining's rule (estimate.h), restated: the key a chosen candidate minimizes.
std::tuple<int, int, int, int, int64_t> RuleKey(const TrainingCandidate& c, int order) {
  return {c.offload_optimizer ? 1 : 0, c.efficient ? 0 : 1, c.recompute ? 1 : 0, order, -c.micro_batch};
}

// Checks a plan against everything PlanTraining promises, recomputing each number independently.
void CheckPlan(const TrainingRequest& req, const TrainingPlan& plan) {
  ModelDescription model;
  ZERO_ASSERT_OK(TransformerSpecs(req.shape, &model.specs));
  const int64_t per_rank = req.global_batch / req.world_size;
  EXPECT_EQ(plan.per_rank_batch, per_rank);
  ASSERT_EQ(plan.candidates.size(), 14u);  // 7 configurations x recompute off, on
  int best = -1;
  for (size_t i = 0; i < plan.candidates.size(); ++i) {
    const TrainingCandidate& c = plan.candidates[i];
    SCOPED_TRACE(ConfigurationName(c.stage, c.offload_optimizer, c.offload_params) +
                 (c.recompute ? " recompute" : " stored"));
    EXPECT_EQ(ConfigurationName(c.stage, c.offload_optimizer, c.offload_params), kOrder[i / 2]);
    EXPECT_EQ(c.recompute, i % 2 == 1);
    Options o = req.options;
    o.stage = c.stage;
    o.offload_optimizer = c.offload_optimizer;
    o.offload_params = c.offload_params;
    MemoryEstimate states;
    ZERO_ASSERT_OK(Estimate(model, req.world_size, o, &states));
    EXPECT_EQ(c.model_state_bytes, states.DeviceTotal());
    // The micro-batch is the largest divisor of the per-rank batch that fits.
    auto fits = [&](int64_t b) {
      ActivationOptions a = req.activations;
      a.micro_batch = b;
      a.recompute = c.recompute;
      ActivationEstimate e;
      EXPECT_TRUE(EstimateActivations(req.shape, a, &e).ok());
      return states.DeviceTotal() + e.peak <= plan.budget;
    };
    for (int64_t b = per_rank; b > c.micro_batch; --b) {
      if (per_rank % b == 0) {
        EXPECT_FALSE(fits(b)) << "micro-batch " << b << " fits but " << c.micro_batch << " taken";
      }
    }
    if (c.micro_batch == 0) continue;
    EXPECT_TRUE(fits(c.micro_batch));
    EXPECT_EQ(c.micro_batch * c.accumulation_steps * req.world_size, req.global_batch);
    if (best < 0 || RuleKey(c, static_cast<int>(i / 2)) <
                        RuleKey(plan.candidates[static_cast<size_t>(best)], best / 2)) {
      best = static_cast<int>(i);
    }
  }
  EXPECT_EQ(plan.chosen, best);
  if (best < 0) return;
  const TrainingCandidate& c = plan.candidates[static_cast<size_t>(best)];
  EXPECT_EQ(plan.options.stage, c.stage);
  EXPECT_EQ(plan.options.offload_optimizer, c.offload_optimizer);
  EXPECT_EQ(plan.options.activation_options.micro_batch, c.micro_batch);
  EXPECT_EQ(plan.options.activation_options.recompute, c.recompute);
  EXPECT_NE(plan.Explain().find("<- chosen"), std::string::npos) << plan.Explain();
  // Stage::kAuto, reserving this micro-batch's activations, lands on the same configuration.
  Options auto_options = plan.options;
  auto_options.stage = Stage::kAuto;
  auto_options.offload_optimizer = auto_options.offload_params = false;
  AutoChoice choice;
  ZERO_ASSERT_OK(ChooseConfiguration(model, req.world_size, auto_options, req.device_bytes, &choice));
  ASSERT_GE(choice.chosen, 0);
  EXPECT_EQ(choice.options.stage, c.stage);
  EXPECT_EQ(choice.options.offload_optimizer, c.offload_optimizer);
  EXPECT_EQ(choice.options.offload_params, c.offload_params);
}

TrainingRequest Request(const TransformerShape& t, int world, int64_t global_batch, int64_t seq, int64_t device) {
  TrainingRequest r;
  r.shape = t;
  r.world_size = world;
  r.global_batch = global_batch;
  r.activations.seq_len = seq;
  r.device_bytes = device;
  r.options.param_dtype = DType::kBF16;
  r.options.backend = Backend::kCuda;
  return r;
}

// From more memory than anything needs down to less than the smallest configuration: at each size the plan is the
// rule's choice among the candidates that fit, and the choice moves as the guides' tables do: stage 0 with the
// whole batch at once, then smaller micro-batches, recomputation, higher stages, offload, nothing.
TEST(PlanTrainingTest, FollowsItsRuleAtEveryDeviceSize) {
  const TransformerShape llama7b{32, 4096, 32, 0, 11008, 32000, false, false};
  for (int world : {1, 8}) {
    int64_t last_chosen_key_offload = 0;
    bool saw_recompute = false, saw_offload = false, saw_nothing = false, saw_full_batch = false;
    for (int64_t gib = 1024; gib >= 1; gib = gib * 3 / 4) {
      SCOPED_TRACE("world " + std::to_string(world) + ", " + std::to_string(gib) + " GiB");
      const TrainingRequest req = Request(llama7b, world, 16 * world, 2048, gib << 30);
      TrainingPlan plan;
      ZERO_ASSERT_OK(PlanTraining(req, &plan));
      CheckPlan(req, plan);
      if (::testing::Test::HasFailure()) return;
      if (plan.chosen < 0) {
        saw_nothing = true;
        continue;
      }
      const TrainingCandidate& c = plan.candidates[static_cast<size_t>(plan.chosen)];
      saw_full_batch |= c.stage == Stage::kDataParallel && c.accumulation_steps == 1 && !c.recompute;
      saw_recompute |= c.recompute;
      saw_offload |= c.offload_optimizer;
      // Less memory never brings offload back off.
      EXPECT_GE(c.offload_optimizer ? 1 : 0, last_chosen_key_offload);
      last_chosen_key_offload = c.offload_optimizer ? 1 : 0;
    }
    EXPECT_TRUE(saw_full_batch);
    EXPECT_TRUE(saw_recompute);
    EXPECT_TRUE(saw_nothing);
    if (world == 8) {
      EXPECT_TRUE(saw_offload);
    }
  }
}

TEST(PlanTrainingTest, ShortSequencesPreferAnEfficientMicroBatch) {
  // 128-token sequences: a micro-batch of 2 (256 tokens) is below the 2048-token rule of thumb, so a larger one
  // with recomputation, or at a higher stage, wins when it fits.
  const TransformerShape t{24, 2048, 32, 32, 8192, 49152, true, false};  // SmolLM2-1.7B
  bool saw_efficient_recompute = false;
  for (int64_t gib = 64; gib >= 4; gib -= 2) {
    const TrainingRequest req = Request(t, 4, 4 * 64, 128, gib << 30);
    TrainingPlan plan;
    ZERO_ASSERT_OK(PlanTraining(req, &plan));
    CheckPlan(req, plan);
    if (plan.chosen < 0) continue;
    const TrainingCandidate& c = plan.candidates[static_cast<size_t>(plan.chosen)];
    // When a stored micro-batch fits but is small while a recomputed one is efficient, recomputation wins.
    const TrainingCandidate& stored = plan.candidates[static_cast<size_t>(plan.chosen / 2 * 2)];
    if (c.recompute && stored.micro_batch > 0 && !stored.efficient) saw_efficient_recompute = true;
  }
  EXPECT_TRUE(saw_efficient_recompute);
}

TEST(PlanTrainingTest, LoraNeedsFarLessThanFullTraining) {
  TransformerShape t{32, 4096, 32, 0, 11008, 32000, false, false};
  const TrainingRequest full = Request(t, 1, 16, 1024, int64_t{24} << 30);
  t.lora_rank = 16;
  const TrainingRequest lora = Request(t, 1, 16, 1024, int64_t{24} << 30);
  TrainingPlan pf, pl;
  ZERO_ASSERT_OK(PlanTraining(full, &pf));
  ZERO_ASSERT_OK(PlanTraining(lora, &pl));
  CheckPlan(full, pf);
  CheckPlan(lora, pl);
  // 7B full training on one 24 GiB device does not fit in any configuration: at one rank nothing is sharded,
  // and the fp32 gradients alone take 27 GB. LoRA on the frozen bf16 base (13.5 GB) fits on the device.
  EXPECT_EQ(pf.chosen, -1) << pf.Explain();
  EXPECT_GT(pf.candidates.back().model_state_bytes, int64_t{24} << 30);
  ASSERT_GE(pl.chosen, 0) << pl.Explain();
  EXPECT_FALSE(pl.candidates[static_cast<size_t>(pl.chosen)].offload_optimizer) << pl.Explain();
  EXPECT_LT(pl.candidates[0].model_state_bytes, pf.candidates[0].model_state_bytes / 4);
}

TEST(PlanTrainingTest, BadRequestsSayWhatWouldDo) {
  const TransformerShape t{2, 64, 4, 2, 128, 100, false, false};
  TrainingPlan plan;
  Status s = PlanTraining(Request(t, 8, 100, 64, int64_t{1} << 30), &plan);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "global_batch (100) must be a positive multiple of world_size (8)")) << s.ToString();
  EXPECT_TRUE(Contains(s, "96 or 104 would do")) << s.ToString();
  s = PlanTraining(Request(t, 2, 4, 0, int64_t{1} << 30), &plan);
  EXPECT_TRUE(Contains(s, "seq_len")) << s.ToString();
  // Too little memory: OK, nothing chosen, and the explanation says so.
  ZERO_ASSERT_OK(PlanTraining(Request(t, 2, 4, 64, 1000), &plan));
  EXPECT_EQ(plan.chosen, -1);
  EXPECT_NE(plan.Explain().find("nothing fits"), std::string::npos) << plan.Explain();
}

// The plan's options open an engine on the CPU backend within the device size, with the bytes it predicted.
TEST(PlanTrainingTest, PlannedOptionsOpenWithinTheDevice) {
  auto comm = WorldComm();
  const int n = comm->world_size();
  const TransformerShape t{6, 64, 4, 2, 128, 256, true, false};
  std::vector<ParamSpec> specs;
  ZERO_ASSERT_OK(TransformerSpecs(t, &specs));
  TrainingRequest req = Request(t, n, 8 * n, 64, 0);
  req.options = AutoBase();
  req.options.param_dtype = DType::kF32;
  req.options.bucket_elements = 4096;
  req.options.reserved_bytes = -1;
  req.activations.dtype = DType::kF32;
  TrainingPlan roomy;
  req.device_bytes = int64_t{1} << 40;
  ZERO_ASSERT_OK(PlanTraining(req, &roomy));
  ASSERT_EQ(roomy.chosen, 0);  // stage 0, the whole per-rank batch at once
  // A device that fits only with a smaller micro-batch or a higher stage.
  const TrainingCandidate& first = roomy.candidates[0];
  req.device_bytes = first.model_state_bytes + first.activation_bytes - 1;
  TrainingPlan plan;
  ZERO_ASSERT_OK(PlanTraining(req, &plan));
  CheckPlan(req, plan);
  ASSERT_GT(plan.chosen, 0) << plan.Explain();
  const TrainingCandidate& c = plan.candidates[static_cast<size_t>(plan.chosen)];
  Options o = plan.options;
  o.device_capacity_bytes = req.device_bytes;
  std::unique_ptr<Engine> engine;
  ZERO_ASSERT_OK(Engine::Open(o, comm.get(), specs, &engine));
  EXPECT_EQ(engine->Memory().device.Total(), c.model_state_bytes);
  EXPECT_LE(engine->Memory().device.Total() + c.activation_bytes, req.device_bytes);
  // And with Stage::kAuto, which reserves the planned micro-batch's activations, the same configuration.
  o.stage = Stage::kAuto;
  o.offload_optimizer = o.offload_params = false;
  ZERO_ASSERT_OK(Engine::Open(o, comm.get(), specs, &engine));
  EXPECT_EQ(engine->options().stage, c.stage);
  EXPECT_EQ(engine->options().offload_optimizer, c.offload_optimizer);
}

// ---------------------------------------------------------------------------------------------------------------
// Out of memory: the report and a suggestion that, applied, succeeds.

TEST(OutOfMemoryTest, StatusCarriesTheReportAndASuggestionThatFits) {
  auto comm = WorldComm();
  const int n = comm->world_size();
  Options o = AutoBase();
  o.stage = Stage::kDataParallel;
  o.reserved_bytes = 0;  // the engine's allocations alone exceed the capacity
  AutoChoice all;
  ZERO_ASSERT_OK(ChooseConfiguration(ModelDescription::FromSpecs(ToySpecs()), n, o, kUnlimited, &all));
  int64_t smallest = kUnlimited;
  for (const AutoCandidate& c : all.candidates) smallest = std::min(smallest, c.device_bytes);
  ASSERT_GT(all.candidates[0].device_bytes, smallest);
  o.device_capacity_bytes = smallest;
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  ASSERT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  EXPECT_TRUE(Contains(s, "Engine::Open on rank " + std::to_string(comm->rank()))) << s.ToString();
  EXPECT_TRUE(Contains(s, "device now")) << s.ToString();  // the memory table
  EXPECT_TRUE(Contains(s, "This configuration needs " + FormatBytes(all.candidates[0].device_bytes))) << s.ToString();
  AutoChoice fit;
  ZERO_ASSERT_OK(ChooseConfiguration(ModelDescription::FromSpecs(ToySpecs()), n, o, o.device_capacity_bytes, &fit));
  ASSERT_GE(fit.chosen, 1);
  const AutoCandidate& c = fit.candidates[static_cast<size_t>(fit.chosen)];
  EXPECT_TRUE(Contains(s, "Suggestion: " + ConfigurationName(c.stage, c.offload_optimizer, c.offload_params) +
                              " fits"))
      << s.ToString();
  // Applied, the suggestion opens and trains in the same capacity.
  ZERO_ASSERT_OK(Engine::Open(fit.options, comm.get(), ToySpecs(), &engine));
  EXPECT_LE(engine->Memory().device.Total(), o.device_capacity_bytes);
  TrainToyStep(*engine, *comm, 0, 1, 24);
  // One byte less than the smallest configuration: nothing fits, and the status says what would.
  o.device_capacity_bytes = smallest - 1;
  s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  ASSERT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  EXPECT_TRUE(Contains(s, "No stage or offload setting fits")) << s.ToString();
}

// Capacities may differ: the last rank alone runs out; it gets the report and suggestion, every other rank a
// status naming it.
TEST(OutOfMemoryTest, OneRankOutOfMemoryIsNamedOnEveryRank) {
  auto comm = WorldComm();
  const int n = comm->world_size(), rank = comm->rank();
  Options o = AutoBase();
  o.stage = Stage::kGradients;
  o.reserved_bytes = 0;
  MemoryEstimate need;
  ZERO_ASSERT_OK(Estimate(ModelDescription::FromSpecs(ToySpecs()), n, o, &need));
  o.device_capacity_bytes = rank == n - 1 ? need.DeviceTotal() - 1 : need.DeviceTotal();
  std::unique_ptr<Engine> engine;
  Status s = Engine::Open(o, comm.get(), ToySpecs(), &engine);
  ASSERT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  EXPECT_EQ(engine, nullptr);
  if (rank == n - 1) {
    EXPECT_TRUE(Contains(s, "Suggestion: ")) << s.ToString();
  } else {
    EXPECT_TRUE(Contains(s, "rank " + std::to_string(n - 1) + " ran out of memory")) << s.ToString();
  }
}

TEST(MemoryReportTest, TablePrintsEveryCategoryAndTheTotal) {
  auto comm = WorldComm();
  Options o = AutoBase();
  o.stage = Stage::kParameters;
  o.offload_optimizer = true;
  auto engine = OpenToyEngine(o, comm.get());
  ASSERT_NE(engine, nullptr);
  const MemoryReport m = engine->Memory();
  const std::string table = m.Table();
  for (const char* word : {"category", "device now", "device peak", "host now", "host peak", "params", "grads",
                           "optimizer", "buffers", "total"}) {
    EXPECT_NE(table.find(word), std::string::npos) << word << " missing from\n" << table;
  }
  // The optimizer row holds the host bytes (offloaded), the device column says "-".
  const size_t row = table.find("\noptimizer");
  ASSERT_NE(row, std::string::npos);
  const std::string line = table.substr(row + 1, table.find('\n', row + 1) - row - 1);
  EXPECT_NE(line.find(FormatBytes(m.host.Current(MemoryCategory::kOptimizer))), std::string::npos) << line;
}

}  // namespace
}  // namespace zero::testing

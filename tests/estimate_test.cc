// zero::Estimate against the ZeRO paper's worked example and against the engine's own accounting (byte for byte,
// over stages x dtypes x optimizers x offload x world 1-4, with the toy model's frozen and tied units); Stage::kAuto
// with capacities just below and just above each configuration's need, also when ranks see different free memory;
// and the out-of-memory status with its report and a suggestion that, applied, opens.
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

const char* const kOrder[] = {"stage 0", "stage 1", "stage 2", "stage 2 + optimizer offload", "stage 3",
                              "stage 3 + optimizer offload", "stage 3 + parameter offload"};

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
  if (comm->world_size() == 4) {
    for (int i : {0, 1, 2, 3, 4, 5, 6}) EXPECT_NE(chosen & (1 << i), 0) << kOrder[i] << " never chosen";
  }
}

// The decision itself, without an engine, at the ZeRO paper's scale: LLaMA-7B in fp32 on 64 ranks needs less
// memory at every step of the preference order, so each configuration is chosen exactly at its own need and the
// next one a byte below it.
TEST(AutoTest, EachConfigurationIsChosenAtItsNeedAtScale) {
  ModelDescription m;
  ZERO_ASSERT_OK(TransformerSpecs(TransformerShape{32, 4096, 32, 0, 11008, 32000, false, false}, &m.specs));
  Options o;
  o.reserved_bytes = int64_t{6} << 30;
  AutoChoice all;
  ZERO_ASSERT_OK(ChooseConfiguration(m, 64, o, kUnlimited, &all));
  for (size_t i = 0; i < all.candidates.size(); ++i) {
    SCOPED_TRACE(kOrder[i]);
    if (i > 0) {
      EXPECT_LT(all.candidates[i].device_bytes, all.candidates[i - 1].device_bytes);
    }
    AutoChoice c;
    ZERO_ASSERT_OK(ChooseConfiguration(m, 64, o, all.candidates[i].device_bytes + o.reserved_bytes, &c));
    EXPECT_EQ(c.chosen, static_cast<int>(i));
    EXPECT_EQ(c.options.stage, all.candidates[i].stage);
    ZERO_ASSERT_OK(ChooseConfiguration(m, 64, o, all.candidates[i].device_bytes + o.reserved_bytes - 1, &c));
    EXPECT_EQ(c.chosen, i + 1 < all.candidates.size() ? static_cast<int>(i) + 1 : -1);
  }
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

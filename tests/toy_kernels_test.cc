// The toy model as a trainer with kernels (testing/toy_kernel_model.h), in three layers:
//  * toy_math.cuh's tanh, exp and log (which replace the C library's in the scalar model, so that a GPU trainer
//    can give the CPU's bits) stay within a few ulps of the C library's fp64 functions over the toy's ranges.
//  * The kernel trainer against the scalar model (ToyForwardBackward): the same protocol calls in the same order,
//    and the same loss and gradients bit for bit, with fp32, bf16 and fp16 parameters, gradients accumulated onto
//    non-zero values, loss scale 1 and 1024, and batches made on the executor (Generate) equal to ToyMicroBatch.
//    On the CPU executor (g++'s instantiation) here; on the CUDA one (nvcc's) where a GPU is (`*cuda*`).
//  * Through an Engine at every stage: the kernel trainer (CPU loops, or CUDA kernels on the compute stream while
//    the engine's communication stream works, no host synchronisation between Acquire and Release) against the
//    mirrored reference, bitwise when the Comm sums in MpiComm's ring order (the CPU, a StagedComm, one rank) and
//    the gradients are fp32, within the equivalence suite's naive bounds otherwise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cast.cuh"
#include "testing/backend_comm.h"
#include "testing/device_copy.h"
#include "testing/device_memory.h"
#include "testing/engine_harness.h"
#include "testing/mpi_env.h"
#include "testing/reference.h"
#include "testing/toy_kernel_model.h"

namespace zero::testing {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// toy_math.cuh's transcendental functions.

// Distance in units in the last place between two finite floats (their positions on the ordered float line).
int64_t UlpDistance(float a, float b) {
  auto ordered = [](float f) {
    int32_t i;
    std::memcpy(&i, &f, sizeof(i));
    return i < 0 ? int64_t{INT32_MIN} - i : int64_t{i};
  };
  return std::llabs(ordered(a) - ordered(b));
}

template <typename Mine, typename Exact>
int64_t WorstUlps(const std::vector<float>& xs, Mine mine, Exact exact, float* worst_x) {
  int64_t worst = 0;
  for (float x : xs) {
    const int64_t d = UlpDistance(mine(x), static_cast<float>(exact(static_cast<double>(x))));
    if (d > worst) {
      worst = d;
      *worst_x = x;
    }
  }
  return worst;
}

std::vector<float> Grid(float lo, float hi, int n) {
  std::vector<float> xs;
  for (int i = 0; i <= n; ++i) xs.push_back(lo + (hi - lo) * static_cast<float>(i) / static_cast<float>(n));
  return xs;
}

// Bounds: each function is a short polynomial plus a few float operations, each rounding by half an ulp, so a
// handful of ulps; tanh's worst case is near |x| = 0.17, where e^(-2|x|) - 1 loses about two bits to
// cancellation. Measured: exp 1, tanh 3, log 1 ulp. A slip in a coefficient or the range reduction shows as
// thousands of ulps.
TEST(ToyMathTest, TranscendentalsStayWithinAFewUlps) {
  float at = 0;
  std::vector<float> xs = Grid(-87.0f, 88.0f, 350'000);
  const int64_t exp_ulps = WorstUlps(
      xs, ToyExp, [](double x) { return std::exp(x); }, &at);
  EXPECT_LE(exp_ulps, 4) << "ToyExp at " << at;
  xs = Grid(-10.0f, 10.0f, 400'000);
  for (float t = 1e-30f; t < 1e-2f; t *= 1.37f) {
    xs.push_back(t);
    xs.push_back(-t);
  }
  xs.push_back(0.0f);
  const int64_t tanh_ulps = WorstUlps(
      xs, ToyTanh, [](double x) { return std::tanh(x); }, &at);
  EXPECT_LE(tanh_ulps, 6) << "ToyTanh at " << at;
  xs = Grid(0.25f, 16.0f, 400'000);
  for (float t = 1e-44f; t < 3e38f; t *= 1.09f) xs.push_back(t);  // subnormals to near the top of the range
  const int64_t log_ulps = WorstUlps(
      xs, ToyLog, [](double x) { return std::log(x); }, &at);
  EXPECT_LE(log_ulps, 4) << "ToyLog at " << at;
  std::printf("[ toy math ] worst ulps against libm in fp64: exp %lld, tanh %lld, log %lld\n",
              static_cast<long long>(exp_ulps), static_cast<long long>(tanh_ulps), static_cast<long long>(log_ulps));
  // Edges: the model never reaches them, but they must not be garbage.
  EXPECT_EQ(ToyExp(-100.0f), 0.0f);
  EXPECT_TRUE(std::isinf(ToyExp(100.0f)));
  EXPECT_EQ(ToyTanh(20.0f), 1.0f);
  EXPECT_EQ(ToyTanh(-20.0f), -1.0f);
  EXPECT_EQ(ToyLog(1.0f), 0.0f);
  EXPECT_TRUE(std::isinf(ToyLog(0.0f)) && ToyLog(0.0f) < 0);
  EXPECT_TRUE(std::isnan(ToyLog(-1.0f)));
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel trainer against the scalar model, outside any engine.

// Memory of one executor: host vectors, or device memory.
class ExecMemory {
 public:
  explicit ExecMemory(ToyExec exec) : exec_(exec) {}
  ~ExecMemory() {
    for (void* p : device_) DeviceFree(p);
  }
  // A copy of `bytes` of `host` in the executor's memory.
  void* Put(const void* host, int64_t bytes) {
    if (exec_ == ToyExec::kCpu) {
      host_.emplace_back(static_cast<size_t>((bytes + 7) / 8));
      std::memcpy(host_.back().data(), host, static_cast<size_t>(bytes));
      return host_.back().data();
    }
    void* p = nullptr;
    EXPECT_TRUE(DeviceMalloc(bytes, &p).ok());
    device_.push_back(p);
    EXPECT_TRUE(CopyToDevice(p, host, bytes).ok());
    return p;
  }
  void Get(void* host, const void* at, int64_t bytes) const {
    if (exec_ == ToyExec::kCpu) {
      std::memcpy(host, at, static_cast<size_t>(bytes));
    } else {
      EXPECT_TRUE(CopyFromDevice(host, at, bytes).ok());
    }
  }

 private:
  ToyExec exec_;
  std::vector<std::vector<double>> host_;
  std::vector<void*> device_;
};

// Records the protocol calls of either trainer.
struct CallLog {
  std::vector<std::string> calls;
  void Add(const char* what, int unit, bool backward = false) {
    calls.push_back(std::string(what) + "(" + std::to_string(unit) + (backward ? ", bwd)" : ")"));
  }
};

// The scalar model's access: plain fp32 arrays.
class ScalarAccess : public ToyAccess {
 public:
  ScalarAccess(std::vector<std::vector<float>>* params, std::vector<std::vector<float>>* grads, CallLog* log)
      : params_(params), grads_(grads), log_(log) {}
  void Acquire(int unit, bool backward) override { log_->Add("Acquire", unit, backward); }
  void Release(int unit, bool backward) override { log_->Add("Release", unit, backward); }
  void GradsReady(int unit) override { log_->Add("GradsReady", unit); }
  float* Param(int p) override { return (*params_)[static_cast<size_t>(p)].data(); }
  float* Grad(int p) override { return (*grads_)[static_cast<size_t>(p)].data(); }

 private:
  std::vector<std::vector<float>>* params_;
  std::vector<std::vector<float>>* grads_;
  CallLog* log_;
};

// The kernel trainer's access: parameters stored as `kind` and fp32 gradients, in the executor's memory.
class ArrayKernelAccess : public ToyKernelAccess {
 public:
  ArrayKernelAccess(std::vector<ToyParam> params, std::vector<float*> grads, CallLog* log)
      : params_(std::move(params)), grads_(std::move(grads)), log_(log) {}
  void Acquire(int unit, bool backward) override { log_->Add("Acquire", unit, backward); }
  void Release(int unit, bool backward) override { log_->Add("Release", unit, backward); }
  void GradsReady(int unit) override { log_->Add("GradsReady", unit); }
  ToyParam Param(int p) override { return params_[static_cast<size_t>(p)]; }
  float* Grad(int p) override { return grads_[static_cast<size_t>(p)]; }

 private:
  std::vector<ToyParam> params_;
  std::vector<float*> grads_;
  CallLog* log_;
};

const char* KindName(ToyKind k) { return k == kToyBf16 ? "bf16" : k == kToyF16 ? "fp16" : "fp32"; }

// `v` rounded to `kind` as stored bits (fp32: the floats' bytes), and the exact fp32 values of those bits.
void RoundTo(ToyKind kind, const std::vector<float>& v, std::vector<char>* bits, std::vector<float>* widened) {
  widened->resize(v.size());
  if (kind == kToyF32) {
    bits->resize(v.size() * 4);
    std::memcpy(bits->data(), v.data(), bits->size());
    *widened = v;
    return;
  }
  bits->resize(v.size() * 2);
  auto* b = reinterpret_cast<uint16_t*>(bits->data());
  for (size_t i = 0; i < v.size(); ++i) {
    b[i] = kind == kToyBf16 ? kernels::FloatToBf16(v[i]) : kernels::FloatToF16(v[i]);
    (*widened)[i] = kind == kToyBf16 ? kernels::Bf16ToFloat(b[i]) : kernels::F16ToFloat(b[i]);
  }
}

// The batches both trainers run, in order: two as the engine suites make them, and one by hand whose tokens
// repeat (the lookup's gradient adds several tokens into one row) and cover every target.
std::vector<ToyBatch> Batches() {
  std::vector<ToyBatch> b = {ToyMicroBatch(0, 0, 0, 1, 24), ToyMicroBatch(5, 1, 1, 2, 24)};
  ToyBatch hand;
  for (int i = 0; i < 17; ++i) {
    hand.tokens.push_back((i * 5) % kVocab % 6);
    hand.targets.push_back(i % kVocab);
  }
  b.push_back(hand);
  return b;
}

bool CudaUsable(std::string* why) {
  int n = 0;
  const Status s = CudaDeviceCount(&n);
  if (!s.ok()) *why = "Backend::kCuda cannot run here: " + s.message();
  return s.ok();
}

class KernelTrainerTest : public ::testing::TestWithParam<ToyExec> {};

TEST_P(KernelTrainerTest, SameCallsAndBitsAsTheScalarModel) {
  const ToyExec exec = GetParam();
  std::string why;
  if (exec == ToyExec::kCuda && !CudaUsable(&why)) GTEST_SKIP() << why;  // no GPU: the CPU twin ran instead
  const std::vector<ParamSpec> specs = ToySpecs();
  const std::vector<ToyBatch> batches = Batches();
  for (const ToyKind kind : {kToyF32, kToyBf16, kToyF16}) {
    for (const float scale : {1.0f, 1024.0f}) {
      SCOPED_TRACE(std::string(KindName(kind)) + " parameters, loss scale " + std::to_string(scale));
      ExecMemory mem(exec);
      std::vector<std::vector<float>> params, grads;
      std::vector<ToyParam> kparams;
      std::vector<float*> kgrads;
      for (int p = 0; p < kToyParams; ++p) {
        std::vector<char> bits;
        std::vector<float> widened;
        RoundTo(kind, ToyInitialParams()[static_cast<size_t>(p)], &bits, &widened);
        params.push_back(widened);
        kparams.push_back({mem.Put(bits.data(), static_cast<int64_t>(bits.size())), kind});
        // Gradients start non-zero: both trainers add into what is there.
        std::vector<float> g(static_cast<size_t>(specs[static_cast<size_t>(p)].numel()));
        for (size_t i = 0; i < g.size(); ++i) g[i] = 0.01f * ToyInit(p + 3, static_cast<int64_t>(i));
        grads.push_back(g);
        kgrads.push_back(static_cast<float*>(mem.Put(g.data(), static_cast<int64_t>(g.size() * 4))));
      }
      CallLog scalar_log, kernel_log;
      ScalarAccess scalar(&params, &grads, &scalar_log);
      ArrayKernelAccess kernel(kparams, kgrads, &kernel_log);
      std::unique_ptr<ToyWorkspace> ws;
      ZERO_ASSERT_OK(ToyWorkspace::Create(exec, 32, 4, &ws));
      for (size_t b = 0; b < batches.size(); ++b) {
        const float want = ToyForwardBackward(scalar, batches[b], scale);
        ZERO_ASSERT_OK(ws->Upload(static_cast<int>(b), batches[b]));
        ZERO_ASSERT_OK(ToyKernelForwardBackward(*ws, static_cast<int>(b), kernel, scale));
        float got = 0;
        ZERO_ASSERT_OK(ws->Loss(static_cast<int>(b), &got));
        EXPECT_EQ(UlpDistance(got, want), 0) << "loss of batch " << b << ": kernels " << got << ", scalar " << want;
      }
      EXPECT_EQ(kernel_log.calls, scalar_log.calls) << "the kernel trainer's protocol calls differ";
      int mismatches = 0;
      for (int p = 0; p < kToyParams; ++p) {
        std::vector<float> got(grads[static_cast<size_t>(p)].size());
        mem.Get(got.data(), kgrads[static_cast<size_t>(p)], static_cast<int64_t>(got.size() * 4));
        for (size_t i = 0; i < got.size(); ++i) {
          const float want = grads[static_cast<size_t>(p)][i];
          if (std::memcmp(&got[i], &want, 4) != 0 && ++mismatches <= 5) {
            ADD_FAILURE() << "gradient of " << specs[static_cast<size_t>(p)].name << " element " << i << ": kernels "
                          << got[i] << ", scalar " << want;
          }
        }
      }
      EXPECT_EQ(mismatches, 0);
      // Forward only.
      const float want = ToyForward(scalar, batches[0]);
      ZERO_ASSERT_OK(ToyKernelForward(*ws, 0, kernel));
      float got = 0;
      ZERO_ASSERT_OK(ws->Loss(0, &got));
      EXPECT_EQ(UlpDistance(got, want), 0) << "forward-only loss";
    }
  }
}

TEST_P(KernelTrainerTest, BatchesMadeOnTheExecutorEqualToyMicroBatch) {
  const ToyExec exec = GetParam();
  std::string why;
  if (exec == ToyExec::kCuda && !CudaUsable(&why)) GTEST_SKIP() << why;
  std::unique_ptr<ToyWorkspace> ws;
  ZERO_ASSERT_OK(ToyWorkspace::Create(exec, 64, 2, &ws));
  ExecMemory mem(exec);
  for (const auto& [step, micro, rank, world, global] : {std::tuple{0, 0, 0, 1, 24}, std::tuple{7, 1, 2, 3, 24},
                                                         std::tuple{999, 3, 3, 4, 24}, std::tuple{49, 1, 0, 1, 64}}) {
    ZERO_ASSERT_OK(ws->Generate(1, step, micro, rank, world, global));
    const ToyBatch want = ToyMicroBatch(step, micro, rank, world, global);
    const ToyArgs a = ws->BatchArgs(1);
    ASSERT_EQ(a.n, static_cast<int>(want.tokens.size()));
    std::vector<int> tokens(want.tokens.size()), targets(want.targets.size());
    mem.Get(tokens.data(), a.tokens, static_cast<int64_t>(tokens.size() * sizeof(int)));
    mem.Get(targets.data(), a.targets, static_cast<int64_t>(targets.size() * sizeof(int)));
    EXPECT_EQ(tokens, want.tokens) << "step " << step << " micro " << micro << " rank " << rank;
    EXPECT_EQ(targets, want.targets);
  }
  // A batch that does not fit is refused, not written past the workspace.
  EXPECT_EQ(ws->Generate(2, 0, 0, 0, 1, 24).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ws->Generate(0, 0, 0, 0, 1, 65).code(), StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Executors, KernelTrainerTest, ::testing::Values(ToyExec::kCpu, ToyExec::kCuda),
                         [](const ::testing::TestParamInfo<ToyExec>& info) {
                           return std::string(info.param == ToyExec::kCpu ? "cpu" : "cuda");
                         });

// ---------------------------------------------------------------------------------------------------------------
// The kernel trainer through an engine.

constexpr int kSteps = 6;
constexpr int kMicros = 2;
constexpr int kGlobalBatch = 24;  // divisible by 1, 2, 3 and 4 ranks

struct Case {
  const char* name;
  Stage stage;
  OptimizerKind optimizer;
  int64_t bucket_elements;
  DType param_dtype = DType::kF32;
  DType grad_dtype = DType::kF32;
  int offload = 0;  // 1: optimizer state on the host; 2: and the stage-3 parameter shards
  int64_t persist_bytes = 0;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

Options MakeOptions(const Case& c, Backend backend) {
  Options o;
  o.backend = backend;
  o.stage = c.stage;
  o.optimizer = c.optimizer;
  o.bucket_elements = c.bucket_elements;
  o.clip_norm = 0.5;
  o.adamw.lr = 1e-2f;
  o.adamw.eps = 1e-6f;
  o.adamw.weight_decay = 0.05f;
  o.sgd.lr = 0.2f;
  o.sgd.momentum = 0.9f;
  o.persist_bytes = c.persist_bytes;
  o.cpu_threads = 1;
  o.param_dtype = c.param_dtype;
  o.grad_dtype = c.grad_dtype;
  o.offload_optimizer = c.offload >= 1;
  o.offload_params = c.offload >= 2;
  if (c.grad_dtype == DType::kF16) o.loss_scale.initial = 1024.0f;  // the equivalence suite's reason
  return o;
}

double MaxRelError(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double worst = 0.0;
  for (size_t p = 0; p < a.size(); ++p) {
    for (size_t i = 0; i < a[p].size(); ++i) {
      worst = std::max(worst, std::abs(a[p][i] - double{b[p][i]}) / std::max(1.0, std::abs(double{b[p][i]})));
    }
  }
  return worst;
}

class KernelEngineTest : public ::testing::TestWithParam<std::tuple<Case, Backend>> {};

TEST_P(KernelEngineTest, MatchesTheMirroredReference) {
  const Case& c = std::get<0>(GetParam());
  const Backend backend = std::get<1>(GetParam());
  ZERO_BACKEND_COMM(comm, backend);
  const Options options = MakeOptions(c, backend);
  auto engine = OpenToyEngine(options, comm.get());
  ASSERT_NE(engine, nullptr);
  // 16-bit gradients round at every hop, which the mirrored reference does not model (engine_equivalence_test).
  const bool bitwise = SumsInRingOrder(*comm) && c.grad_dtype == DType::kF32;
  ReferenceConfig rc;
  rc.options = options;
  rc.world = comm->world_size();
  rc.micro_steps = kMicros;
  rc.global_batch = kGlobalBatch;
  Reference mirrored(rc);
  rc.mirror = false;
  Reference naive(rc);
  ToyStepOptions kernels;
  kernels.trainer = ToyTrainer::kKernels;
  for (int step = 0; step < kSteps; ++step) {
    const StepResult got = TrainToyStep(*engine, *comm, step, kMicros, kGlobalBatch, kernels);
    const StepResult want = mirrored.Step(step);
    naive.Step(step);
    ASSERT_FALSE(got.skipped) << "step " << step;
    if (bitwise) {
      ASSERT_EQ(got.grad_norm, want.grad_norm) << "step " << step;
      ASSERT_EQ(got.clip_coef, want.clip_coef) << "step " << step;
    }
  }
  const auto params = GatherToyParams(*engine);
  ASSERT_EQ(params.size(), static_cast<size_t>(kToyParams));
  if (bitwise) {
    int mismatches = 0;
    for (int p = 0; p < kToyParams; ++p) {
      const std::vector<float>& want = mirrored.param(p);
      ASSERT_EQ(params[static_cast<size_t>(p)].size(), want.size());
      for (size_t i = 0; i < want.size(); ++i) {
        if (std::memcmp(&params[static_cast<size_t>(p)][i], &want[i], 4) != 0 && ++mismatches <= 5) {
          ADD_FAILURE() << "param " << p << " element " << i << ": engine " << params[static_cast<size_t>(p)][i]
                        << ", reference " << want[i];
        }
      }
    }
    EXPECT_EQ(mismatches, 0) << "not bitwise equal to the mirrored reference";
  }
  // The equivalence suite's naive bounds (engine_equivalence_test.cc says why): 1e-4 AdamW, 1e-5 SGD, 8 ulps of
  // a 16-bit parameter or gradient dtype.
  double bound = c.optimizer == OptimizerKind::kAdamW ? 1e-4 : 1e-5;
  if (c.param_dtype == DType::kBF16 || c.grad_dtype == DType::kBF16) bound = 8.0 / 256;
  if (c.param_dtype == DType::kF16 || c.grad_dtype == DType::kF16) bound = std::max(bound, 8.0 / 2048);
  std::vector<std::vector<float>> want_naive;
  for (int p = 0; p < kToyParams; ++p) want_naive.push_back(naive.param(p));
  const double naive_err = MaxRelError(params, want_naive);
  EXPECT_LE(naive_err, bound);
  EXPECT_GT(MaxRelError(params, ToyInitialParams()), 1e-3) << "training must move the parameters";
  if (comm->rank() == 0) {
    std::printf("[ kernels ] %s %s world %d: %s, naive error %.3g (bound %.0e)\n", c.name, BackendName(backend),
                comm->world_size(), bitwise ? "bitwise" : "bounded", naive_err, bound);
  }
}

const Case kCases[] = {
    {"stage0_adamw", Stage::kDataParallel, OptimizerKind::kAdamW, 1 << 20},
    {"stage1_sgd", Stage::kOptimizerStates, OptimizerKind::kSgdMomentum, 64},
    {"stage2_adamw", Stage::kGradients, OptimizerKind::kAdamW, 64},
    {"stage3_adamw", Stage::kParameters, OptimizerKind::kAdamW, 64},
    {"stage3_adamw_offload_params_persistent", Stage::kParameters, OptimizerKind::kAdamW, 64, DType::kF32, DType::kF32,
     2, 512},
    {"stage1_sgd_fp16", Stage::kOptimizerStates, OptimizerKind::kSgdMomentum, 64, DType::kF16},
    {"stage3_adamw_bf16", Stage::kParameters, OptimizerKind::kAdamW, 64, DType::kBF16},
    {"stage2_adamw_bf16_bf16grads", Stage::kGradients, OptimizerKind::kAdamW, 64, DType::kBF16, DType::kBF16},
    {"stage3_sgd_fp16_fp16grads_offload", Stage::kParameters, OptimizerKind::kSgdMomentum, 64, DType::kF16, DType::kF16,
     1},
};

INSTANTIATE_TEST_SUITE_P(Stages, KernelEngineTest,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(Backend::kCpu, Backend::kCuda)),
                         [](const ::testing::TestParamInfo<std::tuple<Case, Backend>>& info) {
                           return std::string(std::get<0>(info.param).name) + "_" +
                                  BackendName(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace zero::testing

// minimal_trainer: the smallest complete zero trainer. A 2-layer MLP learns a synthetic classification task
// (labels from a fixed random "teacher" layer) on every rank's slice of each global batch, averages its loss over
// the ranks with its own collective, and evaluates on held-out samples in an eval pass. Copy it.
//
//   mpiexec -n 2 build/examples/minimal_trainer/minimal_trainer --stage 3 --steps 30
//
// The README's "API" section shows the lines between the readme-loop markers verbatim (a test checks it).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <zero/zero.h>

namespace {

constexpr int kIn = 16, kHidden = 64, kClasses = 4;

struct Flags {
  int stage = 2, steps = 30, micro = 2, batch = 64;  // batch: samples per micro-step, across all ranks
  float lr = 3e-3f;
};

bool Parse(int argc, char** argv, Flags* f) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--stage") f->stage = v;
    else if (k == "--steps") f->steps = v;
    else if (k == "--micro") f->micro = v;
    else if (k == "--batch") f->batch = v;
    else if (k == "--lr") f->lr = std::strtof(argv[i + 1], nullptr);
    else return false;
  }
  return f->stage >= 0 && f->stage <= 3 && f->steps > 0 && f->micro > 0 && f->batch > 0 && (argc % 2) == 1;
}

// Sample i of the endless synthetic data set: x ~ U(-1, 1), label = argmax of a fixed teacher's logits.
void Sample(int64_t i, float* x, int* label) {
  std::mt19937 rng(static_cast<uint32_t>(i) * 2654435761u + 17);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int k = 0; k < kIn; ++k) x[k] = u(rng);
  float best = -1e30f;
  for (int c = 0; c < kClasses; ++c) {
    float s = 0;
    for (int k = 0; k < kIn; ++k) s += x[k] * std::sin(1.3f * (k + 1) * (c + 1));
    if (s > best) best = s, *label = c;
  }
}

// A fixed pseudo-random value in [-1.7, 1.7) for element `i` of parameter `p` (splitmix64 of the position):
// whichever rank owns the element computes the same value.
float InitNoise(int p, int64_t i) {
  uint64_t z = (static_cast<uint64_t>(p) << 40) ^ static_cast<uint64_t>(i);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 11) / 9007199254740992.0 * 3.4 - 1.7);
}

#define CHECK_OK(expr)                                                            \
  do {                                                                            \
    zero::Status s_ = (expr);                                                     \
    if (!s_.ok()) {                                                               \
      std::fprintf(stderr, "%s failed: %s\n", #expr, s_.ToString().c_str());      \
      return 1;                                                                   \
    }                                                                             \
  } while (0)

// The model's arithmetic on one rank's micro-batch of n samples. Views come from the engine (checked accessors:
// a view used outside its validity window is a Status, not a null pointer).
void Layer1(int n, const float* x, const float* w1, const float* b1, float* h) {  // h = relu(x W1 + b1)
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < kHidden; ++j) {
      float s = b1[j];
      for (int k = 0; k < kIn; ++k) s += x[i * kIn + k] * w1[k * kHidden + j];
      h[i * kHidden + j] = s > 0 ? s : 0;
    }
}

// logits = h W2 + b2 and softmax cross-entropy; returns the summed loss and leaves dloss/dlogits in `logits`.
double Layer2(int n, const float* h, const float* w2, const float* b2, const int* y, float* logits) {
  double loss = 0;
  for (int i = 0; i < n; ++i) {
    float* l = &logits[i * kClasses];
    float mx = -1e30f, z = 0;
    for (int c = 0; c < kClasses; ++c) {
      l[c] = b2[c];
      for (int j = 0; j < kHidden; ++j) l[c] += h[i * kHidden + j] * w2[j * kClasses + c];
      mx = std::max(mx, l[c]);
    }
    for (int c = 0; c < kClasses; ++c) z += std::exp(l[c] - mx);
    loss += std::log(z) + mx - l[y[i]];
    for (int c = 0; c < kClasses; ++c) l[c] = (std::exp(l[c] - mx) / z - (c == y[i])) / n;
  }
  return loss;
}

// Backward of layer 2: accumulates into gw2, gb2 and writes dh (through relu).
void Layer2Backward(int n, const float* h, const float* w2, const float* dlogits, float* gw2, float* gb2, float* dh) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < kHidden; ++j) {
      float d = 0;
      for (int c = 0; c < kClasses; ++c) {
        gw2[j * kClasses + c] += h[i * kHidden + j] * dlogits[i * kClasses + c];
        d += dlogits[i * kClasses + c] * w2[j * kClasses + c];
      }
      dh[i * kHidden + j] = h[i * kHidden + j] > 0 ? d : 0;
    }
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < kClasses; ++c) gb2[c] += dlogits[i * kClasses + c];
}

void Layer1Backward(int n, const float* x, const float* dh, float* gw1, float* gb1) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < kHidden; ++j) {
      gb1[j] += dh[i * kHidden + j];
      for (int k = 0; k < kIn; ++k) gw1[k * kHidden + j] += x[i * kIn + k] * dh[i * kHidden + j];
    }
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  std::unique_ptr<zero::Comm> comm;
  CHECK_OK(zero::Comm::OpenMpi(zero::CommOptions(), &comm));
  const int rank = comm->rank(), world = comm->world_size();
  if (!Parse(argc, argv, &flags) || flags.batch % world != 0) {
    if (rank == 0) std::fprintf(stderr, "usage: minimal_trainer [--stage 0-3] [--steps N] [--micro M] [--batch B (multiple of ranks)] [--lr F]\n");
    return 2;
  }
  const int local = flags.batch / world;  // this rank's samples per micro-step
  std::vector<float> x(local * kIn), h(local * kHidden), dh(local * kHidden), logits(local * kClasses);
  std::vector<int> y(local);
  // [readme-loop-begin]
  // 1. Register parameters: two units (one per layer). Biases get no weight decay.
  std::vector<zero::ParamSpec> specs = {
      {"fc1.weight", {kIn, kHidden}, /*unit=*/0}, {"fc1.bias", {kHidden}, 0, true, 1.0f, /*wd_mult=*/0.0f},
      {"fc2.weight", {kHidden, kClasses}, 1},    {"fc2.bias", {kClasses}, 1, true, 1.0f, 0.0f}};
  zero::Options options;
  options.stage = static_cast<zero::Stage>(flags.stage);  // zero::Stage::kParameters is ZeRO-3
  options.adamw.lr = flags.lr;
  options.clip_norm = 1.0;
  std::unique_ptr<zero::Engine> engine;
  CHECK_OK(zero::Engine::Open(options, comm.get(), specs, &engine));  // every rank checks the specs agree
  // 2. Initialize: each rank fills only the fragments it owns, so each value depends on its position only.
  CHECK_OK(engine->InitParams([](int p, int64_t off, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = p % 2 ? 0.0f : 0.3f * InitNoise(p, off + i);  // biases start at 0
  }));
  // 3. Train. Views (Param, Grad) are valid inside their unit's Acquire/Release; take them after each Acquire.
  zero::TensorView w1, b1, w2, b2, gw1, gb1, gw2, gb2;
  for (int step = 0; step < flags.steps; ++step) {
    double loss_sum = 0;
    for (int m = 0; m < flags.micro; ++m) {
      CHECK_OK(engine->BeginMicroStep(m, /*is_last=*/m == flags.micro - 1));
      const int64_t first = (int64_t{step} * flags.micro + m) * flags.batch + rank * local;
      for (int i = 0; i < local; ++i) Sample(first + i, &x[i * kIn], &y[i]);
      CHECK_OK(engine->Acquire(0, zero::Pass::kForward));
      CHECK_OK(engine->Param(0, &w1));
      CHECK_OK(engine->Param(1, &b1));
      Layer1(local, x.data(), w1.as<float>(), b1.as<float>(), h.data());
      CHECK_OK(engine->Release(0, zero::Pass::kForward));
      CHECK_OK(engine->Acquire(1, zero::Pass::kForward));
      CHECK_OK(engine->Param(2, &w2));
      CHECK_OK(engine->Param(3, &b2));
      loss_sum += Layer2(local, h.data(), w2.as<float>(), b2.as<float>(), y.data(), logits.data());
      CHECK_OK(engine->Release(1, zero::Pass::kForward));
      // Backward, in reverse unit order: += into the gradient views (the engine zeroes them).
      CHECK_OK(engine->Acquire(1, zero::Pass::kBackward));
      CHECK_OK(engine->Param(2, &w2));
      CHECK_OK(engine->Grad(2, &gw2));
      CHECK_OK(engine->Grad(3, &gb2));
      Layer2Backward(local, h.data(), w2.as<float>(), logits.data(), gw2.as<float>(), gb2.as<float>(), dh.data());
      CHECK_OK(engine->GradsReady(1));
      CHECK_OK(engine->Release(1, zero::Pass::kBackward));
      CHECK_OK(engine->Acquire(0, zero::Pass::kBackward));
      CHECK_OK(engine->Grad(0, &gw1));
      CHECK_OK(engine->Grad(1, &gb1));
      Layer1Backward(local, x.data(), dh.data(), gw1.as<float>(), gb1.as<float>());
      CHECK_OK(engine->GradsReady(0));
      CHECK_OK(engine->Release(0, zero::Pass::kBackward));
    }
    zero::StepResult result;  // grad norm, clip coefficient, step count
    CHECK_OK(engine->Step(zero::StepArgs(), &result));
    // The trainer's own collectives on its Comm are safe at any moment: the engine works on a duplicate of it.
    double loss = loss_sum / (local * flags.micro);  // this rank's mean; the average over ranks for the log
    CHECK_OK(comm->AllReduce(&loss, &loss, 1, zero::DType::kF64, zero::ReduceOp::kSum));
    if (rank == 0) {
      const zero::MemoryReport mem = engine->Memory();
      std::printf("step %3d  loss %.4f  grad_norm %.4f  clip %.3f  device %lld B/rank (peak %lld)\n", step + 1,
                  loss / world, result.grad_norm, result.clip_coef, static_cast<long long>(mem.device.Total()),
                  static_cast<long long>(mem.device.peak_total));
    }
  }
  // 4. Evaluate on held-out samples: forward-only passes go between BeginEval and EndEval (stage 3 gathers there).
  CHECK_OK(engine->BeginEval());
  double eval_loss = 0;
  for (int i = 0; i < local; ++i) Sample(-1 - (rank * local + i), &x[i * kIn], &y[i]);
  CHECK_OK(engine->Acquire(0, zero::Pass::kForward));
  CHECK_OK(engine->Param(0, &w1));
  CHECK_OK(engine->Param(1, &b1));
  Layer1(local, x.data(), w1.as<float>(), b1.as<float>(), h.data());
  CHECK_OK(engine->Release(0, zero::Pass::kForward));
  CHECK_OK(engine->Acquire(1, zero::Pass::kForward));
  CHECK_OK(engine->Param(2, &w2));
  CHECK_OK(engine->Param(3, &b2));
  eval_loss += Layer2(local, h.data(), w2.as<float>(), b2.as<float>(), y.data(), logits.data()) / local;
  CHECK_OK(engine->Release(1, zero::Pass::kForward));
  CHECK_OK(engine->EndEval());
  CHECK_OK(comm->AllReduce(&eval_loss, &eval_loss, 1, zero::DType::kF64, zero::ReduceOp::kSum));
  // [readme-loop-end]
  if (rank == 0) std::printf("eval loss %.4f (%d held-out samples)\n", eval_loss / world, local * world);
  return 0;
}

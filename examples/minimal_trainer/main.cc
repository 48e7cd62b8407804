// minimal_trainer: the smallest complete zero trainer. A 2-layer MLP learns a synthetic classification task
// (labels from a fixed random "teacher" layer) on every rank's slice of each global batch. Copy it.
//
//   mpiexec -n 2 build/examples/minimal_trainer/minimal_trainer --stage 3 --steps 30
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

#define CHECK_OK(expr)                                                            \
  do {                                                                            \
    zero::Status s_ = (expr);                                                     \
    if (!s_.ok()) {                                                               \
      std::fprintf(stderr, "%s failed: %s\n", #expr, s_.ToString().c_str());      \
      return 1;                                                                   \
    }                                                                             \
  } while (0)

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
  // 1. Register parameters: two units (one per layer). Biases get no weight decay.
  std::vector<zero::ParamSpec> specs = {
      {"fc1.weight", {kIn, kHidden}, 0}, {"fc1.bias", {kHidden}, 0, true, 1.0f, 0.0f},
      {"fc2.weight", {kHidden, kClasses}, 1}, {"fc2.bias", {kClasses}, 1, true, 1.0f, 0.0f}};
  zero::Options options;
  options.stage = static_cast<zero::Stage>(flags.stage);
  options.adamw.lr = flags.lr;
  options.clip_norm = 1.0;
  std::unique_ptr<zero::Engine> engine;
  CHECK_OK(zero::Engine::Open(options, comm.get(), specs, &engine));
  // 2. Initialize: each rank fills only the fragments it owns.
  CHECK_OK(engine->InitParams([](int p, int64_t off, int64_t n, float* dst) {
    std::mt19937 rng(static_cast<uint32_t>(p * 1000003 + off));
    std::normal_distribution<float> g(0.0f, p % 2 ? 0.0f : 0.3f);
    for (int64_t i = 0; i < n; ++i) dst[i] = g(rng);
  }));
  // 3. Train.
  const int local = flags.batch / world;
  std::vector<float> x(local * kIn), h(local * kHidden), dh(local * kHidden), logits(local * kClasses);
  std::vector<int> y(local);
  for (int step = 0; step < flags.steps; ++step) {
    double loss_sum = 0;
    for (int m = 0; m < flags.micro; ++m) {
      CHECK_OK(engine->BeginMicroStep(m, m == flags.micro - 1));
      const int64_t first = (int64_t{step} * flags.micro + m) * flags.batch + rank * local;
      for (int i = 0; i < local; ++i) Sample(first + i, &x[i * kIn], &y[i]);
      CHECK_OK(engine->Acquire(0, zero::Pass::kForward));  // h = relu(x W1 + b1)
      const float *w1 = engine->Param(0).as<float>(), *b1 = engine->Param(1).as<float>();
      for (int i = 0; i < local; ++i)
        for (int j = 0; j < kHidden; ++j) {
          float s = b1[j];
          for (int k = 0; k < kIn; ++k) s += x[i * kIn + k] * w1[k * kHidden + j];
          h[i * kHidden + j] = s > 0 ? s : 0;
        }
      CHECK_OK(engine->Release(0, zero::Pass::kForward));
      CHECK_OK(engine->Acquire(1, zero::Pass::kForward));  // logits = h W2 + b2, softmax cross-entropy
      const float *w2 = engine->Param(2).as<float>(), *b2 = engine->Param(3).as<float>();
      for (int i = 0; i < local; ++i) {
        float* l = &logits[i * kClasses];
        float mx = -1e30f, z = 0;
        for (int c = 0; c < kClasses; ++c) {
          l[c] = b2[c];
          for (int j = 0; j < kHidden; ++j) l[c] += h[i * kHidden + j] * w2[j * kClasses + c];
          mx = std::max(mx, l[c]);
        }
        for (int c = 0; c < kClasses; ++c) z += std::exp(l[c] - mx);
        loss_sum += std::log(z) + mx - l[y[i]];
        for (int c = 0; c < kClasses; ++c) l[c] = (std::exp(l[c] - mx) / z - (c == y[i])) / local;  // dlogits
      }
      CHECK_OK(engine->Release(1, zero::Pass::kForward));
      CHECK_OK(engine->Acquire(1, zero::Pass::kBackward));  // backward: += into gradient views
      float *gw2 = engine->Grad(2).as<float>(), *gb2 = engine->Grad(3).as<float>();
      w2 = engine->Param(2).as<float>();
      for (int i = 0; i < local; ++i)
        for (int j = 0; j < kHidden; ++j) {
          float d = 0;
          for (int c = 0; c < kClasses; ++c) {
            gw2[j * kClasses + c] += h[i * kHidden + j] * logits[i * kClasses + c];
            d += logits[i * kClasses + c] * w2[j * kClasses + c];
          }
          dh[i * kHidden + j] = h[i * kHidden + j] > 0 ? d : 0;
        }
      for (int i = 0; i < local; ++i)
        for (int c = 0; c < kClasses; ++c) gb2[c] += logits[i * kClasses + c];
      CHECK_OK(engine->GradsReady(1));
      CHECK_OK(engine->Release(1, zero::Pass::kBackward));
      CHECK_OK(engine->Acquire(0, zero::Pass::kBackward));
      float *gw1 = engine->Grad(0).as<float>(), *gb1 = engine->Grad(1).as<float>();
      for (int i = 0; i < local; ++i)
        for (int j = 0; j < kHidden; ++j) {
          gb1[j] += dh[i * kHidden + j];
          for (int k = 0; k < kIn; ++k) gw1[k * kHidden + j] += x[i * kIn + k] * dh[i * kHidden + j];
        }
      CHECK_OK(engine->GradsReady(0));
      CHECK_OK(engine->Release(0, zero::Pass::kBackward));
    }
    zero::StepResult result;
    CHECK_OK(engine->Step(zero::StepArgs(), &result));
    double loss = loss_sum / (local * flags.micro);  // this rank's mean; average over ranks for the log
    CHECK_OK(comm->AllReduce(&loss, &loss, 1, zero::DType::kF64, zero::ReduceOp::kSum));
    if (rank == 0) {
      const zero::MemoryReport mem = engine->Memory();
      std::printf("step %3d  loss %.4f  grad_norm %.4f  clip %.3f  device %lld B/rank (peak %lld)\n", step + 1,
                  loss / world, result.grad_norm, result.clip_coef, static_cast<long long>(mem.device.Total()),
                  static_cast<long long>(mem.device.peak_total));
    }
  }
  return 0;
}

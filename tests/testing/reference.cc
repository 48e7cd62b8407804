// The unsharded references of reference.h.
#include "testing/reference.h"

#include <cmath>

#include "kernels/cpu_kernels.h"
#include "partition_plan.h"
#include "ring_order.h"

namespace zero::testing {

namespace {

using Grads = std::vector<std::vector<float>>;  // per param

// Parameters from shared arrays, gradients into one rank's arrays; the protocol calls are no-ops.
class ArrayAccess : public ToyAccess {
 public:
  ArrayAccess(std::vector<std::vector<float>>* params, Grads* grads) : params_(params), grads_(grads) {}
  void Acquire(int, bool) override {}
  void Release(int, bool) override {}
  void GradsReady(int) override {}
  float* Param(int p) override { return (*params_)[static_cast<size_t>(p)].data(); }
  float* Grad(int p) override {
    std::vector<float>& g = (*grads_)[static_cast<size_t>(p)];
    return g.empty() ? nullptr : g.data();
  }

 private:
  std::vector<std::vector<float>>* params_;
  Grads* grads_;
};

Grads ZeroGrads(const std::vector<ParamSpec>& specs) {
  Grads g(specs.size());
  for (size_t p = 0; p < specs.size(); ++p) {
    if (specs[p].trainable) g[p].assign(static_cast<size_t>(specs[p].numel()), 0.0f);
  }
  return g;
}

constexpr double kClipEps = 1e-6;

}  // namespace

Reference::Reference(const ReferenceConfig& config) : config_(config), specs_(ToySpecs()) {
  for (size_t p = 0; p < specs_.size(); ++p) {
    std::vector<float> v(static_cast<size_t>(specs_[p].numel()));
    for (size_t i = 0; i < v.size(); ++i) v[i] = ToyInit(static_cast<int>(p), static_cast<int64_t>(i));
    params_.push_back(v);
    state0_.emplace_back(v.size(), 0.0f);
    state1_.emplace_back(v.size(), 0.0f);
  }
  RoundCompute();
}

void Reference::RoundCompute() {
  const DType dt = config_.mirror ? config_.options.param_dtype : DType::kF32;
  compute_ = params_;
  if (dt == DType::kF32) return;
  for (std::vector<float>& v : compute_) {
    for (float& x : v) x = dt == DType::kBF16 ? kernels::Bf16ToFloat(kernels::FloatToBf16(x))
                                              : kernels::F16ToFloat(kernels::FloatToF16(x));
  }
}

StepResult Reference::Step(int step) { return config_.mirror ? StepMirrored(step) : StepNaive(step); }

void Reference::Optimize(const Grads& raw, double grad_scale, double lr) {
  const Options& o = config_.options;
  const int64_t t = steps_taken_ + 1;
  for (size_t p = 0; p < specs_.size(); ++p) {
    if (!specs_[p].trainable) continue;
    const double plr = lr * specs_[p].lr_mult;
    const int64_t n = specs_[p].numel();
    if (o.optimizer == OptimizerKind::kAdamW) {
      const auto c = kernels::MakeAdamWCoeffs(plr, o.adamw.beta1, o.adamw.beta2, o.adamw.eps,
                                              o.adamw.weight_decay * specs_[p].wd_mult, t, grad_scale);
      kernels::AdamWCpu(c, params_[p].data(), state0_[p].data(), state1_[p].data(), raw[p].data(), n, 1);
    } else {
      const auto c = kernels::MakeSgdCoeffs(plr, o.sgd.momentum, o.sgd.dampening,
                                            o.sgd.weight_decay * specs_[p].wd_mult, o.sgd.nesterov,
                                            steps_taken_ == 0, grad_scale);
      kernels::SgdCpu(c, params_[p].data(), state0_[p].data(), raw[p].data(), n, 1);
    }
  }
  ++steps_taken_;
  RoundCompute();
}

StepResult Reference::StepMirrored(int step) {
  const int world = config_.world, micros = config_.micro_steps;
  const Stage stage = config_.options.stage;
  PartitionPlan plan;
  Status s = PartitionPlan::Build(specs_, world, config_.options.bucket_elements, &plan);
  if (!s.ok()) std::abort();

  // Owner of element i of param p: the rank whose shard of the bucket holds it.
  auto owner = [&](size_t p, int64_t i) {
    const ParamLocation& loc = plan.params[p];
    const Bucket& b = plan.buckets[static_cast<size_t>(loc.bucket)];
    return static_cast<int>((loc.offset + i) / b.shard);
  };
  auto ring_reduce = [&](const std::vector<Grads>& per_rank) {
    Grads out = ZeroGrads(specs_);
    std::vector<float> vals(static_cast<size_t>(world));
    for (size_t p = 0; p < specs_.size(); ++p) {
      for (size_t i = 0; i < out[p].size(); ++i) {
        for (int r = 0; r < world; ++r) vals[static_cast<size_t>(r)] = per_rank[static_cast<size_t>(r)][p][i];
        out[p][i] = RingSum(vals.data(), world, owner(p, static_cast<int64_t>(i)));
      }
    }
    return out;
  };

  Grads reduced = ZeroGrads(specs_);
  if (stage == Stage::kDataParallel || stage == Stage::kOptimizerStates) {
    // One gradient buffer per rank, accumulated across micro-steps, reduced once.
    std::vector<Grads> local(static_cast<size_t>(world), ZeroGrads(specs_));
    for (int m = 0; m < micros; ++m) {
      for (int r = 0; r < world; ++r) {
        ArrayAccess access(&compute_, &local[static_cast<size_t>(r)]);
        ToyForwardBackward(access, ToyMicroBatch(step, m, r, world, config_.global_batch));
      }
    }
    reduced = ring_reduce(local);
  } else {
    // A fresh buffer per micro-step, reduced each time and added into the shard accumulator.
    for (int m = 0; m < micros; ++m) {
      std::vector<Grads> local(static_cast<size_t>(world), ZeroGrads(specs_));
      for (int r = 0; r < world; ++r) {
        ArrayAccess access(&compute_, &local[static_cast<size_t>(r)]);
        ToyForwardBackward(access, ToyMicroBatch(step, m, r, world, config_.global_batch));
      }
      const Grads red = ring_reduce(local);
      for (size_t p = 0; p < reduced.size(); ++p) {
        for (size_t i = 0; i < reduced[p].size(); ++i) reduced[p][i] = reduced[p][i] + red[p][i];
      }
    }
  }

  // Norm: each rank's shards of the trainable buckets, in plan order, then the ranks in order.
  double sumsq = 0.0;
  for (int r = 0; r < world; ++r) {
    double mine = 0.0;
    for (const Bucket& b : plan.buckets) {
      if (!b.trainable) continue;
      std::vector<float> flat(static_cast<size_t>(b.padded), 0.0f);
      for (const ParamPlacement& pl : b.params) {
        for (int64_t i = 0; i < pl.numel; ++i) flat[static_cast<size_t>(pl.offset + i)] = reduced[pl.param][i];
      }
      mine += kernels::SumSquaresCpu(flat.data() + r * b.shard, b.shard, 1).sum;
    }
    sumsq += mine;
  }
  StepResult res;
  const double inv_avg = 1.0 / (static_cast<double>(world) * micros);
  res.grad_norm = std::sqrt(sumsq) * inv_avg;
  const double clip = config_.options.clip_norm;
  if (clip > 0 && clip / (res.grad_norm + kClipEps) < 1.0) res.clip_coef = clip / (res.grad_norm + kClipEps);
  const bool adamw = config_.options.optimizer == OptimizerKind::kAdamW;
  res.lr = adamw ? config_.options.adamw.lr : config_.options.sgd.lr;
  Optimize(reduced, inv_avg * res.clip_coef, res.lr);
  res.step = steps_taken_;
  return res;
}

StepResult Reference::StepNaive(int step) {
  const int world = config_.world, micros = config_.micro_steps;
  Grads g = ZeroGrads(specs_);
  for (int m = 0; m < micros; ++m) {
    ToyBatch all;
    for (int r = 0; r < world; ++r) {
      const ToyBatch b = ToyMicroBatch(step, m, r, world, config_.global_batch);
      all.tokens.insert(all.tokens.end(), b.tokens.begin(), b.tokens.end());
      all.targets.insert(all.targets.end(), b.targets.begin(), b.targets.end());
    }
    ArrayAccess access(&compute_, &g);
    ToyForwardBackward(access, all);
  }
  double sumsq = 0.0;
  for (const std::vector<float>& v : g) {
    for (float x : v) sumsq += static_cast<double>(x) * x;
  }
  StepResult res;
  res.grad_norm = std::sqrt(sumsq) / micros;
  const double clip = config_.options.clip_norm;
  if (clip > 0 && clip / (res.grad_norm + kClipEps) < 1.0) res.clip_coef = clip / (res.grad_norm + kClipEps);
  const bool adamw = config_.options.optimizer == OptimizerKind::kAdamW;
  res.lr = adamw ? config_.options.adamw.lr : config_.options.sgd.lr;
  Optimize(g, res.clip_coef / micros, res.lr);
  res.step = steps_taken_;
  return res;
}

}  // namespace zero::testing

// Single-process, unsharded references for the toy model, against which every stage is checked.
//
//  * Mirrored: simulates every rank's micro-batches in one process with full (unsharded) parameters, and
//    reproduces the engine's summation order: the stage's gradient accumulation pattern (one buffer across
//    micro-steps in stages 0-1, a fresh buffer per micro-step plus an accumulator in stages 2-3), the ring's
//    fixed per-element order (RingSum), and the norm's per-rank fp64 partials added in rank order. fp32 results
//    must then be bitwise equal to the engine's.
//  * Naive: one process, the whole global batch at once, plain fp64 norm: an independent check of the math,
//    equal within a tolerance that scales with the optimizer's sensitivity.
#pragma once

#include <vector>

#include "testing/toy_model.h"
#include "zero/engine.h"
#include "zero/options.h"

namespace zero::testing {

struct ReferenceConfig {
  Options options;       // stage, optimizer, clip_norm, bucket_elements, param_dtype (mirrored) are used
  int world = 1;
  int micro_steps = 2;
  int global_batch = 24;  // tokens per micro-step, split evenly across ranks
  bool mirror = true;
};

class Reference {
 public:
  explicit Reference(const ReferenceConfig& config);
  // Runs optimizer step `step` (0-based) over micro_steps micro-batches. Returns what Engine::Step reports.
  StepResult Step(int step);
  // The parameters the trainer computes with: the fp32 values, or with a low-precision param_dtype (mirrored
  // references only) the master rounded to it and widened back.
  const std::vector<float>& param(int p) const { return compute_[static_cast<size_t>(p)]; }

 private:
  void Optimize(const std::vector<std::vector<float>>& raw_grads, double grad_scale, double lr);
  StepResult StepMirrored(int step);
  StepResult StepNaive(int step);

  ReferenceConfig config_;
  std::vector<ParamSpec> specs_;
  void RoundCompute();  // compute_ = params_ rounded to param_dtype

  std::vector<std::vector<float>> params_, compute_, state0_, state1_;
  int64_t steps_taken_ = 0;
};

}  // namespace zero::testing

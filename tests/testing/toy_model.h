// The deterministic toy model of DESIGN.md, used by the equivalence, memory and communication tests.
//
// Units (forward order) and parameters:
//   unit 0  embed [11, 7]                 tied: the token lookup and the output head (acquired twice per pass)
//   unit 1  b1.w1 [7, 13], b1.b1 [13] (wd_mult 0), b1.w2 [13, 7]
//   unit 2  frozen.f [7, 7]               frozen (no gradient, no optimizer state)
//   unit 3  b2.w3 [7, 7] (lr_mult 0.5), b2.gain [1] (wd_mult 0; smaller than any world size > 1)
// Per token t with target y:
//   x0 = E[t];  h1 = tanh(x0 W1 + b1);  x1 = x0 + h1 W2;  x2 = x1 + tanh(x1 F);  x3 = x2 + gain * tanh(x2 W3)
//   loss = logsumexp(x3 E^T) - (x3 E^T)[y], averaged over the micro-batch.
// tanh, exp and log are toy_math.cuh's, which give the same bits on the CPU and on a GPU, so that a trainer
// running the model as kernels (toy_kernel_model.h) can be compared bitwise with this one.
// Sizes are odd on purpose so that buckets and shards never line up with parameters.
#pragma once

#include <cstdint>
#include <vector>

#include "testing/toy_math.cuh"  // kVocab, kDim, kHidden, kToyUnits, kToyParams, ToyTanh, ToyExp, ToyLog
#include "zero/options.h"

namespace zero::testing {

std::vector<ParamSpec> ToySpecs();
// Deterministic initial value of element `off` of parameter `param`.
float ToyInit(int param, int64_t off);
// Every parameter's initial values (ToyInit), per parameter.
std::vector<std::vector<float>> ToyInitialParams();

struct ToyBatch {
  std::vector<int> tokens;
  std::vector<int> targets;
};
// The micro-batch of `rank` (of `world`) for micro-step `micro` of step `step`: a fixed global batch of
// `global` tokens per micro-step split into equal contiguous parts by rank.
ToyBatch ToyMicroBatch(int step, int micro, int rank, int world, int global);

// What the model needs from whoever owns parameters: the engine, or a reference's plain arrays.
class ToyAccess {
 public:
  virtual ~ToyAccess() = default;
  virtual void Acquire(int unit, bool backward) = 0;
  virtual void Release(int unit, bool backward) = 0;
  virtual void GradsReady(int unit) = 0;
  virtual float* Param(int param) = 0;
  virtual float* Grad(int param) = 0;  // gradients are accumulated (+=)
};

// Runs forward and backward of one micro-batch through `access` in the protocol's order (the tied unit is
// acquired twice in each pass), accumulating gradients. Returns the micro-batch's mean loss.
// `loss_scale` multiplies the loss before backward, as a mixed-precision trainer does with Engine::LossScale().
float ToyForwardBackward(ToyAccess& access, const ToyBatch& batch, float loss_scale = 1.0f);
// Forward only (acquires in forward order), returns the mean loss.
float ToyForward(ToyAccess& access, const ToyBatch& batch);

}  // namespace zero::testing

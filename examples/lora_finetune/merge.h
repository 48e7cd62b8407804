// Folding LoRA adapters into their base weights (W' = W + (alpha / r) B A), and a ParamAccess over full tensors
// that are already in memory (inside a zero GatherFull scope, or plain arrays in tests).
#pragma once

#include <utility>
#include <vector>

#include "examples/lora_finetune/model.h"

namespace lora {

// Forward-only access to full tensors: Acquire / Release do nothing, Param(p) is params[p], Grad is never valid.
class FullAccess : public ParamAccess {
 public:
  explicit FullAccess(std::vector<const float*> params) : params_(std::move(params)) {}
  void Acquire(int, bool) override {}
  void Release(int, bool) override {}
  void GradsReady(int) override {}
  const float* Param(int p) override { return params_[static_cast<size_t>(p)]; }
  float* Grad(int) override { return nullptr; }

 private:
  std::vector<const float*> params_;
};

// The merged model: tensors in Parameters(m, LoraConfig()) order (no adapters).
struct MergedModel {
  std::vector<const float*> params;        // the folded copy for targeted projections, else the adapted model's
  std::vector<std::vector<float>> folded;  // per merged parameter: its folded copy, or empty
};

// `adapted[p]` is the full tensor p of Parameters(m, l) (REQUIRES l.enabled). Each targeted projection is copied
// and folded, W + (alpha / r) B A, in fp32 (sgemm); the adapted tensors are not written (inside a stage 0-2
// GatherFull scope they are the engine's own copies). The rest of the merged model points into `adapted`.
MergedModel Merge(const ModelConfig& m, const LoraConfig& l, const std::vector<const float*>& adapted, int threads);

}  // namespace lora

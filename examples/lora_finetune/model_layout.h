// The model's parameter table: which parameter index is which weight, built in one place (BuildLayout in
// model.cc, which also makes Parameters()) for the CPU model and the CUDA model (model_cuda.cu) alike.
#pragma once

#include <vector>

#include "examples/lora_finetune/model.h"

namespace lora::detail {

// The seven projections of a block, in parameter order.
enum Proj { kQ, kK, kV, kO, kGate, kUp, kDown, kNumProj };
inline constexpr const char* kProjName[kNumProj] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                             "mlp.down_proj"};

struct Linear {
  int w = -1, a = -1, b = -1;  // parameter indices; a, b = -1 without an adapter
  int in = 0, out = 0;
};

struct Block {
  int ln1 = -1, ln2 = -1;
  Linear proj[kNumProj];
};

// Parameter indices and infos, built in one place so Parameters() and the kernels agree.
struct Layout {
  int embed = -1, norm = -1;
  std::vector<Block> blocks;
  std::vector<ParamInfo> params;
};

Layout BuildLayout(const ModelConfig& m, const LoraConfig& lora);

}  // namespace lora::detail

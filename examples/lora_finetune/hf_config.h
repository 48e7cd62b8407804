// Hugging Face model directories as transformers and PEFT load them, without conversion:
//   model directory    config.json (LlamaConfig), model.safetensors (Hugging Face LLaMA names, written by the
//                      caller), tokenizer.json + tokenizer_config.json (hf_tokenizer.h)
//   adapter directory  adapter_config.json (PEFT's LoraConfig), adapter_model.safetensors (PEFT names)
// so that, in Python,
//   model = AutoModelForCausalLM.from_pretrained(base_dir)          # or merged_dir
//   model = PeftModel.from_pretrained(model, adapter_dir)           # or AutoPeftModelForCausalLM(adapter_dir)
//   tokenizer = AutoTokenizer.from_pretrained(base_dir)
// compute what the example computes (tests/hf_load_check.py compares the logits).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "examples/lora_finetune/model.h"
#include "examples/lora_finetune/tokenizer.h"
#include "zero/status.h"

namespace lora {

struct HfModelOptions {
  int64_t max_position_embeddings = 0;  // the context the model was trained for (SmolLM2: 8192)
  int32_t bos_token_id = -1;            // -1: none (the small byte-level base has no special tokens)
  int32_t eos_token_id = -1;
  std::string chat_template;            // copied into tokenizer_config.json when not empty
};

// config.json of `m` for LlamaForCausalLM: fp32 weights ("torch_dtype": "float32"), SiLU, tied embeddings, no
// biases, no RoPE scaling; rms_norm_eps and rope_theta written as the shortest decimals that read back as the
// model's float values. `indent` < 0: one line (the safetensors metadata's "config").
std::string HfLlamaConfigJson(const ModelConfig& m, const HfModelOptions& options, int indent = 2);

struct PeftLoraOptions {
  std::string base_model_name_or_path;      // a directory or a hub name
  int r = 8;
  float alpha = 16.f;
  float dropout = 0.f;
  std::vector<std::string> target_modules;  // "q_proj", "gate_proj", ...
};
// adapter_config.json: PEFT's LoraConfig fields for a causal LM (task CAUSAL_LM, bias none, no rank or alpha
// patterns), the keys PEFT 0.10 and later accept.
std::string PeftAdapterConfigJson(const PeftLoraOptions& options);

// Writes `text` to dir/name through a temporary file and a rename; creates dir.
zero::Status WriteTextFile(const std::string& dir, const std::string& name, const std::string& text);

// Writes config.json, tokenizer.json and tokenizer_config.json into `dir` (model.safetensors is the caller's).
zero::Status WriteHfModelFiles(const std::string& dir, const ModelConfig& m, const BpeTokenizer& tokenizer,
                               const HfModelOptions& options);

}  // namespace lora

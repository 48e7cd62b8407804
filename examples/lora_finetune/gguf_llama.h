// A LLaMA-architecture GGUF file (as written by llama.cpp's convert_hf_to_gguf.py; SmolLM2-135M-Instruct is one)
// as the frozen base of the example's model (model.h): its configuration from the llama.* metadata, the Hugging
// Face name of each tensor, and range reads in Hugging Face layout, so that each rank dequantizes only the
// fragments zero's InitParams asks it for.
//
// RoPE row order. llama.cpp rotates adjacent pairs (x[2j], x[2j+1]) of each head; Hugging Face LLaMA (and
// model.cc's Rope) rotates x[j] with x[j + head_dim/2]. The converter therefore permutes the rows of q_proj and
// k_proj within each head: GGUF row h*hd + 2j + s holds Hugging Face row h*hd + s*hd/2 + j (s in {0, 1},
// j < hd/2). ReadHfRange undoes it, so the loaded model, and adapters trained on it, are in Hugging Face row order
// (what PEFT and transformers expect).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "examples/lora_finetune/gguf.h"
#include "examples/lora_finetune/model.h"
#include "zero/status.h"

namespace lora {

// The model configuration from general.architecture ("llama", else an error) and llama.block_count,
// embedding_length, feed_forward_length, attention.head_count, attention.head_count_kv (default: head_count),
// rope.freq_base (default 10000), attention.layer_norm_rms_epsilon, and the vocabulary from token_embd.weight.
// Also checks what model.h cannot represent: rope.dimension_count other than head_dim, RoPE scaling, an untied
// output.weight, and any tensor of the model missing or of another shape. Errors name the file and the key.
zero::Status LlamaConfigFromGguf(const GgufFile& file, ModelConfig* config);

// The GGUF tensor name of a base parameter's Hugging Face name (model.layers.3.self_attn.q_proj.weight ->
// blk.3.attn_q.weight); empty when there is none (LoRA adapters).
std::string GgufTensorName(const std::string& hf_name);

// Within one head of head_dim rows: the GGUF row that holds Hugging Face row `row` of q_proj / k_proj.
int64_t GgufRowOfHfRow(int64_t row, int64_t head_dim);

// Elements [first, first + count) of base parameter `hf_name` in Hugging Face row-major order, dequantized; q_proj
// and k_proj rows are read through GgufRowOfHfRow. Thread-safe (pread).
zero::Status ReadHfRange(const GgufFile& file, const ModelConfig& config, const std::string& hf_name, int64_t first,
                         int64_t count, float* out);

}  // namespace lora

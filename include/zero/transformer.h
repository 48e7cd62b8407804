// zero::TransformerShape and zero::ActivationOptions: a LLaMA-style decoder described without weights, and one
// micro-batch of its training pass. What the estimator (estimate.h) takes to count parameters and activations, and
// what Options gives Stage::kAuto so that it can leave the activations' memory free by estimate.
#pragma once

#include <cstdint>

#include "zero/types.h"

namespace zero {

// The projections of a block that LoRA adapters can target (a bit set).
enum LoraTarget : uint32_t {
  kLoraQ = 1u << 0,
  kLoraK = 1u << 1,
  kLoraV = 1u << 2,
  kLoraO = 1u << 3,
  kLoraGate = 1u << 4,
  kLoraUp = 1u << 5,
  kLoraDown = 1u << 6,
};

// A LLaMA-style decoder (RMSNorm, RoPE, no biases, SwiGLU feed-forward, grouped-query attention). Expands to units:
// 0 = the token embedding [vocab, hidden]; 1..layers = the blocks (attention norm, q, k, v, o, feed-forward norm,
// gate, up, down, and their LoRA adapters); layers + 1 = the final norm and, unless tied, the output head
// [vocab, hidden]. Shapes are [out, in], as Hugging Face stores them.
struct TransformerShape {
  int64_t layers = 0;
  int64_t hidden = 0;
  int64_t heads = 0;     // 0: multi-head attention with k and v as wide as q (kv_heads must be 0 too)
  int64_t kv_heads = 0;  // 0: heads; k and v are [hidden / heads * kv_heads, hidden]
  int64_t ffn = 0;       // the feed-forward's inner width (gate and up: [ffn, hidden]; down: [hidden, ffn])
  int64_t vocab = 0;
  bool tied = false;     // the head reuses the embedding (no head parameter)
  bool frozen = false;   // every base parameter frozen (a base under adapters)
  // LoRA: adapters of this rank on the targeted projections (0: none), each {proj}.lora_A.weight [rank, in] and
  // {proj}.lora_B.weight [out, rank], trainable, in the block's unit; the base is then frozen whatever `frozen` says.
  int64_t lora_rank = 0;
  uint32_t lora_targets = kLoraQ | kLoraK | kLoraV | kLoraO;
};

// One micro-batch of a training pass, as the activation estimate (zero::EstimateActivations) counts it.
struct ActivationOptions {
  int64_t micro_batch = 1;  // sequences per rank per micro-step
  int64_t seq_len = 0;      // tokens per sequence
  // Per-block recomputation (activation checkpointing): forward keeps only each block's input, backward recomputes
  // the block's activations from it. Saves all but one block's activations; costs one more forward of the blocks
  // (about a third more compute per step).
  bool recompute = false;
  // The compute dtype: what matrix-product operands are stored in. kF32 is the LoRA example's CPU model; kBF16 or
  // kF16 its CUDA model (residual stream, statistics, logits and gradients stay fp32).
  DType dtype = DType::kBF16;
  bool lora_dropout = false;  // dropout on the adapters' inputs (its masks are recomputed, never stored)
};

}  // namespace zero

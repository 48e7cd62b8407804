// The model of the LoRA fine-tune example: a small LLaMA-style decoder (RMSNorm, RoPE, grouped-query causal
// attention, SwiGLU MLP, tied embeddings) with optional LoRA adapters, forward and backward written by hand for
// the CPU in fp32 (CBLAS sgemm for matrix products, OpenMP for the rest).
//
// The model owns no parameters: it reaches them only through ParamAccess, which the trainer implements over
// zero::Engine (which owns and shards them) and tests implement over plain arrays. Activations for backward live
// inside one Forward call, in a Workspace (model_workspace.h) that counts them; there is no global state (except
// OpenBLAS's thread count, set to `threads`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "examples/lora_finetune/model_workspace.h"

namespace lora {

struct ModelConfig {
  int vocab = 256;   // byte-level tokens (a GGUF base brings its own: 49152 for SmolLM2)
  int dim = 64;      // model width; head_dim = dim / heads (must be even for RoPE)
  int layers = 2;    // transformer blocks; each is one zero unit
  int heads = 4;     // query heads
  int kv_heads = 2;  // key/value heads (grouped-query attention); must divide heads
  int ffn = 172;     // SwiGLU hidden width
  float rope_theta = 10000.f;
  float norm_eps = 1e-5f;
};

struct LoraConfig {
  bool enabled = false;  // false: every parameter is trainable (pretraining)
  int r = 8;             // adapter rank
  float alpha = 16.f;    // y = W x + (alpha / r) * B (A (dropout(x)))
  float dropout = 0.f;   // on the adapter's input, only in training passes (Forward with backward = true)
  bool q = true, k = true, v = true, o = true, gate = false, up = false, down = false;  // targeted projections
};

struct ParamInfo {
  std::string name;            // Hugging Face LLaMA / PEFT name
  std::vector<int64_t> shape;  // row-major; linear weights are [out, in]
  int unit;                    // zero unit: 0 embedding (tied head), i + 1 block i, layers + 1 final norm
  bool trainable;
};

// Empty when the configurations are usable; otherwise what is wrong. Every other call REQUIRES it empty.
std::string CheckConfig(const ModelConfig&, const LoraConfig&);

// Parameters in a fixed order (the `param` index of every other call), with Hugging Face LLaMA names:
//   model.embed_tokens.weight [vocab, dim]                      unit 0 (tied with the output head)
//   per block i, unit i + 1:
//     model.layers.{i}.input_layernorm.weight [dim]
//     model.layers.{i}.self_attn.{q,k,v,o}_proj.weight [out, in]
//     model.layers.{i}.post_attention_layernorm.weight [dim]
//     model.layers.{i}.mlp.{gate,up,down}_proj.weight [out, in]
//   model.norm.weight [dim]                                     unit layers + 1
// With LoRA enabled every base weight is frozen (trainable = false) and each targeted projection is followed by
// its adapter, {proj}.lora_A.weight [r, in] and {proj}.lora_B.weight [out, r] (trainable, in the block's unit).
std::vector<ParamInfo> Parameters(const ModelConfig&, const LoraConfig&);

// Number of zero units: layers + 2.
inline int NumUnits(const ModelConfig& config) { return config.layers + 2; }

// Deterministic initial value of element `i` of parameter `param`, from a counter-based hash of (seed, param, i):
// normal(0, 0.02) for the embedding and projections (o_proj and down_proj scaled by 1/sqrt(2 * layers), as
// GPT-2/LLaMA-style trainers do for the residual branches), 1 for norms, lora_A uniform in +-1/sqrt(in) (PEFT's
// kaiming-uniform bound), lora_B 0. Independent of rank and world size: zero's InitParams calls it per fragment.
float InitValue(const ModelConfig&, const LoraConfig&, int param, int64_t i, uint64_t seed);

// How the model reaches parameters and gradients.
class ParamAccess {
 public:
  virtual ~ParamAccess() = default;
  virtual void Acquire(int unit, bool backward) = 0;
  virtual void Release(int unit, bool backward) = 0;
  virtual void GradsReady(int unit) = 0;      // after the unit's last backward use, once per Forward(backward)
  virtual const float* Param(int param) = 0;  // valid while its unit is acquired
  virtual float* Grad(int param) = 0;         // accumulate (+=); asked only for trainable parameters
};

// batch sequences of seq tokens each, row-major [batch * seq]. targets[j] = -1 ignores position j.
struct Batch {
  int batch;
  int seq;
  const int32_t* tokens;
  const int32_t* targets;
};

// How a pass keeps its activations.
struct PassOptions {
  // Per-block recomputation (activation checkpointing): forward keeps only each block's input; backward runs the
  // block's forward again from it, then its backward. Costs one more forward of the blocks; the results are the
  // same bits (dropout masks are hashed, not drawn). Memory: zero::EstimateActivations says how much.
  bool recompute = false;
  // Where activations live (Workspace::Host() for this model; the CUDA model's from NewCudaWorkspace()): its
  // peak_bytes() is the pass's activation high-water mark. Null: a workspace for this pass alone.
  Workspace* workspace = nullptr;
};

// Mean next-token cross-entropy over the non-ignored targets (0 when there are none). With `backward`, the
// gradient of loss * loss_scale is added into Grad(p) of every trainable parameter, and LoRA dropout is applied
// with masks hashed from dropout_seed. The access protocol, units u = 0 .. layers + 1:
//   forward:  Acquire(0) Release(0), Acquire(1) Release(1), ..., Acquire(layers+1) Release(layers+1),
//             Acquire(0) Release(0)   (the tied embedding again, for the output head)
//   backward: Acquire(0) Release(0)   (head), then for u = layers+1 .. 1: Acquire(u) GradsReady(u) Release(u),
//             then Acquire(0) GradsReady(0) Release(0)   (the lookup: unit 0's last backward use)
// Param pointers are re-read after every Acquire (recomputation happens inside the backward Acquire of its block,
// so the protocol is the same with it). `threads` bounds OpenMP and OpenBLAS threads.
float Forward(const ModelConfig&, const LoraConfig&, ParamAccess&, const Batch&, bool backward, float loss_scale,
              uint64_t dropout_seed, int threads, const PassOptions& options = {});

// Logits [batch * seq, vocab] for evaluation or sampling: the forward protocol above, no dropout, no targets read.
void Logits(const ModelConfig&, const LoraConfig&, ParamAccess&, const Batch&, std::vector<float>* logits, int threads,
            Workspace* workspace = nullptr);

}  // namespace lora

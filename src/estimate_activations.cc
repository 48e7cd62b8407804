// zero::EstimateActivations: the per-rank bytes of one micro-batch's training pass of a LLaMA-style decoder,
// counted buffer by buffer as the LoRA example's models hold them (examples/lora_finetune/model.cc and
// model_cuda.cu, which take every activation from a stack-like Workspace and free in reverse order, so their peak
// is a sum of the buffers alive at one moment). tests/lora_activation_test.cc measures the CPU model's peak against
// this at several batch sizes and sequence lengths, with and without recomputation.
//
// Derivation. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count, for
// a GPT layer in 16 bits with dropout, sbh(34 + 5as/h) bytes per layer: 34 bytes per token and hidden unit for the
// stored inputs of the norms, projections, GELU and dropout masks, 5 a s bytes per token for the attention scores,
// softmax output and its dropout mask; with full recomputation only 2sbh per layer (the layer's input) plus one
// layer's activations during its backward. This implementation differs from their GPT in ways that change every
// term, so it is counted from the code instead:
//   - RMSNorm, no biases, no dropout on activations (LoRA dropout masks are hashed from a seed, never stored);
//   - SwiGLU: gate and up (F wide) and silu(gate) * up are kept, where GPT keeps GELU's 4h input and output;
//   - grouped-query attention: k and v are K = kv_heads * head_dim wide;
//   - the residual stream, the norm statistics and every gradient are fp32; the operands of matrix products are
//     in the compute dtype (fp32 on the CPU; bf16 on a GPU, which also keeps fp32 staging copies of products
//     before rounding them, and the head-major copies its batched attention products read);
//   - the block input (for the first norm's backward) is kept besides the normed input, and so is the attention
//     residual x_mid besides the second norm's output: the models keep the norm inputs rather than recompute them;
//   - the attention probabilities are stored once (the compute dtype), the scores never (they are a transient);
//   - the head's logits are fp32, [tokens, vocab], and at the model's loss they are the largest single buffer.
//
// Notation: b micro-batch, T seq_len, N = b T tokens, L layers, D hidden, H heads, hd = D / H, Q = H hd, K = kv_heads
// hd, F ffn, V vocab; e = bytes of the compute dtype. On the narrow (GPU) path, e < 4, s(x) = 4x is an fp32
// staging copy of a product stored narrow and c(x) = e x a narrow copy of an fp32 tensor; both are 0 when e = 4.
// LoRA (rank r, targeted projections P): each targeted projection keeps u = A x (e N r); LF_p and LB_p are its
// forward and backward temporaries (the dropout mask applied to the input, recomputed, e N in_p, and the
// gradient through it, 4 N in_p, when dropout is on; the fp32 staging of u and du).
//
//   block input        I = 4ND                                             kept in both modes
//   block activations  A = 4N + eND                 1/rms, normed input
//                        + eN(Q + 2K)               q and k after RoPE, v
//                        + e N H T                  the causal softmax probabilities [b, H, T, T]
//                        + eNQ                      the attention output (o's input)
//                        + 4ND + 4N + eND           x_mid, 1/rms, normed
//                        + 8NF + eNF                gate and up outputs (fp32), silu(gate) * up (down's input)
//                        + sum_P e N r              the adapters' A x
//   forward temps      max( s(N(Q + 2K)) + LF_qkv,  q, k, v staged before RoPE and the narrow cast
//                           s(NQ) + s(NHT),         the fp32 scores and the attention output, staged
//                           4ND + LF_o, 4ND + LF_gate|up, 4ND + LF_down )   the o and down outputs
//   backward temps     max( 2eNF + 4NF + c(ND) + LB_down,            dgate, dup, dh; dx cast for down
//                           2eNF + 4ND + LB_gate|up,                 + the normed input's gradient
//                           eN(Q + 2K) + 4NQ + c(ND) + LB_o,         dq, dk, dv; d(attention output)
//                           eN(Q + 2K) + 4NQ + s(N(Q + 2K)) + c(NQ) + c(NHT) + 4NHT,   the scores' gradient
//                           eN(Q + 2K) + 4ND + LB_qkv )
//   head               H_ = 4N + eND + 4ND + 4NV + max(8N, c(NV))   final norm, its output's gradient, logits,
//                                                                   per-row losses (fp64) or narrow dlogits
//   fixed              X = 8 T (hd / 2) + 4ND + 4ND (+ 8N narrow)   RoPE tables, residual stream and its
//                                                                   gradient (device token ids and targets)
//
//   peak, stored       X + L (I + A) + max(forward temps, backward temps, H_)
//   peak, recomputed   X + L I + max(A + 4ND + forward temps, A + backward temps, H_)
// (with recomputation a block's activations exist once, during its forward and again, from a copy of its input,
// during its backward). For LLaMA-7B in bf16 without LoRA this keeps about 47 D + 2 H T bytes per token and layer
// (Korthikanti's GPT: 34 D + 5 H T), plus one layer's temporaries and the fp32 logits, 4V per token.
//
// Not counted: cuBLAS's own workspace, the CUDA context, NCCL's buffers and the allocator's rounding; the
// engine's buffers are zero::Estimate's.
#include <algorithm>
#include <cstdio>
#include <sstream>
#include <vector>

#include "zero/estimate.h"

namespace zero {

Status EstimateActivations(const TransformerShape& shape, const ActivationOptions& o, ActivationEstimate* out) {
  *out = ActivationEstimate();
  auto bad = [](const std::string& m) { return Status::InvalidArgument("EstimateActivations: " + m); };
  std::vector<ParamSpec> specs;
  ZERO_RETURN_IF_ERROR(TransformerSpecs(shape, &specs).WithContext("EstimateActivations"));
  if (shape.heads < 1) {
    return bad("heads must be given (>= 1): the attention probabilities are micro_batch x heads x seq_len^2 values");
  }
  if (o.micro_batch < 1) return bad("micro_batch must be >= 1");
  if (o.seq_len < 1) return bad("seq_len must be >= 1");
  if (o.dtype != DType::kF32 && o.dtype != DType::kBF16 && o.dtype != DType::kF16) {
    return bad(std::string("dtype must be kF32, kBF16 or kF16, not ") + DTypeName(o.dtype));
  }
  const int64_t e = static_cast<int64_t>(DTypeSize(o.dtype));
  const bool narrow = e < 4;
  auto s = [&](int64_t x) { return narrow ? 4 * x : 0; };  // fp32 staging of a product stored narrow
  auto c = [&](int64_t x) { return narrow ? e * x : 0; };  // a narrow copy of an fp32 tensor
  const int64_t T = o.seq_len, N = o.micro_batch * T, L = shape.layers, D = shape.hidden, H = shape.heads;
  const int64_t hd = D / H, kvh = shape.kv_heads == 0 ? H : shape.kv_heads;
  const int64_t Q = H * hd, K = kvh * hd, F = shape.ffn, V = shape.vocab, NHT = N * H * T;

  // LoRA, per projection in the order q, k, v, o, gate, up, down.
  const int64_t r = shape.lora_rank;
  const bool drop = o.lora_dropout && r > 0;
  const int64_t in[7] = {D, D, D, Q, D, D, F};
  bool adapted[7];
  for (int p = 0; p < 7; ++p) adapted[p] = r > 0 && (shape.lora_targets & (1u << p)) != 0;
  auto lf = [&](int p) { return adapted[p] ? (drop ? e * N * in[p] : 0) + s(N * r) : 0; };
  auto lb = [&](int p) { return adapted[p] ? 4 * N * r + c(N * r) + (drop ? (e + 4) * N * in[p] : 0) : 0; };
  int64_t lora_kept = 0;
  for (int p = 0; p < 7; ++p) lora_kept += adapted[p] ? e * N * r : 0;
  const int64_t lf_qkv = std::max({lf(0), lf(1), lf(2)}), lb_qkv = std::max({lb(0), lb(1), lb(2)});

  const int64_t I = 4 * N * D;
  const int64_t A = 4 * N + e * N * D + e * N * (Q + 2 * K) + e * NHT + e * N * Q + 4 * N * D + 4 * N + e * N * D +
                    8 * N * F + e * N * F + lora_kept;
  const int64_t fwd = std::max({s(N * (Q + 2 * K)) + lf_qkv, s(N * Q) + s(NHT), 4 * N * D + lf(3),
                                4 * N * D + std::max(lf(4), lf(5)), 4 * N * D + lf(6)});
  const int64_t bwd = std::max({2 * e * N * F + 4 * N * F + c(N * D) + lb(6),
                                2 * e * N * F + 4 * N * D + std::max(lb(4), lb(5)),
                                e * N * (Q + 2 * K) + 4 * N * Q + c(N * D) + lb(3),
                                e * N * (Q + 2 * K) + 4 * N * Q + s(N * (Q + 2 * K)) + c(N * Q) + c(NHT) + 4 * NHT,
                                e * N * (Q + 2 * K) + 4 * N * D + lb_qkv});
  const int64_t head = 4 * N + e * N * D + 4 * N * D + 4 * N * V + std::max(8 * N, c(N * V));
  const int64_t fixed = 8 * T * (hd / 2) + (narrow ? 8 * N : 0) + 8 * N * D;

  out->options = o;
  out->tokens = N;
  out->fixed = fixed;
  out->block_input = I;
  out->block_kept = A;
  out->kept = L * (I + (o.recompute ? 0 : A));
  out->block_forward_temp = fwd;
  out->block_backward_temp = bwd;
  out->head = head;
  out->peak = fixed + out->kept +
              (o.recompute ? std::max({A + 4 * N * D + fwd, A + bwd, head}) : std::max({fwd, bwd, head}));
  return Status::Ok();
}

std::string ActivationEstimate::Table() const {
  std::ostringstream os;
  char line[160];
  auto row = [&](const char* what, int64_t bytes) {
    std::snprintf(line, sizeof(line), "  %-52s %12.2f MiB\n", what, static_cast<double>(bytes) / (1 << 20));
    os << line;
  };
  os << "activations of one micro-batch of " << options.micro_batch << " x " << options.seq_len << " tokens, "
     << DTypeName(options.dtype) << (options.recompute ? ", per-block recomputation" : ", stored") << "\n";
  row("fixed (RoPE tables, residual stream and its gradient)", fixed);
  row(options.recompute ? "kept for backward (each block's input)" : "kept for backward (each block's input + acts)",
      kept);
  row("  of which one block's input", block_input);
  row(options.recompute ? "one block's activations, recomputed" : "  of which one block's activations", block_kept);
  row("largest block forward temporaries", block_forward_temp);
  row("largest block backward temporaries", block_backward_temp);
  row("head (final norm, fp32 logits, their gradient, losses)", head);
  row("peak", peak);
  return os.str();
}

}  // namespace zero

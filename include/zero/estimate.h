// zero::Estimate: the bytes Engine::Open will allocate, per rank and by category, before anything is allocated;
// zero::EstimateActivations: the bytes a LLaMA-style model's training pass holds for one micro-batch;
// zero::ChooseConfiguration: the configuration Stage::kAuto picks for a given amount of free device memory; and
// zero::PlanTraining: the whole answer, stage, offload, micro-batch, recomputation and accumulation steps.
//
// Estimates come from the engine's own partition plan and buffer rules (src/buffer_plan.h), not from a second
// copy of them: on the CPU backend an estimate equals Engine::Memory() after Open and after any step, byte for
// byte (tests/estimate_test.cc). Activations are counted buffer by buffer as the LoRA example's models hold them
// (src/estimate_activations.cc derives it; tests/lora_activation_test.cc measures them). Pure functions: no
// device, no communicator, no allocation of model size.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "zero/options.h"
#include "zero/status.h"
#include "zero/transformer.h"
#include "zero/types.h"

namespace zero {

// Appends the shape's parameters to *specs (names as Hugging Face LLaMA: model.layers.N.self_attn.q_proj.weight;
// adapters as PEFT's: model.layers.N.self_attn.q_proj.lora_A.weight). InvalidArgument naming the field for
// non-positive sizes or heads that do not divide hidden / kv_heads that do not divide heads.
Status TransformerSpecs(const TransformerShape& shape, std::vector<ParamSpec>* specs);

// Per-rank activation bytes of one micro-batch of a training pass (forward, loss and backward) of a LLaMA-style
// decoder: what lives between forward and backward (every block's input; every block's activations unless
// recomputing), the logits and the loss, and the largest set of temporaries alive at once. The parts, so that a
// table can show where the bytes go:
struct ActivationEstimate {
  ActivationOptions options;
  int64_t tokens = 0;         // micro_batch * seq_len
  int64_t fixed = 0;          // the pass's own: RoPE tables, the residual stream and its gradient (and token ids)
  int64_t block_input = 0;    // one block's input, kept for backward in either mode
  int64_t block_kept = 0;     // one block's activations for its backward (all of them: kept, or recomputed)
  int64_t kept = 0;           // what forward leaves for backward: layers * (input [+ activations])
  int64_t block_forward_temp = 0;   // the largest set of a block forward's temporaries
  int64_t block_backward_temp = 0;  // ... of a block backward's (attention scores' gradient, projections')
  int64_t head = 0;           // final norm, logits [tokens, vocab] in fp32, their gradient and the per-row losses
  int64_t peak = 0;           // the pass's high-water mark: reserve this
  std::string Table() const;  // one line per part, in MiB
};

// InvalidArgument for a shape TransformerSpecs rejects, heads == 0 (the attention scores need the head count),
// micro_batch or seq_len < 1, or a dtype other than kF32, kBF16, kF16.
Status EstimateActivations(const TransformerShape& shape, const ActivationOptions& options, ActivationEstimate* out);

// What is estimated: the parameter specs as Engine::Open takes them (exact), or, with less precision, a bare
// parameter count (then only model states are estimated: parameters, gradients, optimizer state; the gradient
// pool, stage-3 gather slots, offload staging and scratch depend on the unit sizes and are left out, and
// MemoryEstimate::model_state_only says so).
struct ModelDescription {
  std::vector<ParamSpec> specs;
  int64_t param_count = 0;         // used when specs is empty: trainable parameters
  int64_t frozen_param_count = 0;  // used when specs is empty: frozen parameters

  static ModelDescription FromSpecs(std::vector<ParamSpec> specs);
  static ModelDescription FromParamCount(int64_t trainable, int64_t frozen = 0);
};

struct MemoryEstimate {
  struct Item {
    std::string what;  // the allocation's name, as in out-of-memory messages ("gradient pool", ...)
    MemoryCategory category;
    MemoryKind kind;
    int64_t bytes;
  };
  Options options;  // the configuration estimated
  int world_size = 1;
  bool model_state_only = false;  // from a bare parameter count: working buffers not included
  int64_t trainable_padded = 0;   // Ψt, padded elements of trainable parameters (over all ranks)
  int64_t frozen_padded = 0;      // Ψf
  int64_t device[kNumMemoryCategories] = {};  // bytes per rank on the device, index MemoryCategory
  int64_t host[kNumMemoryCategories] = {};    // bytes per rank in host memory: offload, staging, NVMe bounce buffers
  int64_t nvme[kNumMemoryCategories] = {};    // bytes per rank in the NVMe tier's files (Options::nvme_path)
  std::vector<Item> items;                    // every allocation of Engine::Open (and the tier's files), in order

  int64_t DeviceTotal() const;
  int64_t HostTotal() const;
  int64_t NvmeTotal() const;
  int64_t Device(MemoryCategory c) const { return device[static_cast<int>(c)]; }
  int64_t Host(MemoryCategory c) const { return host[static_cast<int>(c)]; }
  int64_t Nvme(MemoryCategory c) const { return nvme[static_cast<int>(c)]; }
  // The NVMe tier's bounce buffers (pinned host, part of host[kBuffers]): what stays in host memory per rank however
  // large the model.
  int64_t NvmeBounceBytes() const;
  // A table: one row per allocation kind (params, gradients, optimizer, pool, gather slots, staging...) with
  // device and host bytes per rank (and NVMe with a tier), and the totals.
  std::string Table() const;
};

// Per-rank bytes for `world_size` ranks and `options` (a concrete stage; for kAuto use ChooseConfiguration).
// Fails like Engine::Open on invalid options or specs.
Status Estimate(const ModelDescription& model, int world_size, const Options& options, MemoryEstimate* out);
// The same with `ranks_per_node` ranks on every node, which sizes ZeRO++'s buffers (Options::zeropp: hpZ's secondary
// partition spans a node, qgZ's staging depends on the number of nodes). The overload above counts one rank per
// node: hpZ's largest partition. ranks_per_node must divide world_size.
Status Estimate(const ModelDescription& model, int world_size, int ranks_per_node, const Options& options,
                MemoryEstimate* out);

// "stage 2 + optimizer offload", "stage 3 + parameter offload" (optimizer too: offload_params needs it); with the
// NVMe tier "stage 3 + optimizer offload to NVMe", "stage 3 + parameter offload, optimizer to NVMe" (the shards in
// host memory) and "stage 3 + parameter offload to NVMe" (both there).
std::string ConfigurationName(Stage stage, bool offload_optimizer, bool offload_params, bool nvme = false,
                              bool nvme_params = false);
std::string ConfigurationName(const Options& options);  // of its stage, offload flags, nvme_path and nvme_params

// One step of Stage::kAuto's preference order, evaluated.
struct AutoCandidate {
  Stage stage;
  bool offload_optimizer;
  bool offload_params;
  int64_t device_bytes;  // MemoryEstimate::DeviceTotal() per rank
  int64_t host_bytes;    // MemoryEstimate::HostTotal() per rank
  bool fits;             // device_bytes <= budget, and host_bytes <= Options::host_budget_bytes when that is given
  bool nvme = false;         // the optimizer state on the NVMe tier (Options::nvme_path kept)
  bool nvme_params = false;  // the stage-3 parameter shards too (Options::nvme_params)
  int64_t nvme_bytes = 0;    // MemoryEstimate::NvmeTotal() per rank
  bool host_fits = true;     // host_bytes <= Options::host_budget_bytes (always true without a budget)
};

struct AutoChoice {
  int64_t free_bytes = 0;        // the smallest free device memory of any rank (INT64_MAX: unlimited)
  int64_t activation_bytes = 0;  // EstimateActivations(activation_model, activation_options).peak, when given
  int64_t reserved_bytes = 0;    // activation_bytes + Options::reserved_bytes (when >= 0)
  int64_t budget = 0;            // free_bytes - reserved_bytes: what the engine's buffers may take per rank
  int64_t host_budget = 0;       // Options::host_budget_bytes (0: host memory not checked)
  std::vector<AutoCandidate> candidates;  // the whole preference order
  int chosen = -1;             // index of the first candidate that fits, -1 when none does
  Options options;             // the input options with the chosen stage and offload (unchanged if none fits)
  // One line per candidate up to the chosen one (why each earlier one does not fit), then the choice.
  std::string Explain() const;
};

// Stage::kAuto's decision: walks the on-device configurations, stage 0, 1, 2, 3, then the offloaded ones, 2 +
// optimizer offload, 3 + optimizer offload, 3 + parameter offload (offload moves the optimizer step to the CPU
// and every step's gradients and parameters over PCIe: the slowest choice, taken only when nothing on the device
// fits), then, when options.nvme_path is given, the NVMe tier last: 2 + optimizer offload to NVMe, 3 + optimizer
// offload to NVMe, 3 + parameter offload with the optimizer state on NVMe, 3 + parameter offload to NVMe (every
// step then also reads and writes the state at the disk's speed). It chooses the first whose device bytes fit in
// free_bytes minus the reserve (the activation estimate of options.activation_model, when its layers > 0, plus
// options.reserved_bytes; a negative one counts as 0) and, when options.host_budget_bytes > 0, whose host bytes
// fit that. `options.stage`, the offload flags and nvme_params are ignored; every other field (dtypes, optimizer,
// bucket and pool sizes, slots, persistence, backend, the tier's block size and buffers) is used as given. OK with
// chosen = -1 when nothing fits.
Status ChooseConfiguration(const ModelDescription& model, int world_size, const Options& options,
                           int64_t free_bytes, AutoChoice* out);

// "Which configuration, micro-batch and recomputation fit my GPU, and how many accumulation steps reach my batch?"
struct TrainingRequest {
  TransformerShape shape;          // the model (with LoRA adapters when shape.lora_rank > 0)
  ActivationOptions activations;   // seq_len, dtype, lora_dropout; micro_batch and recompute are chosen
  int world_size = 1;
  int64_t global_batch = 0;        // sequences per optimizer step over all ranks; a multiple of world_size
  int64_t device_bytes = 0;        // device memory per rank
  // Micro-batches of at least this many tokens count as efficient (rule 2 below): below it a step's matrix
  // products are small enough to lose GPU throughput. A rule of thumb; 0 treats every micro-batch as efficient.
  int64_t efficient_tokens = 2048;
  // Dtypes, optimizer, buckets, pool, slots, backend as the engine will be opened; stage, offload and the
  // activation fields are chosen; reserved_bytes >= 0 is kept free besides activations (CUDA context, NCCL...).
  Options options;
};

// One configuration with or without recomputation, and the largest micro-batch dividing the per-rank batch
// (global_batch / world_size) whose model states + activations fit.
struct TrainingCandidate {
  Stage stage;
  bool offload_optimizer;
  bool offload_params;
  bool recompute;
  int64_t micro_batch;         // 0: not even one sequence fits
  int64_t accumulation_steps;  // per-rank batch / micro_batch
  int64_t model_state_bytes;   // Estimate(...).DeviceTotal(): the engine's buffers per rank
  int64_t activation_bytes;    // EstimateActivations(...).peak at micro_batch
  int64_t host_bytes;          // Estimate(...).HostTotal() per rank (offload)
  bool efficient;              // micro_batch * seq_len >= efficient_tokens, or no accumulation
  bool nvme = false;           // the NVMe tier holds the optimizer state (and with nvme_params the shards)
  bool nvme_params = false;
  int64_t nvme_bytes = 0;      // Estimate(...).NvmeTotal() per rank
};

struct TrainingPlan {
  int64_t per_rank_batch = 0;
  int64_t budget = 0;                       // device_bytes - reserved_bytes
  std::vector<TrainingCandidate> candidates;  // every configuration of ChooseConfiguration's order x recompute off/on
  int chosen = -1;                          // the fastest by the rule below; -1 when nothing fits
  Options options;  // the request's options with the choice: stage, offload, activation_model and
                    // activation_options (micro_batch, recompute), ready for Engine::Open (or with Stage::kAuto)
  std::string Explain() const;  // the choice and why, one line per candidate that fits
};

// Chooses among the candidates that fit (device memory, and Options::host_budget_bytes when given), by this rule
// (each step breaks the ties of the one before):
//   1. on the device before offloaded (offload runs the optimizer on the CPU and moves every step over PCIe), and
//      the optimizer state in host memory before the NVMe tier (options.nvme_path adds those candidates last);
//   2. an efficient micro-batch (see efficient_tokens) before one that is not;
//   3. without recomputation before with it (recomputation costs one more forward of every block);
//   4. ChooseConfiguration's order (stage 0, 1, 2, 3: less communication first);
//   5. the larger micro-batch (fewer micro-steps, so fewer per-micro-step collectives in stages 2 and 3).
// OK with chosen = -1 when nothing fits; InvalidArgument for a bad shape or a global batch that is not a positive
// multiple of world_size.
Status PlanTraining(const TrainingRequest& request, TrainingPlan* out);

}  // namespace zero

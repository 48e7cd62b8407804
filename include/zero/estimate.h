// zero::Estimate: the bytes Engine::Open will allocate, per rank and by category, before anything is allocated;
// and zero::ChooseConfiguration: the configuration Stage::kAuto picks for a given amount of free device memory.
//
// Estimates come from the engine's own partition plan and buffer rules (src/buffer_plan.h), not from a second
// copy of them: on the CPU backend an estimate equals Engine::Memory() after Open and after any step, byte for
// byte (tests/estimate_test.cc). Pure functions: no device, no communicator, no allocation of model size.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "zero/options.h"
#include "zero/status.h"
#include "zero/types.h"

namespace zero {

// A LLaMA-style decoder (RMSNorm, no biases, SwiGLU feed-forward, grouped-query attention). Expands to units:
// 0 = the token embedding [vocab, hidden]; 1..layers = the blocks (attention norm, q, k, v, o, feed-forward norm,
// gate, up, down); layers + 1 = the final norm and, unless tied, the output head [vocab, hidden]. Shapes are
// [out, in], as Hugging Face stores them.
struct TransformerShape {
  int64_t layers = 0;
  int64_t hidden = 0;
  int64_t heads = 0;     // 0: multi-head attention with k and v as wide as q (kv_heads must be 0 too)
  int64_t kv_heads = 0;  // 0: heads; k and v are [hidden / heads * kv_heads, hidden]
  int64_t ffn = 0;       // the feed-forward's inner width (gate and up: [ffn, hidden]; down: [hidden, ffn])
  int64_t vocab = 0;
  bool tied = false;     // the head reuses the embedding (no head parameter)
  bool frozen = false;   // every parameter frozen (a base under adapters; add the adapters' specs yourself)
};

// Appends the shape's parameters to *specs (names as Hugging Face LLaMA: model.layers.N.self_attn.q_proj.weight).
// InvalidArgument naming the field for non-positive sizes or heads that do not divide hidden / kv_heads that
// do not divide heads.
Status TransformerSpecs(const TransformerShape& shape, std::vector<ParamSpec>* specs);

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
  int64_t host[kNumMemoryCategories] = {};    // bytes per rank in (pinned) host memory: offload
  std::vector<Item> items;                    // every allocation of Engine::Open, in its order

  int64_t DeviceTotal() const;
  int64_t HostTotal() const;
  int64_t Device(MemoryCategory c) const { return device[static_cast<int>(c)]; }
  int64_t Host(MemoryCategory c) const { return host[static_cast<int>(c)]; }
  // A table: one row per allocation kind (params, gradients, optimizer, pool, gather slots, staging...) with
  // device and host bytes per rank, and the totals.
  std::string Table() const;
};

// Per-rank bytes for `world_size` ranks and `options` (a concrete stage; for kAuto use ChooseConfiguration).
// Fails like Engine::Open on invalid options or specs.
Status Estimate(const ModelDescription& model, int world_size, const Options& options, MemoryEstimate* out);

// "stage 2 + optimizer offload", "stage 3 + parameter offload" (optimizer too: offload_params needs it).
std::string ConfigurationName(Stage stage, bool offload_optimizer, bool offload_params);

// One step of Stage::kAuto's preference order, evaluated.
struct AutoCandidate {
  Stage stage;
  bool offload_optimizer;
  bool offload_params;
  int64_t device_bytes;  // MemoryEstimate::DeviceTotal() per rank
  int64_t host_bytes;    // MemoryEstimate::HostTotal() per rank
  bool fits;             // device_bytes <= budget
};

struct AutoChoice {
  int64_t free_bytes = 0;      // the smallest free device memory of any rank (INT64_MAX: unlimited)
  int64_t reserved_bytes = 0;  // Options::reserved_bytes
  int64_t budget = 0;          // free_bytes - reserved_bytes: what the engine's buffers may take per rank
  std::vector<AutoCandidate> candidates;  // the whole preference order
  int chosen = -1;             // index of the first candidate that fits, -1 when none does
  Options options;             // the input options with the chosen stage and offload (unchanged if none fits)
  // One line per candidate up to the chosen one (why each earlier one does not fit), then the choice.
  std::string Explain() const;
};

// Stage::kAuto's decision: walks stage 0, 1, 2, 2 + optimizer offload, 3, 3 + optimizer offload, 3 + parameter
// offload and chooses the first whose device bytes fit in free_bytes - options.reserved_bytes (a negative
// reserved_bytes counts as 0 here). `options.stage` and the offload flags are ignored; every other field
// (dtypes, optimizer, bucket and pool sizes, slots, persistence, backend) is used as given. OK with chosen = -1
// when nothing fits.
Status ChooseConfiguration(const ModelDescription& model, int world_size, const Options& options,
                           int64_t free_bytes, AutoChoice* out);

}  // namespace zero

// zero::Estimate, ChooseConfiguration, PlanTraining and the memory tables: the engine's buffer plan
// (buffer_plan.h) summed without allocating anything, and the activation estimate (estimate_activations.cc) on top.
#include "zero/estimate.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <sstream>
#include <tuple>

#include "buffer_plan.h"
#include "device.h"
#include "partition_plan.h"
#include "zero/engine.h"

namespace zero {
namespace {

constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();

// Right-aligned bytes column ("12.34 GiB", "-" for zero).
std::string Cell(int64_t bytes) { return bytes == 0 ? "-" : FormatBytes(bytes); }

void Row(std::ostringstream& os, const std::string& name, const std::vector<std::string>& cells) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%-28s", name.c_str());
  os << buf;
  for (const std::string& c : cells) {
    std::snprintf(buf, sizeof(buf), " %14s", c.c_str());
    os << buf;
  }
  os << "\n";
}

}  // namespace

ModelDescription ModelDescription::FromSpecs(std::vector<ParamSpec> specs) {
  ModelDescription m;
  m.specs = std::move(specs);
  return m;
}

ModelDescription ModelDescription::FromParamCount(int64_t trainable, int64_t frozen) {
  ModelDescription m;
  m.param_count = trainable;
  m.frozen_param_count = frozen;
  return m;
}

Status TransformerSpecs(const TransformerShape& t, std::vector<ParamSpec>* specs) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("TransformerShape: " + m); };
  if (t.layers < 1) return bad("layers must be >= 1");
  if (t.hidden < 1) return bad("hidden must be >= 1");
  if (t.ffn < 1) return bad("ffn must be >= 1 (LLaMA-7B: 11008)");
  if (t.vocab < 1) return bad("vocab must be >= 1");
  if (t.heads < 0 || t.kv_heads < 0) return bad("heads and kv_heads must be >= 0");
  if (t.layers + 2 > std::numeric_limits<int>::max()) return bad("too many layers");
  int64_t kv = t.hidden;
  if (t.heads == 0) {
    if (t.kv_heads != 0) return bad("kv_heads needs heads (k and v are hidden / heads * kv_heads wide)");
  } else {
    if (t.hidden % t.heads != 0) {
      return bad("heads (" + std::to_string(t.heads) + ") must divide hidden (" + std::to_string(t.hidden) + ")");
    }
    const int64_t kvh = t.kv_heads == 0 ? t.heads : t.kv_heads;
    if (t.heads % kvh != 0) {
      return bad("kv_heads (" + std::to_string(kvh) + ") must divide heads (" + std::to_string(t.heads) + ")");
    }
    kv = t.hidden / t.heads * kvh;
  }
  if (t.lora_rank < 0) return bad("lora_rank must be >= 0 (0: no adapters)");
  if (t.lora_rank > 0 && (t.lora_targets == 0 || (t.lora_targets & ~0x7fu) != 0)) {
    return bad("lora_targets must be a non-empty set of kLoraQ, kLoraK, kLoraV, kLoraO, kLoraGate, kLoraUp, kLoraDown");
  }
  const bool trainable = !t.frozen && t.lora_rank == 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, int64_t unit, bool is_norm, bool train) {
    ParamSpec p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    p.unit = static_cast<int>(unit);
    p.trainable = train;
    p.wd_mult = is_norm ? 0.0f : 1.0f;
    specs->push_back(std::move(p));
  };
  const int64_t h = t.hidden;
  add("model.embed_tokens.weight", {t.vocab, h}, 0, false, trainable);
  static const char* const kProj[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                       "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  const int64_t out[7] = {h, kv, kv, h, t.ffn, t.ffn, h}, in[7] = {h, h, h, h, h, h, t.ffn};
  for (int64_t l = 0; l < t.layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    const int64_t u = l + 1;
    for (int p = 0; p < 7; ++p) {
      if (p == 0) add(pre + "input_layernorm.weight", {h}, u, true, trainable);
      if (p == 4) add(pre + "post_attention_layernorm.weight", {h}, u, true, trainable);
      const std::string name = pre + kProj[p];
      add(name + ".weight", {out[p], in[p]}, u, false, trainable);
      if (t.lora_rank > 0 && (t.lora_targets & (1u << p)) != 0) {
        add(name + ".lora_A.weight", {t.lora_rank, in[p]}, u, false, true);
        add(name + ".lora_B.weight", {out[p], t.lora_rank}, u, false, true);
      }
    }
  }
  add("model.norm.weight", {h}, t.layers + 1, true, trainable);
  if (!t.tied) add("lm_head.weight", {t.vocab, h}, t.layers + 1, false, trainable);
  return Status::Ok();
}

int64_t MemoryEstimate::DeviceTotal() const {
  int64_t t = 0;
  for (int64_t b : device) t += b;
  return t;
}

int64_t MemoryEstimate::HostTotal() const {
  int64_t t = 0;
  for (int64_t b : host) t += b;
  return t;
}

int64_t MemoryEstimate::NvmeTotal() const {
  int64_t t = 0;
  for (int64_t b : nvme) t += b;
  return t;
}

int64_t MemoryEstimate::NvmeBounceBytes() const {
  int64_t t = 0;
  for (const Item& it : items) {
    if (it.what == "NVMe bounce buffers" || it.what == "NVMe gather bounce buffers") t += it.bytes;
  }
  return t;
}

std::string MemoryEstimate::Table() const {
  // Rows: allocations of the same name summed (the pool's buffers, both staging buffers...).
  std::vector<std::string> names;
  std::vector<int64_t> dev, hst, nvm;
  for (const Item& it : items) {
    auto at = std::find(names.begin(), names.end(), it.what);
    size_t i = static_cast<size_t>(at - names.begin());
    if (at == names.end()) {
      names.push_back(it.what);
      dev.push_back(0);
      hst.push_back(0);
      nvm.push_back(0);
    }
    (it.kind == MemoryKind::kDevice ? dev : it.kind == MemoryKind::kNvme ? nvm : hst)[i] += it.bytes;
  }
  const bool tier = NvmeTotal() > 0;
  std::ostringstream os;
  os << ConfigurationName(options) << ", " << world_size
     << (world_size == 1 ? " rank" : " ranks") << ", param " << DTypeName(options.param_dtype) << ", grad "
     << DTypeName(options.grad_dtype) << ", "
     << (options.optimizer == OptimizerKind::kAdamW ? "AdamW" : "SGD momentum")
     << (model_state_only ? " (model states only: from a bare parameter count)" : "") << "\n";
  Row(os, "allocation", tier ? std::vector<std::string>{"device/rank", "host/rank", "NVMe/rank"}
                             : std::vector<std::string>{"device/rank", "host/rank"});
  for (size_t i = 0; i < names.size(); ++i) {
    if (dev[i] == 0 && hst[i] == 0 && nvm[i] == 0) continue;
    std::vector<std::string> cells = {Cell(dev[i]), Cell(hst[i])};
    if (tier) cells.push_back(Cell(nvm[i]));
    Row(os, names[i], cells);
  }
  std::vector<std::string> total = {Cell(DeviceTotal()), Cell(HostTotal())};
  if (tier) total.push_back(Cell(NvmeTotal()));
  Row(os, "total", total);
  return os.str();
}

std::string MemoryReport::Table() const {
  std::ostringstream os;
  const bool tier = nvme.Total() > 0;
  std::vector<std::string> head = {"device now", "device peak", "host now", "host peak"};
  if (tier) head.push_back("NVMe");
  Row(os, "category", head);
  for (int c = 0; c < kNumMemoryCategories; ++c) {
    std::vector<std::string> cells = {Cell(device.current[c]), Cell(device.peak[c]), Cell(host.current[c]),
                                      Cell(host.peak[c])};
    if (tier) cells.push_back(Cell(nvme.current[c]));
    Row(os, MemoryCategoryName(static_cast<MemoryCategory>(c)), cells);
  }
  std::vector<std::string> total = {Cell(device.Total()), Cell(device.peak_total), Cell(host.Total()),
                                    Cell(host.peak_total)};
  if (tier) total.push_back(Cell(nvme.Total()));
  Row(os, "total", total);
  return os.str();
}

Status Estimate(const ModelDescription& model, int world_size, const Options& options, MemoryEstimate* out) {
  return Estimate(model, world_size, /*ranks_per_node=*/1, options, out);
}

Status Estimate(const ModelDescription& model, int world_size, int ranks_per_node, const Options& options,
                MemoryEstimate* out) {
  *out = MemoryEstimate();
  if (ranks_per_node < 1 || world_size % ranks_per_node != 0) {
    return Status::InvalidArgument("Estimate: ranks_per_node (" + std::to_string(ranks_per_node) +
                                   ") must be >= 1 and divide world_size (" + std::to_string(world_size) + ")");
  }
  if (options.stage == Stage::kAuto) {
    return Status::InvalidArgument("Estimate: options.stage is Stage::kAuto; estimate a concrete stage, or call "
                                   "ChooseConfiguration for what kAuto would choose");
  }
  if (world_size < 1) return Status::InvalidArgument("Estimate: world_size must be >= 1");
  const bool bare = model.specs.empty();
  Options o = options;
  std::vector<ParamSpec> bare_specs;
  if (bare) {
    if (model.param_count < 0 || model.frozen_param_count < 0 || model.param_count + model.frozen_param_count < 1) {
      return Status::InvalidArgument("Estimate: the model has no parameters; give specs or param_count >= 1");
    }
    // One flat unit per set: the bucket layout rounds each to 64 * world elements, negligible at model scale.
    int unit = 0;
    if (model.param_count > 0) bare_specs.push_back(ParamSpec{"parameters", {model.param_count}, unit++, true});
    if (model.frozen_param_count > 0) {
      bare_specs.push_back(ParamSpec{"frozen parameters", {model.frozen_param_count}, unit++, false});
    }
    o.persist_bytes = 0;  // no unit structure to persist
  }
  const std::vector<ParamSpec>& specs = bare ? bare_specs : model.specs;
  PartitionPlan plan;
  ZERO_RETURN_IF_ERROR(PartitionPlan::Build(specs, world_size, o.bucket_elements, &plan).WithContext("Estimate"));
  ZERO_RETURN_IF_ERROR(ValidateOptions(o, static_cast<int>(plan.units.size())).WithContext("Estimate"));
  const BufferPlan bp = PlanBuffers(o, plan, ranks_per_node);
  out->options = options;
  out->world_size = world_size;
  out->model_state_only = bare;
  out->trainable_padded = plan.trainable_padded;
  out->frozen_padded = plan.frozen_padded;
  for (const PlannedBuffer& b : bp.buffers) {
    if (bare && !b.model_state) continue;
    out->items.push_back({b.what, b.category, b.kind, b.bytes});
    int64_t* where = b.kind == MemoryKind::kDevice ? out->device : b.kind == MemoryKind::kNvme ? out->nvme : out->host;
    where[static_cast<int>(b.category)] += b.bytes;
  }
  return Status::Ok();
}

std::string ConfigurationName(Stage stage, bool offload_optimizer, bool offload_params, bool nvme, bool nvme_params) {
  if (stage == Stage::kAuto) return "stage auto";
  std::string name = "stage " + std::to_string(static_cast<int>(stage));
  if (offload_params && nvme && nvme_params) return name + " + parameter offload to NVMe";
  if (offload_params && nvme) return name + " + parameter offload, optimizer to NVMe";
  if (offload_params) return name + " + parameter offload";
  if (offload_optimizer && nvme) return name + " + optimizer offload to NVMe";
  if (offload_optimizer) return name + " + optimizer offload";
  return name;
}

std::string ConfigurationName(const Options& o) {
  return ConfigurationName(o.stage, o.offload_optimizer, o.offload_params, !o.nvme_path.empty(), o.nvme_params);
}

namespace {

// Stage::kAuto's preference order (issue 17's): every on-device configuration, stage 3 included, before any
// offloaded one; with an NVMe directory, the tier after all of them (it adds the disk's time to every step).
struct Config {
  Stage stage;
  bool opt, params;
  bool nvme = false, nvme_params = false;
};
constexpr Config kOrder[] = {{Stage::kDataParallel, false, false}, {Stage::kOptimizerStates, false, false},
                             {Stage::kGradients, false, false},    {Stage::kParameters, false, false},
                             {Stage::kGradients, true, false},     {Stage::kParameters, true, false},
                             {Stage::kParameters, true, true}};
constexpr Config kNvmeOrder[] = {{Stage::kGradients, true, false, true, false},
                                 {Stage::kParameters, true, false, true, false},
                                 {Stage::kParameters, true, true, true, false},
                                 {Stage::kParameters, true, true, true, true}};

std::vector<Config> Order(const Options& o) {
  std::vector<Config> order(std::begin(kOrder), std::end(kOrder));
  if (!o.nvme_path.empty()) order.insert(order.end(), std::begin(kNvmeOrder), std::end(kNvmeOrder));
  return order;
}

Options WithConfig(const Options& base, const Config& c) {
  Options o = base;
  o.stage = c.stage;
  o.offload_optimizer = c.opt;
  o.offload_params = c.params;
  if (!c.nvme) o.nvme_path.clear();  // the directory only made the tier a candidate
  o.nvme_params = c.nvme_params;
  return o;
}

bool HostFits(const Options& o, int64_t host_bytes) {
  return o.host_budget_bytes <= 0 || host_bytes <= o.host_budget_bytes;
}

}  // namespace

Status ChooseConfiguration(const ModelDescription& model, int world_size, const Options& options,
                           int64_t free_bytes, AutoChoice* out) {
  *out = AutoChoice();
  out->free_bytes = free_bytes;
  if (options.activation_model.layers > 0) {
    ActivationEstimate a;
    ZERO_RETURN_IF_ERROR(EstimateActivations(options.activation_model, options.activation_options, &a)
                             .WithContext("ChooseConfiguration (Options::activation_model)"));
    out->activation_bytes = a.peak;
  }
  out->reserved_bytes = out->activation_bytes + std::max<int64_t>(0, options.reserved_bytes);
  out->budget = free_bytes == kUnlimited ? kUnlimited : free_bytes - out->reserved_bytes;
  out->host_budget = std::max<int64_t>(0, options.host_budget_bytes);
  out->options = options;
  for (const Config& step : Order(options)) {
    const Options o = WithConfig(options, step);
    MemoryEstimate e;
    ZERO_RETURN_IF_ERROR(Estimate(model, world_size, o, &e).WithContext("ChooseConfiguration"));
    AutoCandidate c{step.stage, step.opt, step.params, e.DeviceTotal(), e.HostTotal(), false};
    c.nvme = step.nvme;
    c.nvme_params = step.nvme_params;
    c.nvme_bytes = e.NvmeTotal();
    c.host_fits = HostFits(options, c.host_bytes);
    c.fits = e.DeviceTotal() <= out->budget && c.host_fits;
    out->candidates.push_back(c);
    if (c.fits && out->chosen < 0) {
      out->chosen = static_cast<int>(out->candidates.size()) - 1;
      out->options = o;
    }
  }
  return Status::Ok();
}

Status PlanTraining(const TrainingRequest& req, TrainingPlan* out) {
  *out = TrainingPlan();
  auto bad = [](const std::string& m) { return Status::InvalidArgument("PlanTraining: " + m); };
  if (req.world_size < 1) return bad("world_size must be >= 1");
  if (req.global_batch < 1 || req.global_batch % req.world_size != 0) {
    const int64_t w = req.world_size, lo = std::max<int64_t>(w, req.global_batch / w * w);
    return bad("global_batch (" + std::to_string(req.global_batch) + ") must be a positive multiple of world_size (" +
               std::to_string(w) + ") so that every rank takes the same number of sequences; " + std::to_string(lo) +
               " or " + std::to_string(lo + w) + " would do");
  }
  if (req.device_bytes < 0) return bad("device_bytes must be >= 0");
  ModelDescription model;
  ZERO_RETURN_IF_ERROR(TransformerSpecs(req.shape, &model.specs).WithContext("PlanTraining"));
  ActivationOptions probe = req.activations;
  probe.micro_batch = 1;
  ActivationEstimate a;
  ZERO_RETURN_IF_ERROR(EstimateActivations(req.shape, probe, &a).WithContext("PlanTraining"));
  const int64_t per_rank = req.global_batch / req.world_size;
  out->per_rank_batch = per_rank;
  out->budget = req.device_bytes - std::max<int64_t>(0, req.options.reserved_bytes);
  std::vector<int64_t> divisors;  // descending: the first that fits is the largest
  for (int64_t b = per_rank; b >= 1; --b) {
    if (per_rank % b == 0) divisors.push_back(b);
  }
  int best = -1;
  std::tuple<int, int, int, int, int64_t> best_key;
  int order = 0;
  for (const Config& step : Order(req.options)) {
    Options o = WithConfig(req.options, step);
    o.activation_model = TransformerShape();  // Estimate takes concrete options; the reserve is this function's
    MemoryEstimate states;
    ZERO_RETURN_IF_ERROR(Estimate(model, req.world_size, o, &states).WithContext("PlanTraining"));
    for (bool recompute : {false, true}) {
      TrainingCandidate c{step.stage, step.opt, step.params, recompute, 0, 0, states.DeviceTotal(), 0,
                          states.HostTotal(), false};
      c.nvme = step.nvme;
      c.nvme_params = step.nvme_params;
      c.nvme_bytes = states.NvmeTotal();
      for (int64_t b : divisors) {
        if (!HostFits(req.options, c.host_bytes)) break;  // over the host budget at any micro-batch
        ActivationOptions ao = req.activations;
        ao.micro_batch = b;
        ao.recompute = recompute;
        ZERO_RETURN_IF_ERROR(EstimateActivations(req.shape, ao, &a).WithContext("PlanTraining"));
        c.activation_bytes = a.peak;  // at the last b tried: micro-batch 1's when none fits
        if (c.model_state_bytes + a.peak <= out->budget) {
          c.micro_batch = b;
          break;
        }
      }
      if (c.micro_batch > 0) {
        c.accumulation_steps = per_rank / c.micro_batch;
        c.efficient = c.micro_batch * req.activations.seq_len >= req.efficient_tokens || c.accumulation_steps == 1;
        // The rule of estimate.h, as a key compared lexicographically (smaller is preferred).
        const auto key = std::make_tuple(step.nvme ? 2 : step.opt ? 1 : 0, c.efficient ? 0 : 1, recompute ? 1 : 0,
                                         order, -c.micro_batch);
        if (best < 0 || key < best_key) {
          best = static_cast<int>(out->candidates.size());
          best_key = key;
        }
      }
      out->candidates.push_back(c);
    }
    ++order;
  }
  out->options = req.options;
  out->chosen = best;
  if (best >= 0) {
    const TrainingCandidate& c = out->candidates[static_cast<size_t>(best)];
    out->options =
        WithConfig(req.options, Config{c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params});
    out->options.activation_model = req.shape;
    out->options.activation_options = req.activations;
    out->options.activation_options.micro_batch = c.micro_batch;
    out->options.activation_options.recompute = c.recompute;
  }
  return Status::Ok();
}

std::string TrainingPlan::Explain() const {
  std::ostringstream os;
  os << "per-rank batch " << per_rank_batch << ", device budget per rank " << FormatBytes(budget) << "\n";
  for (size_t i = 0; i < candidates.size(); ++i) {
    const TrainingCandidate& c = candidates[i];
    os << "  " << ConfigurationName(c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params)
       << (c.recompute ? ", recompute" : ", no recompute") << ": ";
    if (c.micro_batch == 0 && c.activation_bytes == 0) {
      os << "does not fit (host " << FormatBytes(c.host_bytes) << " per rank, over the host budget)\n";
      continue;
    }
    if (c.micro_batch == 0) {
      os << "does not fit (states " << FormatBytes(c.model_state_bytes) << " + activations of micro-batch 1 "
         << FormatBytes(c.activation_bytes) << ")\n";
      continue;
    }
    os << "micro-batch " << c.micro_batch << " x " << c.accumulation_steps << " steps, states "
       << FormatBytes(c.model_state_bytes) << " + activations " << FormatBytes(c.activation_bytes)
       << (c.efficient ? "" : ", small micro-batch") << (static_cast<int>(i) == chosen ? "  <- chosen" : "") << "\n";
  }
  if (chosen < 0) os << "nothing fits: add ranks or device memory, shorten the sequences, or use LoRA\n";
  return os.str();
}

std::string AutoChoice::Explain() const {
  std::ostringstream os;
  const std::string free_text = free_bytes == kUnlimited ? "unlimited" : FormatBytes(free_bytes);
  const std::string budget_text = budget == kUnlimited ? "unlimited" : FormatBytes(budget);
  os << "device budget per rank " << budget_text << " (smallest free memory of any rank " << free_text
     << " - reserved " << FormatBytes(reserved_bytes)
     << (activation_bytes > 0 ? ", of which the activation estimate " + FormatBytes(activation_bytes) : "") << ")"
     << (host_budget > 0 ? ", host budget per rank " + FormatBytes(host_budget) : "") << "\n";
  const size_t last = chosen >= 0 ? static_cast<size_t>(chosen) : candidates.size() - 1;
  for (size_t i = 0; i <= last && i < candidates.size(); ++i) {
    const AutoCandidate& c = candidates[i];
    os << "  " << ConfigurationName(c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params)
       << ": device " << FormatBytes(c.device_bytes) << ", host " << FormatBytes(c.host_bytes)
       << (c.nvme ? ", NVMe " + FormatBytes(c.nvme_bytes) : "") << " per rank: ";
    const bool device_fits = budget == kUnlimited || c.device_bytes <= budget;
    if (c.fits) {
      os << "fits, chosen\n";
    } else if (!device_fits) {
      os << "does not fit (" << FormatBytes(c.device_bytes - budget) << " over)\n";
    } else {
      os << "does not fit (host " << FormatBytes(c.host_bytes - host_budget) << " over the host budget)\n";
    }
  }
  if (chosen < 0) {
    os << "nothing fits: add ranks or device memory, lower reserved_bytes, gather_slots, grad_pool_buffers or "
          "bucket_elements"
       << (host_budget > 0 ? ", raise the host budget or give an NVMe directory (Options::nvme_path)" : "") << "\n";
  }
  return os.str();
}

}  // namespace zero

// zero::Estimate, ChooseConfiguration and the memory tables: the engine's buffer plan (buffer_plan.h) summed
// without allocating anything.
#include "zero/estimate.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <sstream>

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
  const bool trainable = !t.frozen;
  auto add = [&](std::string name, std::vector<int64_t> shape, int64_t unit, bool is_norm) {
    ParamSpec p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    p.unit = static_cast<int>(unit);
    p.trainable = trainable;
    p.wd_mult = is_norm ? 0.0f : 1.0f;
    specs->push_back(std::move(p));
  };
  const int64_t h = t.hidden;
  add("model.embed_tokens.weight", {t.vocab, h}, 0, false);
  for (int64_t l = 0; l < t.layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    const int64_t u = l + 1;
    add(pre + "input_layernorm.weight", {h}, u, true);
    add(pre + "self_attn.q_proj.weight", {h, h}, u, false);
    add(pre + "self_attn.k_proj.weight", {kv, h}, u, false);
    add(pre + "self_attn.v_proj.weight", {kv, h}, u, false);
    add(pre + "self_attn.o_proj.weight", {h, h}, u, false);
    add(pre + "post_attention_layernorm.weight", {h}, u, true);
    add(pre + "mlp.gate_proj.weight", {t.ffn, h}, u, false);
    add(pre + "mlp.up_proj.weight", {t.ffn, h}, u, false);
    add(pre + "mlp.down_proj.weight", {h, t.ffn}, u, false);
  }
  add("model.norm.weight", {h}, t.layers + 1, true);
  if (!t.tied) add("lm_head.weight", {t.vocab, h}, t.layers + 1, false);
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

std::string MemoryEstimate::Table() const {
  // Rows: allocations of the same name summed (the pool's buffers, both staging buffers...).
  std::vector<std::string> names;
  std::vector<int64_t> dev, hst;
  for (const Item& it : items) {
    auto at = std::find(names.begin(), names.end(), it.what);
    size_t i = static_cast<size_t>(at - names.begin());
    if (at == names.end()) {
      names.push_back(it.what);
      dev.push_back(0);
      hst.push_back(0);
    }
    (it.kind == MemoryKind::kDevice ? dev : hst)[i] += it.bytes;
  }
  std::ostringstream os;
  os << ConfigurationName(options.stage, options.offload_optimizer, options.offload_params) << ", " << world_size
     << (world_size == 1 ? " rank" : " ranks") << ", param " << DTypeName(options.param_dtype) << ", grad "
     << DTypeName(options.grad_dtype) << ", "
     << (options.optimizer == OptimizerKind::kAdamW ? "AdamW" : "SGD momentum")
     << (model_state_only ? " (model states only: from a bare parameter count)" : "") << "\n";
  Row(os, "allocation", {"device/rank", "host/rank"});
  for (size_t i = 0; i < names.size(); ++i) {
    if (dev[i] == 0 && hst[i] == 0) continue;
    Row(os, names[i], {Cell(dev[i]), Cell(hst[i])});
  }
  Row(os, "total", {Cell(DeviceTotal()), Cell(HostTotal())});
  return os.str();
}

std::string MemoryReport::Table() const {
  std::ostringstream os;
  Row(os, "category", {"device now", "device peak", "host now", "host peak"});
  for (int c = 0; c < kNumMemoryCategories; ++c) {
    Row(os, MemoryCategoryName(static_cast<MemoryCategory>(c)),
        {Cell(device.current[c]), Cell(device.peak[c]), Cell(host.current[c]), Cell(host.peak[c])});
  }
  Row(os, "total", {Cell(device.Total()), Cell(device.peak_total), Cell(host.Total()), Cell(host.peak_total)});
  return os.str();
}

Status Estimate(const ModelDescription& model, int world_size, const Options& options, MemoryEstimate* out) {
  *out = MemoryEstimate();
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
  const BufferPlan bp = PlanBuffers(o, plan);
  out->options = options;
  out->world_size = world_size;
  out->model_state_only = bare;
  out->trainable_padded = plan.trainable_padded;
  out->frozen_padded = plan.frozen_padded;
  for (const PlannedBuffer& b : bp.buffers) {
    if (bare && !b.model_state) continue;
    out->items.push_back({b.what, b.category, b.kind, b.bytes});
    (b.kind == MemoryKind::kDevice ? out->device : out->host)[static_cast<int>(b.category)] += b.bytes;
  }
  return Status::Ok();
}

std::string ConfigurationName(Stage stage, bool offload_optimizer, bool offload_params) {
  if (stage == Stage::kAuto) return "stage auto";
  std::string name = "stage " + std::to_string(static_cast<int>(stage));
  if (offload_params) return name + " + parameter offload";
  if (offload_optimizer) return name + " + optimizer offload";
  return name;
}

Status ChooseConfiguration(const ModelDescription& model, int world_size, const Options& options,
                           int64_t free_bytes, AutoChoice* out) {
  *out = AutoChoice();
  out->free_bytes = free_bytes;
  out->reserved_bytes = std::max<int64_t>(0, options.reserved_bytes);
  out->budget = free_bytes == kUnlimited ? kUnlimited : free_bytes - out->reserved_bytes;
  out->options = options;
  struct Step {
    Stage stage;
    bool opt, params;
  };
  static constexpr Step kOrder[] = {{Stage::kDataParallel, false, false}, {Stage::kOptimizerStates, false, false},
                                    {Stage::kGradients, false, false},    {Stage::kGradients, true, false},
                                    {Stage::kParameters, false, false},   {Stage::kParameters, true, false},
                                    {Stage::kParameters, true, true}};
  for (const Step& step : kOrder) {
    Options o = options;
    o.stage = step.stage;
    o.offload_optimizer = step.opt;
    o.offload_params = step.params;
    MemoryEstimate e;
    ZERO_RETURN_IF_ERROR(Estimate(model, world_size, o, &e).WithContext("ChooseConfiguration"));
    AutoCandidate c{step.stage, step.opt, step.params, e.DeviceTotal(), e.HostTotal(), e.DeviceTotal() <= out->budget};
    out->candidates.push_back(c);
    if (c.fits && out->chosen < 0) {
      out->chosen = static_cast<int>(out->candidates.size()) - 1;
      out->options = o;
    }
  }
  return Status::Ok();
}

std::string AutoChoice::Explain() const {
  std::ostringstream os;
  const std::string free_text = free_bytes == kUnlimited ? "unlimited" : FormatBytes(free_bytes);
  const std::string budget_text = budget == kUnlimited ? "unlimited" : FormatBytes(budget);
  os << "device budget per rank " << budget_text << " (smallest free memory of any rank " << free_text
     << " - reserved " << FormatBytes(reserved_bytes) << ")\n";
  const size_t last = chosen >= 0 ? static_cast<size_t>(chosen) : candidates.size() - 1;
  for (size_t i = 0; i <= last && i < candidates.size(); ++i) {
    const AutoCandidate& c = candidates[i];
    os << "  " << ConfigurationName(c.stage, c.offload_optimizer, c.offload_params) << ": device "
       << FormatBytes(c.device_bytes) << ", host " << FormatBytes(c.host_bytes) << " per rank: ";
    if (c.fits) {
      os << "fits, chosen\n";
    } else {
      os << "does not fit (" << FormatBytes(c.device_bytes - budget) << " over)\n";
    }
  }
  if (chosen < 0) {
    os << "nothing fits: add ranks or device memory, lower reserved_bytes, gather_slots, grad_pool_buffers or "
          "bucket_elements\n";
  }
  return os.str();
}

}  // namespace zero

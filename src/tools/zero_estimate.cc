// zero-estimate: per-rank device and per-node host memory of every ZeRO configuration for a model, before anything
// is allocated; the activation memory of a micro-batch; the configuration Stage::kAuto would choose for a device
// size; and the whole answer (stage, offload, micro-batch, recomputation, accumulation steps) for a global batch,
// for one device size or a table of common ones. A thin front end over zero::Estimate, EstimateActivations,
// ChooseConfiguration and PlanTraining (include/zero/estimate.h); run with --help for the flags.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "zero/zero.h"

namespace {

const char kUsage[] = R"(usage: zero-estimate MODEL [options]

Per-rank device memory and per-node host memory of every ZeRO configuration, in the order Stage::kAuto prefers
them, computed from the engine's own buffer rules (zero::Estimate); with a sequence length, the activations of a
micro-batch (zero::EstimateActivations); with a global batch, the whole answer (zero::PlanTraining).

MODEL, one of:
  --params N                 a bare parameter count (7.5e9, 7B, 350M): model states only (parameters, gradients,
                             optimizer state); buffers and activations need the shape
  --frozen-params N          frozen parameters besides --params (a LoRA base: no gradient, no optimizer state)
  --layers L --hidden H --ffn F --vocab V [--heads A] [--kv-heads K] [--tied] [--frozen]
                             a LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, GQA); one unit per block; --frozen
                             freezes it
  --preset NAME              a known shape: smollm2-135m, smollm2-360m, smollm2-1.7b, tinyllama-1.1b, llama2-7b,
                             llama2-13b, llama2-70b, llama3-8b
  --lora-rank R              LoRA adapters of rank R on a frozen base (with a shape or preset)
  --lora-targets LIST        their projections, any of q,k,v,o,gate,up,down (default q,k,v,o)
options:
  --world N                  data-parallel ranks (default 1)
  --ranks-per-node N         ranks sharing one host's memory (default 8; at most --world)
  --param-dtype fp32|bf16|fp16   parameters for compute (default bf16; 16-bit adds the fp32 master)
  --grad-dtype fp32|bf16|fp16    gradients (default fp32; fp16 is the ZeRO paper's setting)
  --optimizer adamw|sgd      (default adamw)
  --bucket-elements N        Options::bucket_elements (default 2^25)
  --grad-pool-buffers N      Options::grad_pool_buffers (default 2)
  --gather-slots N           Options::gather_slots (default 2)
  --persist-bytes SIZE       Options::persist_bytes (default 0)
  --backend cuda|cpu         (default cuda: includes the gradient-norm kernel's scratch)
  --device-memory SIZE       free device memory per rank (24GiB, 80GB): print the configuration Stage::kAuto
                             chooses and why the ones before it do not fit (with --global-batch: the whole answer)
  --reserved SIZE            device memory kept free besides activations: workspace, the CUDA context (default 0)
  --unit GB|GiB|MB|MiB       table unit (default GB = 10^9 bytes, the ZeRO paper's)
  --items                    also list every allocation of each configuration
the NVMe tier (Options::nvme_path):
  --nvme                     also the configurations with the optimizer state (and stage-3 parameter shards) in
                             files on a local disk, after all others; adds host and NVMe columns per rank and per
                             node, and the bounce buffers (what stays in host memory however large the model)
  --host-memory SIZE         host memory per node the engine may take (divided among --ranks-per-node ranks:
                             Options::host_budget_bytes); with --device-memory, Stage::kAuto's choice fits it too
  --nvme-buffers N           Options::nvme_buffers (default 3)
  --nvme-block SIZE          Options::nvme_block_bytes (default 1MiB)
activations (with a shape that gives --heads):
  --seq S                    tokens per sequence: print the activations of one micro-batch, and reserve them in
                             Stage::kAuto's choice for --device-memory
  --micro-batch B            sequences per rank per micro-step (default 1)
  --recompute                per-block recomputation (activation checkpointing)
  --compute-dtype fp32|bf16|fp16   what matrix-product operands are kept in (default: --param-dtype)
  --lora-dropout             dropout on the adapters' inputs
the whole answer (with --seq):
  --global-batch G           sequences per optimizer step over all ranks (a multiple of --world): with
                             --device-memory, the stage, offload, largest micro-batch, recomputation and
                             accumulation steps, chosen by PlanTraining's rule (include/zero/estimate.h)
  --table                    that answer for devices of 8, 12, 16, 24, 40, 48, 80 and 141 GiB
  --efficient-tokens N       micro-batches of fewer tokens count as small (default 2048; 0: none do)
Exit status: 0, 1 when --device-memory is given and nothing fits, 2 on bad arguments.
)";

[[noreturn]] void Fail(const std::string& message) {
  std::fprintf(stderr, "zero-estimate: %s (zero-estimate --help lists the flags)\n", message.c_str());
  std::exit(2);
}

// "7.5e9", "7B", "350M", "1.5T", "12k": a count. Suffixes are powers of 1000.
int64_t ParseCount(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || errno != 0) Fail(flag + " expects a number, not '" + text + "'");
  const std::string suffix(end);
  if (suffix == "k" || suffix == "K") v *= 1e3;
  else if (suffix == "M") v *= 1e6;
  else if (suffix == "B" || suffix == "G") v *= 1e9;
  else if (suffix == "T") v *= 1e12;
  else if (!suffix.empty()) Fail(flag + ": unknown suffix '" + suffix + "' in '" + text + "' (k, M, B, T)");
  if (!(v >= 0) || v > 9e18 || v != std::floor(v)) Fail(flag + " expects a whole number >= 0, not '" + text + "'");
  return static_cast<int64_t>(v);
}

// "24GiB", "80GB", "512MiB", "1e9": bytes. SI suffixes are powers of 1000, binary ones of 1024.
int64_t ParseBytes(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || errno != 0) Fail(flag + " expects a size such as 24GiB, not '" + text + "'");
  std::string suffix(end);
  static const struct {
    const char* name;
    double factor;
  } kSuffixes[] = {{"", 1},           {"B", 1},           {"KB", 1e3},         {"MB", 1e6},
                   {"GB", 1e9},       {"TB", 1e12},       {"KiB", 1024.0},     {"MiB", 1048576.0},
                   {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
  bool known = false;
  for (const auto& s : kSuffixes) {
    if (suffix == s.name) {
      v *= s.factor;
      known = true;
    }
  }
  if (!known) Fail(flag + ": unknown unit '" + suffix + "' in '" + text + "' (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)");
  if (!(v >= 0) || v > 9e18) Fail(flag + " expects a size >= 0, not '" + text + "'");
  return static_cast<int64_t>(std::llround(v));
}

int ParseInt(const std::string& flag, const std::string& text, int min) {
  const int64_t v = ParseCount(flag, text);
  if (v < min || v > std::numeric_limits<int>::max()) Fail(flag + " must be >= " + std::to_string(min));
  return static_cast<int>(v);
}

zero::DType ParseDType(const std::string& flag, const std::string& text) {
  if (text == "fp32" || text == "f32") return zero::DType::kF32;
  if (text == "bf16") return zero::DType::kBF16;
  if (text == "fp16" || text == "f16") return zero::DType::kF16;
  Fail(flag + " must be fp32, bf16 or fp16, not '" + text + "'");
}

std::string Fixed(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", decimals, v);
  return buf;
}

// Published shapes (each model's config.json): layers, hidden, heads, kv_heads, ffn, vocab, tied.
struct Preset {
  const char* name;
  zero::TransformerShape shape;
};
const Preset kPresets[] = {
    {"smollm2-135m", {30, 576, 9, 3, 1536, 49152, true, false}},
    {"smollm2-360m", {32, 960, 15, 5, 2560, 49152, true, false}},
    {"smollm2-1.7b", {24, 2048, 32, 32, 8192, 49152, true, false}},
    {"tinyllama-1.1b", {22, 2048, 32, 4, 5632, 32000, false, false}},
    {"llama2-7b", {32, 4096, 32, 32, 11008, 32000, false, false}},
    {"llama2-13b", {40, 5120, 40, 40, 13824, 32000, false, false}},
    {"llama2-70b", {80, 8192, 64, 8, 28672, 32000, false, false}},
    {"llama3-8b", {32, 4096, 32, 8, 14336, 128256, false, false}},
};

uint32_t ParseTargets(const std::string& flag, const std::string& list) {
  static const char* const kNames[] = {"q", "k", "v", "o", "gate", "up", "down"};  // zero::LoraTarget's bit order
  uint32_t bits = 0;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    const std::string t = list.substr(start, end - start);
    int found = -1;
    for (int i = 0; i < 7; ++i) {
      if (t == kNames[i]) found = i;
    }
    if (found < 0) Fail(flag + ": unknown projection '" + t + "' (q, k, v, o, gate, up, down)");
    bits |= 1u << found;
    start = end + 1;
  }
  return bits;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int64_t params = -1, frozen_params = 0;
  zero::TransformerShape shape;
  bool have_shape = false;
  std::string preset;
  int world = 1, ranks_per_node = 8;
  int64_t device_memory = -1, reserved = 0, global_batch = 0, efficient_tokens = 2048;
  bool items = false, table = false, compute_dtype_given = false, nvme = false;
  int64_t host_memory = 0;
  std::string unit = "GB";
  zero::Options o;
  o.param_dtype = zero::DType::kBF16;
  o.backend = zero::Backend::kCuda;
  zero::ActivationOptions act;
  act.seq_len = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (a == "--tied" || a == "--frozen" || a == "--items" || a == "--recompute" || a == "--table" ||
        a == "--lora-dropout" || a == "--nvme") {
      if (a == "--nvme") nvme = true;
      if (a == "--tied") shape.tied = true;
      if (a == "--frozen") shape.frozen = true;
      if (a == "--items") items = true;
      if (a == "--recompute") act.recompute = true;
      if (a == "--table") table = true;
      if (a == "--lora-dropout") act.lora_dropout = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) Fail("unexpected argument '" + a + "'");
    if (i + 1 >= args.size()) Fail(a + " needs a value");
    const std::string v = args[++i];
    if (a == "--params") params = ParseCount(a, v);
    else if (a == "--frozen-params") frozen_params = ParseCount(a, v);
    else if (a == "--layers") shape.layers = ParseCount(a, v), have_shape = true;
    else if (a == "--hidden") shape.hidden = ParseCount(a, v), have_shape = true;
    else if (a == "--heads") shape.heads = ParseCount(a, v), have_shape = true;
    else if (a == "--kv-heads") shape.kv_heads = ParseCount(a, v), have_shape = true;
    else if (a == "--ffn") shape.ffn = ParseCount(a, v), have_shape = true;
    else if (a == "--vocab") shape.vocab = ParseCount(a, v), have_shape = true;
    else if (a == "--preset") preset = v;
    else if (a == "--lora-rank") shape.lora_rank = ParseCount(a, v);
    else if (a == "--lora-targets") shape.lora_targets = ParseTargets(a, v);
    else if (a == "--world") world = ParseInt(a, v, 1);
    else if (a == "--ranks-per-node") ranks_per_node = ParseInt(a, v, 1);
    else if (a == "--param-dtype") o.param_dtype = ParseDType(a, v);
    else if (a == "--grad-dtype") o.grad_dtype = ParseDType(a, v);
    else if (a == "--compute-dtype") act.dtype = ParseDType(a, v), compute_dtype_given = true;
    else if (a == "--optimizer") {
      if (v == "adamw") o.optimizer = zero::OptimizerKind::kAdamW;
      else if (v == "sgd") o.optimizer = zero::OptimizerKind::kSgdMomentum;
      else Fail("--optimizer must be adamw or sgd, not '" + v + "'");
    } else if (a == "--bucket-elements") o.bucket_elements = ParseCount(a, v);
    else if (a == "--grad-pool-buffers") o.grad_pool_buffers = ParseInt(a, v, 1);
    else if (a == "--gather-slots") o.gather_slots = ParseInt(a, v, 1);
    else if (a == "--persist-bytes") o.persist_bytes = ParseBytes(a, v);
    else if (a == "--backend") {
      if (v == "cuda") o.backend = zero::Backend::kCuda;
      else if (v == "cpu") o.backend = zero::Backend::kCpu;
      else Fail("--backend must be cuda or cpu, not '" + v + "'");
    } else if (a == "--device-memory") device_memory = ParseBytes(a, v);
    else if (a == "--host-memory") host_memory = ParseBytes(a, v);
    else if (a == "--nvme-buffers") o.nvme_buffers = ParseInt(a, v, 2);
    else if (a == "--nvme-block") o.nvme_block_bytes = ParseBytes(a, v);
    else if (a == "--reserved") reserved = ParseBytes(a, v);
    else if (a == "--seq") act.seq_len = ParseCount(a, v);
    else if (a == "--micro-batch") act.micro_batch = ParseCount(a, v);
    else if (a == "--global-batch") global_batch = ParseCount(a, v);
    else if (a == "--efficient-tokens") efficient_tokens = ParseCount(a, v);
    else if (a == "--unit") {
      if (v != "GB" && v != "GiB" && v != "MB" && v != "MiB") Fail("--unit must be GB, GiB, MB or MiB");
      unit = v;
    } else Fail("unknown flag '" + a + "'");
  }
  if (!preset.empty()) {
    if (have_shape) Fail("--preset gives the shape; leave out --layers/--hidden/--heads/--kv-heads/--ffn/--vocab");
    const Preset* found = nullptr;
    for (const Preset& p : kPresets) {
      if (preset == p.name) found = &p;
    }
    if (found == nullptr) Fail("unknown --preset '" + preset + "' (zero-estimate --help lists them)");
    const zero::TransformerShape given = shape;
    shape = found->shape;
    shape.frozen = given.frozen;
    shape.lora_rank = given.lora_rank;
    shape.lora_targets = given.lora_targets;
    have_shape = true;
  }
  if (have_shape == (params >= 0)) Fail("give the model as --params N, as --layers/--hidden/--ffn/--vocab, or --preset");
  if (!have_shape && params == 0 && frozen_params == 0) Fail("--params must be > 0");
  if (have_shape && frozen_params > 0) Fail("--frozen-params goes with --params; freeze a shape with --frozen");
  if (!have_shape && (shape.lora_rank > 0 || act.seq_len > 0)) {
    Fail("--lora-rank and --seq need the model's shape (--layers/--hidden/--heads/--ffn/--vocab or --preset)");
  }
  if ((global_batch > 0 || table) && act.seq_len <= 0) Fail("--global-batch and --table need --seq");
  if (table && global_batch <= 0) Fail("--table needs --global-batch");
  if (global_batch > 0 && !table && device_memory < 0) Fail("--global-batch needs --device-memory (or --table)");
  if (!compute_dtype_given) act.dtype = o.param_dtype;
  o.reserved_bytes = reserved;
  // The tier's directory only makes it a candidate here: nothing is created.
  if (nvme) o.nvme_path = "nvme";
  const double scale = unit == "GB" ? 1e9 : unit == "GiB" ? 1073741824.0 : unit == "MB" ? 1e6 : 1048576.0;
  auto in_unit = [&](int64_t bytes, int decimals) { return Fixed(static_cast<double>(bytes) / scale, decimals); };
  const int per_node = std::min(world, ranks_per_node);
  if (host_memory > 0) o.host_budget_bytes = host_memory / per_node;

  zero::ModelDescription model;
  std::string what;
  if (have_shape) {
    zero::Status s = zero::TransformerSpecs(shape, &model.specs);
    if (!s.ok()) Fail(s.message());
    int64_t n = 0, trainable = 0;
    for (const zero::ParamSpec& p : model.specs) {
      n += p.numel();
      trainable += p.trainable ? p.numel() : 0;
    }
    what = Fixed(static_cast<double>(n) / 1e9, 3) + "e9 parameters (" + (preset.empty() ? "" : preset + ": ") +
           std::to_string(shape.layers) + " layers, hidden " + std::to_string(shape.hidden) + ", ffn " +
           std::to_string(shape.ffn) + ", vocab " + std::to_string(shape.vocab) + (shape.tied ? ", tied" : "") +
           (shape.frozen ? ", frozen" : "") +
           (shape.lora_rank > 0 ? ", LoRA rank " + std::to_string(shape.lora_rank) + " on a frozen base: " +
                                      std::to_string(trainable) + " trainable"
                                : "") +
           ")";
  } else {
    model = zero::ModelDescription::FromParamCount(params, frozen_params);
    what = Fixed(static_cast<double>(params) / 1e9, 3) + "e9 parameters" +
           (frozen_params > 0 ? " + " + Fixed(static_cast<double>(frozen_params) / 1e9, 3) + "e9 frozen" : "") +
           " (a bare count: model states only, no buffers; give --layers/--hidden/--ffn/--vocab for those)";
  }
  const int pb = static_cast<int>(zero::DTypeSize(o.param_dtype));
  const int k = (o.optimizer == zero::OptimizerKind::kAdamW ? 8 : 4) + (o.param_dtype == zero::DType::kF32 ? 0 : 4);
  std::printf("zero-estimate: %s\n", what.c_str());
  const std::string k_text = "K = " + std::to_string(k) + " bytes/param" +
                             (o.param_dtype == zero::DType::kF32 ? ", +4 offloaded (a separate fp32 master)" : "");
  std::printf("world %d, %d ranks per node; param %s (%d bytes), grad %s (%d bytes), %s (%s), backend %s; "
              "%s = %.0f bytes\n\n",
              world, per_node, zero::DTypeName(o.param_dtype), pb, zero::DTypeName(o.grad_dtype),
              static_cast<int>(zero::DTypeSize(o.grad_dtype)),
              o.optimizer == zero::OptimizerKind::kAdamW ? "AdamW" : "SGD momentum", k_text.c_str(),
              o.backend == zero::Backend::kCuda ? "cuda" : "cpu", unit.c_str(), scale);

  // Activations of one micro-batch, also Stage::kAuto's reserve below.
  zero::ActivationEstimate activations;
  if (act.seq_len > 0) {
    const zero::Status s = zero::EstimateActivations(shape, act, &activations);
    if (!s.ok()) Fail(s.message());
    o.activation_model = shape;
    o.activation_options = act;
  }

  zero::AutoChoice choice;
  zero::Status s = zero::ChooseConfiguration(model, world, o, device_memory >= 0 ? device_memory
                                                                             : std::numeric_limits<int64_t>::max(),
                                             &choice);
  if (!s.ok()) Fail(s.message());
  const bool show_auto = device_memory >= 0 && global_batch <= 0;
  // With --nvme the names are longer and host, NVMe and the bounce buffers get columns of their own.
  const int name_width = nvme ? 45 : 28;
  std::printf("%-*s %9s %9s %9s %9s %14s", name_width, "configuration", "params", "grads", "optimizer", "buffers",
              ("device " + unit + "/rank").c_str());
  if (nvme) {
    std::printf(" %14s %14s %15s %14s %14s", ("host " + unit + "/rank").c_str(), ("host " + unit + "/node").c_str(),
                ("bounce " + unit + "/rank").c_str(), ("NVMe " + unit + "/rank").c_str(),
                ("NVMe " + unit + "/node").c_str());
  } else {
    std::printf(" %14s", ("host " + unit + "/node").c_str());
  }
  std::printf("%s\n", show_auto ? "  fits" : "");
  std::vector<zero::MemoryEstimate> estimates;
  for (size_t i = 0; i < choice.candidates.size(); ++i) {
    const zero::AutoCandidate& c = choice.candidates[i];
    zero::Options co = o;
    co.stage = c.stage;
    co.offload_optimizer = c.offload_optimizer;
    co.offload_params = c.offload_params;
    if (!c.nvme) co.nvme_path.clear();
    co.nvme_params = c.nvme_params;
    zero::MemoryEstimate e;
    s = zero::Estimate(model, world, co, &e);
    if (!s.ok()) Fail(s.message());
    auto cat = [&](zero::MemoryCategory m) { return in_unit(e.Device(m), 2); };
    std::printf("%-*s %9s %9s %9s %9s %14s", name_width,
                zero::ConfigurationName(c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params).c_str(),
                cat(zero::MemoryCategory::kParams).c_str(), cat(zero::MemoryCategory::kGrads).c_str(),
                cat(zero::MemoryCategory::kOptimizer).c_str(), cat(zero::MemoryCategory::kBuffers).c_str(),
                in_unit(e.DeviceTotal(), 1).c_str());
    if (nvme) {
      std::printf(" %14s %14s %15s %14s %14s", in_unit(e.HostTotal(), 2).c_str(),
                  in_unit(e.HostTotal() * per_node, 1).c_str(), in_unit(e.NvmeBounceBytes(), 2).c_str(),
                  in_unit(e.NvmeTotal(), 2).c_str(), in_unit(e.NvmeTotal() * per_node, 1).c_str());
    } else {
      std::printf(" %14s", in_unit(e.HostTotal() * per_node, 1).c_str());
    }
    std::printf("%s\n",
                !show_auto ? "" : (static_cast<int>(i) == choice.chosen ? "  yes <- chosen" : c.fits ? "  yes" : "  no"));
    estimates.push_back(std::move(e));
  }
  std::printf("\nparams/grads/optimizer/buffers: device %s per rank. Host memory is the offloaded optimizer state "
              "(and parameter shards) plus staging, per rank times %d.\n",
              unit.c_str(), per_node);
  if (nvme) {
    std::printf("NVMe: the tier's files per rank (times %d per node). With them host memory holds the staging and the "
                "bounce buffers (%d x one bucket's state: Options::nvme_buffers), which do not grow with the model.%s\n",
                per_node, o.nvme_buffers,
                model.specs.empty() ? " A bare count does not give the buckets: bounce buffers and staging show as 0."
                                    : "");
  }
  if (items) {
    for (const zero::MemoryEstimate& e : estimates) std::printf("\n%s", e.Table().c_str());
  }
  if (act.seq_len > 0 && global_batch <= 0) {
    std::printf("\n%s", activations.Table().c_str());
    zero::ActivationOptions other = act;
    other.recompute = !act.recompute;
    zero::ActivationEstimate e;
    if (zero::EstimateActivations(shape, other, &e).ok()) {
      std::printf("  (%s: peak %.2f MiB)\n", other.recompute ? "with --recompute" : "without --recompute",
                  static_cast<double>(e.peak) / (1 << 20));
    }
  }
  if (show_auto) {
    std::printf("\nStage::kAuto with %s", choice.Explain().c_str());
    if (choice.chosen < 0) return 1;
    const zero::AutoCandidate& c = choice.candidates[static_cast<size_t>(choice.chosen)];
    std::printf("choice: %s\n",
                zero::ConfigurationName(c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params).c_str());
  }
  if (global_batch <= 0) return 0;

  // The whole answer.
  zero::TrainingRequest req;
  req.shape = shape;
  req.activations = act;
  req.world_size = world;
  req.global_batch = global_batch;
  req.efficient_tokens = efficient_tokens;
  req.options = o;
  req.options.activation_model = zero::TransformerShape();
  auto answer = [&](const zero::TrainingPlan& plan) -> std::string {
    if (plan.chosen < 0) return "nothing fits";
    const zero::TrainingCandidate& c = plan.candidates[static_cast<size_t>(plan.chosen)];
    return zero::ConfigurationName(c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params) +
           ", micro-batch " +
           std::to_string(c.micro_batch) + (c.recompute ? ", recompute" : ", no recompute") + ", " +
           std::to_string(c.accumulation_steps) + " accumulation step" + (c.accumulation_steps == 1 ? "" : "s");
  };
  std::printf("\nglobal batch %lld sequences of %lld tokens over %d rank%s (%lld per rank), compute %s%s\n",
              static_cast<long long>(global_batch), static_cast<long long>(act.seq_len), world, world == 1 ? "" : "s",
              static_cast<long long>(global_batch / std::max(1, world)), zero::DTypeName(act.dtype),
              reserved > 0 ? (", " + in_unit(reserved, 2) + " " + unit + " reserved per rank").c_str() : "");
  int rc = 0;
  if (device_memory >= 0) {
    req.device_bytes = device_memory;
    zero::TrainingPlan plan;
    s = zero::PlanTraining(req, &plan);
    if (!s.ok()) Fail(s.message());
    std::printf("%s", plan.Explain().c_str());
    std::printf("answer: %s\n", answer(plan).c_str());
    if (plan.chosen < 0) rc = 1;
  }
  if (table) {
    std::printf("\n%-8s %-28s %11s %9s %12s %16s %16s\n", "device", "configuration", "micro-batch", "recompute",
                "accumulation", ("activations " + unit).c_str(), ("device " + unit + "/rank").c_str());
    for (int gib : {8, 12, 16, 24, 40, 48, 80, 141}) {
      req.device_bytes = int64_t{gib} << 30;
      zero::TrainingPlan plan;
      s = zero::PlanTraining(req, &plan);
      if (!s.ok()) Fail(s.message());
      const std::string size = std::to_string(gib) + " GiB";
      if (plan.chosen < 0) {
        std::printf("%-8s %-28s\n", size.c_str(), "nothing fits");
        continue;
      }
      const zero::TrainingCandidate& c = plan.candidates[static_cast<size_t>(plan.chosen)];
      std::printf("%-8s %-28s %11lld %9s %12lld %16s %16s\n", size.c_str(),
                  zero::ConfigurationName(c.stage, c.offload_optimizer, c.offload_params, c.nvme, c.nvme_params)
                      .c_str(),
                  static_cast<long long>(c.micro_batch), c.recompute ? "yes" : "no",
                  static_cast<long long>(c.accumulation_steps), in_unit(c.activation_bytes, 2).c_str(),
                  in_unit(c.model_state_bytes + c.activation_bytes, 2).c_str());
    }
    std::printf("\nEach row: PlanTraining's choice for that device memory per rank (estimate.h states the rule); the "
                "CUDA context, NCCL and the allocator's rounding come on top (--reserved).\n");
  }
  return rc;
}

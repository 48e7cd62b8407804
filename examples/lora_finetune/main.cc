// lora_finetune: zero's main example. A small LLaMA-style decoder (examples/lora_finetune/model.h) is pretrained
// on the fortunes collection, then LoRA adapters are fine-tuned on the King James Bible while the frozen base is
// sharded by ZeRO (stage 3 by default) across the ranks. Only zero's public API is used.
//
//   mpiexec -n 2 build/examples/lora_finetune/lora_finetune all --out runs/lora
//
// Subcommands (each takes --key value options; `lora_finetune help` lists them):
//   prepare   corpora from Debian's fortunes and bible-kjv packages (or --corpus synthetic), byte-level tokens
//   pretrain  full training of the base on the first corpus; writes OUT/base/ (a Hugging Face model directory:
//             model.safetensors, config.json, a byte-level tokenizer.json). Cached: the same settings reuse it.
//   lora      adapters on the second corpus; validation loss before and after, a sample before and after, and
//             OUT/adapter/ (PEFT: adapter_model.safetensors + adapter_config.json)
//   sample    continues --prompt with the base alone and with the adapter from OUT (every rank alike)
//   merge     folds the adapter from OUT into the base inside a GatherFull scope, checks that the merged model's
//             logits equal the adapted model's, and writes OUT/merged/ (a Hugging Face model directory; for a
//             GGUF base also OUT/base/, the dequantized weights the adapter was trained on). --logits-out FILE
//             also writes the batch's tokens and the base, adapter and merged logits (tests/hf_load_check.py).
//   all       prepare, pretrain (or reuse), lora
//
// --base smollm2 replaces the small pretrained base by SmolLM2-135M-Instruct from its GGUF file
// (scripts/fetch_smollm2.sh puts it in runs/models/), dequantized fragment by fragment into the frozen base
// through InitParams, with the GGUF's byte-level BPE tokenizer (tokenizer.h) re-tokenizing the corpus.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <type_traits>
#include <map>
#include <random>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <zero/zero.h>

#include "examples/lora_finetune/data.h"
#include "examples/lora_finetune/flags.h"
#include "examples/lora_finetune/gguf.h"
#include "examples/lora_finetune/gguf_llama.h"
#include "examples/lora_finetune/hf_config.h"
#include "examples/lora_finetune/merge.h"
#include "examples/lora_finetune/model.h"
#include "examples/lora_finetune/model_cuda.h"
#include "examples/lora_finetune/safetensors.h"
#include "examples/lora_finetune/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;
using lora_cli::Flags;
using lora_cli::kSmolLm2Gguf;
using lora_cli::kUsage;
using lora_cli::ParseFlags;

// Errors end the run on every rank with the message (rank-tagged); zero's statuses already name the rank.
[[noreturn]] void Fail(const std::string& what) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "lora_finetune (rank %d): %s\n", rank, what.c_str());
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::exit(1);
}

void Check(const zero::Status& s, const std::string& what) {
  if (!s.ok()) Fail(what + ": " + s.ToString());
}

// Rank 0 prints; every rank must call (no collectives inside).
template <typename... Args>
void Say(const char* fmt, Args... args) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) return;
  std::printf(fmt, args...);
  std::fflush(stdout);
}

double AllMean(double v) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  double sum = 0;
  MPI_Allreduce(&v, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return sum / world;
}

double AllMax(double v) {
  double m = 0;
  MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

// lora::ParamAccess over a zero::Engine: the model's parameter traffic goes through zero's protocol.
class EngineAccess : public lora::ParamAccess {
 public:
  explicit EngineAccess(zero::Engine* e) : e_(e) {}
  void Acquire(int unit, bool backward) override {
    Check(e_->Acquire(unit, backward ? zero::Pass::kBackward : zero::Pass::kForward), "Acquire");
  }
  void Release(int unit, bool backward) override {
    Check(e_->Release(unit, backward ? zero::Pass::kBackward : zero::Pass::kForward), "Release");
  }
  void GradsReady(int unit) override { Check(e_->GradsReady(unit), "GradsReady"); }
  const float* Param(int p) override { return e_->Param(p).as<float>(); }
  float* Grad(int p) override { return e_->Grad(p).as<float>(); }

 private:
  zero::Engine* e_;
};

// lora::CudaParamAccess over a zero::Engine on the CUDA backend: bf16 parameter and fp32 gradient views.
class EngineCudaAccess : public lora::CudaParamAccess {
 public:
  explicit EngineCudaAccess(zero::Engine* e) : e_(e) {}
  void Acquire(int unit, bool backward) override {
    Check(e_->Acquire(unit, backward ? zero::Pass::kBackward : zero::Pass::kForward), "Acquire");
  }
  void Release(int unit, bool backward) override {
    Check(e_->Release(unit, backward ? zero::Pass::kBackward : zero::Pass::kForward), "Release");
  }
  void GradsReady(int unit) override { Check(e_->GradsReady(unit), "GradsReady"); }
  const void* Param(int p) override { return e_->Param(p).data; }
  float* Grad(int p) override { return e_->Grad(p).as<float>(); }

 private:
  zero::Engine* e_;
};

// The model's passes on the device --device chose: lora::Forward / Logits (CPU) or their CUDA twins, with their
// activations in `ws` (whose peak is the activation memory reported).
float ModelForward(const Flags& f, zero::Engine* engine, const lora::ModelConfig& m, const lora::LoraConfig& l,
                   const lora::Batch& b, bool backward, float loss_scale, uint64_t dropout_seed, lora::Workspace* ws) {
  const lora::PassOptions options{f.recompute, ws};
  if (f.cuda) {
    EngineCudaAccess access(engine);
    return lora::ForwardCuda(m, l, access, b, backward, loss_scale, dropout_seed, options);
  }
  EngineAccess access(engine);
  return lora::Forward(m, l, access, b, backward, loss_scale, dropout_seed, f.threads, options);
}
void ModelLogits(const Flags& f, zero::Engine* engine, const lora::ModelConfig& m, const lora::LoraConfig& l,
                 const lora::Batch& b, std::vector<float>* logits, lora::Workspace* ws) {
  if (f.cuda) {
    EngineCudaAccess access(engine);
    lora::LogitsCuda(m, l, access, b, logits, ws);
    return;
  }
  EngineAccess access(engine);
  lora::Logits(m, l, access, b, logits, f.threads, ws);
}

// How text becomes token ids: bytes for the small base, the GGUF's BPE for smollm2.
struct Text {
  const lora::BpeTokenizer* bpe = nullptr;
  std::vector<int32_t> Encode(const std::string& s) const {
    return bpe != nullptr ? bpe->Encode(s) : std::vector<int32_t>(s.begin(), s.end());
  }
  std::string Decode(const std::vector<int32_t>& ids) const {
    if (bpe != nullptr) return bpe->Decode(ids);
    std::string out;
    for (int32_t id : ids) {
      const char c = static_cast<char>(id);
      out += (c == '\n' || (c >= 32 && c < 127)) ? c : '?';
    }
    return out;
  }
};

// The frozen base: the small model's safetensors file, or a GGUF (SmolLM2) read with the Hugging Face row order.
struct Base {
  lora::ModelConfig config;
  std::unique_ptr<lora::Reader> safetensors;
  std::unique_ptr<lora::GgufFile> gguf;
  lora::BpeTokenizer tokenizer;  // GGUF only
  zero::Status Read(const std::string& name, int64_t off, int64_t n, float* dst) const {
    return gguf ? lora::ReadHfRange(*gguf, config, name, off, n, dst) : safetensors->ReadRange(name, off, n, dst);
  }
};

// The base's text encoding: its BPE when it has one, bytes otherwise.
Text TextOf(const Base& base) {
  Text t;
  if (base.gguf) t.bpe = &base.tokenizer;
  return t;
}

lora::ModelConfig SmallConfig(const Flags& f) {
  lora::ModelConfig m;
  m.vocab = lora::kVocabSize;
  m.dim = f.dim;
  m.layers = f.layers;
  m.heads = f.heads;
  m.kv_heads = f.kv_heads;
  m.ffn = f.ffn;
  return m;
}

// Opens the base for lora / sample / merge. Every rank opens the file; none reads a whole tensor.
void OpenBase(const Flags& f, const std::string& small_path, Base* base) {
  if (f.base == "small") {
    Check(lora::Reader::Open(small_path, &base->safetensors), "opening the base model (run pretrain first)");
    base->config = SmallConfig(f);
    return;
  }
  const zero::Status s = lora::GgufFile::Open(f.gguf, &base->gguf);
  if (!s.ok()) {
    Fail("opening the SmolLM2 GGUF: " + s.ToString() +
         (f.gguf == kSmolLm2Gguf ? "\n  fetch it first: scripts/fetch_smollm2.sh (or pass --gguf PATH)" : ""));
  }
  Check(lora::LlamaConfigFromGguf(*base->gguf, &base->config), "GGUF base");
  Check(lora::BpeTokenizer::FromGguf(*base->gguf, &base->tokenizer), "GGUF tokenizer");
  if (base->tokenizer.vocab_size() != base->config.vocab) {
    Fail("GGUF base: the tokenizer has " + std::to_string(base->tokenizer.vocab_size()) +
         " tokens, token_embd.weight " + std::to_string(base->config.vocab) + " rows");
  }
}

struct Run {
  lora::ModelConfig model;
  lora::LoraConfig lora;
  std::vector<lora::ParamInfo> params;
  std::unique_ptr<zero::Engine> engine;
  std::unique_ptr<lora::Workspace> workspace;  // the model's activations, on the model's device
};

zero::Options EngineOptions(const Flags& f, float lr) {
  zero::Options o;
  o.stage = static_cast<zero::Stage>(f.stage);
  o.offload_optimizer = f.offload;
  o.nvme_path = f.nvme;
  o.adamw.lr = lr;
  o.adamw.weight_decay = 0.01f;
  o.clip_norm = 1.0;
  o.bucket_elements = int64_t{1} << 20;
  o.cpu_threads = f.threads;
  o.zeropp.hpz = f.hpz;
  o.zeropp.qwz = f.qwz;
  o.zeropp.qgz_bits = f.qgz_bits;
  if (f.cuda) {  // the CUDA model computes in bf16 (fp32 master weights and gradients)
    o.backend = zero::Backend::kCuda;
    o.param_dtype = zero::DType::kBF16;
  }
  return o;
}

// The projections --targets names (comma-separated), or false for an unknown or empty list.
bool SetTargets(const std::string& list, lora::LoraConfig* l) {
  l->q = l->k = l->v = l->o = l->gate = l->up = l->down = false;
  std::stringstream ss(list);
  std::string t;
  bool any = false;
  while (std::getline(ss, t, ',')) {
    bool* flag = t == "q" ? &l->q : t == "k" ? &l->k : t == "v" ? &l->v : t == "o" ? &l->o : t == "gate" ? &l->gate
               : t == "up" ? &l->up : t == "down" ? &l->down : nullptr;
    if (flag == nullptr) return false;
    *flag = any = true;
  }
  return any;
}

// PEFT's target_modules for --targets: {"q_proj", ...}.
std::vector<std::string> TargetModules(const std::string& list) {
  std::stringstream ss(list);
  std::string t;
  std::vector<std::string> out;
  while (std::getline(ss, t, ',')) out.push_back(t + "_proj");
  return out;
}

void Open(const Flags& f, zero::Comm* comm, const lora::ModelConfig& model, bool with_lora, float lr, Run* run) {
  run->model = model;
  run->lora = {};
  run->lora.enabled = with_lora;
  run->lora.r = f.r;
  run->lora.alpha = f.alpha;
  run->lora.dropout = f.dropout;
  if (!SetTargets(f.targets, &run->lora)) {
    Fail("--targets '" + f.targets + "': give a comma-separated subset of q,k,v,o,gate,up,down");
  }
  const std::string bad = lora::CheckConfig(run->model, run->lora);
  if (!bad.empty()) Fail("model configuration: " + bad);
  run->params = lora::Parameters(run->model, run->lora);
  std::vector<zero::ParamSpec> specs;
  for (const lora::ParamInfo& p : run->params) {
    zero::ParamSpec s;
    s.name = p.name;
    s.shape = p.shape;
    s.unit = p.unit;
    s.trainable = p.trainable;
    if (p.shape.size() == 1) s.wd_mult = 0.0f;  // no weight decay on norms
    specs.push_back(s);
  }
  Check(zero::Engine::Open(EngineOptions(f, lr), comm, specs, &run->engine), "Engine::Open");
  if (!f.nvme.empty()) Say("offload: the optimizer state on the NVMe tier under %s\n", f.nvme.c_str());
  run->workspace = f.cuda ? lora::NewCudaWorkspace() : lora::Workspace::Host();
}

// zero::EstimateActivations for one micro-batch of this run (fp32 on the CPU model, bf16 on the CUDA model).
int64_t EstimatedActivationBytes(const Flags& f, const Run& run) {
  zero::TransformerShape s;
  s.layers = run.model.layers;
  s.hidden = run.model.dim;
  s.heads = run.model.heads;
  s.kv_heads = run.model.kv_heads;
  s.ffn = run.model.ffn;
  s.vocab = run.model.vocab;
  s.tied = true;
  if (run.lora.enabled) {
    const bool on[7] = {run.lora.q, run.lora.k, run.lora.v, run.lora.o, run.lora.gate, run.lora.up, run.lora.down};
    s.lora_rank = run.lora.r;
    s.lora_targets = 0;
    for (int p = 0; p < 7; ++p) s.lora_targets |= on[p] ? 1u << p : 0u;
  }
  zero::ActivationOptions o;
  o.micro_batch = f.batch;
  o.seq_len = f.seq;
  o.recompute = f.recompute;
  o.dtype = f.cuda ? zero::DType::kBF16 : zero::DType::kF32;
  o.lora_dropout = run.lora.enabled && run.lora.dropout > 0.f;
  zero::ActivationEstimate e;
  Check(zero::EstimateActivations(s, o, &e), "EstimateActivations");
  return e.peak;
}

// Fills the base from `base` and the adapters from `adapter` (PEFT names), or from their init when it is null
// (`zero_adapters`: A = B = 0 instead, the base alone). Each rank reads only the fragments it owns.
void LoadParams(const Flags& f, Run& run, const Base& base, const lora::Reader* adapter, bool zero_adapters) {
  zero::Status fill_error;
  const auto t0 = Clock::now();
  Check(run.engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
    const lora::ParamInfo& info = run.params[static_cast<size_t>(p)];
    zero::Status st;
    if (!info.trainable) {
      st = base.Read(info.name, off, n, dst);
    } else if (adapter != nullptr) {
      st = adapter->ReadRange("base_model.model." + info.name, off, n, dst);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = zero_adapters ? 0.0f : lora::InitValue(run.model, run.lora, p, off + i, f.seed);
    }
    if (!st.ok() && fill_error.ok()) fill_error = st;
  }), "InitParams");
  Check(fill_error, "loading parameters");
  if (base.gguf) {
    Say("smollm2: dequantized this rank's shards of %s in %.1f s\n", f.gguf.c_str(),
        AllMax(std::chrono::duration<double>(Clock::now() - t0).count()));
  }
}

// Warmup, then cosine decay to 10% of the peak.
double LearningRate(double peak, int step, int steps, int warmup) {
  if (step < warmup) return peak * (step + 1) / warmup;
  const double t = steps > warmup ? static_cast<double>(step - warmup) / (steps - warmup) : 1.0;
  return peak * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * t)));
}

double ValidationLoss(const Flags& f, Run& run, const lora::BatchSampler& val) {
  Check(run.engine->BeginEval(), "BeginEval");
  std::vector<int32_t> in(static_cast<size_t>(f.batch * f.seq)), tg(in.size());
  double total = 0;
  for (int i = 0; i < f.eval_batches; ++i) {
    val.Sample(i, in.data(), tg.data());
    const lora::Batch b{f.batch, f.seq, in.data(), tg.data()};
    total += ModelForward(f, run.engine.get(), run.model, run.lora, b, /*backward=*/false, 1.0f, 0,
                          run.workspace.get());
  }
  Check(run.engine->EndEval(), "EndEval");
  return AllMean(total / f.eval_batches);
}

// One progress line every `every` steps (and the last): loss averaged over ranks, tokens/s of the whole job, the
// largest rank's peak device and host bytes, the loss scale.
// With `ckpt` set, saves a zero checkpoint every f.save_every steps (the two newest are kept); steps start at
// `start` (a resumed run). Returns false when --stop-after ended the run early.
bool Train(const Flags& f, Run& run, const lora::BatchSampler& train, int steps, float peak_lr, const char* label,
           int every, int start = 0, const std::string& ckpt = "") {
  std::vector<int32_t> in(static_cast<size_t>(f.batch * f.seq)), tg(in.size());
  int world = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  run.workspace->ResetPeak();  // the training passes' peak, not the evaluation's before
  for (int step = start; step < steps; ++step) {
    const auto t0 = Clock::now();
    double loss = 0;
    for (int m = 0; m < f.micro; ++m) {
      Check(run.engine->BeginMicroStep(m, m == f.micro - 1), "BeginMicroStep");
      train.Sample(static_cast<int64_t>(step) * f.micro + m, in.data(), tg.data());
      const lora::Batch b{f.batch, f.seq, in.data(), tg.data()};
      loss += ModelForward(f, run.engine.get(), run.model, run.lora, b, /*backward=*/true, run.engine->LossScale(),
                           f.seed * 1000003 + static_cast<uint64_t>(step * f.micro + m), run.workspace.get());
    }
    zero::StepArgs args;
    args.lr = LearningRate(peak_lr, step, steps, f.warmup);
    zero::StepResult r;
    Check(run.engine->Step(args, &r), "Step");
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    const double mean_loss = AllMean(loss / f.micro);
    const double tokens = static_cast<double>(f.micro) * f.batch * f.seq * world;
    const zero::MemoryReport mem = run.engine->Memory();
    const double dev_mib = AllMax(static_cast<double>(mem.device.peak_total)) / (1 << 20);
    const double host_mib = AllMax(static_cast<double>(mem.host.peak_total)) / (1 << 20);
    const double act_mib = AllMax(static_cast<double>(run.workspace->peak_bytes())) / (1 << 20);
    if (step % every == 0 || step == steps - 1) {
      // bench/report.py reads "tok/s  device X MiB  host Y MiB": the activations come after.
      Say("%s step %4d/%d  loss %.4f  lr %.2e  norm %.3f  %6.0f tok/s  device %.1f MiB  host %.1f MiB  "
          "activations %.1f MiB  scale %g%s\n",
          label, step + 1, steps, mean_loss, r.lr, r.grad_norm, tokens / AllMax(secs), dev_mib, host_mib, act_mib,
          static_cast<double>(r.loss_scale), r.skipped ? "  (skipped)" : "");
    }
    const int done = step + 1;
    if (!ckpt.empty() && f.save_every > 0 && done % f.save_every == 0 && done < steps) {
      // The metadata is the data position: the next step's index (the sampler and the schedule are functions
      // of it), so a resumed run takes exactly the batches and learning rates of an uninterrupted one.
      char tag[32];
      std::snprintf(tag, sizeof(tag), "step-%06d", done);
      Check(run.engine->Save(ckpt, tag, "next_step=" + std::to_string(done)), std::string("saving ") + tag);
      if (rank == 0 && done > 2 * f.save_every) {
        std::snprintf(tag, sizeof(tag), "step-%06d", done - 2 * f.save_every);
        std::filesystem::remove_all(std::filesystem::path(ckpt) / tag);
      }
      Say("%s: checkpoint %s/step-%06d\n", label, ckpt.c_str(), done);
    }
    if (f.stop_after >= 0 && done >= f.stop_after && done < steps) {
      Say("%s: stopping after step %d (--stop-after)\n", label, done);
      return false;
    }
  }
  // Activation memory: measured (the high-water mark of the model's workspace, largest rank) and estimated.
  const double measured = AllMax(static_cast<double>(run.workspace->peak_bytes()));
  const double estimated = static_cast<double>(EstimatedActivationBytes(f, run));
  Say("%s: peak activations per rank %.2f MiB measured, %.2f MiB estimated by zero::EstimateActivations (%+.1f%%), "
      "micro-batch %d x %d tokens%s\n",
      label, measured / (1 << 20), estimated / (1 << 20), 100.0 * (estimated - measured) / std::max(measured, 1.0),
      f.batch, f.seq, f.recompute ? ", per-block recomputation" : "");
  Say("peak_activation_bytes=%.0f estimated_activation_bytes=%.0f\n", measured, estimated);
  return true;
}

// Continuation of `prompt`, sampled at temperature 0.7 from a fixed seed (greedy decoding of a small byte-level
// model loops on its most frequent word). Every rank computes the same logits and draws the same numbers, so
// every rank produces the same text. Stops early at the tokenizer's end-of-sequence token.
std::string Sample(const Flags& f, Run& run, const Text& text, const std::string& prompt, int new_tokens) {
  std::vector<int32_t> tokens = text.Encode(prompt);
  if (tokens.empty()) tokens.push_back(text.bpe != nullptr && text.bpe->bos() >= 0 ? text.bpe->bos() : '\n');
  const size_t prompt_tokens = tokens.size();
  const int vocab = run.model.vocab;
  std::mt19937_64 rng(f.seed);
  Check(run.engine->BeginEval(), "BeginEval");
  std::vector<float> logits;
  for (int i = 0; i < new_tokens; ++i) {
    const int n = static_cast<int>(std::min<size_t>(tokens.size(), static_cast<size_t>(f.seq)));
    std::vector<int32_t> window(tokens.end() - n, tokens.end()), targets(static_cast<size_t>(n), -1);
    const lora::Batch b{1, n, window.data(), targets.data()};
    ModelLogits(f, run.engine.get(), run.model, run.lora, b, &logits, run.workspace.get());
    const float* last = logits.data() + static_cast<size_t>(n - 1) * vocab;
    const float top = *std::max_element(last, last + vocab);
    std::vector<double> weights(static_cast<size_t>(vocab));
    for (int v = 0; v < vocab; ++v) weights[static_cast<size_t>(v)] = std::exp((last[v] - top) / 0.7);
    std::discrete_distribution<int> pick(weights.begin(), weights.end());
    tokens.push_back(pick(rng));
    if (text.bpe != nullptr && tokens.back() == text.bpe->eos()) break;
  }
  Check(run.engine->EndEval(), "EndEval");
  return text.Decode(std::vector<int32_t>(tokens.begin() + static_cast<std::ptrdiff_t>(prompt_tokens), tokens.end()));
}

lora::Corpus CorpusFor(const std::string& name) {
  if (name == "fortunes") return lora::Corpus::kFortunes;
  if (name == "bible") return lora::Corpus::kBible;
  if (name == "synthetic") return lora::Corpus::kSynthetic;
  Fail("unknown corpus '" + name + "' (fortunes, bible or synthetic)");
}

// Every rank prepares into the same directory: the corpus files are written atomically and reused by content
// hash, so concurrent preparation of identical content is harmless; rank 0 reports.
lora::PreparedCorpus Prepare(const Flags& f, const std::string& name) {
  lora::PreparedCorpus p;
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  lora::CorpusOptions options;
  options.synthetic_documents = f.synthetic_documents;
  if (rank == 0) Check(lora::PrepareCorpus(CorpusFor(name), f.data, options, &p), "prepare " + name);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank != 0) Check(lora::PrepareCorpus(CorpusFor(name), f.data, options, &p), "prepare " + name);
  Say("corpus %-9s train %lld tokens (%lld docs), validation %lld tokens%s\n", name.c_str(),
      static_cast<long long>(p.train_tokens), static_cast<long long>(p.train_documents),
      static_cast<long long>(p.validation_tokens), p.reused ? " (reused)" : "");
  return p;
}

// The token stream of a prepared corpus file: its bytes, or their BPE ids. Every rank tokenizes alike.
struct Tokens {
  std::vector<uint8_t> bytes;
  std::vector<int32_t> ids;
};

Tokens LoadTokens(const std::string& path, const Text& text) {
  Tokens t;
  Check(lora::ReadTokens(path, &t.bytes), "reading tokens");
  if (text.bpe != nullptr) {
    const auto t0 = Clock::now();
    t.ids = text.bpe->Encode(std::string(t.bytes.begin(), t.bytes.end()));
    Say("bpe: %s: %zu bytes -> %zu tokens in %.1f s\n", path.c_str(), t.bytes.size(), t.ids.size(),
        std::chrono::duration<double>(Clock::now() - t0).count());
    t.bytes.clear();
  }
  return t;
}

lora::BatchSampler Sampler(const Tokens& tokens, const Flags& f, uint64_t seed) {
  lora::SamplerOptions o;
  o.batch = f.batch;
  o.seq_len = f.seq;
  o.seed = seed;
  MPI_Comm_rank(MPI_COMM_WORLD, &o.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &o.world);
  lora::BatchSampler s;
  if (tokens.ids.empty()) {
    Check(lora::BatchSampler::Create(tokens.bytes, o, &s), "batch sampler");
  } else {
    Check(lora::BatchSampler::Create(tokens.ids, o, &s), "batch sampler");
  }
  return s;
}

// The settings that determine the base model; the cache key of base/model.safetensors.
std::string BaseKey(const Flags& f, uint64_t corpus_hash) {
  std::ostringstream os;
  os << "dim=" << f.dim << " layers=" << f.layers << " heads=" << f.heads << " kv_heads=" << f.kv_heads
     << " ffn=" << f.ffn << " seq=" << f.seq << " batch=" << f.batch << " micro=" << f.micro
     << " steps=" << f.pretrain_steps << " lr=" << f.pretrain_lr << " seed=" << f.seed << " corpus=" << corpus_hash;
  return os.str();
}

// The Hugging Face directories under --out (hf_config.h): OUT/base, OUT/adapter, OUT/merged.
std::string HfDir(const Flags& f, const char* which) { return f.out + "/" + which; }

// What config.json and tokenizer_config.json say beyond the model's shape: the small base was trained on --seq
// tokens and has no special tokens; a GGUF base brings its context length, bos/eos and chat template.
lora::HfModelOptions HfOptions(const Flags& f, const Base* base) {
  lora::HfModelOptions o;
  o.max_position_embeddings = f.seq;
  if (base != nullptr && base->gguf) {
    int64_t context = 0;
    if (base->gguf->GetInt("llama.context_length", &context).ok()) o.max_position_embeddings = context;
    if (base->gguf->FindValue("tokenizer.chat_template") != nullptr) {
      (void)base->gguf->GetString("tokenizer.chat_template", &o.chat_template);  // optional: left out if unreadable
    }
    o.bos_token_id = base->tokenizer.bos();
    o.eos_token_id = base->tokenizer.eos();
  }
  return o;
}

// config.json's fields for `m`, on one line (also the "config" metadata of the saved safetensors files).
std::string HfConfig(const lora::ModelConfig& m, const lora::HfModelOptions& o) {
  return lora::HfLlamaConfigJson(m, o, -1);
}

// config.json, tokenizer.json and tokenizer_config.json beside a model.safetensors (rank 0 alone).
void WriteHfFiles(const Flags& f, const std::string& dir, const lora::ModelConfig& m, const Base* base) {
  const lora::BpeTokenizer bytes = lora::BpeTokenizer::ByteLevel();
  const lora::BpeTokenizer& tokenizer = base != nullptr && base->gguf ? base->tokenizer : bytes;
  Check(lora::WriteHfModelFiles(dir, m, tokenizer, HfOptions(f, base)), "writing the Hugging Face files of " + dir);
}

// Writes `tensors` to `path` atomically (the caller: rank 0 alone).
void WriteFile(const std::string& path, const std::vector<lora::TensorData>& tensors,
               const std::map<std::string, std::string>& metadata) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  Check(lora::Save(path, tensors, metadata), "writing " + path);  // through path.tmp and a rename
}

std::vector<int> AllUnits(const Run& run) {
  std::vector<int> units(static_cast<size_t>(lora::NumUnits(run.model)));
  for (size_t u = 0; u < units.size(); ++u) units[u] = static_cast<int>(u);
  return units;
}

// Writes the model (Hugging Face names), or only its adapters (PEFT names), as fp32 safetensors with
// Engine::Export: every rank writes the fragments it owns, in parallel; no rank gathers the model.
void SaveModel(Run& run, const std::string& path, const std::map<std::string, std::string>& metadata,
               bool trainable_only) {
  zero::ExportOptions eo;
  eo.trainable_only = trainable_only;
  for (const lora::ParamInfo& p : run.params) eo.names.push_back(trainable_only ? "base_model.model." + p.name : p.name);
  eo.metadata.assign(metadata.begin(), metadata.end());
  std::error_code ec;  // every rank: idempotent, and the directory exists before rank 0 creates the file
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  Check(run.engine->Export(path, eo), "writing " + path);
}

// merge: inside one GatherFull scope of every unit, the adapted model's logits on a validation batch, then the
// adapters folded into copies of their projections (merge.h) and the merged model's logits on the same batch.
// They must agree to 1e-5 relative to the largest |logit|: the two differ only in fp32 rounding, W x + s B (A x)
// against (W + s B A) x, each a sum of at most ffn products whose rounding error is a few units of 2^-24 ~ 6e-8
// times the summed magnitudes. Measured: 4.7e-7 on the tiny test model, 2.1e-6 on SmolLM2-135M (30 layers), while
// a wrong fold (a transposed or unscaled B A, a missed projection) moves logits by about as much as the adapter
// does (printed: 0.5 and 20 there), far beyond 1e-5.
void Merge(const Flags& f, Run& run, const Base& base, const lora::BatchSampler& val) {
  std::vector<int32_t> in(static_cast<size_t>(f.batch * f.seq)), tg(in.size());
  val.Sample(0, in.data(), tg.data());
  const lora::Batch batch{f.batch, f.seq, in.data(), tg.data()};
  zero::FullParamsScope scope;
  Check(run.engine->GatherFull(AllUnits(run), &scope), "GatherFull");
  std::vector<const float*> adapted(run.params.size());
  for (size_t p = 0; p < adapted.size(); ++p) adapted[p] = run.engine->Param(static_cast<int>(p)).as<float>();
  lora::FullAccess adapted_access(adapted);
  std::vector<float> want, got;
  lora::Logits(run.model, run.lora, adapted_access, batch, &want, f.threads);
  const lora::MergedModel merged = lora::Merge(run.model, run.lora, adapted, f.threads);
  lora::FullAccess merged_access(merged.params);
  lora::Logits(run.model, lora::LoraConfig(), merged_access, batch, &got, f.threads);
  double max_diff = 0, max_abs = 0, adapter_effect = 0;
  size_t folded = 0;
  for (const std::vector<float>& w : merged.folded) folded += w.empty() ? 0 : 1;
  for (size_t i = 0; i < want.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs(got[i] - want[i])));
    max_abs = std::max(max_abs, static_cast<double>(std::abs(want[i])));
  }
  // How far the adapter moves the logits (base alone = B A dropped): shows the check compares something.
  const std::vector<lora::ParamInfo> infos = lora::Parameters(run.model, lora::LoraConfig());
  std::vector<const float*> plain(merged.params.size());
  for (size_t p = 0; p < plain.size(); ++p) {
    for (size_t q = 0; q < run.params.size(); ++q) {
      if (run.params[q].name == infos[p].name) plain[p] = adapted[q];
    }
  }
  std::vector<float> base_logits;
  {
    lora::FullAccess plain_access(plain);
    lora::Logits(run.model, lora::LoraConfig(), plain_access, batch, &base_logits, f.threads);
    for (size_t i = 0; i < want.size(); ++i) {
      adapter_effect = std::max(adapter_effect, static_cast<double>(std::abs(base_logits[i] - want[i])));
    }
  }
  const double rel = max_diff / std::max(max_abs, 1e-30);
  Say("merge: %zu projections folded; max |merged - adapter logits| = %.3g, relative %.3g (limit 1e-5); the "
      "adapter itself moves logits by up to %.3g\n",
      folded, max_diff, rel, adapter_effect);
  if (!(rel <= 1e-5)) Fail("merged logits differ from adapter logits beyond 1e-5 relative");
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const std::string merged_dir = HfDir(f, "merged");
  if (rank == 0) {
    // The merged model, and for a GGUF base the base itself: the hub's SmolLM2 is not the Q4_1-dequantized model
    // the adapter was trained on, so PeftModel reproduces the example's logits only on this one.
    const auto write_model = [&](const std::string& dir, const std::vector<const float*>& params) {
      std::vector<lora::TensorData> tensors;
      for (size_t p = 0; p < infos.size(); ++p) {
        lora::TensorData t;
        t.spec.name = infos[p].name;
        t.spec.shape = infos[p].shape;
        t.data = params[p];
        tensors.push_back(t);
      }
      WriteFile(dir + "/model.safetensors", tensors,
                {{"format", "pt"}, {"config", HfConfig(run.model, HfOptions(f, &base))}});
      WriteHfFiles(f, dir, run.model, &base);
    };
    write_model(merged_dir, merged.params);
    if (base.gguf) write_model(HfDir(f, "base"), plain);
    if (!f.logits_out.empty()) {
      // Token ids as F32 (exact: every id < 2^24), logits [batch, seq, vocab] of the three models, and the prompt
      // with its ids (the tokenizer check).
      const std::vector<int32_t> prompt_ids = TextOf(base).Encode(f.prompt);
      std::string ids;
      for (int32_t id : prompt_ids) {
        if (!ids.empty()) ids += ',';
        ids += std::to_string(id);
      }
      const std::vector<float> tokens(in.begin(), in.end());
      const std::vector<int64_t> shape = {f.batch, f.seq, run.model.vocab};
      std::vector<lora::TensorData> t(4);
      t[0] = {{"tokens", lora::DType::kF32, {f.batch, f.seq}}, tokens.data()};
      t[1] = {{"base", lora::DType::kF32, shape}, base_logits.data()};
      t[2] = {{"adapter", lora::DType::kF32, shape}, want.data()};
      t[3] = {{"merged", lora::DType::kF32, shape}, got.data()};
      WriteFile(f.logits_out, t, {{"format", "pt"}, {"prompt", f.prompt}, {"prompt_ids", ids}});
    }
  }
  Check(scope.Close(), "closing GatherFull");
  if (base.gguf) Say("merge: wrote %s (the dequantized base)\n", HfDir(f, "base").c_str());
  if (!f.logits_out.empty()) Say("merge: wrote %s\n", f.logits_out.c_str());
  Say("merged_relative_error=%.3g\nmerged=%s\n", rel, merged_dir.c_str());
}

int Main(int argc, char** argv) {
  Flags f;
  std::string error;
  if (argc > 1 && std::string(argv[1]) == "help") {
    Say("%s", kUsage);
    return 0;
  }
  if (!ParseFlags(argc, argv, &f, &error)) {
    Say("lora_finetune: %s\n%s", error.c_str(), kUsage);
    return 2;
  }
  std::string no_cuda;
  const bool have_cuda = lora::CudaModelAvailable(&no_cuda);
  if (f.device == "cuda" && !have_cuda) Fail("--device cuda: " + no_cuda);
  if (f.device == "cuda" && f.command == "merge") Fail("merge folds adapters on the host: use --device cpu");
  f.cuda = f.device == "cuda" || (f.device == "auto" && have_cuda && f.command != "merge");
  std::unique_ptr<zero::Comm> comm;
  zero::CommOptions comm_options;
  comm_options.ranks_per_node = f.ranks_per_node;
  if (f.cuda) {
    // NCCL over the world; it also makes this rank's GPU (its local rank's) current, where the model runs. With
    // --device auto, a GPU this rank may not use (more ranks on the node than GPUs, unless the NCCL allows sharing)
    // means the CPU; OpenNccl answers alike on every rank.
    const zero::Status s = zero::Comm::OpenNccl(MPI_Comm_c2f(MPI_COMM_WORLD), comm_options, &comm);
    if (!s.ok() && f.device == "auto" && s.code() == zero::StatusCode::kUnavailable) {
      Say("device: auto: the CPU (%s)\n", s.message().c_str());
      f.cuda = false;
    } else {
      Check(s, "Comm (NCCL)");
      Say("device: CUDA %d (bf16 model)\n", comm->cuda_device());
    }
  }
  if (!f.cuda) {
    Check(zero::Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), comm_options, &comm), "Comm");
  }
  if (f.hpz || f.qwz || f.qgz_bits > 0) {
    Say("ZeRO++: hpz %d, qwz %d, qgz %d bits; %s\n", f.hpz ? 1 : 0, f.qwz ? 1 : 0, f.qgz_bits,
        comm->topology().ToString().c_str());
  }
  int world = comm->world_size();
  if (f.threads < 1) f.threads = 1;
  const bool smollm2 = f.base == "smollm2";

  // The small base pretrains on the first corpus; SmolLM2 is pretrained already.
  lora::PreparedCorpus base_corpus;
  if (!smollm2) base_corpus = Prepare(f, f.base_corpus);
  const lora::PreparedCorpus tune_corpus = Prepare(f, f.tune_corpus);
  if (f.command == "prepare") return 0;

  // --- pretrain (or reuse) ---
  const std::string base_path = HfDir(f, "base") + "/model.safetensors";
  const std::string key = smollm2 ? "" : BaseKey(f, base_corpus.content_hash);
  bool reuse = false;
  if (!smollm2) {
    std::unique_ptr<lora::Reader> reader;
    if (std::filesystem::exists(base_path) && lora::Reader::Open(base_path, &reader).ok()) {
      auto it = reader->metadata().find("zero.base_key");
      reuse = it != reader->metadata().end() && it->second == key;
    }
  }
  if (f.command == "pretrain" || (f.command == "all" && !smollm2 && !reuse)) {
    const Text bytes;
    const Tokens train_tokens = LoadTokens(base_corpus.train_path, bytes);
    const Tokens val_tokens = LoadTokens(base_corpus.validation_path, bytes);
    Run run;
    Open(f, comm.get(), SmallConfig(f), /*with_lora=*/false, f.pretrain_lr, &run);
    Check(run.engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
      for (int64_t i = 0; i < n; ++i) dst[i] = lora::InitValue(run.model, run.lora, p, off + i, f.seed);
    }), "InitParams");
    Say("pretrain: %zu tensors, stage %d, %d ranks, %d steps of %d x %d x %d tokens\n", run.params.size(), f.stage,
        world, f.pretrain_steps, f.micro, f.batch * world, f.seq);
    const lora::BatchSampler train = Sampler(train_tokens, f, f.seed), val = Sampler(val_tokens, f, f.seed + 7);
    Train(f, run, train, f.pretrain_steps, f.pretrain_lr, "pretrain", 10);
    Say("pretrain: validation loss %.4f\n", ValidationLoss(f, run, val));
    SaveModel(run, base_path, {{"format", "pt"}, {"config", HfConfig(run.model, HfOptions(f, nullptr))},
                               {"zero.base_key", key}}, false);
    Say("pretrain: wrote %s\n", base_path.c_str());
  } else if (f.command == "all" && !smollm2) {
    Say("pretrain: reusing %s (same settings)\n", base_path.c_str());
  }
  if ((f.command == "pretrain" || f.command == "all") && !smollm2 && comm->rank() == 0) {
    WriteHfFiles(f, HfDir(f, "base"), SmallConfig(f), nullptr);  // also completes a reused directory
  }
  if (f.command == "pretrain") return 0;

  Base base;
  OpenBase(f, base_path, &base);
  Text text;
  if (smollm2) {
    text.bpe = &base.tokenizer;
    const lora::ModelConfig& m = base.config;
    Say("smollm2: %s: %d layers, dim %d, %d heads (%d kv), ffn %d, vocab %d, rope theta %g\n", f.gguf.c_str(),
        m.layers, m.dim, m.heads, m.kv_heads, m.ffn, m.vocab, static_cast<double>(m.rope_theta));
    Say("smollm2: a 135M-parameter model on CPU ranks: only a short run is practical (%d steps of %d x %d tokens "
        "here; raise --lora-steps for more)\n",
        f.lora_steps, f.micro * f.batch * world, f.seq);
  }
  const std::string adapter_path = HfDir(f, "adapter") + "/adapter_model.safetensors";

  // --- sample: the base alone, then with the trained adapter ---
  if (f.command == "sample") {
    std::unique_ptr<lora::Reader> adapter;
    Check(lora::Reader::Open(adapter_path, &adapter), "opening the adapter (run lora first)");
    Run run;
    Open(f, comm.get(), base.config, /*with_lora=*/true, f.lora_lr, &run);
    const std::vector<const lora::Reader*> variants = {nullptr, adapter.get()};
    for (const lora::Reader* adapters : variants) {
      LoadParams(f, run, base, adapters, /*zero_adapters=*/true);
      Say("%s %s%s\n", adapters == nullptr ? "base:   " : "adapter:", f.prompt.c_str(),
          Sample(f, run, text, f.prompt, f.sample_tokens).c_str());
    }
    return 0;
  }

  const Tokens train_tokens = LoadTokens(tune_corpus.train_path, text);
  const Tokens val_tokens = LoadTokens(tune_corpus.validation_path, text);
  const lora::BatchSampler train = Sampler(train_tokens, f, f.seed + 11), val = Sampler(val_tokens, f, f.seed + 13);

  // --- merge ---
  if (f.command == "merge") {
    std::unique_ptr<lora::Reader> adapter;
    Check(lora::Reader::Open(adapter_path, &adapter), "opening the adapter (run lora first)");
    Run run;
    Open(f, comm.get(), base.config, /*with_lora=*/true, f.lora_lr, &run);
    LoadParams(f, run, base, adapter.get(), false);
    Merge(f, run, base, val);
    return 0;
  }

  // --- lora ---
  Run run;
  Open(f, comm.get(), base.config, /*with_lora=*/true, f.lora_lr, &run);
  LoadParams(f, run, base, nullptr, /*zero_adapters=*/false);  // adapters start from their init (B = 0)
  int64_t trainable = 0, frozen = 0;
  for (const lora::ParamInfo& p : run.params) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    (p.trainable ? trainable : frozen) += n;
  }
  Say("lora: r=%d alpha=%g on %s: %lld trainable / %lld frozen parameters, stage %d%s, %d ranks\n", f.r,
      static_cast<double>(f.alpha), f.targets.c_str(), static_cast<long long>(trainable), static_cast<long long>(frozen), f.stage,
      f.offload ? " + optimizer offload" : "", world);
  const std::string& prompt = f.prompt;
  const std::string before_sample = Sample(f, run, text, prompt, f.sample_tokens);
  const double before = ValidationLoss(f, run, val);
  Say("lora: validation loss before %.4f\n", before);
  const std::string ckpt = f.out + "/ckpt";
  int start = 0;
  if (f.resume) {
    // Everything the run continues from is in the checkpoint: adapters, optimizer state, step, loss scaler, and
    // the data position in its metadata. Saved at any world size or stage, it loads at this one.
    std::string meta;
    Check(run.engine->Load(ckpt, "", &meta), "resuming from " + ckpt + " (--resume 1)");
    if (meta.rfind("next_step=", 0) != 0) Fail(ckpt + ": the checkpoint's metadata is not this example's");
    start = std::atoi(meta.c_str() + 10);
    Say("lora: resumed from %s at step %d\n", ckpt.c_str(), start);
  }
  if (!Train(f, run, train, f.lora_steps, f.lora_lr, "lora", 1, start, ckpt)) return 0;
  const double after = ValidationLoss(f, run, val);
  const std::string after_sample = Sample(f, run, text, prompt, f.sample_tokens);
  SaveModel(run, adapter_path, {{"format", "pt"}}, /*trainable_only=*/true);
  if (comm->rank() == 0) {
    // The base PEFT loads the adapter onto: the small base's directory (absolute, so the adapter directory works
    // from anywhere), or SmolLM2's hub name (`merge` also writes OUT/base, the dequantized weights trained on).
    lora::PeftLoraOptions o;
    o.base_model_name_or_path = smollm2 ? std::string("HuggingFaceTB/SmolLM2-135M-Instruct")
                                        : std::filesystem::absolute(HfDir(f, "base")).lexically_normal().string();
    o.r = f.r;
    o.alpha = f.alpha;
    o.dropout = f.dropout;
    o.target_modules = TargetModules(f.targets);
    Check(lora::WriteTextFile(HfDir(f, "adapter"), "adapter_config.json", lora::PeftAdapterConfigJson(o)),
          "writing adapter_config.json");
  }
  Say("sample before: %s%s\n", prompt.c_str(), before_sample.c_str());
  Say("sample after:  %s%s\n", prompt.c_str(), after_sample.c_str());
  Say("val_loss_before=%.4f val_loss_after=%.4f\n", before, after);
  Say("adapter=%s\n", HfDir(f, "adapter").c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rc = Main(argc, argv);
  MPI_Finalize();
  return rc;
}

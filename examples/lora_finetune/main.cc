// lora_finetune: zero's main example. A small LLaMA-style decoder (examples/lora_finetune/model.h) is pretrained
// on the fortunes collection, then LoRA adapters are fine-tuned on the King James Bible while the frozen base is
// sharded by ZeRO (stage 3 by default) across the ranks. Only zero's public API is used.
//
//   mpiexec -n 2 build/examples/lora_finetune/lora_finetune all --out runs/lora
//
// Subcommands (each takes --key value options; `lora_finetune help` lists them):
//   prepare   corpora from Debian's fortunes and bible-kjv packages (or --corpus synthetic), byte-level tokens
//   pretrain  full training of the base on the first corpus; writes OUT/base.safetensors (Hugging Face LLaMA
//             names, config in the metadata). Cached: the same settings reuse the file.
//   lora      adapters on the second corpus; validation loss before and after, a sample before and after, and
//             OUT/adapter_model.safetensors + OUT/adapter_config.json (PEFT layout)
//   sample    continues --prompt with the base alone and with the adapter from OUT (every rank alike)
//   all       prepare, pretrain (or reuse), lora
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <type_traits>
#include <map>
#include <random>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <zero/zero.h>

#include "examples/lora_finetune/data.h"
#include "examples/lora_finetune/model.h"
#include "examples/lora_finetune/safetensors.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Flags {
  std::string command = "all";
  std::string out = "runs/lora";
  std::string data = "";  // default: OUT/data
  std::string base_corpus = "fortunes", tune_corpus = "bible";
  std::string prompt = "And God said, ";
  int sample_tokens = 48;
  int stage = 3;
  bool offload = false;
  // Defaults: the main job on 2 CPU ranks (scripts/example.sh), about 4 minutes of pretraining and 1 of
  // fine-tuning on 2 cores; about 1.6M tokens of fortunes and 0.4M of Bible.
  int micro = 2;             // micro-steps per optimizer step
  int batch = 4;             // sequences per rank per micro-step
  int seq = 128;
  int pretrain_steps = 800, lora_steps = 200;
  float pretrain_lr = 3e-3f, lora_lr = 2e-3f;
  int warmup = 20;
  int dim = 128, layers = 4, heads = 4, kv_heads = 2, ffn = 344;
  int r = 8;
  float alpha = 16.f, dropout = 0.05f;
  int eval_batches = 8;
  int threads = 1;
  uint64_t seed = 1;
};

const char* kUsage =
    "usage: lora_finetune [prepare|pretrain|lora|sample|all] [--out DIR] [--data DIR] [--stage 0-3] [--offload 0|1]\n"
    "  [--micro M] [--batch B] [--seq S] [--pretrain-steps N] [--lora-steps N] [--pretrain-lr X] [--lora-lr X]\n"
    "  [--warmup N] [--dim D] [--layers L] [--heads H] [--kv-heads K] [--ffn F] [--r R] [--alpha A]\n"
    "  [--dropout P] [--eval-batches N] [--threads T] [--seed S] [--base-corpus fortunes|synthetic]\n"
    "  [--tune-corpus bible|synthetic] [--prompt TEXT] [--sample-tokens N]\n";

bool ParseFlags(int argc, char** argv, Flags* f, std::string* error) {
  int i = 1;
  if (i < argc && argv[i][0] != '-') f->command = argv[i++];
  if (f->command != "prepare" && f->command != "pretrain" && f->command != "lora" && f->command != "sample" &&
      f->command != "all") {
    *error = "unknown subcommand '" + f->command + "'";
    return false;
  }
  for (; i < argc; i += 2) {
    const std::string k = argv[i];
    if (i + 1 >= argc) {
      *error = "option " + k + " needs a value";
      return false;
    }
    const std::string v = argv[i + 1];
    auto num = [&](auto* out) {
      char* end = nullptr;
      const double d = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0') return false;
      *out = static_cast<std::remove_pointer_t<decltype(out)>>(d);
      return true;
    };
    bool ok = true;
    if (k == "--out") f->out = v;
    else if (k == "--data") f->data = v;
    else if (k == "--base-corpus") f->base_corpus = v;
    else if (k == "--tune-corpus") f->tune_corpus = v;
    else if (k == "--prompt") f->prompt = v;
    else if (k == "--sample-tokens") ok = num(&f->sample_tokens);
    else if (k == "--stage") ok = num(&f->stage);
    else if (k == "--offload") ok = num(&f->offload);
    else if (k == "--micro") ok = num(&f->micro);
    else if (k == "--batch") ok = num(&f->batch);
    else if (k == "--seq") ok = num(&f->seq);
    else if (k == "--pretrain-steps") ok = num(&f->pretrain_steps);
    else if (k == "--lora-steps") ok = num(&f->lora_steps);
    else if (k == "--pretrain-lr") ok = num(&f->pretrain_lr);
    else if (k == "--lora-lr") ok = num(&f->lora_lr);
    else if (k == "--warmup") ok = num(&f->warmup);
    else if (k == "--dim") ok = num(&f->dim);
    else if (k == "--layers") ok = num(&f->layers);
    else if (k == "--heads") ok = num(&f->heads);
    else if (k == "--kv-heads") ok = num(&f->kv_heads);
    else if (k == "--ffn") ok = num(&f->ffn);
    else if (k == "--r") ok = num(&f->r);
    else if (k == "--alpha") ok = num(&f->alpha);
    else if (k == "--dropout") ok = num(&f->dropout);
    else if (k == "--eval-batches") ok = num(&f->eval_batches);
    else if (k == "--threads") ok = num(&f->threads);
    else if (k == "--seed") ok = num(&f->seed);
    else {
      *error = "unknown option " + k;
      return false;
    }
    if (!ok) {
      *error = "option " + k + ": '" + v + "' is not a number";
      return false;
    }
  }
  if (f->stage < 0 || f->stage > 3) *error = "--stage must be 0..3";
  else if (f->micro < 1 || f->batch < 1 || f->seq < 2) *error = "--micro, --batch must be >= 1 and --seq >= 2";
  else if (f->pretrain_steps < 0 || f->lora_steps < 0) *error = "step counts must be >= 0";
  else if (f->offload && f->stage == 0) *error = "--offload 1 needs --stage 1, 2 or 3";
  if (f->data.empty()) f->data = f->out + "/data";
  return error->empty();
}

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

struct Run {
  lora::ModelConfig model;
  lora::LoraConfig lora;
  std::vector<lora::ParamInfo> params;
  std::unique_ptr<zero::Engine> engine;
};

zero::Options EngineOptions(const Flags& f, float lr) {
  zero::Options o;
  o.stage = static_cast<zero::Stage>(f.stage);
  o.offload_optimizer = f.offload;
  o.adamw.lr = lr;
  o.adamw.weight_decay = 0.01f;
  o.clip_norm = 1.0;
  o.bucket_elements = int64_t{1} << 20;
  o.cpu_threads = f.threads;
  return o;
}

void Open(const Flags& f, zero::Comm* comm, bool with_lora, float lr, Run* run) {
  run->model = {};
  run->model.dim = f.dim;
  run->model.layers = f.layers;
  run->model.heads = f.heads;
  run->model.kv_heads = f.kv_heads;
  run->model.ffn = f.ffn;
  run->lora = {};
  run->lora.enabled = with_lora;
  run->lora.r = f.r;
  run->lora.alpha = f.alpha;
  run->lora.dropout = f.dropout;
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
}

// Warmup, then cosine decay to 10% of the peak.
double LearningRate(double peak, int step, int steps, int warmup) {
  if (step < warmup) return peak * (step + 1) / warmup;
  const double t = steps > warmup ? static_cast<double>(step - warmup) / (steps - warmup) : 1.0;
  return peak * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * t)));
}

double ValidationLoss(const Flags& f, Run& run, const lora::BatchSampler& val) {
  Check(run.engine->BeginEval(), "BeginEval");
  EngineAccess access(run.engine.get());
  std::vector<int32_t> in(static_cast<size_t>(f.batch * f.seq)), tg(in.size());
  double total = 0;
  for (int i = 0; i < f.eval_batches; ++i) {
    val.Sample(i, in.data(), tg.data());
    const lora::Batch b{f.batch, f.seq, in.data(), tg.data()};
    total += lora::Forward(run.model, run.lora, access, b, /*backward=*/false, 1.0f, 0, f.threads);
  }
  Check(run.engine->EndEval(), "EndEval");
  return AllMean(total / f.eval_batches);
}

// One progress line every `every` steps (and the last): loss averaged over ranks, tokens/s of the whole job, the
// largest rank's peak device and host bytes, the loss scale.
void Train(const Flags& f, Run& run, const lora::BatchSampler& train, int steps, float peak_lr, const char* label,
           int every) {
  EngineAccess access(run.engine.get());
  std::vector<int32_t> in(static_cast<size_t>(f.batch * f.seq)), tg(in.size());
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  for (int step = 0; step < steps; ++step) {
    const auto t0 = Clock::now();
    double loss = 0;
    for (int m = 0; m < f.micro; ++m) {
      Check(run.engine->BeginMicroStep(m, m == f.micro - 1), "BeginMicroStep");
      train.Sample(static_cast<int64_t>(step) * f.micro + m, in.data(), tg.data());
      const lora::Batch b{f.batch, f.seq, in.data(), tg.data()};
      loss += lora::Forward(run.model, run.lora, access, b, /*backward=*/true, run.engine->LossScale(),
                            f.seed * 1000003 + static_cast<uint64_t>(step * f.micro + m), f.threads);
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
    if (step % every == 0 || step == steps - 1) {
      Say("%s step %4d/%d  loss %.4f  lr %.2e  norm %.3f  %6.0f tok/s  device %.1f MiB  host %.1f MiB  scale %g%s\n",
          label, step + 1, steps, mean_loss, r.lr, r.grad_norm, tokens / secs, dev_mib, host_mib,
          static_cast<double>(r.loss_scale), r.skipped ? "  (skipped)" : "");
    }
  }
}

// Continuation of `prompt`, sampled at temperature 0.7 from a fixed seed (greedy decoding of a small byte-level
// model loops on its most frequent word). Every rank computes the same logits and draws the same numbers, so
// every rank produces the same text.
std::string Sample(const Flags& f, Run& run, const std::string& prompt, int new_tokens) {
  std::vector<int32_t> tokens(prompt.begin(), prompt.end());
  std::mt19937_64 rng(f.seed);
  EngineAccess access(run.engine.get());
  Check(run.engine->BeginEval(), "BeginEval");
  std::vector<float> logits;
  for (int i = 0; i < new_tokens; ++i) {
    const int n = static_cast<int>(std::min<size_t>(tokens.size(), static_cast<size_t>(f.seq)));
    std::vector<int32_t> window(tokens.end() - n, tokens.end()), targets(static_cast<size_t>(n), -1);
    const lora::Batch b{1, n, window.data(), targets.data()};
    lora::Logits(run.model, run.lora, access, b, &logits, f.threads);
    const float* last = logits.data() + static_cast<size_t>(n - 1) * lora::kVocabSize;
    const float top = *std::max_element(last, last + lora::kVocabSize);
    std::vector<double> weights(lora::kVocabSize);
    for (int v = 0; v < lora::kVocabSize; ++v) weights[static_cast<size_t>(v)] = std::exp((last[v] - top) / 0.7);
    std::discrete_distribution<int> pick(weights.begin(), weights.end());
    tokens.push_back(pick(rng));
  }
  Check(run.engine->EndEval(), "EndEval");
  std::string out;
  for (size_t i = prompt.size(); i < tokens.size(); ++i) {
    const char c = static_cast<char>(tokens[i]);
    out += (c == '\n' || (c >= 32 && c < 127)) ? c : '?';
  }
  return out;
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
  if (rank == 0) Check(lora::PrepareCorpus(CorpusFor(name), f.data, lora::CorpusOptions(), &p), "prepare " + name);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank != 0) Check(lora::PrepareCorpus(CorpusFor(name), f.data, lora::CorpusOptions(), &p), "prepare " + name);
  Say("corpus %-9s train %lld tokens (%lld docs), validation %lld tokens%s\n", name.c_str(),
      static_cast<long long>(p.train_tokens), static_cast<long long>(p.train_documents),
      static_cast<long long>(p.validation_tokens), p.reused ? " (reused)" : "");
  return p;
}

lora::BatchSampler Sampler(const std::vector<uint8_t>& tokens, const Flags& f, uint64_t seed) {
  lora::SamplerOptions o;
  o.batch = f.batch;
  o.seq_len = f.seq;
  o.seed = seed;
  MPI_Comm_rank(MPI_COMM_WORLD, &o.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &o.world);
  lora::BatchSampler s;
  Check(lora::BatchSampler::Create(tokens, o, &s), "batch sampler");
  return s;
}

// The settings that determine the base model; the cache key of base.safetensors.
std::string BaseKey(const Flags& f, uint64_t corpus_hash) {
  std::ostringstream os;
  os << "dim=" << f.dim << " layers=" << f.layers << " heads=" << f.heads << " kv_heads=" << f.kv_heads
     << " ffn=" << f.ffn << " seq=" << f.seq << " batch=" << f.batch << " micro=" << f.micro
     << " steps=" << f.pretrain_steps << " lr=" << f.pretrain_lr << " seed=" << f.seed << " corpus=" << corpus_hash;
  return os.str();
}

// Writes the whole model (Hugging Face names) from full copies on every rank; rank 0 writes the file.
void SaveModel(Run& run, const std::string& path, const std::map<std::string, std::string>& metadata,
               bool trainable_only) {
  std::vector<int> units(static_cast<size_t>(lora::NumUnits(run.model)));
  for (size_t u = 0; u < units.size(); ++u) units[u] = static_cast<int>(u);
  zero::FullParamsScope scope;
  Check(run.engine->GatherFull(units, &scope), "GatherFull");
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    std::vector<lora::TensorData> tensors;
    for (size_t p = 0; p < run.params.size(); ++p) {
      if (trainable_only && !run.params[p].trainable) continue;
      lora::TensorData t;
      t.spec.name = trainable_only ? "base_model.model." + run.params[p].name : run.params[p].name;
      t.spec.shape = run.params[p].shape;
      t.data = run.engine->Param(static_cast<int>(p)).data;
      tensors.push_back(t);
    }
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    const std::string tmp = path + ".tmp";
    Check(lora::Save(tmp, tensors, metadata), "writing " + path);
    std::filesystem::rename(tmp, path);
  }
  Check(scope.Close(), "closing GatherFull");
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
  std::unique_ptr<zero::Comm> comm;
  Check(zero::Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), zero::CommOptions(), &comm), "Comm");
  int world = comm->world_size();
  if (f.threads < 1) f.threads = 1;

  const lora::PreparedCorpus base_corpus = Prepare(f, f.base_corpus);
  const lora::PreparedCorpus tune_corpus = Prepare(f, f.tune_corpus);
  if (f.command == "prepare") return 0;

  // --- pretrain (or reuse) ---
  const std::string base_path = f.out + "/base.safetensors";
  const std::string key = BaseKey(f, base_corpus.content_hash);
  bool reuse = false;
  {
    std::unique_ptr<lora::Reader> reader;
    if (std::filesystem::exists(base_path) && lora::Reader::Open(base_path, &reader).ok()) {
      auto it = reader->metadata().find("zero.base_key");
      reuse = it != reader->metadata().end() && it->second == key;
    }
  }
  if (f.command == "pretrain" || (f.command == "all" && !reuse)) {
    std::vector<uint8_t> train_tokens, val_tokens;
    Check(lora::ReadTokens(base_corpus.train_path, &train_tokens), "reading tokens");
    Check(lora::ReadTokens(base_corpus.validation_path, &val_tokens), "reading tokens");
    Run run;
    Open(f, comm.get(), /*with_lora=*/false, f.pretrain_lr, &run);
    Check(run.engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
      for (int64_t i = 0; i < n; ++i) dst[i] = lora::InitValue(run.model, run.lora, p, off + i, f.seed);
    }), "InitParams");
    Say("pretrain: %zu tensors, stage %d, %d ranks, %d steps of %d x %d x %d tokens\n", run.params.size(), f.stage,
        world, f.pretrain_steps, f.micro, f.batch * world, f.seq);
    const lora::BatchSampler train = Sampler(train_tokens, f, f.seed), val = Sampler(val_tokens, f, f.seed + 7);
    Train(f, run, train, f.pretrain_steps, f.pretrain_lr, "pretrain", 10);
    Say("pretrain: validation loss %.4f\n", ValidationLoss(f, run, val));
    std::ostringstream config;
    config << "{\"model_type\": \"llama\", \"vocab_size\": " << lora::kVocabSize << ", \"hidden_size\": " << f.dim
           << ", \"num_hidden_layers\": " << f.layers << ", \"num_attention_heads\": " << f.heads
           << ", \"num_key_value_heads\": " << f.kv_heads << ", \"intermediate_size\": " << f.ffn
           << ", \"rope_theta\": 10000.0, \"rms_norm_eps\": 1e-05, \"tie_word_embeddings\": true}";
    SaveModel(run, base_path, {{"format", "pt"}, {"config", config.str()}, {"zero.base_key", key}}, false);
    Say("pretrain: wrote %s\n", base_path.c_str());
  } else if (f.command == "all") {
    Say("pretrain: reusing %s (same settings)\n", base_path.c_str());
  }
  if (f.command == "pretrain") return 0;

  // --- sample: the base alone, then with the trained adapter ---
  if (f.command == "sample") {
    std::unique_ptr<lora::Reader> base, adapter;
    Check(lora::Reader::Open(base_path, &base), "opening the base model (run pretrain first)");
    Check(lora::Reader::Open(f.out + "/adapter_model.safetensors", &adapter), "opening the adapter (run lora first)");
    Run run;
    Open(f, comm.get(), /*with_lora=*/true, f.lora_lr, &run);
    const std::vector<const lora::Reader*> variants = {nullptr, adapter.get()};
    for (const lora::Reader* adapters : variants) {
      zero::Status fill_error;
      Check(run.engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
        const lora::ParamInfo& info = run.params[static_cast<size_t>(p)];
        zero::Status st;
        if (!info.trainable) {
          st = base->ReadRange(info.name, off, n, dst);
        } else if (adapters != nullptr) {
          st = adapters->ReadRange("base_model.model." + info.name, off, n, dst);
        } else {
          for (int64_t i = 0; i < n; ++i) dst[i] = 0.0f;  // no adapter: B = A = 0
        }
        if (!st.ok() && fill_error.ok()) fill_error = st;
      }), "InitParams");
      Check(fill_error, "loading parameters");
      Say("%s %s%s\n", adapters == nullptr ? "base:   " : "adapter:", f.prompt.c_str(),
          Sample(f, run, f.prompt, f.sample_tokens).c_str());
    }
    return 0;
  }

  // --- lora ---
  std::unique_ptr<lora::Reader> base;
  Check(lora::Reader::Open(base_path, &base), "opening the base model (run pretrain first)");
  std::vector<uint8_t> train_tokens, val_tokens;
  Check(lora::ReadTokens(tune_corpus.train_path, &train_tokens), "reading tokens");
  Check(lora::ReadTokens(tune_corpus.validation_path, &val_tokens), "reading tokens");
  Run run;
  Open(f, comm.get(), /*with_lora=*/true, f.lora_lr, &run);
  // Every rank reads only the fragments it owns from the base file; adapters start from their init.
  zero::Status fill_error;
  Check(run.engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
    const lora::ParamInfo& info = run.params[static_cast<size_t>(p)];
    if (info.trainable) {
      for (int64_t i = 0; i < n; ++i) dst[i] = lora::InitValue(run.model, run.lora, p, off + i, f.seed);
      return;
    }
    zero::Status s = base->ReadRange(info.name, off, n, dst);
    if (!s.ok() && fill_error.ok()) fill_error = s;
  }), "InitParams");
  Check(fill_error, "loading the base model from " + base_path);
  const lora::BatchSampler train = Sampler(train_tokens, f, f.seed + 11), val = Sampler(val_tokens, f, f.seed + 13);
  int64_t trainable = 0, frozen = 0;
  for (const lora::ParamInfo& p : run.params) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    (p.trainable ? trainable : frozen) += n;
  }
  Say("lora: r=%d alpha=%g on q,k,v,o: %lld trainable / %lld frozen parameters, stage %d%s, %d ranks\n", f.r,
      static_cast<double>(f.alpha), static_cast<long long>(trainable), static_cast<long long>(frozen), f.stage,
      f.offload ? " + optimizer offload" : "", world);
  const std::string& prompt = f.prompt;
  const std::string before_sample = Sample(f, run, prompt, f.sample_tokens);
  const double before = ValidationLoss(f, run, val);
  Say("lora: validation loss before %.4f\n", before);
  Train(f, run, train, f.lora_steps, f.lora_lr, "lora", 1);
  const double after = ValidationLoss(f, run, val);
  const std::string after_sample = Sample(f, run, prompt, f.sample_tokens);
  const std::string adapter_path = f.out + "/adapter_model.safetensors";
  SaveModel(run, adapter_path, {{"format", "pt"}}, /*trainable_only=*/true);
  if (comm->rank() == 0) {
    std::ofstream cfg(f.out + "/adapter_config.json");
    cfg << "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"r\": " << f.r
        << ",\n  \"lora_alpha\": " << f.alpha << ",\n  \"lora_dropout\": " << f.dropout
        << ",\n  \"target_modules\": [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"],\n  \"bias\": \"none\"\n}\n";
  }
  Say("sample before: %s%s\n", prompt.c_str(), before_sample.c_str());
  Say("sample after:  %s%s\n", prompt.c_str(), after_sample.c_str());
  Say("val_loss_before=%.4f val_loss_after=%.4f\n", before, after);
  Say("adapter=%s\n", adapter_path.c_str());
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

// lora_finetune's command line (flags.h).
#include "examples/lora_finetune/flags.h"

#include <cstdlib>
#include <type_traits>

namespace lora_cli {

const char* const kUsage =
    "usage: lora_finetune [prepare|pretrain|lora|sample|merge|all] [--out DIR] [--data DIR] [--stage 0-3]\n"
    "  [--base small|smollm2] [--gguf PATH] [--offload 0|1] [--nvme DIR]\n"
    "  [--micro M] [--batch B] [--seq S] [--pretrain-steps N] [--lora-steps N] [--pretrain-lr X] [--lora-lr X]\n"
    "  [--warmup N] [--dim D] [--layers L] [--heads H] [--kv-heads K] [--ffn F] [--r R] [--alpha A]\n"
    "  [--dropout P] [--eval-batches N] [--threads T] [--seed S] [--base-corpus fortunes|synthetic]\n"
    "  [--tune-corpus bible|synthetic] [--synthetic-documents N] [--prompt TEXT] [--sample-tokens N] [--save-every N] [--resume 0|1]\n"
    "  [--targets q,k,v,o,gate,up,down] [--logits-out FILE]"
    "  [--stop-after N] [--device auto|cpu|cuda] [--recompute 0|1]\n"
    "  [--hpz 0|1] [--qwz 0|1] [--qgz-bits 0|4|8] [--ranks-per-node K]   (ZeRO++; README \"ZeRO++\")\n";

bool ParseFlags(int argc, char** argv, Flags* f, std::string* error) {
  int i = 1;
  if (i < argc && argv[i][0] != '-') f->command = argv[i++];
  if (f->command != "prepare" && f->command != "pretrain" && f->command != "lora" && f->command != "sample" &&
      f->command != "merge" && f->command != "all") {
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
    f->given.insert(k);
    if (k == "--out") f->out = v;
    else if (k == "--base") f->base = v;
    else if (k == "--gguf") f->gguf = v;
    else if (k == "--data") f->data = v;
    else if (k == "--base-corpus") f->base_corpus = v;
    else if (k == "--tune-corpus") f->tune_corpus = v;
    else if (k == "--synthetic-documents") ok = num(&f->synthetic_documents);
    else if (k == "--prompt") f->prompt = v;
    else if (k == "--device") f->device = v;
    else if (k == "--sample-tokens") ok = num(&f->sample_tokens);
    else if (k == "--stage") ok = num(&f->stage);
    else if (k == "--offload") ok = num(&f->offload);
    else if (k == "--nvme") f->nvme = v;
    else if (k == "--micro") ok = num(&f->micro);
    else if (k == "--batch") ok = num(&f->batch);
    else if (k == "--seq") ok = num(&f->seq);
    else if (k == "--pretrain-steps") ok = num(&f->pretrain_steps);
    else if (k == "--lora-steps") ok = num(&f->lora_steps);
    else if (k == "--save-every") ok = num(&f->save_every);
    else if (k == "--targets") f->targets = v;
    else if (k == "--logits-out") f->logits_out = v;
    else if (k == "--resume") ok = num(&f->resume);
    else if (k == "--recompute") ok = num(&f->recompute);
    else if (k == "--hpz") ok = num(&f->hpz);
    else if (k == "--qwz") ok = num(&f->qwz);
    else if (k == "--qgz-bits") ok = num(&f->qgz_bits);
    else if (k == "--ranks-per-node") ok = num(&f->ranks_per_node);
    else if (k == "--stop-after") ok = num(&f->stop_after);
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
  if (f->base == "smollm2") {
    // A 135M-parameter model on CPU ranks: fp32 forward + backward costs about 0.8 GFLOP per token, so a few short
    // steps are what 2 cores manage in minutes (README: measured speed).
    const auto preset = [&](const char* key, auto value, auto* field) {
      if (!f->given.contains(key)) *field = value;
    };
    preset("--seq", 64, &f->seq);
    preset("--batch", 1, &f->batch);
    preset("--micro", 1, &f->micro);
    preset("--lora-steps", 20, &f->lora_steps);
    preset("--warmup", 2, &f->warmup);
    preset("--lora-lr", 1e-3f, &f->lora_lr);
    preset("--eval-batches", 8, &f->eval_batches);
    preset("--sample-tokens", 16, &f->sample_tokens);
    preset("--dropout", 0.0f, &f->dropout);
    preset("--prompt", std::string("The capital of France is"), &f->prompt);
  }
  if (f->base != "small" && f->base != "smollm2") *error = "--base must be small or smollm2";
  else if (f->base == "smollm2" && f->command == "pretrain") *error = "--base smollm2 is already pretrained";
  else if (f->stage < 0 || f->stage > 3) *error = "--stage must be 0..3";
  else if (f->micro < 1 || f->batch < 1 || f->seq < 2) *error = "--micro, --batch must be >= 1 and --seq >= 2";
  else if (f->pretrain_steps < 0 || f->lora_steps < 0) *error = "step counts must be >= 0";
  else if (f->offload && f->stage == 0) *error = "--offload 1 needs --stage 1, 2 or 3";
  else if (!f->nvme.empty() && !f->offload) *error = "--nvme DIR holds the offloaded optimizer state: add --offload 1";
  else if (f->device != "auto" && f->device != "cpu" && f->device != "cuda") *error = "--device: auto, cpu or cuda";
  else if (f->synthetic_documents < 40 || f->synthetic_documents > 10'000'000) {
    *error = "--synthetic-documents must be 40..10000000 (every 20th is validation: 40 gives 2)";
  }
  if (f->data.empty()) f->data = f->out + "/data";
  return error->empty();
}

}  // namespace lora_cli

// lora_finetune's command line: the flags, their defaults (the main job of scripts/example.sh), the presets of
// --base smollm2, and the checks that refuse a bad combination before anything runs.
#pragma once

#include <cstdint>
#include <set>
#include <string>

namespace lora_cli {

inline constexpr const char* kSmolLm2Gguf = "runs/models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Flags {
  std::string command = "all";
  std::string base = "small";  // small: pretrained here; smollm2: SmolLM2-135M-Instruct from --gguf
  std::string gguf = kSmolLm2Gguf;
  std::string out = "runs/lora";
  std::string data = "";  // default: OUT/data
  std::string base_corpus = "fortunes", tune_corpus = "bible";
  // Documents of the synthetic corpus (about 60 bytes each, every 20th for validation): 400 by default, more for a
  // benchmark whose batch x seq needs more validation tokens than 400 documents give (about 990 BPE tokens).
  int synthetic_documents = 400;
  std::string prompt = "And God said, ";
  int sample_tokens = 48;
  int stage = 3;
  bool offload = false;
  std::string nvme;  // with --offload 1: the optimizer state on an NVMe tier in this directory (README "NVMe")
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
  // Checkpoints of `lora` (zero's sharded checkpoints, OUT/ckpt): every N steps (0: none); --resume 1 continues
  // from OUT/ckpt/latest; --stop-after N ends the run after N steps (an interruption, for tests).
  std::string targets = "q,k,v,o";  // LoRA-adapted projections: any of q,k,v,o,gate,up,down
  int save_every = 0;
  bool resume = false;
  int stop_after = -1;
  std::string logits_out;  // merge: tokens and logits for comparison with Hugging Face (safetensors)
  // auto: the CUDA model (bf16, zero's CUDA backend and NCCL) when this build has it and a GPU is visible, except
  // for merge, which folds adapters on the host; otherwise the CPU model (fp32, host memory, Open MPI).
  std::string device = "auto";
  bool cuda = false;            // resolved from device in Main
  bool recompute = false;       // per-block recomputation (activation checkpointing): less memory, one more forward
  // ZeRO++ (zero::Options::zeropp) and the nodes it sees (zero::CommOptions::ranks_per_node; 0: the hosts).
  bool hpz = false, qwz = false;
  int qgz_bits = 0, ranks_per_node = 0;
  std::set<std::string> given;  // options set on the command line
};

extern const char* const kUsage;

// Parses argv into *f (the subcommand first, then --key value pairs); false with *error saying why.
bool ParseFlags(int argc, char** argv, Flags* f, std::string* error);

}  // namespace lora_cli

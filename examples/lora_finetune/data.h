// Corpora and batches for the LoRA example: byte-level text from Debian packages (or a built-in synthetic one),
// a deterministic train/validation split written to token files, and a per-rank batch sampler.
//
// Corpora:
//   fortunes   the plain-text files of Debian's `fortunes` (+ `fortunes-min`) under /usr/share/games/fortunes,
//              one document per fortune (the `%` separator lines dropped); used to pretrain the base.
//   bible      the King James Bible from Debian's `bible-kjv`, read through its program
//              (`bible -p /usr/lib gen1:1-rev22:21` prints the whole text on Debian 12), one document per chapter
//              (1,189); used for fine-tuning.
//   synthetic  deterministic generated sentences, no package needed (tests).
//
// Tokens are bytes (vocabulary 256; for a GGUF base the example re-tokenizes the text with its BPE). Each document
// is written with surrounding newlines trimmed, followed by "\n\n". Document i goes to validation when
// i % validation_every == validation_every - 1 (every 20th: 5%, spread over the whole corpus so that validation
// text has the training distribution), the others to train.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "zero/status.h"

namespace lora {

inline constexpr int kVocabSize = 256;

enum class Corpus { kSynthetic, kFortunes, kBible };
const char* CorpusName(Corpus corpus);  // "synthetic", "fortunes", "bible"

struct CorpusOptions {
  std::string fortunes_dir = "/usr/share/games/fortunes";
  std::string bible_program = "bible";      // looked up on PATH
  std::string bible_data_dir = "/usr/lib";  // bible -p: where bible.data lives on Debian
  int validation_every = 20;                // >= 2; every Nth document is validation
  int synthetic_documents = 400;            // ~60 bytes each
  uint64_t synthetic_seed = 1;
};

// The corpus as documents in a fixed order. Fails, naming the package and the install command, when its Debian
// package is missing.
zero::Status LoadDocuments(Corpus corpus, const CorpusOptions& options, std::vector<std::string>* documents);

struct Split {
  std::vector<uint8_t> train;
  std::vector<uint8_t> validation;
  int64_t train_documents = 0;
  int64_t validation_documents = 0;
};
// Byte tokens of the documents, split as described above. REQUIRES: validation_every >= 2.
Split SplitDocuments(const std::vector<std::string>& documents, int validation_every);

struct PreparedCorpus {
  std::string train_path;       // <data_dir>/<name>.train.u8: raw uint8 tokens
  std::string validation_path;  // <data_dir>/<name>.val.u8
  int64_t train_tokens = 0;
  int64_t validation_tokens = 0;
  int64_t train_documents = 0;
  int64_t validation_documents = 0;
  uint64_t content_hash = 0;  // of the documents and the split settings; stored in <data_dir>/<name>.meta
  bool reused = false;        // the files already held this content: nothing was written
};
// Loads, splits and writes the corpus into data_dir (created if needed). A second call with the same inputs
// finds the same content hash in the .meta file and writes nothing. Files are replaced atomically (rename).
zero::Status PrepareCorpus(Corpus corpus, const std::string& data_dir, const CorpusOptions& options,
                           PreparedCorpus* prepared);

zero::Status ReadTokens(const std::string& path, std::vector<uint8_t>* tokens);

struct SamplerOptions {
  int64_t batch = 4;     // sequences per rank per step; the global batch is batch * world
  int64_t seq_len = 64;  // tokens per sequence (targets are the next seq_len tokens)
  uint64_t seed = 0;
  int rank = 0;
  int world = 1;
};

// Cuts the token stream into non-overlapping windows of seq_len + 1 tokens (shifted by a per-epoch offset) and
// visits them in a per-epoch pseudo-random permutation. Global row k = step * batch * world + rank * batch + i,
// so at each step the ranks take disjoint slices of one global batch, and all of it is a pure function of
// (seed, step, rank, world): no state, const methods are thread-safe. Within a step the global batch holds
// distinct windows (Create checks there are at least batch * world of them).
class BatchSampler {
 public:
  BatchSampler() = default;
  // `tokens` must outlive the sampler.
  static zero::Status Create(std::span<const uint8_t> tokens, const SamplerOptions& options, BatchSampler* sampler);
  // The same over int32 token ids (a BPE vocabulary).
  static zero::Status Create(std::span<const int32_t> tokens, const SamplerOptions& options, BatchSampler* sampler);

  // Fills inputs and targets, each batch * seq_len (row-major [batch][seq_len]); targets[j] = the token after
  // inputs[j].
  void Sample(int64_t step, int32_t* inputs, int32_t* targets) const;
  // Where global row `global_row` of `step` starts in the token stream.
  int64_t WindowStart(int64_t step, int64_t global_row) const;

  int64_t windows() const { return windows_; }  // windows per epoch
  const SamplerOptions& options() const { return options_; }

 private:
  static zero::Status CreateFor(int64_t num_tokens, const SamplerOptions& options, BatchSampler* sampler);
  std::span<const uint8_t> tokens_;    // byte tokens, or
  std::span<const int32_t> tokens32_;  // token ids (exactly one of the two is non-empty)
  SamplerOptions options_;
  int64_t windows_ = 0;
};

}  // namespace lora

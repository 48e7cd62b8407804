// The byte-level BPE tokenizer of GGUF files whose tokenizer.ggml.model is "gpt2" (SmolLM2, GPT-2, LLaMA 3, ...):
// the vocabulary (tokenizer.ggml.tokens), the merges in rank order (tokenizer.ggml.merges, "left right"), token
// types (tokenizer.ggml.token_type) and the bos/eos ids, as llama.cpp and Hugging Face `tokenizers` apply them.
//
// Encoding: text -> pre-tokens (below) -> each pre-token's bytes as symbols of GPT-2's byte-to-unicode alphabet
// (printable bytes stand for themselves, the others for U+0100 upwards: a space is "Ġ", a newline "Ċ") -> the
// adjacent pair with the lowest merge rank is merged, again and again, until no pair has a rank -> each symbol's
// id. Decoding maps the symbols back to bytes, so Decode(Encode(s)) == s for every byte string whose bytes all
// have their symbol in the vocabulary (covers_byte). A byte without one is dropped, as llama.cpp does: SmolLM2's
// vocabulary lacks 21 of the 256 (the control characters 0x04 0x06 0x13 0x14 0x16 0x1d, and 0xc0 0xc1 0xf1 0xf2
// 0xf5-0xff, which UTF-8 text never or almost never contains).
//
// Pre-tokenizer: SmolLM2's ("smollm" in llama.cpp; Hugging Face's Digits(individual_digits) then ByteLevel): every
// number character (\p{N}) is a piece of its own, and the rest is split by GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Limits: character classes are exact for ASCII; outside ASCII there is no Unicode table: the Unicode whitespace
// characters are recognised, the common number blocks (Latin-1 superscripts and fractions, Arabic-Indic and
// Devanagari digits, super/subscripts, number forms, circled and fullwidth digits) are numbers, code points in the
// Latin-1 symbol block, U+2000 to U+2BFF (punctuation, arrows, math, other symbols) and CJK punctuation are
// punctuation, and every other code point counts as a letter. Text in other scripts' numerals or rare symbol
// blocks may therefore split differently from Hugging Face's (the round trip stays exact). Measured with SmolLM2's
// vocabulary: the same ids as Hugging Face `tokenizers` (same vocabulary, merges and pre-tokenizer) on 200 kB of the
// King James Bible, 600 kB of fortunes, and mixed ASCII / accented / CJK / emoji samples. Malformed UTF-8 bytes
// count as letters, one byte each. Other pre-tokenizers (LLaMA 3's, Qwen's) are not implemented.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "zero/status.h"

namespace lora {

class GgufFile;

class BpeTokenizer {
 public:
  // Token types as numbered in GGUF files (llama.cpp's llama_token_type).
  static constexpr int32_t kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6;

  // `tokens`: id -> token text in the byte-to-unicode alphabet (control and user-defined tokens: plain text).
  // `merges`: "left right" in rank order (rank 0 first). `types`: one per token, or empty (all normal).
  // Fails naming the problem: a merge that is not two symbols, a merge result missing from the vocabulary, a
  // duplicate token, an id out of range, fewer than 128 of the 256 byte symbols in the vocabulary.
  static zero::Status Create(std::vector<std::string> tokens, const std::vector<std::string>& merges,
                             std::vector<int32_t> types, int32_t bos, int32_t eos, BpeTokenizer* out);
  // From tokenizer.ggml.* metadata. A model other than "gpt2" or a missing key is an error naming the file.
  static zero::Status FromGguf(const GgufFile& file, BpeTokenizer* out);
  // The small base's vocabulary as a BPE without merges: token b is byte b's symbol, so Encode gives the bytes
  // themselves (what the example feeds that model) and hf_tokenizer.h can describe it like any other.
  static BpeTokenizer ByteLevel();

  // Token ids of `text` (no BOS is added). With `special`, control and user-defined tokens written out in the text
  // (e.g. "<|im_start|>") become their ids (longest match first); without, they are encoded as plain text.
  std::vector<int32_t> Encode(std::string_view text, bool special = false) const;
  // The bytes the ids stand for; control tokens give their text. REQUIRES: 0 <= id < vocab_size().
  std::string Decode(std::span<const int32_t> ids) const;
  std::string Decode(int32_t id) const { return Decode(std::span<const int32_t>(&id, 1)); }

  // The pre-tokenizer alone (pieces of the input, in order, concatenating to it). For tests.
  static std::vector<std::string_view> PreTokenize(std::string_view text);

  // Byte b's symbol in GPT-2's byte-to-unicode alphabet, UTF-8 ("Ġ" for a space).
  static std::string ByteSymbol(uint8_t b);

  int vocab_size() const { return static_cast<int>(tokens_.size()); }
  int32_t bos() const { return bos_; }
  int32_t eos() const { return eos_; }
  bool covers_byte(uint8_t b) const { return byte_id_[b] >= 0; }
  const std::string& token(int32_t id) const { return tokens_[static_cast<size_t>(id)]; }
  int32_t type(int32_t id) const { return types_[static_cast<size_t>(id)]; }
  // The merges in rank order, each once ("left right"; a merge given twice to Create kept its first rank).
  std::vector<std::string> Merges() const;

 private:
  void EncodePlain(std::string_view text, std::unordered_map<std::string, std::vector<int32_t>>* cache,
                   std::vector<int32_t>* out) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;

  std::vector<std::string> tokens_;
  std::vector<int32_t> types_;
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<std::string, int32_t> ranks_;  // "left right" -> merge rank
  std::vector<std::string> specials_;               // control / user-defined token texts, longest first
  std::string byte_symbol_[256];                    // UTF-8 of byte b's symbol
  int32_t byte_id_[256] = {};                       // its id, -1 when not in the vocabulary
  int32_t bos_ = -1, eos_ = -1;
};

}  // namespace lora

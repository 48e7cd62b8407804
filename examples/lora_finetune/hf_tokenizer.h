// A BpeTokenizer (tokenizer.h) as the two files of a Hugging Face tokenizer directory, so that
// AutoTokenizer.from_pretrained(dir) gives the same ids as the example:
//   tokenizer.json         the `tokenizers` library's file: a BPE model with the vocabulary and the merges in rank
//                          order, the pre-tokenizer BpeTokenizer implements (Digits(individual_digits) then
//                          ByteLevel with GPT-2's pattern, SmolLM2's), the ByteLevel decoder, no normalizer and no
//                          post-processor (no BOS is added, as the example adds none), and control / user-defined
//                          tokens as added tokens (control ones special). Bytes without a symbol in the vocabulary
//                          are dropped, as BpeTokenizer does (no unk token, no byte fallback).
//   tokenizer_config.json  PreTrainedTokenizerFast, bos/eos when the tokenizer has them, the chat template when
//                          given, and clean_up_tokenization_spaces = false, so decode(encode(s)) == s.
// Equivalence: Hugging Face matches added tokens in the text before pre-tokenizing, which is
// BpeTokenizer::Encode(text, special = true). For the small base (BpeTokenizer::ByteLevel: 256 byte tokens, no
// merges) every byte becomes its own id whatever the pre-tokenizer splits, so the ids are the bytes.
#pragma once

#include <string>

#include "examples/lora_finetune/tokenizer.h"

namespace lora {

// tokenizer.json's text.
std::string HfTokenizerJson(const BpeTokenizer& tokenizer);

struct HfTokenizerOptions {
  int64_t model_max_length = 0;  // the longest input the model was made for (0: left out)
  std::string chat_template;     // Jinja, as in GGUF's tokenizer.chat_template (empty: left out)
};
// tokenizer_config.json's text.
std::string HfTokenizerConfigJson(const BpeTokenizer& tokenizer, const HfTokenizerOptions& options);

}  // namespace lora

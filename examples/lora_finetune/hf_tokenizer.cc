// tokenizer.json and tokenizer_config.json from a BpeTokenizer (hf_tokenizer.h).
#include "examples/lora_finetune/hf_tokenizer.h"

#include <nlohmann/json.hpp>

namespace lora {

namespace {

// tokenizer.json: std::map objects (sorted keys) because the vocabulary has tens of thousands of entries and an
// ordered_json object looks keys up linearly. Readers do not care about key order.
using Json = nlohmann::json;

// The tokenizers library's ByteLevel component (pre-tokenizer, decoder). use_regex: GPT-2's split pattern.
Json ByteLevelComponent(bool use_regex) {
  return Json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

bool IsAdded(int32_t type) { return type == BpeTokenizer::kControl || type == BpeTokenizer::kUserDefined; }

}  // namespace

std::string HfTokenizerJson(const BpeTokenizer& tokenizer) {
  Json added = Json::array();
  Json vocab = Json::object();
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    const std::string& text = tokenizer.token(id);
    vocab[text] = id;
    if (IsAdded(tokenizer.type(id)) && !text.empty()) {
      added.push_back(Json{{"id", id},
                           {"content", text},
                           {"single_word", false},
                           {"lstrip", false},
                           {"rstrip", false},
                           {"normalized", false},
                           {"special", tokenizer.type(id) == BpeTokenizer::kControl}});
    }
  }
  Json doc = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", std::move(added)},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       Json{{"type", "Sequence"},
            {"pretokenizers",
             Json::array({Json{{"type", "Digits"}, {"individual_digits", true}}, ByteLevelComponent(true)})}}},
      {"post_processor", nullptr},
      {"decoder", ByteLevelComponent(true)},
      {"model", Json{{"type", "BPE"},
                     {"dropout", nullptr},
                     {"unk_token", nullptr},
                     {"continuing_subword_prefix", nullptr},
                     {"end_of_word_suffix", nullptr},
                     {"fuse_unk", false},
                     {"byte_fallback", false},
                     {"vocab", std::move(vocab)},
                     {"merges", tokenizer.Merges()}}},
  };
  // A token that is not valid UTF-8 cannot be a JSON string: replaced (U+FFFD) rather than failing the whole file.
  return doc.dump(1, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string HfTokenizerConfigJson(const BpeTokenizer& tokenizer, const HfTokenizerOptions& options) {
  nlohmann::ordered_json doc = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                                {"clean_up_tokenization_spaces", false}};
  if (tokenizer.bos() >= 0) doc["bos_token"] = tokenizer.token(tokenizer.bos());
  if (tokenizer.eos() >= 0) doc["eos_token"] = tokenizer.token(tokenizer.eos());
  if (options.model_max_length > 0) doc["model_max_length"] = options.model_max_length;
  if (!options.chat_template.empty()) doc["chat_template"] = options.chat_template;
  return doc.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
}

}  // namespace lora

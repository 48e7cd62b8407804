// config.json, adapter_config.json and the files of a Hugging Face model directory (hf_config.h).
#include "examples/lora_finetune/hf_config.h"

#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "examples/lora_finetune/hf_tokenizer.h"

namespace lora {

namespace {

using Json = nlohmann::ordered_json;

// The shortest decimal that reads back as `f` (1e-05, not 9.999999747378752e-06): Python parses it to a double,
// torch rounds it to the same float the example computes with.
double ShortestDecimal(float f) {
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf) - 1, f);
  if (ec != std::errc()) return static_cast<double>(f);
  *end = '\0';
  return std::strtod(buf, nullptr);
}

}  // namespace

std::string HfLlamaConfigJson(const ModelConfig& m, const HfModelOptions& options, int indent) {
  const Json no_token = nullptr;
  Json doc = {
      {"architectures", Json::array({"LlamaForCausalLM"})},
      {"model_type", "llama"},
      {"vocab_size", m.vocab},
      {"hidden_size", m.dim},
      {"intermediate_size", m.ffn},
      {"num_hidden_layers", m.layers},
      {"num_attention_heads", m.heads},
      {"num_key_value_heads", m.kv_heads},
      {"head_dim", m.dim / m.heads},
      {"hidden_act", "silu"},
      {"max_position_embeddings", options.max_position_embeddings},
      {"rms_norm_eps", ShortestDecimal(m.norm_eps)},
      {"rope_theta", ShortestDecimal(m.rope_theta)},
      {"rope_scaling", nullptr},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"mlp_bias", false},
      {"tie_word_embeddings", true},
      {"bos_token_id", options.bos_token_id >= 0 ? Json(options.bos_token_id) : no_token},
      {"eos_token_id", options.eos_token_id >= 0 ? Json(options.eos_token_id) : no_token},
      {"initializer_range", 0.02},
      {"pretraining_tp", 1},
      {"use_cache", true},
      {"torch_dtype", "float32"},
  };
  return doc.dump(indent) + (indent >= 0 ? "\n" : "");
}

std::string PeftAdapterConfigJson(const PeftLoraOptions& o) {
  Json doc = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", o.base_model_name_or_path},
      {"r", o.r},
      {"lora_alpha", ShortestDecimal(o.alpha)},
      {"lora_dropout", ShortestDecimal(o.dropout)},
      {"target_modules", o.target_modules},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"init_lora_weights", true},
      {"use_rslora", false},
      {"use_dora", false},
      {"modules_to_save", nullptr},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"rank_pattern", Json::object()},
      {"alpha_pattern", Json::object()},
      {"revision", nullptr},
      {"inference_mode", true},
  };
  return doc.dump(2) + "\n";
}

zero::Status WriteTextFile(const std::string& dir, const std::string& name, const std::string& text) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return zero::Status::IoError("creating directory " + dir + ": " + ec.message());
  const std::filesystem::path path = std::filesystem::path(dir) / name;
  const std::string tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.flush();
    if (!out) return zero::Status::IoError("writing " + tmp + " failed (disk full or not writable?)");
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) return zero::Status::IoError("renaming " + tmp + " to " + path.string() + ": " + ec.message());
  return zero::Status::Ok();
}

zero::Status WriteHfModelFiles(const std::string& dir, const ModelConfig& m, const BpeTokenizer& tokenizer,
                               const HfModelOptions& options) {
  if (tokenizer.vocab_size() != m.vocab) {
    return zero::Status::InvalidArgument("Hugging Face files for " + dir + ": the tokenizer has " +
                                         std::to_string(tokenizer.vocab_size()) + " tokens, the model " +
                                         std::to_string(m.vocab));
  }
  zero::Status s = WriteTextFile(dir, "config.json", HfLlamaConfigJson(m, options));
  if (s.ok()) s = WriteTextFile(dir, "tokenizer.json", HfTokenizerJson(tokenizer));
  if (s.ok()) {
    HfTokenizerOptions t;
    t.model_max_length = options.max_position_embeddings;
    t.chat_template = options.chat_template;
    s = WriteTextFile(dir, "tokenizer_config.json", HfTokenizerConfigJson(tokenizer, t));
  }
  return s;
}

}  // namespace lora

// A LLaMA GGUF file as the example's frozen base (gguf_llama.h).
#include "examples/lora_finetune/gguf_llama.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace lora {
namespace {

// Hugging Face suffix within a block -> GGUF suffix.
constexpr std::pair<const char*, const char*> kBlockNames[] = {
    {"input_layernorm.weight", "attn_norm.weight"},    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},      {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"}, {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},       {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

bool IsRotated(const std::string& hf_name) {
  const auto ends = [&](const char* s) {
    const std::string suffix(s);
    return hf_name.size() >= suffix.size() &&
           hf_name.compare(hf_name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends("self_attn.q_proj.weight") || ends("self_attn.k_proj.weight");
}

}  // namespace

std::string GgufTensorName(const std::string& hf_name) {
  if (hf_name == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf_name == "model.norm.weight") return "output_norm.weight";
  const std::string prefix = "model.layers.";
  if (hf_name.compare(0, prefix.size(), prefix) != 0) return "";
  const size_t dot = hf_name.find('.', prefix.size());
  if (dot == std::string::npos) return "";
  const std::string layer = hf_name.substr(prefix.size(), dot - prefix.size());
  const std::string rest = hf_name.substr(dot + 1);
  for (const auto& [hf, gguf] : kBlockNames) {
    if (rest == hf) return "blk." + layer + "." + gguf;
  }
  return "";
}

int64_t GgufRowOfHfRow(int64_t row, int64_t head_dim) {
  const int64_t half = head_dim / 2, head = row / head_dim, within = row % head_dim;
  const int64_t s = within / half, j = within % half;
  return head * head_dim + 2 * j + s;
}

zero::Status LlamaConfigFromGguf(const GgufFile& file, ModelConfig* config) {
  const std::string where = "GGUF base " + file.path();
  std::string arch;
  zero::Status s = file.GetString("general.architecture", &arch);
  if (!s.ok()) return s.WithContext(where);
  if (arch != "llama") {
    return zero::Status::InvalidArgument(where + ": general.architecture is '" + arch +
                                         "'; only 'llama' (LLaMA, SmolLM2, ...) is supported");
  }
  ModelConfig m;
  int64_t v = 0;
  const auto get_int = [&](const char* key, int* out, bool required) -> zero::Status {
    if (!required && file.FindValue(key) == nullptr) return zero::Status::Ok();
    zero::Status st = file.GetInt(key, &v);
    if (!st.ok()) return st.WithContext(where);
    if (v <= 0 || v > (int64_t{1} << 30)) {
      return zero::Status::InvalidArgument(where + ": " + key + " = " + std::to_string(v) + " is out of range");
    }
    *out = static_cast<int>(v);
    return zero::Status::Ok();
  };
  if (!(s = get_int("llama.block_count", &m.layers, true)).ok()) return s;
  if (!(s = get_int("llama.embedding_length", &m.dim, true)).ok()) return s;
  if (!(s = get_int("llama.feed_forward_length", &m.ffn, true)).ok()) return s;
  if (!(s = get_int("llama.attention.head_count", &m.heads, true)).ok()) return s;
  m.kv_heads = m.heads;
  if (!(s = get_int("llama.attention.head_count_kv", &m.kv_heads, false)).ok()) return s;
  double f = 0;
  if (file.FindValue("llama.rope.freq_base") != nullptr) {
    if (!(s = file.GetFloat("llama.rope.freq_base", &f)).ok()) return s.WithContext(where);
    m.rope_theta = static_cast<float>(f);
  }
  if (!(s = file.GetFloat("llama.attention.layer_norm_rms_epsilon", &f)).ok()) return s.WithContext(where);
  m.norm_eps = static_cast<float>(f);
  if (file.FindValue("llama.rope.scaling.type") != nullptr) {
    std::string type;
    if (!(s = file.GetString("llama.rope.scaling.type", &type)).ok()) return s.WithContext(where);
    if (type != "none") {
      return zero::Status::InvalidArgument(where + ": RoPE scaling '" + type + "' is not implemented by model.cc");
    }
  }
  const GgufTensor* embed = file.Find("token_embd.weight");
  if (embed == nullptr || embed->dims.size() != 2) {
    return zero::Status::InvalidArgument(where + ": no 2-D token_embd.weight");
  }
  m.vocab = static_cast<int>(embed->dims[1]);
  if (file.FindValue("llama.vocab_size") != nullptr) {
    if (!(s = file.GetInt("llama.vocab_size", &v)).ok()) return s.WithContext(where);
    if (v != m.vocab) {
      return zero::Status::InvalidArgument(where + ": llama.vocab_size = " + std::to_string(v) +
                                           " but token_embd.weight has " + std::to_string(m.vocab) + " rows");
    }
  }
  const std::string bad = CheckConfig(m, LoraConfig());
  if (!bad.empty()) return zero::Status::InvalidArgument(where + ": " + bad);
  if (file.FindValue("llama.rope.dimension_count") != nullptr) {
    if (!(s = file.GetInt("llama.rope.dimension_count", &v)).ok()) return s.WithContext(where);
    if (v != m.dim / m.heads) {
      return zero::Status::InvalidArgument(where + ": llama.rope.dimension_count = " + std::to_string(v) +
                                           " (partial rotary) but head_dim is " + std::to_string(m.dim / m.heads));
    }
  }
  if (file.Find("output.weight") != nullptr) {
    return zero::Status::InvalidArgument(where +
                                         ": has an untied output.weight; model.cc ties the head to the "
                                         "embedding");
  }
  for (const ParamInfo& p : Parameters(m, LoraConfig())) {
    const std::string name = GgufTensorName(p.name);
    const GgufTensor* t = file.Find(name);
    if (t == nullptr) return zero::Status::InvalidArgument(where + ": tensor " + name + " (" + p.name + ") is missing");
    if (t->shape() != p.shape) {
      std::string got, want;
      for (int64_t d : t->shape()) got += (got.empty() ? "" : ",") + std::to_string(d);
      for (int64_t d : p.shape) want += (want.empty() ? "" : ",") + std::to_string(d);
      return zero::Status::InvalidArgument(where + ": tensor " + name + " has shape [" + got +
                                           "], the config implies [" + want + "]");
    }
    if (!GgmlTypeDequantizable(t->type)) {
      return zero::Status::InvalidArgument(where + ": tensor " + name + " is " + GgmlTypeName(t->type) +
                                           "; only F32, F16, BF16, Q8_0 and Q4_1 are dequantized");
    }
  }
  *config = m;
  return zero::Status::Ok();
}

zero::Status ReadHfRange(const GgufFile& file, const ModelConfig& config, const std::string& hf_name, int64_t first,
                         int64_t count, float* out) {
  const std::string name = GgufTensorName(hf_name);
  if (name.empty()) return zero::Status::InvalidArgument("no GGUF tensor for parameter " + hf_name);
  if (!IsRotated(hf_name)) return file.ReadRange(name, first, count, out);
  // q_proj / k_proj: row by row through the permutation ([out, in] with in = dim).
  const int64_t in = config.dim, head_dim = config.dim / config.heads;
  for (int64_t at = first; at < first + count;) {
    const int64_t row = at / in, col = at % in;
    const int64_t n = std::min(in - col, first + count - at);
    zero::Status s = file.ReadRange(name, GgufRowOfHfRow(row, head_dim) * in + col, n, out + (at - first));
    if (!s.ok()) return s;
    at += n;
  }
  return zero::Status::Ok();
}

}  // namespace lora

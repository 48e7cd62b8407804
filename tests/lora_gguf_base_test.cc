// A LLaMA GGUF file as the LoRA example's frozen base (examples/lora_finetune/gguf_llama.h), through zero's engine.
// A tiny random model is written twice: in Hugging Face order (a safetensors file) and as llama.cpp's converter
// writes it (a GGUF whose q_proj / k_proj rows are permuted for its interleaved RoPE). Loading the GGUF must give
// the same logits as the Hugging Face weights (the RoPE row order is undone), an adapter trained against the GGUF
// base and exported must give the same logits again on the Hugging Face base (what PEFT will do with it), and a
// load that skips the un-permutation must not (so the test can tell the orders apart). Also: the configuration is
// read from the llama.* keys, and bad files fail with messages naming the problem.
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "examples/lora_finetune/gguf.h"
#include "examples/lora_finetune/gguf_llama.h"
#include "examples/lora_finetune/merge.h"
#include "examples/lora_finetune/model.h"
#include "examples/lora_finetune/safetensors.h"
#include "testing/mpi_env.h"
#include "tests/lora_gguf_writer.h"
#include "zero/zero.h"

namespace lora {
namespace {

ModelConfig Tiny() {
  ModelConfig m;
  m.vocab = 40;
  m.dim = 32;
  m.layers = 2;
  m.heads = 4;
  m.kv_heads = 2;
  m.ffn = 48;
  m.rope_theta = 500.f;  // not the default: the test sees that it is read
  m.norm_eps = 1e-6f;
  return m;
}

// The names llama.cpp gives the tensors (its gguf-py constants), written out here rather than taken from
// gguf_llama.cc, so that a wrong mapping there cannot cancel out.
std::string LlamaCppName(const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  const std::map<std::string, std::string> block = {
      {"input_layernorm", "attn_norm"}, {"self_attn.q_proj", "attn_q"},      {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"},   {"self_attn.o_proj", "attn_output"}, {"post_attention_layernorm", "ffn_norm"},
      {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},           {"mlp.down_proj", "ffn_down"}};
  const std::string layer = hf.substr(13, hf.find('.', 13) - 13);                            // model.layers.<i>.
  const std::string rest = hf.substr(14 + layer.size(), hf.size() - 14 - layer.size() - 7);  // without .weight
  return "blk." + layer + "." + block.at(rest) + ".weight";
}

// llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute(weights, n_head, n_head_kv), for a [rows, cols] matrix:
//   weights.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
// (k_proj passes n_head = n_head_kv). Output row (h, j, s) is input row (h, s, j).
std::vector<float> ConverterPermute(const std::vector<float>& w, int64_t rows, int64_t cols, int64_t n_head) {
  const int64_t half = rows / n_head / 2;
  std::vector<float> out(w.size());
  for (int64_t h = 0; h < n_head; ++h) {
    for (int64_t j = 0; j < half; ++j) {
      for (int64_t s = 0; s < 2; ++s) {
        const int64_t dst = (h * half + j) * 2 + s, src = (h * 2 + s) * half + j;
        for (int64_t c = 0; c < cols; ++c)
          out[static_cast<size_t>(dst * cols + c)] = w[static_cast<size_t>(src * cols + c)];
      }
    }
  }
  return out;
}

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Every tensor of Parameters(m, l), random and O(1) (adapters included, so that B A matters), the same on every
// rank.
std::vector<std::vector<float>> RandomParams(const ModelConfig& m, const LoraConfig& l, uint64_t seed) {
  std::vector<std::vector<float>> out;
  for (const ParamInfo& p : Parameters(m, l)) {
    std::mt19937_64 rng(seed + out.size());
    std::normal_distribution<float> normal(0.f, 1.f);
    const bool norm = p.name.find("norm") != std::string::npos;
    const float scale = p.name.find("embed") != std::string::npos ? 1.f : 0.3f;
    std::vector<float> v(static_cast<size_t>(Numel(p.shape)));
    for (float& x : v) x = norm ? 1.f + 0.2f * normal(rng) : scale * normal(rng);
    out.push_back(std::move(v));
  }
  return out;
}

std::string TempPath(const std::string& name) {
  return "/tmp/lora_gguf_base_test_" + std::to_string(::getpid()) + "_" + name;
}

// The llama.* metadata of `m`, without tensors; rope.dimension_count is head_dim unless `rope_dims` says otherwise.
testing::GgufWriter LlamaMetadata(const ModelConfig& m, int rope_dims = 0) {
  testing::GgufWriter w;
  w.String("general.architecture", "llama");
  w.U32("llama.block_count", static_cast<uint32_t>(m.layers));
  w.U32("llama.context_length", 2048);
  w.U32("llama.embedding_length", static_cast<uint32_t>(m.dim));
  w.U32("llama.feed_forward_length", static_cast<uint32_t>(m.ffn));
  w.U32("llama.attention.head_count", static_cast<uint32_t>(m.heads));
  w.U32("llama.attention.head_count_kv", static_cast<uint32_t>(m.kv_heads));
  w.F32("llama.rope.freq_base", m.rope_theta);
  w.F32("llama.attention.layer_norm_rms_epsilon", m.norm_eps);
  w.U32("llama.rope.dimension_count", static_cast<uint32_t>(rope_dims > 0 ? rope_dims : m.dim / m.heads));
  w.U32("llama.vocab_size", static_cast<uint32_t>(m.vocab));
  return w;
}

// The base tensors (Parameters(m, {}) order, Hugging Face layout) as the converter writes them.
void AddBaseTensors(const ModelConfig& m, const std::vector<std::vector<float>>& base, testing::GgufWriter* w) {
  const std::vector<ParamInfo> infos = Parameters(m, LoraConfig());
  for (size_t p = 0; p < infos.size(); ++p) {
    std::vector<float> data = base[p];
    const std::string& n = infos[p].name;
    if (n.find("q_proj") != std::string::npos)
      data = ConverterPermute(data, infos[p].shape[0], infos[p].shape[1], m.heads);
    if (n.find("k_proj") != std::string::npos)
      data = ConverterPermute(data, infos[p].shape[0], infos[p].shape[1], m.kv_heads);
    w->Tensor(LlamaCppName(n), infos[p].shape, data);
  }
}

TEST(LoraGgufBase, RowPermutationMatchesTheConverter) {
  for (const auto& [rows, heads] : {std::pair<int64_t, int64_t>{32, 4}, {576, 9}, {192, 3}}) {
    std::vector<float> w(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) w[static_cast<size_t>(r)] = static_cast<float>(r);  // one column: row ids
    const std::vector<float> g = ConverterPermute(w, rows, 1, heads);
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_EQ(g[static_cast<size_t>(GgufRowOfHfRow(r, rows / heads))], static_cast<float>(r)) << "row " << r;
    }
  }
}

TEST(LoraGgufBase, ConfigFromLlamaKeys) {
  const ModelConfig m = Tiny();
  testing::GgufWriter w = LlamaMetadata(m);
  AddBaseTensors(m, RandomParams(m, LoraConfig(), 1), &w);
  const std::string path = TempPath("config.gguf");
  w.Write(path);
  std::unique_ptr<GgufFile> f;
  ASSERT_TRUE(GgufFile::Open(path, &f).ok());
  ModelConfig got;
  const zero::Status s = LlamaConfigFromGguf(*f, &got);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(got.vocab, m.vocab);
  EXPECT_EQ(got.dim, m.dim);
  EXPECT_EQ(got.layers, m.layers);
  EXPECT_EQ(got.heads, m.heads);
  EXPECT_EQ(got.kv_heads, m.kv_heads);
  EXPECT_EQ(got.ffn, m.ffn);
  EXPECT_EQ(got.rope_theta, m.rope_theta);
  EXPECT_EQ(got.norm_eps, m.norm_eps);
  ::unlink(path.c_str());
}

TEST(LoraGgufBase, BadFilesFailWithTheReason) {
  const ModelConfig m = Tiny();
  const std::vector<std::vector<float>> base = RandomParams(m, LoraConfig(), 1);
  const std::vector<ParamInfo> infos = Parameters(m, LoraConfig());
  const auto expect_error = [&](const testing::GgufWriter& w, const std::string& needle) {
    const std::string path = TempPath("bad.gguf");
    w.Write(path);
    std::unique_ptr<GgufFile> f;
    zero::Status s = GgufFile::Open(path, &f);
    ModelConfig got;
    if (s.ok()) s = LlamaConfigFromGguf(*f, &got);
    ::unlink(path.c_str());
    ASSERT_FALSE(s.ok()) << "accepted; expected an error with: " << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find(path), std::string::npos) << "the message should name the file: " << s.ToString();
  };
  {
    testing::GgufWriter w;
    w.String("general.architecture", "gpt2");
    expect_error(w, "only 'llama'");
  }
  {
    testing::GgufWriter w;
    w.String("general.architecture", "llama");
    expect_error(w, "llama.block_count");
  }
  {
    testing::GgufWriter w = LlamaMetadata(m);  // no tensors
    expect_error(w, "token_embd.weight");
  }
  {
    testing::GgufWriter w = LlamaMetadata(m);
    AddBaseTensors(m, base, &w);
    w.Tensor("output.weight", {m.vocab, m.dim}, base[0]);
    expect_error(w, "untied output.weight");
  }
  {
    testing::GgufWriter w = LlamaMetadata(m);
    for (size_t p = 0; p + 1 < infos.size(); ++p) w.Tensor(LlamaCppName(infos[p].name), infos[p].shape, base[p]);
    expect_error(w, "output_norm.weight (model.norm.weight) is missing");
  }
  {
    testing::GgufWriter w = LlamaMetadata(m);
    for (size_t p = 0; p < infos.size(); ++p) {
      std::vector<int64_t> shape = infos[p].shape;
      if (infos[p].name == "model.layers.1.mlp.up_proj.weight") std::swap(shape[0], shape[1]);
      w.Tensor(LlamaCppName(infos[p].name), shape, base[p]);
    }
    expect_error(w, "blk.1.ffn_up.weight has shape [32,48], the config implies [48,32]");
  }
  {
    testing::GgufWriter w = LlamaMetadata(m, /*rope_dims=*/4);  // RoPE on half of each head: not model.cc's
    AddBaseTensors(m, base, &w);
    expect_error(w, "partial rotary");
  }
  // A missing or truncated file: the reader's message names the file.
  std::unique_ptr<GgufFile> f;
  const zero::Status missing = GgufFile::Open(TempPath("absent.gguf"), &f);
  EXPECT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("absent.gguf"), std::string::npos) << missing.ToString();
  testing::GgufWriter w = LlamaMetadata(m);
  AddBaseTensors(m, base, &w);
  const std::string bytes = w.Bytes();
  const std::string cut = TempPath("cut.gguf");
  std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() - 10);
  const zero::Status truncated = GgufFile::Open(cut, &f);
  ::unlink(cut.c_str());
  EXPECT_FALSE(truncated.ok());
  EXPECT_NE(truncated.message().find(cut), std::string::npos) << truncated.ToString();
}

// ---- through the engine ---------------------------------------------------------------------------------------

class EngineAccess : public ParamAccess {
 public:
  explicit EngineAccess(zero::Engine* e) : e_(e) {}
  void Acquire(int u, bool backward) override {
    Ok(e_->Acquire(u, backward ? zero::Pass::kBackward : zero::Pass::kForward));
  }
  void Release(int u, bool backward) override {
    Ok(e_->Release(u, backward ? zero::Pass::kBackward : zero::Pass::kForward));
  }
  void GradsReady(int u) override { Ok(e_->GradsReady(u)); }
  const float* Param(int p) override { return e_->Param(p).as<float>(); }
  float* Grad(int p) override { return e_->Grad(p).as<float>(); }

 private:
  static void Ok(const zero::Status& s) { ASSERT_TRUE(s.ok()) << s.ToString(); }
  zero::Engine* e_;
};

struct Loaded {
  std::unique_ptr<zero::Engine> engine;
  std::vector<ParamInfo> infos;
};

// An engine over Parameters(m, l) filled by `fill(info, off, n, dst)`.
template <typename Fill>
Loaded Load(zero::Stage stage, zero::Comm* comm, const ModelConfig& m, const LoraConfig& l, Fill fill) {
  Loaded out;
  out.infos = Parameters(m, l);
  std::vector<zero::ParamSpec> specs;
  for (const ParamInfo& p : out.infos) specs.push_back({p.name, p.shape, p.unit, p.trainable});
  zero::Options o;
  o.stage = stage;
  o.cpu_threads = 1;
  o.bucket_elements = 2048;  // several buckets per unit: fragments start mid-row
  zero::Status s = zero::Engine::Open(o, comm, specs, &out.engine);
  EXPECT_TRUE(s.ok()) << s.ToString();
  if (!s.ok()) return out;
  zero::Status fill_error;
  s = out.engine->InitParams([&](int p, int64_t off, int64_t n, float* dst) {
    const zero::Status st = fill(out.infos[static_cast<size_t>(p)], static_cast<size_t>(p), off, n, dst);
    if (!st.ok() && fill_error.ok()) fill_error = st;
  });
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(fill_error.ok()) << fill_error.ToString();
  return out;
}

std::vector<float> EngineLogits(const ModelConfig& m, const LoraConfig& l, zero::Engine* e, const Batch& b) {
  std::vector<float> logits;
  EXPECT_TRUE(e->BeginEval().ok());
  EngineAccess access(e);
  Logits(m, l, access, b, &logits, 1);
  EXPECT_TRUE(e->EndEval().ok());
  return logits;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, static_cast<double>(std::abs(a[i] - b[i])));
  return d;
}

// The RoPE row order test: GGUF (converter's q/k order) -> engine == Hugging Face weights; the adapter exported
// from that engine, re-imported on the Hugging Face base by another engine (another stage), gives the same logits.
TEST(LoraGgufBase, RopeRowOrderExportReimport) {
  auto comm = zero::testing::WorldComm();
  ASSERT_NE(comm, nullptr);
  const ModelConfig m = Tiny();
  LoraConfig l;
  l.enabled = true;
  l.r = 4;
  l.alpha = 8;
  const std::vector<ParamInfo> adapted_infos = Parameters(m, l);
  const std::vector<std::vector<float>> all = RandomParams(m, l, 11);  // base and adapters, Hugging Face order
  std::map<std::string, const std::vector<float>*> by_name;
  for (size_t p = 0; p < adapted_infos.size(); ++p) by_name[adapted_infos[p].name] = &all[p];
  const std::vector<ParamInfo> base_infos = Parameters(m, LoraConfig());
  std::vector<std::vector<float>> base;
  for (const ParamInfo& p : base_infos) base.push_back(*by_name.at(p.name));

  // Every rank writes its own copy of the files (pid in the name): no cross-rank file traffic in this test.
  testing::GgufWriter w = LlamaMetadata(m);
  AddBaseTensors(m, base, &w);
  const std::string gguf_path = TempPath("base.gguf"), hf_path = TempPath("base.safetensors");
  const std::string adapter_path = TempPath("adapter.safetensors");
  w.Write(gguf_path);
  std::vector<TensorData> hf_tensors;
  for (size_t p = 0; p < base_infos.size(); ++p) {
    hf_tensors.push_back({{base_infos[p].name, DType::kF32, base_infos[p].shape}, base[p].data()});
  }
  ASSERT_TRUE(Save(hf_path, hf_tensors, {{"format", "pt"}}).ok());
  std::unique_ptr<GgufFile> gguf;
  ASSERT_TRUE(GgufFile::Open(gguf_path, &gguf).ok());
  ModelConfig from_file;
  ASSERT_TRUE(LlamaConfigFromGguf(*gguf, &from_file).ok());

  // A fixed batch of tokens.
  std::vector<int32_t> tokens, targets;
  for (int i = 0; i < 2 * 12; ++i) tokens.push_back((i * 7 + 3) % m.vocab), targets.push_back(-1);
  const Batch batch{2, 12, tokens.data(), targets.data()};

  // Reference: the Hugging Face tensors directly (FullAccess, no engine).
  std::vector<const float*> ptrs;
  for (const auto& v : all) ptrs.push_back(v.data());
  FullAccess ref_access(ptrs);
  std::vector<float> want;
  Logits(m, l, ref_access, batch, &want, 1);

  const auto adapter_fill = [&](const ParamInfo& info, int64_t off, int64_t n, float* dst) {
    const std::vector<float>& v = *by_name.at(info.name);
    std::copy(v.begin() + off, v.begin() + off + n, dst);
  };
  Loaded from_gguf = Load(zero::Stage::kParameters, comm.get(), from_file, l,
                          [&](const ParamInfo& info, size_t, int64_t off, int64_t n, float* dst) {
                            if (info.trainable) return adapter_fill(info, off, n, dst), zero::Status::Ok();
                            return ReadHfRange(*gguf, from_file, info.name, off, n, dst);
                          });
  ASSERT_NE(from_gguf.engine, nullptr);
  const std::vector<float> got = EngineLogits(from_file, l, from_gguf.engine.get(), batch);
  // Same fp32 values through the same kernels on the same batch: bit for bit.
  EXPECT_EQ(got, want) << "GGUF-loaded logits differ from the Hugging Face weights' by up to " << MaxAbsDiff(got, want);

  // Without undoing the permutation (rows read as stored), q and k come out in llama.cpp's order: the logits move,
  // which shows this test can see the row order.
  Loaded raw = Load(zero::Stage::kParameters, comm.get(), from_file, l,
                    [&](const ParamInfo& info, size_t, int64_t off, int64_t n, float* dst) {
                      if (info.trainable) return adapter_fill(info, off, n, dst), zero::Status::Ok();
                      return gguf->ReadRange(GgufTensorName(info.name), off, n, dst);
                    });
  ASSERT_NE(raw.engine, nullptr);
  EXPECT_GT(MaxAbsDiff(EngineLogits(from_file, l, raw.engine.get(), batch), want), 1e-3)
      << "reading q/k rows in GGUF order changed nothing: the test cannot tell the orders apart";

  // Export the adapter from the GGUF-loaded engine (PEFT names, as main.cc's SaveModel), re-import it on the
  // Hugging Face base under stage 0.
  {
    zero::FullParamsScope scope;
    std::vector<int> units;
    for (int u = 0; u < NumUnits(m); ++u) units.push_back(u);
    ASSERT_TRUE(from_gguf.engine->GatherFull(units, &scope).ok());
    std::vector<TensorData> adapter;
    for (size_t p = 0; p < from_gguf.infos.size(); ++p) {
      if (!from_gguf.infos[p].trainable) continue;
      adapter.push_back({{"base_model.model." + from_gguf.infos[p].name, DType::kF32, from_gguf.infos[p].shape},
                         from_gguf.engine->Param(static_cast<int>(p)).data});
    }
    ASSERT_TRUE(Save(adapter_path, adapter, {{"format", "pt"}}).ok());
    ASSERT_TRUE(scope.Close().ok());
  }
  std::unique_ptr<Reader> hf, adapter;
  ASSERT_TRUE(Reader::Open(hf_path, &hf).ok());
  ASSERT_TRUE(Reader::Open(adapter_path, &adapter).ok());
  Loaded reimported = Load(zero::Stage::kDataParallel, comm.get(), m, l,
                           [&](const ParamInfo& info, size_t, int64_t off, int64_t n, float* dst) {
                             if (info.trainable)
                               return adapter->ReadRange("base_model.model." + info.name, off, n, dst);
                             return hf->ReadRange(info.name, off, n, dst);
                           });
  ASSERT_NE(reimported.engine, nullptr);
  EXPECT_EQ(EngineLogits(m, l, reimported.engine.get(), batch), got)
      << "export + re-import on the Hugging Face base changed the logits";
  ::unlink(gguf_path.c_str());
  ::unlink(hf_path.c_str());
  ::unlink(adapter_path.c_str());
}

}  // namespace
}  // namespace lora

// The Hugging Face files the LoRA example writes (examples/lora_finetune/hf_config.h, hf_tokenizer.h): config.json,
// adapter_config.json, tokenizer.json and tokenizer_config.json hold what transformers, PEFT and `tokenizers` read,
// with the model's values. HfTokenizerFixture.Write (run by ctest hf_tokenizer_write with LORA_HF_TOKENIZER_FIXTURE
// set) writes two tokenizer directories and the ids BpeTokenizer gives for a set of texts; tests/hf_tokenizer_check.py
// then loads the directories with transformers and checks that Hugging Face gives the same ids.
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "examples/lora_finetune/hf_config.h"
#include "examples/lora_finetune/hf_tokenizer.h"
#include "examples/lora_finetune/tokenizer.h"

namespace lora {
namespace {

using Json = nlohmann::json;

// A corpus for learning merges: ASCII prose with contractions, digits and punctuation, runs of spaces, newlines,
// accented Latin and CJK letters (inside the pre-tokenizer's exact domain, tokenizer.h).
const char* kCorpus =
    "The quick brown fox jumps over the lazy dog. The dog didn't move; the fox's tail was there.\n"
    "In the beginning there were 12345 tokens, and then 678 more; they'll merge, we've seen it.\n"
    "  Indented   text\twith\ttabs and    many spaces.\n\n"
    "Caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9" "e, na\xc3\xafve r\xc3\xa9sum\xc3\xa9; \xe6\x97\xa5\xe6\x9c\xac"
    "\xe8\xaa\x9e\xe3\x81\xae\xe6\x96\x87\xe7\xab\xa0\xe3\x80\x82 Here is the end, the end, the end!!! ...\n";

// Texts the two implementations must tokenize alike (special tokens included: Hugging Face matches added tokens in
// the text, BpeTokenizer::Encode(text, true) too).
const std::vector<std::string> kTexts = {
    "The quick brown fox jumps over the lazy dog.",
    "they'll merge, we've seen it; the fox's tail didn't move",
    "In 2024 there were 12345 tokens (and 6.78 more).",
    "  leading spaces,   runs   of spaces, trailing  ",
    "tabs\tand\nnewlines\n\n\nand \r\n CRLF",
    "Caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9" "e, \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe6\x96\x87",
    "<|im_start|>user\nWhat is the end?<|im_end|>\n<|im_start|>assistant\nthe end<|endoftext|>",
    "!!! ... ??? --- ### the end",
    "x",
    "",
};

// Merges learned from kCorpus the usual way (the most frequent adjacent pair within pre-tokens, ties to the
// smallest pair, `count` times). A real vocabulary's shape without shipping one.
void LearnMerges(int count, std::vector<std::string>* vocab, std::vector<std::string>* merges) {
  std::vector<std::vector<std::string>> words;
  for (std::string_view piece : BpeTokenizer::PreTokenize(kCorpus)) {
    std::vector<std::string> w;
    for (unsigned char c : piece) w.push_back(BpeTokenizer::ByteSymbol(c));
    words.push_back(std::move(w));
  }
  for (int m = 0; m < count; ++m) {
    std::map<std::pair<std::string, std::string>, int> pairs;
    for (const auto& w : words) {
      for (size_t i = 0; i + 1 < w.size(); ++i) ++pairs[{w[i], w[i + 1]}];
    }
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it) {
      if (it->second > best->second) best = it;
    }
    const auto [a, b] = best->first;
    merges->push_back(a + " " + b);
    vocab->push_back(a + b);
    for (auto& w : words) {
      std::vector<std::string> out;
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == a && w[i + 1] == b) {
          out.push_back(a + b);
          ++i;
        } else {
          out.push_back(w[i]);
        }
      }
      w = std::move(out);
    }
  }
}

// Three control tokens first (ids 0-2, so ids are not bytes), one user-defined token, the 256 byte symbols in an
// order other than byte order, then the learned merges' tokens.
BpeTokenizer LearnedTokenizer() {
  std::vector<std::string> vocab = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"};
  std::vector<int32_t> types = {BpeTokenizer::kControl, BpeTokenizer::kControl, BpeTokenizer::kControl,
                                BpeTokenizer::kUserDefined};
  for (int b = 255; b >= 0; --b) vocab.push_back(BpeTokenizer::ByteSymbol(static_cast<uint8_t>(b)));
  std::vector<std::string> merges;
  LearnMerges(300, &vocab, &merges);
  // Digit merges, which only the Digits pre-tokenizer keeps from applying ("12345" is five tokens in both).
  for (const char* m : {"1 2", "12 3", "4 5", "7 8"}) {
    merges.push_back(m);
    std::string joined(m);
    joined.erase(joined.find(' '), 1);
    vocab.push_back(joined);
  }
  types.resize(vocab.size(), BpeTokenizer::kNormal);
  BpeTokenizer t;
  const zero::Status s = BpeTokenizer::Create(vocab, merges, types, 1, 2, &t);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return t;
}

TEST(HfConfig, LlamaConfigHoldsTheModel) {
  ModelConfig m;
  m.vocab = 49152, m.dim = 576, m.layers = 30, m.heads = 9, m.kv_heads = 3, m.ffn = 1536;
  m.rope_theta = 100000.f, m.norm_eps = 1e-5f;
  HfModelOptions o;
  o.max_position_embeddings = 8192, o.bos_token_id = 1, o.eos_token_id = 2;
  const Json c = Json::parse(HfLlamaConfigJson(m, o));
  EXPECT_EQ(c["architectures"], Json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(c["model_type"], "llama");
  EXPECT_EQ(c["vocab_size"], 49152);
  EXPECT_EQ(c["hidden_size"], 576);
  EXPECT_EQ(c["intermediate_size"], 1536);
  EXPECT_EQ(c["num_hidden_layers"], 30);
  EXPECT_EQ(c["num_attention_heads"], 9);
  EXPECT_EQ(c["num_key_value_heads"], 3);
  EXPECT_EQ(c["head_dim"], 64);
  EXPECT_EQ(c["max_position_embeddings"], 8192);
  EXPECT_EQ(c["tie_word_embeddings"], true);
  EXPECT_EQ(c["hidden_act"], "silu");
  EXPECT_EQ(c["torch_dtype"], "float32");
  EXPECT_EQ(c["bos_token_id"], 1);
  EXPECT_EQ(c["eos_token_id"], 2);
  // The shortest decimals: what a person reads in the file, and torch rounds them back to the model's floats.
  EXPECT_EQ(c["rms_norm_eps"].get<double>(), 1e-5);
  EXPECT_EQ(static_cast<float>(c["rms_norm_eps"].get<double>()), m.norm_eps);
  EXPECT_EQ(c["rope_theta"].get<double>(), 100000.0);
  EXPECT_TRUE(c["rope_scaling"].is_null());
  // The small base: no special tokens; one line for the safetensors metadata.
  const std::string line = HfLlamaConfigJson(ModelConfig(), HfModelOptions(), -1);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  const Json small = Json::parse(line);
  EXPECT_TRUE(small["bos_token_id"].is_null());
  EXPECT_TRUE(small["eos_token_id"].is_null());
  EXPECT_EQ(small["vocab_size"], 256);
}

TEST(HfConfig, AdapterConfigIsPeftsLoraConfig) {
  PeftLoraOptions o;
  o.base_model_name_or_path = "/runs/lora/base";
  o.r = 4, o.alpha = 8.f, o.dropout = 0.05f;
  o.target_modules = {"q_proj", "gate_proj"};
  const Json c = Json::parse(PeftAdapterConfigJson(o));
  EXPECT_EQ(c["peft_type"], "LORA");
  EXPECT_EQ(c["task_type"], "CAUSAL_LM");
  EXPECT_EQ(c["base_model_name_or_path"], "/runs/lora/base");
  EXPECT_EQ(c["r"], 4);
  EXPECT_EQ(c["lora_alpha"].get<double>(), 8.0);
  EXPECT_EQ(c["lora_dropout"].get<double>(), 0.05);
  EXPECT_EQ(c["target_modules"], Json::array({"q_proj", "gate_proj"}));
  EXPECT_EQ(c["bias"], "none");
  EXPECT_EQ(c["fan_in_fan_out"], false);  // weights are [out, in], as nn.Linear's
}

TEST(HfTokenizer, ByteLevelVocabularyIsTheBytes) {
  const BpeTokenizer t = BpeTokenizer::ByteLevel();
  ASSERT_EQ(t.vocab_size(), 256);
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::vector<int32_t> ids = t.Encode(all);
  ASSERT_EQ(ids.size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[static_cast<size_t>(b)], b);
  const Json j = Json::parse(HfTokenizerJson(t));
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_EQ(j["model"]["vocab"].size(), 256u);
  EXPECT_EQ(j["model"]["vocab"]["\xc4\xa0"], ' ');  // Ġ is the space, id 32
  EXPECT_TRUE(j["model"]["merges"].empty());
  EXPECT_TRUE(j["added_tokens"].empty());
  const Json c = Json::parse(HfTokenizerConfigJson(t, {}));
  EXPECT_EQ(c["tokenizer_class"], "PreTrainedTokenizerFast");
  EXPECT_EQ(c["clean_up_tokenization_spaces"], false);
  EXPECT_FALSE(c.contains("bos_token"));
}

TEST(HfTokenizer, VocabularyMergesAndAddedTokens) {
  const BpeTokenizer t = LearnedTokenizer();
  const Json j = Json::parse(HfTokenizerJson(t));
  ASSERT_EQ(j["model"]["vocab"].size(), static_cast<size_t>(t.vocab_size()));
  for (int32_t id = 0; id < t.vocab_size(); ++id) EXPECT_EQ(j["model"]["vocab"][t.token(id)], id);
  EXPECT_EQ(j["model"]["merges"].get<std::vector<std::string>>(), t.Merges());
  ASSERT_EQ(j["added_tokens"].size(), 4u);
  EXPECT_EQ(j["added_tokens"][0]["content"], "<|endoftext|>");
  EXPECT_EQ(j["added_tokens"][0]["special"], true);
  EXPECT_EQ(j["added_tokens"][3]["content"], "<tool>");
  EXPECT_EQ(j["added_tokens"][3]["special"], false);
  const Json c = Json::parse(HfTokenizerConfigJson(t, {.model_max_length = 2048, .chat_template = "{{ x }}"}));
  EXPECT_EQ(c["bos_token"], "<|im_start|>");
  EXPECT_EQ(c["eos_token"], "<|im_end|>");
  EXPECT_EQ(c["model_max_length"], 2048);
  EXPECT_EQ(c["chat_template"], "{{ x }}");
}

TEST(HfTokenizer, MergesKeepTheirFirstRank) {
  std::vector<std::string> vocab;
  for (int b = 0; b < 256; ++b) vocab.push_back(BpeTokenizer::ByteSymbol(static_cast<uint8_t>(b)));
  vocab.push_back("ab");
  vocab.push_back("bc");
  BpeTokenizer t;
  ASSERT_TRUE(BpeTokenizer::Create(vocab, {"b c", "a b", "b c"}, {}, -1, -1, &t).ok());
  EXPECT_EQ(t.Merges(), std::vector<std::string>({"b c", "a b"}));
}

TEST(HfFiles, WriteModelFilesRefusesAMismatchedTokenizer) {
  const std::string dir = testing::TempDir() + "/hf_files_mismatch";
  ModelConfig m;
  m.vocab = 300;
  const zero::Status s = WriteHfModelFiles(dir, m, BpeTokenizer::ByteLevel(), {});
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("256 tokens"), std::string::npos) << s.ToString();
}

// The fixture for tests/hf_tokenizer_check.py: DIR/bpe and DIR/bytes (tokenizer.json, tokenizer_config.json,
// expected.json = [{"text", "ids"}]). DIR is LORA_HF_TOKENIZER_FIXTURE (ctest hf_tokenizer_write), else a temporary one.
TEST(HfTokenizerFixture, Write) {
  const char* env = std::getenv("LORA_HF_TOKENIZER_FIXTURE");
  const std::string root = env != nullptr ? env : testing::TempDir() + "/hf_tokenizer_fixture";
  const std::vector<std::pair<std::string, BpeTokenizer>> tokenizers = {{"bpe", LearnedTokenizer()},
                                                                         {"bytes", BpeTokenizer::ByteLevel()}};
  for (const auto& [name, t] : tokenizers) {
    const std::string dir = root + "/" + name;
    ASSERT_TRUE(WriteTextFile(dir, "tokenizer.json", HfTokenizerJson(t)).ok());
    ASSERT_TRUE(WriteTextFile(dir, "tokenizer_config.json", HfTokenizerConfigJson(t, {})).ok());
    Json expected = Json::array();
    for (const std::string& text : kTexts) {
      const std::vector<int32_t> ids = t.Encode(text, /*special=*/true);
      ASSERT_EQ(t.Decode(ids), text) << "the texts must round-trip through BpeTokenizer itself";
      if (name == "bytes") {
        std::vector<int32_t> bytes;
        for (unsigned char c : text) bytes.push_back(c);
        ASSERT_EQ(ids, bytes);
      }
      expected.push_back(Json{{"text", text}, {"ids", ids}});
    }
    ASSERT_TRUE(WriteTextFile(dir, "expected.json", expected.dump(1) + "\n").ok());
  }
}

}  // namespace
}  // namespace lora

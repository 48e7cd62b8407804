// The byte-level BPE tokenizer (examples/lora_finetune/tokenizer.h) on hand-made vocabularies: GPT-2's byte
// alphabet, merges applied by rank (not left to right), SmolLM2's pre-tokenizer, round trips over ASCII, UTF-8 and
// arbitrary bytes, special tokens, and the errors of Create / FromGguf. (The real SmolLM2 vocabulary is checked
// against Hugging Face's ids in lora_smollm2_test, registered when the file is present.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "examples/lora_finetune/gguf.h"
#include "examples/lora_finetune/tokenizer.h"
#include "tests/lora_gguf_writer.h"

namespace lora {
namespace {

// GPT-2's bytes_to_unicode, written out independently of tokenizer.cc.
std::string ByteSymbol(int b) {
  int cp = b, extra = 0;
  const auto printable = [](int x) {
    return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255);
  };
  if (!printable(b)) {
    for (int x = 0; x < b; ++x) extra += printable(x) ? 0 : 1;
    cp = 256 + extra;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

// Tokens 0..255: the byte symbols in byte order; then `extra`; then one control token.
std::vector<std::string> Vocab(const std::vector<std::string>& extra) {
  std::vector<std::string> v;
  for (int b = 0; b < 256; ++b) v.push_back(ByteSymbol(b));
  v.insert(v.end(), extra.begin(), extra.end());
  v.push_back("<|im_end|>");
  return v;
}

BpeTokenizer Make(const std::vector<std::string>& extra, const std::vector<std::string>& merges) {
  std::vector<std::string> vocab = Vocab(extra);
  std::vector<int32_t> types(vocab.size(), BpeTokenizer::kNormal);
  types.back() = BpeTokenizer::kControl;
  BpeTokenizer t;
  zero::Status s = BpeTokenizer::Create(vocab, merges, types, -1, static_cast<int32_t>(vocab.size() - 1), &t);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return t;
}

TEST(LoraTokenizer, ByteAlphabetIsGpt2s) {
  EXPECT_EQ(ByteSymbol(' '), "\xc4\xa0");   // Ġ
  EXPECT_EQ(ByteSymbol('\n'), "\xc4\x8a");  // Ċ
  const BpeTokenizer t = Make({}, {});
  // Without merges every byte is its own token, id = byte here.
  const std::string all = [] {
    std::string s;
    for (int b = 0; b < 256; ++b) s.push_back(static_cast<char>(b));
    return s;
  }();
  const std::vector<int32_t> ids = t.Encode(all);
  ASSERT_EQ(ids.size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[static_cast<size_t>(b)], b) << "byte " << b;
  EXPECT_EQ(t.Decode(ids), all);
}

TEST(LoraTokenizer, MergesApplyInRankOrder) {
  const int ab = 256, abc = 257, bc = 258, cc = 259;
  // "a b" before "b c": abc merges a+b first, then ab+c.
  const BpeTokenizer first = Make({"ab", "abc", "bc", "cc"}, {"a b", "ab c", "b c", "c c"});
  EXPECT_EQ(first.Encode("abc"), std::vector<int32_t>({abc}));
  EXPECT_EQ(first.Encode("bc"), std::vector<int32_t>({bc}));
  // Same merges, "b c" ranked first: b+c wins although a+b is further left, and "a bc" is no merge.
  const BpeTokenizer second = Make({"ab", "abc", "bc", "cc"}, {"b c", "a b", "ab c", "c c"});
  EXPECT_EQ(second.Encode("abc"), std::vector<int32_t>({'a', bc}));
  EXPECT_EQ(second.Encode("ab"), std::vector<int32_t>({ab}));
  // Repeated pairs merge left to right without overlap: cccc -> cc cc, ccc -> cc c.
  EXPECT_EQ(first.Encode("cccc"), std::vector<int32_t>({cc, cc}));
  EXPECT_EQ(first.Encode("ccc"), std::vector<int32_t>({cc, 'c'}));
  // The space joins the word as Ġ; the lowest rank among Ġa (3), ab (0), bc (2) goes first: Ġ ab c -> Ġ abc.
  const BpeTokenizer spaced = Make({"ab", "abc", "bc",
                                    "\xc4\xa0"
                                    "a"},
                                   {"a b", "ab c", "b c", "\xc4\xa0 a"});
  EXPECT_EQ(spaced.Encode(" abc"), std::vector<int32_t>({' ', abc}));  // Ġ is byte 32's symbol, id 32 here
  EXPECT_EQ(spaced.Encode(" ac"), std::vector<int32_t>({259, 'c'}));   // Ġa then c
}

TEST(LoraTokenizer, PreTokenizerSplitsLikeSmolLm2) {
  using V = std::vector<std::string_view>;
  EXPECT_EQ(BpeTokenizer::PreTokenize("Hello world! It's 2024,  and\n\nyou"),
            V({"Hello", " world", "!", " It", "'s", " ", "2", "0", "2", "4", ",", " ", " and", "\n", "\n", "you"}));
  EXPECT_EQ(BpeTokenizer::PreTokenize("we'll DON'T i've x'd"),
            V({"we", "'ll", " DON", "'", "T", " i", "'ve", " x", "'d"}));
  EXPECT_EQ(BpeTokenizer::PreTokenize("a+=b;;  \t end  "), V({"a", "+=", "b", ";;", "  \t", " end", "  "}));
  EXPECT_EQ(BpeTokenizer::PreTokenize("caf\xc3\xa9 \xe2\x80\x94 \xc2\xbd"),  // café — ½
            V({"caf\xc3\xa9", " \xe2\x80\x94", " ", "\xc2\xbd"}));
  EXPECT_EQ(BpeTokenizer::PreTokenize(""), V());
  // The pieces always concatenate to the input, also for malformed UTF-8.
  const std::string odd = "\xff\xc3(x\xe2\x82 9\x80";
  std::string joined;
  for (std::string_view p : BpeTokenizer::PreTokenize(odd)) joined += p;
  EXPECT_EQ(joined, odd);
}

TEST(LoraTokenizer, DecodeEncodeRoundTrips) {
  const std::string e_acute = ByteSymbol(0xC3) + ByteSymbol(0xA9);  // é's two bytes as symbols: "Ã©"
  const BpeTokenizer t = Make({"th", "the", "\xc4\xa0the", "in", e_acute},
                              {"t h", "th e", "\xc4\xa0 the", "i n", ByteSymbol(0xC3) + " " + ByteSymbol(0xA9)});
  const std::vector<std::string> texts = {
      "the thin thing in the inn",
      "Tab\tand\r\nCRLF,   spaces   everywhere  ",
      "caf\xc3\xa9 na\xc3\xafve \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80 \xe2\x88\x91 1,000.5 \xc2\xbd",
      "\xff\xfe\x00\x01 malformed \xc3( \xe2\x82",
      std::string("nul\0inside", 10),
  };
  for (const std::string& s : texts) {
    const std::vector<int32_t> ids = t.Encode(s);
    EXPECT_EQ(t.Decode(ids), s);
    EXPECT_LE(ids.size(), s.size());
  }
  // Merges took effect: " the" is one token.
  EXPECT_EQ(t.Encode(" the").size(), 1u);
}

TEST(LoraTokenizer, SpecialTokensOnlyWhenAsked) {
  const BpeTokenizer t = Make({}, {});
  const int32_t end = t.vocab_size() - 1;
  EXPECT_EQ(t.Encode("hi<|im_end|>", /*special=*/true), std::vector<int32_t>({'h', 'i', end}));
  const std::vector<int32_t> plain = t.Encode("hi<|im_end|>");
  EXPECT_EQ(plain.size(), 12u);
  EXPECT_EQ(t.Decode(plain), "hi<|im_end|>");
  EXPECT_EQ(t.Decode(end), "<|im_end|>");
  EXPECT_EQ(t.eos(), end);
}

TEST(LoraTokenizer, BytesOutsideTheVocabularyAreDropped) {
  std::vector<std::string> vocab = Vocab({});
  vocab[4] = "<unused4>";  // byte 0x04 has no symbol, as in SmolLM2
  BpeTokenizer t;
  ASSERT_TRUE(BpeTokenizer::Create(vocab, {}, {}, -1, -1, &t).ok());
  EXPECT_FALSE(t.covers_byte(4));
  EXPECT_TRUE(t.covers_byte(5));
  EXPECT_EQ(t.Encode("a\x04"
                     "b"),
            std::vector<int32_t>({'a', 'b'}));
}

TEST(LoraTokenizer, CreateRejectsBadInput) {
  const auto fails = [](std::vector<std::string> vocab, std::vector<std::string> merges, std::vector<int32_t> types,
                        int32_t bos, const std::string& needle) {
    BpeTokenizer t;
    const zero::Status s = BpeTokenizer::Create(std::move(vocab), merges, std::move(types), bos, -1, &t);
    ASSERT_FALSE(s.ok()) << "accepted; expected: " << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
  };
  fails(Vocab({}), {"a"}, {}, -1, "not two symbols");
  fails(Vocab({}), {"a b c"}, {}, -1, "not two symbols");
  fails(Vocab({}), {"a b"}, {}, -1, "not in the vocabulary");
  fails(Vocab({"a"}), {}, {}, -1, "appears twice");
  fails(Vocab({}), {}, {1, 1}, -1, "token types");
  fails(Vocab({}), {}, {}, 100000, "out of range");
  fails({"a", "b", "c"}, {}, {}, -1, "byte symbols");
}

std::string TempPath(const std::string& name) {
  return "/tmp/lora_tokenizer_test_" + std::to_string(::getpid()) + "_" + name;
}

TEST(LoraTokenizer, FromGgufMetadata) {
  testing::GgufWriter w;
  w.String("general.architecture", "llama");
  w.String("tokenizer.ggml.model", "gpt2");
  std::vector<std::string> vocab = Vocab({"ab"});
  std::vector<int32_t> types(vocab.size(), BpeTokenizer::kNormal);
  types.back() = BpeTokenizer::kControl;
  w.Strings("tokenizer.ggml.tokens", vocab);
  w.Strings("tokenizer.ggml.merges", {"a b"});
  w.I32s("tokenizer.ggml.token_type", types);
  w.U32("tokenizer.ggml.bos_token_id", 257);
  w.U32("tokenizer.ggml.eos_token_id", 257);
  const std::string path = TempPath("ok.gguf");
  w.Write(path);
  std::unique_ptr<GgufFile> f;
  ASSERT_TRUE(GgufFile::Open(path, &f).ok());
  BpeTokenizer t;
  const zero::Status s = BpeTokenizer::FromGguf(*f, &t);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(t.vocab_size(), 258);
  EXPECT_EQ(t.Encode("ab<|im_end|>", true), std::vector<int32_t>({256, 257}));
  EXPECT_EQ(t.bos(), 257);
  ::unlink(path.c_str());

  // A SentencePiece ("llama") tokenizer is refused by name; a missing key names the key and the file.
  testing::GgufWriter spm;
  spm.String("tokenizer.ggml.model", "llama");
  const std::string spm_path = TempPath("spm.gguf");
  spm.Write(spm_path);
  ASSERT_TRUE(GgufFile::Open(spm_path, &f).ok());
  zero::Status bad = BpeTokenizer::FromGguf(*f, &t);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("'llama'"), std::string::npos) << bad.ToString();
  EXPECT_NE(bad.message().find(spm_path), std::string::npos) << bad.ToString();
  ::unlink(spm_path.c_str());
  testing::GgufWriter none;
  none.String("tokenizer.ggml.model", "gpt2");
  const std::string none_path = TempPath("none.gguf");
  none.Write(none_path);
  ASSERT_TRUE(GgufFile::Open(none_path, &f).ok());
  bad = BpeTokenizer::FromGguf(*f, &t);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("tokenizer.ggml.tokens"), std::string::npos) << bad.ToString();
  ::unlink(none_path.c_str());
}

}  // namespace
}  // namespace lora

// GGUF reader (examples/lora_finetune/gguf.h): a small writer here builds files with F32, F16, BF16, Q8_0 and
// Q4_1 tensors whose dequantized values are closed-form and exact, and metadata of every type; the reader must
// return them exactly (also for ranges that start and end mid-block), and must reject every truncation and a
// list of malformed files with a message naming the problem.
#include "examples/lora_finetune/gguf.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <optional>

#include "examples/lora_finetune/safetensors.h"  // FloatToHalf, FloatToBFloat16

namespace lora {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/gguf_test_" + std::to_string(::getpid()) + "_" + name;
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

template <typename T>
std::string Enc(T v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof v);
}
std::string EncStr(std::string_view s) { return Enc<uint64_t>(s.size()) + std::string(s); }
std::string EncArr(GgufType type, uint64_t count, const std::string& payload) {
  return Enc<uint32_t>(static_cast<uint32_t>(type)) + Enc<uint64_t>(count) + payload;
}
std::string EncHalf(float v) { return Enc<uint16_t>(FloatToHalf(v)); }

// ---- closed-form tensors --------------------------------------------------------------------------------------
// Each value is exact in float (and in the 16-bit formats), and the quantized ones are built from integer codes and
// power-of-two-ish scales so that d * q + m is exact: the reader must reproduce them bit for bit.

float F32Value(int64_t i) { return 0.25f * static_cast<float>(i) - 3.0f; }
float F16Value(int64_t i) { return static_cast<float>(i - 64) / 8.0f; }
float BF16Value(int64_t i) { return static_cast<float>(i - 2) * 0.5f; }
float Q8Scale(int64_t block) { return std::ldexp(1.0f, -static_cast<int>(block % 4)); }
int Q8Code(int64_t i) { return static_cast<int>((i * 37) % 255) - 127; }
float Q8Value(int64_t i) { return Q8Scale(i / 32) * static_cast<float>(Q8Code(i)); }
float Q41Scale(int64_t block) { return 0.5f * static_cast<float>(1 + block % 3); }
float Q41Min(int64_t block) { return -0.25f * static_cast<float>(block); }
int Q41Code(int64_t i) { return static_cast<int>((i * 7 + i / 32) % 16); }
float Q41Value(int64_t i) { return Q41Scale(i / 32) * static_cast<float>(Q41Code(i)) + Q41Min(i / 32); }

std::string F32Data(int64_t n) {
  std::string s;
  for (int64_t i = 0; i < n; ++i) s += Enc<float>(F32Value(i));
  return s;
}
std::string F16Data(int64_t n) {
  std::string s;
  for (int64_t i = 0; i < n; ++i) s += EncHalf(F16Value(i));
  return s;
}
std::string BF16Data(int64_t n) {
  std::string s;
  for (int64_t i = 0; i < n; ++i) s += Enc<uint16_t>(FloatToBFloat16(BF16Value(i)));
  return s;
}
std::string Q8Data(int64_t n) {
  std::string s;
  for (int64_t b = 0; b < n / 32; ++b) {
    s += EncHalf(Q8Scale(b));
    for (int j = 0; j < 32; ++j) s += Enc<int8_t>(static_cast<int8_t>(Q8Code(b * 32 + j)));
  }
  return s;
}
std::string Q41Data(int64_t n) {
  std::string s;
  for (int64_t b = 0; b < n / 32; ++b) {
    s += EncHalf(Q41Scale(b)) + EncHalf(Q41Min(b));
    for (int j = 0; j < 16; ++j) {  // element j in the low nibble, element j + 16 in the high nibble
      s += Enc<uint8_t>(static_cast<uint8_t>(Q41Code(b * 32 + j) | (Q41Code(b * 32 + j + 16) << 4)));
    }
  }
  return s;
}

// ---- the writer -----------------------------------------------------------------------------------------------

struct Tensor {
  std::string name;
  uint32_t type;
  std::vector<uint64_t> dims;  // GGUF order
  std::string data;
  std::function<float(int64_t)> value;  // expected dequantized value; empty for types the reader refuses
};

struct Builder {
  uint32_t version = 3;
  uint64_t alignment = 32;  // used for layout; written as general.alignment only when != 32 or forced
  bool write_alignment = false;
  std::string kvs;
  uint64_t kv_count = 0;
  std::vector<Tensor> tensors;
  // Corruptions.
  std::optional<uint64_t> tensor_count_override;
  std::optional<uint64_t> kv_count_override;
  std::map<size_t, uint64_t> offset_override;

  void Kv(const std::string& key, GgufType type, const std::string& payload) {
    kvs += EncStr(key) + Enc<uint32_t>(static_cast<uint32_t>(type)) + payload;
    ++kv_count;
  }

  std::string Build() const {
    std::string kv_bytes = kvs;
    uint64_t kv_n = kv_count;
    if (alignment != 32 || write_alignment) {
      kv_bytes += EncStr("general.alignment") + Enc<uint32_t>(static_cast<uint32_t>(GgufType::kUint32)) +
                  Enc<uint32_t>(static_cast<uint32_t>(alignment));
      ++kv_n;
    }
    std::string out = "GGUF" + Enc<uint32_t>(version) + Enc<uint64_t>(tensor_count_override.value_or(tensors.size())) +
                      Enc<uint64_t>(kv_count_override.value_or(kv_n)) + kv_bytes;
    std::vector<uint64_t> offsets;
    uint64_t at = 0;
    for (const Tensor& t : tensors) {
      offsets.push_back(at);
      at = (at + t.data.size() + alignment - 1) / alignment * alignment;
    }
    for (size_t k = 0; k < tensors.size(); ++k) {
      const Tensor& t = tensors[k];
      out += EncStr(t.name) + Enc<uint32_t>(static_cast<uint32_t>(t.dims.size()));
      for (uint64_t d : t.dims) out += Enc<uint64_t>(d);
      auto o = offset_override.find(k);
      out += Enc<uint32_t>(t.type) + Enc<uint64_t>(o != offset_override.end() ? o->second : offsets[k]);
    }
    // Data: each tensor at its aligned offset; nothing after the last one, so any cut removes needed bytes.
    while (out.size() % alignment != 0) out.push_back('\0');
    const size_t data_start = out.size();
    for (size_t k = 0; k < tensors.size(); ++k) {
      out.resize(data_start + offsets[k], '\0');
      out += tensors[k].data;
    }
    return out;
  }
};

Tensor MakeTensor(const std::string& name, GgmlType type, std::vector<uint64_t> dims) {
  int64_t n = 1;
  for (uint64_t d : dims) n *= static_cast<int64_t>(d);
  Tensor t{name, static_cast<uint32_t>(type), dims, {}, {}};
  switch (type) {
    case GgmlType::kF32:
      t.data = F32Data(n), t.value = F32Value;
      break;
    case GgmlType::kF16:
      t.data = F16Data(n), t.value = F16Value;
      break;
    case GgmlType::kBF16:
      t.data = BF16Data(n), t.value = BF16Value;
      break;
    case GgmlType::kQ8_0:
      t.data = Q8Data(n), t.value = Q8Value;
      break;
    case GgmlType::kQ4_1:
      t.data = Q41Data(n), t.value = Q41Value;
      break;
    case GgmlType::kQ4_K:
      t.data = std::string(static_cast<size_t>(n / 256 * 144), '\0');
      break;
    default:
      ADD_FAILURE() << "no generator for this type";
  }
  return t;
}

// Metadata of every type, and a tensor of each supported type (plus one the reader refuses to dequantize).
Builder Standard() {
  Builder b;
  b.Kv("general.architecture", GgufType::kString, EncStr("llama"));
  b.Kv("test.u8", GgufType::kUint8, Enc<uint8_t>(200));
  b.Kv("test.i8", GgufType::kInt8, Enc<int8_t>(-100));
  b.Kv("test.u16", GgufType::kUint16, Enc<uint16_t>(60000));
  b.Kv("test.i16", GgufType::kInt16, Enc<int16_t>(-30000));
  b.Kv("test.u32", GgufType::kUint32, Enc<uint32_t>(4000000000u));
  b.Kv("test.i32", GgufType::kInt32, Enc<int32_t>(-2000000000));
  b.Kv("test.f32", GgufType::kFloat32, Enc<float>(0.1f));
  b.Kv("test.bool", GgufType::kBool, Enc<uint8_t>(1));
  b.Kv("test.u64", GgufType::kUint64, Enc<uint64_t>(~uint64_t{0}));
  b.Kv("test.i64", GgufType::kInt64, Enc<int64_t>(-(int64_t{1} << 40)));
  b.Kv("test.f64", GgufType::kFloat64, Enc<double>(1e-300));
  b.Kv("tokenizer.ggml.tokens", GgufType::kArray,
       EncArr(GgufType::kString, 4, EncStr("a") + EncStr("\xc4\xa0the") + EncStr("") + EncStr("<|im_end|>")));
  b.Kv("tokenizer.ggml.token_type", GgufType::kArray,
       EncArr(GgufType::kInt32, 3, Enc<int32_t>(1) + Enc<int32_t>(-3) + Enc<int32_t>(6)));
  b.Kv("tokenizer.ggml.scores", GgufType::kArray, EncArr(GgufType::kFloat32, 2, Enc<float>(-1.5f) + Enc<float>(2.25f)));
  b.Kv("test.nested", GgufType::kArray,
       EncArr(GgufType::kArray, 2,
              EncArr(GgufType::kUint8, 2, Enc<uint8_t>(7) + Enc<uint8_t>(8)) + EncArr(GgufType::kBool, 0, "")));
  b.tensors.push_back(MakeTensor("f32", GgmlType::kF32, {8, 3}));
  b.tensors.push_back(MakeTensor("f16", GgmlType::kF16, {64, 2}));
  b.tensors.push_back(MakeTensor("q8_0", GgmlType::kQ8_0, {64, 3}));
  b.tensors.push_back(MakeTensor("q4_1", GgmlType::kQ4_1, {96, 2}));
  b.tensors.push_back(MakeTensor("bf16", GgmlType::kBF16, {5}));
  b.tensors.push_back(MakeTensor("q4_k", GgmlType::kQ4_K, {256, 1}));
  return b;
}

zero::Status OpenBytes(const std::string& bytes, const std::string& name, std::unique_ptr<GgufFile>* f) {
  const std::string path = TempPath(name);
  WriteAll(path, bytes);
  zero::Status s = GgufFile::Open(path, f);
  ::unlink(path.c_str());  // the open descriptor keeps the data readable
  return s;
}

// Opening must fail with a message naming the file and containing `needle`.
void ExpectRejected(const Builder& b, const std::string& needle) {
  std::unique_ptr<GgufFile> f;
  zero::Status s = OpenBytes(b.Build(), "bad.gguf", &f);
  ASSERT_FALSE(s.ok()) << "accepted a file that should fail with: " << needle;
  EXPECT_NE(s.message().find(TempPath("bad.gguf")), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
}

// ---- tests ----------------------------------------------------------------------------------------------------

TEST(GgufTest, MetadataOfEveryType) {
  std::unique_ptr<GgufFile> f;
  ASSERT_TRUE(OpenBytes(Standard().Build(), "meta.gguf", &f).ok());
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->metadata().size(), 16u);
  EXPECT_EQ(f->metadata()[0].first, "general.architecture");
  std::string s;
  ASSERT_TRUE(f->GetString("general.architecture", &s).ok());
  EXPECT_EQ(s, "llama");
  const std::map<std::string, int64_t> ints = {{"test.u8", 200},
                                               {"test.i8", -100},
                                               {"test.u16", 60000},
                                               {"test.i16", -30000},
                                               {"test.u32", 4000000000},
                                               {"test.i32", -2000000000},
                                               {"test.i64", -(int64_t{1} << 40)}};
  for (const auto& [key, want] : ints) {
    int64_t v = 0;
    ASSERT_TRUE(f->GetInt(key, &v).ok()) << key;
    EXPECT_EQ(v, want) << key;
  }
  double d = 0;
  ASSERT_TRUE(f->GetFloat("test.f32", &d).ok());
  EXPECT_EQ(d, static_cast<double>(0.1f));
  ASSERT_TRUE(f->GetFloat("test.f64", &d).ok());
  EXPECT_EQ(d, 1e-300);
  ASSERT_TRUE(f->GetFloat("test.u16", &d).ok());
  EXPECT_EQ(d, 60000.0);
  ASSERT_NE(f->FindValue("test.bool"), nullptr);
  EXPECT_EQ(f->FindValue("test.bool")->type, GgufType::kBool);
  EXPECT_EQ(f->FindValue("test.bool")->u, 1u);
  EXPECT_EQ(f->FindValue("test.u64")->u, ~uint64_t{0});

  std::vector<std::string> tokens;
  ASSERT_TRUE(f->GetStringArray("tokenizer.ggml.tokens", &tokens).ok());
  EXPECT_EQ(tokens, (std::vector<std::string>{"a", "\xc4\xa0the", "", "<|im_end|>"}));
  std::vector<int64_t> types;
  ASSERT_TRUE(f->GetIntArray("tokenizer.ggml.token_type", &types).ok());
  EXPECT_EQ(types, (std::vector<int64_t>{1, -3, 6}));
  std::vector<double> scores;
  ASSERT_TRUE(f->GetFloatArray("tokenizer.ggml.scores", &scores).ok());
  EXPECT_EQ(scores, (std::vector<double>{-1.5, 2.25}));
  const GgufValue* nested = f->FindValue("test.nested");
  ASSERT_NE(nested, nullptr);
  ASSERT_EQ(nested->element_type, GgufType::kArray);
  ASSERT_EQ(nested->array.size(), 2u);
  ASSERT_EQ(nested->array[0].array.size(), 2u);
  EXPECT_EQ(nested->array[0].array[1].u, 8u);
  EXPECT_EQ(nested->array[1].element_type, GgufType::kBool);
  EXPECT_TRUE(nested->array[1].array.empty());

  // Wrong type, missing key, and a uint64 beyond int64 name the key and the types.
  zero::Status st = f->GetString("test.u32", &s);
  EXPECT_NE(st.message().find("'test.u32' is uint32, expected a string"), std::string::npos) << st.ToString();
  st = f->GetInt("absent.key", nullptr);
  EXPECT_NE(st.message().find("no metadata key 'absent.key'"), std::string::npos) << st.ToString();
  int64_t big = 0;
  EXPECT_FALSE(f->GetInt("test.u64", &big).ok());
  st = f->GetStringArray("tokenizer.ggml.scores", &tokens);
  EXPECT_NE(st.message().find("is array of float32, expected an array of string"), std::string::npos) << st.ToString();
}

TEST(GgufTest, TensorDirectoryAndShapes) {
  const Builder b = Standard();
  std::unique_ptr<GgufFile> f;
  ASSERT_TRUE(OpenBytes(b.Build(), "dir.gguf", &f).ok());
  ASSERT_EQ(f->tensors().size(), b.tensors.size());
  EXPECT_EQ(f->data_start() % 32, 0u);
  const GgufTensor* q8 = f->Find("q8_0");
  ASSERT_NE(q8, nullptr);
  EXPECT_EQ(q8->type, GgmlType::kQ8_0);
  EXPECT_EQ(q8->dims, (std::vector<int64_t>{64, 3}));     // GGUF: innermost first
  EXPECT_EQ(q8->shape(), (std::vector<int64_t>{3, 64}));  // row-major [out, in]
  EXPECT_EQ(q8->numel(), 192);
  EXPECT_EQ(q8->bytes, 6u * 34);
  EXPECT_EQ(f->Find("q4_1")->bytes, 6u * 20);
  EXPECT_EQ(f->Find("f16")->bytes, 128u * 2);
  for (const GgufTensor& t : f->tensors()) EXPECT_EQ(t.offset % 32, 0u) << t.name;
  EXPECT_EQ(f->Find("nope"), nullptr);
}

TEST(GgufTest, DequantizesExactlyIncludingMidBlockRanges) {
  const Builder b = Standard();
  std::unique_ptr<GgufFile> f;
  ASSERT_TRUE(OpenBytes(b.Build(), "values.gguf", &f).ok());
  for (const Tensor& t : b.tensors) {
    if (!t.value) continue;
    SCOPED_TRACE(t.name);
    std::vector<float> all;
    ASSERT_TRUE(f->ReadFloat(t.name, &all).ok());
    const int64_t n = static_cast<int64_t>(all.size());
    ASSERT_EQ(n, f->Find(t.name)->numel());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(all[static_cast<size_t>(i)], t.value(i)) << "element " << i;
    // Every start, with lengths that end inside, at, and past block boundaries.
    for (int64_t first = 0; first <= n; ++first) {
      for (int64_t count :
           {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{31}, int64_t{32}, int64_t{33}, int64_t{70}, n - first}) {
        if (first + count > n) continue;
        std::vector<float> part(static_cast<size_t>(count) + 1, -12345.0f);
        ASSERT_TRUE(f->ReadRange(t.name, first, count, part.data()).ok()) << first << "+" << count;
        for (int64_t k = 0; k < count; ++k) {
          ASSERT_EQ(part[static_cast<size_t>(k)], t.value(first + k)) << first << "+" << count << " at " << k;
        }
        ASSERT_EQ(part[static_cast<size_t>(count)], -12345.0f) << "wrote past the range";
      }
    }
  }
  // A row-major row shard of an [out, in] matrix: row r is elements [r * in, (r + 1) * in).
  std::vector<float> row(96);
  ASSERT_TRUE(f->ReadRange("q4_1", 96, 96, row.data()).ok());
  for (int64_t c = 0; c < 96; ++c) EXPECT_EQ(row[static_cast<size_t>(c)], Q41Value(96 + c));
}

TEST(GgufTest, ReadRangeErrors) {
  std::unique_ptr<GgufFile> f;
  ASSERT_TRUE(OpenBytes(Standard().Build(), "errors.gguf", &f).ok());
  float out[8];
  zero::Status s = f->ReadRange("q4_k", 0, 8, out);
  EXPECT_NE(s.message().find("has type Q4_K, which this reader does not dequantize"), std::string::npos)
      << s.ToString();
  s = f->ReadRange("f32", 20, 5, out);
  EXPECT_NE(s.message().find("range [20, +5) is outside its 24 elements"), std::string::npos) << s.ToString();
  EXPECT_FALSE(f->ReadRange("f32", -1, 1, out).ok());
  s = f->ReadRange("missing", 0, 1, out);
  EXPECT_NE(s.message().find("no tensor named 'missing'"), std::string::npos) << s.ToString();
}

TEST(GgufTest, CustomAlignmentAndVersion2) {
  Builder b = Standard();
  b.alignment = 64;
  b.version = 2;
  std::unique_ptr<GgufFile> f;
  ASSERT_TRUE(OpenBytes(b.Build(), "align.gguf", &f).ok());
  EXPECT_EQ(f->version(), 2u);
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->data_start() % 64, 0u);
  std::vector<float> v;
  ASSERT_TRUE(f->ReadFloat("q4_1", &v).ok());
  for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], Q41Value(static_cast<int64_t>(i)));
}

TEST(GgufTest, EveryTruncationIsRejected) {
  const std::string full = Standard().Build();
  const std::string path = TempPath("cut.gguf");
  for (size_t cut = 0; cut < full.size(); ++cut) {
    WriteAll(path, full.substr(0, cut));
    std::unique_ptr<GgufFile> f;
    zero::Status s = GgufFile::Open(path, &f);
    ASSERT_FALSE(s.ok()) << "a file cut to " << cut << " of " << full.size() << " bytes was accepted";
    ASSERT_NE(s.message().find(path), std::string::npos) << s.ToString();
    const std::string& m = s.message();
    ASSERT_TRUE(m.find("truncated at byte") != std::string::npos || m.find("cannot fit") != std::string::npos ||
                m.find("remaining bytes") != std::string::npos || m.find("past the end") != std::string::npos)
        << "cut " << cut << ": " << s.ToString();
  }
  ::unlink(path.c_str());
}

// Overwriting any single header byte must give an error or a file whose reads stay inside it (never a crash).
TEST(GgufTest, CorruptedHeaderBytesNeverCrash) {
  const Builder b = Standard();
  const std::string full = b.Build();
  std::unique_ptr<GgufFile> good;
  ASSERT_TRUE(OpenBytes(full, "good.gguf", &good).ok());
  const std::string path = TempPath("corrupt.gguf");
  for (size_t at = 0; at < good->data_start(); ++at) {
    for (uint8_t byte : {uint8_t{0x00}, uint8_t{0xFF}, uint8_t{0x41}}) {
      std::string bytes = full;
      bytes[at] = static_cast<char>(byte);
      WriteAll(path, bytes);
      std::unique_ptr<GgufFile> f;
      if (!GgufFile::Open(path, &f).ok()) continue;
      for (const GgufTensor& t : f->tensors()) {
        std::vector<float> v;
        (void)f->ReadFloat(t.name, &v);
      }
    }
  }
  ::unlink(path.c_str());
}

TEST(GgufTest, RejectsMalformedFiles) {
  {
    std::string bytes = Standard().Build();
    bytes.replace(0, 4, "GGML");
    std::unique_ptr<GgufFile> f;
    zero::Status s = OpenBytes(bytes, "magic.gguf", &f);
    EXPECT_NE(s.message().find("not a GGUF file: magic is \"GGML\""), std::string::npos) << s.ToString();
  }
  {
    Builder b = Standard();
    b.version = 1;
    ExpectRejected(b, "unsupported GGUF version 1");
    b.version = 4;
    ExpectRejected(b, "unsupported GGUF version 4");
    b.version = 0x03000000;
    ExpectRejected(b, "big-endian");
  }
  {
    Builder b = Standard();
    b.tensor_count_override = uint64_t{1} << 40;
    ExpectRejected(b, "tensor count 1099511627776 cannot fit");
  }
  {
    Builder b = Standard();
    b.kv_count_override = ~uint64_t{0};
    ExpectRejected(b, "metadata key-value count 18446744073709551615 cannot fit");
  }
  {
    Builder b = Standard();
    b.kv_count_override = b.kv_count + 1;  // one more entry than present: reads into the tensor directory
    std::unique_ptr<GgufFile> f;
    EXPECT_FALSE(OpenBytes(b.Build(), "kv.gguf", &f).ok());
  }
  {
    Builder b;
    b.Kv("x", GgufType::kString, Enc<uint64_t>(uint64_t{1} << 50) + "abc");
    ExpectRejected(b, "reading the value of metadata key 'x' (length 1125899906842624)");
  }
  {
    Builder b;
    b.Kv("arr", GgufType::kArray, EncArr(GgufType::kUint64, uint64_t{1} << 60, ""));
    ExpectRejected(b, "claims 1152921504606846976 uint64 elements");
  }
  {
    Builder b;
    b.Kv("weird", static_cast<GgufType>(13), Enc<uint32_t>(0));
    ExpectRejected(b, "metadata key 'weird' has unknown value type 13");
  }
  {
    Builder b;
    b.Kv("flag", GgufType::kBool, Enc<uint8_t>(2));
    ExpectRejected(b, "is a bool with byte value 2");
  }
  {
    Builder b;
    b.Kv("dup", GgufType::kUint8, Enc<uint8_t>(1));
    b.Kv("dup", GgufType::kUint8, Enc<uint8_t>(2));
    ExpectRejected(b, "metadata key 'dup' appears twice");
  }
  {
    Builder b = Standard();
    b.alignment = 48;
    ExpectRejected(b, "general.alignment 48 is not a power of two");
  }
  {
    Builder b = Standard();
    b.offset_override[2] = 40;  // "q8_0" at a misaligned data offset
    ExpectRejected(b, "tensor 2 ('q8_0') has data offset 40, not a multiple of the alignment 32");
  }
  {
    Builder b = Standard();
    b.offset_override[3] = uint64_t{1} << 40;  // "q4_1" far past the end
    ExpectRejected(b, "tensor 3 ('q4_1') (Q4_1, 120 bytes at data offset 1099511627776");
  }
  {
    Builder b = Standard();
    b.tensors[5].data.pop_back();  // the last tensor ends one byte short
    std::string bytes = b.Build();
    std::unique_ptr<GgufFile> f;
    zero::Status s = OpenBytes(bytes, "short.gguf", &f);
    EXPECT_NE(s.message().find("tensor 5 ('q4_k')"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("extends past the end of the file"), std::string::npos) << s.ToString();
  }
  {
    Builder b = Standard();
    b.tensors[1].type = 99;
    ExpectRejected(b, "tensor 1 ('f16') has unknown ggml type 99");
  }
  {
    Builder b = Standard();
    b.offset_override[1] = 64;  // "f16" starts inside "f32" (data offsets 0..96)
    ExpectRejected(b, "overlap");
  }
  {
    Builder b = Standard();
    b.tensors[0].dims = {8, 0};
    ExpectRejected(b, "tensor 0 ('f32') has dimension 1 = 0 (must be positive)");
  }
  {
    Builder b = Standard();
    b.tensors[0].dims = {1, 1, 1, 1, 24};
    ExpectRejected(b, "tensor 0 ('f32') has 5 dimensions");
  }
  {
    Builder b = Standard();
    b.tensors[0].dims = {uint64_t{1} << 40, uint64_t{1} << 40};
    ExpectRejected(b, "the element count overflows");
  }
  {
    Builder b = Standard();
    b.tensors[2].dims = {48, 4};  // 192 elements, but rows of 48 are not whole Q8_0 blocks
    ExpectRejected(b, "innermost dimension 48 is not a multiple of the block size");
  }
  {
    Builder b = Standard();
    b.tensors[3].name = "q8_0";
    ExpectRejected(b, "tensor name 'q8_0' appears twice");
  }
  {
    std::unique_ptr<GgufFile> f;
    zero::Status s = GgufFile::Open(TempPath("does_not_exist.gguf"), &f);
    EXPECT_EQ(s.code(), zero::StatusCode::kIoError);
    EXPECT_NE(s.message().find("cannot open"), std::string::npos) << s.ToString();
  }
}

}  // namespace
}  // namespace lora

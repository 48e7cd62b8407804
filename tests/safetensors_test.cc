// safetensors writer/reader (examples/lora_finetune/safetensors.h): round trips, parallel range writes, exact
// 16-bit conversions, and rejection of malformed files with messages naming the problem.
#include "examples/lora_finetune/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

namespace lora {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/safetensors_test_" + std::to_string(::getpid()) + "_" + name;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// Closed-form values exactly representable in F16 and BF16: multiples of 1/8 up to 3 in magnitude.
float Value(int64_t i, int scale) { return static_cast<float>((i % 17) - 8) * 0.125f * static_cast<float>(scale); }

// Encodes floats into the dtype's little-endian bytes.
std::vector<uint8_t> Encode(DType dtype, const std::vector<float>& values) {
  std::vector<uint8_t> out;
  for (float v : values) {
    if (dtype == DType::kF32) {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      for (int b = 0; b < 4; ++b) out.push_back(static_cast<uint8_t>(bits >> (8 * b)));
    } else {
      uint16_t bits = dtype == DType::kF16 ? FloatToHalf(v) : FloatToBFloat16(v);
      out.push_back(static_cast<uint8_t>(bits));
      out.push_back(static_cast<uint8_t>(bits >> 8));
    }
  }
  return out;
}

struct Model {
  std::vector<TensorSpec> specs;
  std::vector<std::vector<float>> values;
  std::vector<std::vector<uint8_t>> bytes;
  std::map<std::string, std::string> metadata;
};

Model MakeModel() {
  Model m;
  m.specs = {{"model.embed_tokens.weight", DType::kF32, {6, 4}},
             {"model.layers.0.self_attn.q_proj.weight", DType::kF16, {4, 4}},
             {"model.layers.0.input_layernorm.weight", DType::kBF16, {4}},
             {"scalar", DType::kF32, {}},
             {"empty", DType::kBF16, {0, 3}}};
  for (size_t t = 0; t < m.specs.size(); ++t) {
    int64_t n = 1;
    for (int64_t d : m.specs[t].shape) n *= d;
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = Value(i, static_cast<int>(t) % 3 + 1);
    m.bytes.push_back(Encode(m.specs[t].dtype, v));
    m.values.push_back(std::move(v));
  }
  m.metadata = {{"format", "pt"},
                {"config", "{\"dim\": 4, \"name\": \"tiny \\\\ \\\"q\\\"\"}"},
                {"note", "line1\nline2\ttab \xc3\xa9 \x01"}};
  return m;
}

std::vector<TensorData> AsData(const Model& m) {
  std::vector<TensorData> data;
  for (size_t t = 0; t < m.specs.size(); ++t) data.push_back({m.specs[t], m.bytes[t].data()});
  return data;
}

TEST(SafetensorsConvert, HalfAndBFloat16RoundTripEveryBitPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
    } else {
      ASSERT_EQ(FloatToHalf(f), h) << "half bits " << h;
    }
    float b = BFloat16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(b)) {
      EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(b))));
    } else {
      ASSERT_EQ(FloatToBFloat16(b), h) << "bf16 bits " << h;
    }
  }
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  // Ties go to even; overflow to infinity.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7C00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
}

TEST(Safetensors, SaveThenReadRoundTripsAllDtypesAndMetadata) {
  Model m = MakeModel();
  std::string path = TempPath("roundtrip.safetensors");
  ASSERT_TRUE(Save(path, AsData(m), m.metadata).ok());
  std::unique_ptr<Reader> reader;
  zero::Status s = Reader::Open(path, &reader);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(reader->metadata(), m.metadata);
  ASSERT_EQ(reader->tensors().size(), m.specs.size());
  for (size_t t = 0; t < m.specs.size(); ++t) {
    const TensorInfo* info = reader->Find(m.specs[t].name);
    ASSERT_NE(info, nullptr) << m.specs[t].name;
    EXPECT_EQ(info->dtype, m.specs[t].dtype);
    EXPECT_EQ(info->shape, m.specs[t].shape);
    std::vector<float> got;
    ASSERT_TRUE(reader->ReadFloat(m.specs[t].name, &got).ok());
    EXPECT_EQ(got, m.values[t]) << m.specs[t].name;
    std::vector<uint8_t> raw;
    ASSERT_TRUE(reader->ReadBytes(m.specs[t].name, &raw).ok());
    EXPECT_EQ(raw, m.bytes[t]);
  }
  // An element range from the middle.
  std::vector<float> part(5);
  ASSERT_TRUE(reader->ReadRange("model.embed_tokens.weight", 7, 5, part.data()).ok());
  EXPECT_EQ(part, std::vector<float>(m.values[0].begin() + 7, m.values[0].begin() + 12));
  zero::Status bad = reader->ReadRange("model.embed_tokens.weight", 20, 5, part.data());
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("outside its 24 elements"), std::string::npos) << bad.message();
  EXPECT_FALSE(reader->ReadFloat("missing", &part).ok());
  std::remove(path.c_str());
}

TEST(Safetensors, HeaderIsPaddedJsonInSpecOrder) {
  Layout layout;
  ASSERT_TRUE(ComputeLayout({{"b", DType::kF16, {3}}, {"a", DType::kF32, {2, 1}}}, {{"k", "v"}}, &layout).ok());
  EXPECT_EQ(layout.header.size() % 8, 0u);
  EXPECT_EQ(layout.data_start % 8, 0u);
  std::string json = layout.header.substr(0, layout.header.find_last_not_of(' ') + 1);
  EXPECT_EQ(json,
            "{\"__metadata__\":{\"k\":\"v\"},\"b\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,6]},"
            "\"a\":{\"dtype\":\"F32\",\"shape\":[2,1],\"data_offsets\":[6,14]}}");
  EXPECT_EQ(layout.file_size, layout.data_start + 14);
  EXPECT_EQ(layout.Find("a"), 1);

  Layout dup;
  zero::Status s = ComputeLayout({{"x", DType::kF32, {1}}, {"x", DType::kF32, {1}}}, {}, &dup);
  EXPECT_NE(s.message().find("'x' appears twice"), std::string::npos) << s.ToString();
  s = ComputeLayout({{"y", DType::kF32, {2, -1}}}, {}, &dup);
  EXPECT_NE(s.message().find("invalid shape [2, -1]"), std::string::npos) << s.ToString();
}

// Four writers, each owning an interleaved set of element chunks of every tensor, reproduce Save's bytes.
TEST(Safetensors, ParallelRangeWritesEqualSave) {
  Model m = MakeModel();
  std::string saved = TempPath("serial.safetensors");
  std::string parallel = TempPath("parallel.safetensors");
  ASSERT_TRUE(Save(saved, AsData(m), m.metadata).ok());

  Layout layout;  // each "rank" would compute this itself; it is deterministic
  ASSERT_TRUE(ComputeLayout(m.specs, m.metadata, &layout).ok());
  ASSERT_TRUE(WriteHeader(parallel, layout).ok());
  constexpr int kWriters = 4;
  constexpr int64_t kChunk = 3;
  std::vector<std::thread> threads;
  std::vector<zero::Status> statuses(kWriters);
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      for (size_t t = 0; t < m.specs.size(); ++t) {
        const int64_t n = static_cast<int64_t>(m.values[t].size());
        for (int64_t first = w * kChunk; first < n; first += kWriters * kChunk) {
          int64_t count = std::min(kChunk, n - first);
          // Half the writers pass dtype bytes, the others floats converted by the writer.
          zero::Status s = w % 2 == 0 ? WriteRange(parallel, layout, static_cast<int>(t), first, count,
                                                   m.bytes[t].data() + first * DTypeSize(m.specs[t].dtype))
                                      : WriteRangeFromFloat(parallel, layout, static_cast<int>(t), first, count,
                                                            m.values[t].data() + first);
          if (!s.ok()) statuses[w] = s;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const zero::Status& s : statuses) EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(ReadAll(parallel), ReadAll(saved));
  std::remove(saved.c_str());
  std::remove(parallel.c_str());
}

TEST(Safetensors, WriteRangeChecksTheFileAndTheRange) {
  Layout layout;
  ASSERT_TRUE(ComputeLayout({{"w", DType::kF32, {4}}}, {}, &layout).ok());
  std::string path = TempPath("norange.safetensors");
  std::remove(path.c_str());
  float data[4] = {1, 2, 3, 4};
  zero::Status s = WriteRange(path, layout, 0, 0, 4, data);
  EXPECT_NE(s.message().find("WriteHeader"), std::string::npos) << s.ToString();
  WriteAll(path, "short");
  s = WriteRange(path, layout, 0, 0, 4, data);
  EXPECT_NE(s.message().find("run WriteHeader"), std::string::npos) << s.ToString();
  ASSERT_TRUE(WriteHeader(path, layout).ok());
  s = WriteRange(path, layout, 0, 2, 3, data);
  EXPECT_NE(s.message().find("tensor 'w': elements [2, +3) outside its 4 elements"), std::string::npos) << s.ToString();
  s = WriteRange(path, layout, 1, 0, 1, data);
  EXPECT_NE(s.message().find("tensor index 1 out of range"), std::string::npos) << s.ToString();
  std::remove(path.c_str());
}

// A file from a header string, data bytes, and optionally a forged header length.
std::string MakeFile(const std::string& header, size_t data_bytes, int64_t forged_len = -1) {
  uint64_t len = forged_len >= 0 ? static_cast<uint64_t>(forged_len) : header.size();
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(len >> (8 * i)));
  return out + header + std::string(data_bytes, '\x11');
}

struct BadCase {
  const char* name;
  std::string bytes;
  const char* expected;  // substring of the message
};

TEST(Safetensors, MalformedFilesAreRejectedWithTheProblem) {
  const std::string t1 = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::vector<BadCase> cases = {
      {"truncated_length", std::string("\x10\x00\x00", 3), "too short for the 8-byte header length"},
      {"header_past_eof", MakeFile("{" + t1 + "}", 8, 1000), "header length 1000 runs past the end of the file"},
      {"huge_header", MakeFile("{}", 0, int64_t{1} << 40), "exceeds the 100000000-byte limit"},
      {"bad_json", MakeFile(R"({"a":{"dtype":"F32","shape":[2],)", 8), "header JSON: expected a string key"},
      {"trailing_json", MakeFile("{" + t1 + "}}", 8), "after the JSON value"},
      {"not_object", MakeFile("[1,2]", 0), "header JSON is an array, not an object"},
      {"float_in_shape", MakeFile(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8),
       "non-integer number"},
      {"unknown_dtype", MakeFile(R"({"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2),
       "tensor 'a': unknown or unsupported dtype 'F8_E4M3'"},
      {"missing_field", MakeFile(R"({"a":{"dtype":"F32","shape":[2]}})", 8),
       "tensor 'a': missing field 'data_offsets'"},
      {"unknown_field", MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8),
       "tensor 'a': unknown field 'x'"},
      {"shape_mismatch", MakeFile(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "tensor 'a': shape [3] x F32 is 12 bytes but data_offsets [0, 8] span 8"},
      {"negative_dim", MakeFile(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "tensor 'a': shape has an entry that is not a non-negative integer"},
      {"overlap", MakeFile("{" + t1 + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       "tensor 'b' data_offsets [4, 12] overlap tensor 'a' [0, 8]"},
      {"gap", MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       "gap of 4 bytes before tensor 'a'"},
      {"past_eof", MakeFile(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
       "tensor 'a': data_offsets end 16 is past the end of the file (the data section has 8 bytes)"},
      {"trailing_data", MakeFile("{" + t1 + "}", 12), "4 unused bytes after the last tensor"},
      {"duplicate", MakeFile("{" + t1 + "," + t1 + "}", 8), "key 'a' appears twice"},
      {"metadata_not_string", MakeFile(R"({"__metadata__":{"k":1}})", 0),
       "__metadata__ value for 'k' is an integer, not a string"},
      {"bad_escape", MakeFile(R"({"__metadata__":{"k":"\q"}})", 0), "bad escape '\\q'"},
      {"lone_surrogate", MakeFile(R"({"__metadata__":{"k":"\udc00"}})", 0), "unpaired surrogate"},
  };
  for (const BadCase& c : cases) {
    std::string path = TempPath(std::string("bad_") + c.name + ".safetensors");
    WriteAll(path, c.bytes);
    std::unique_ptr<Reader> reader;
    zero::Status s = Reader::Open(path, &reader);
    EXPECT_FALSE(s.ok()) << c.name;
    EXPECT_EQ(reader, nullptr) << c.name;
    EXPECT_NE(s.message().find(path + ": not a valid safetensors file"), std::string::npos)
        << c.name << ": " << s.message();
    EXPECT_NE(s.message().find(c.expected), std::string::npos) << c.name << ": " << s.message();
    std::remove(path.c_str());
  }
  std::unique_ptr<Reader> reader;
  zero::Status s = Reader::Open(TempPath("does_not_exist"), &reader);
  EXPECT_EQ(s.code(), zero::StatusCode::kIoError);
}

TEST(Safetensors, ParsesEscapesAndUnicodeFromOtherWriters) {
  // Whitespace, key order and escapes as another writer might produce them.
  std::string header = R"({ "b" : {"shape": [1], "dtype": "BF16", "data_offsets": [4, 6]},
    "__metadata__": {"s\u00e9": "\ud83d\ude00\/\"\\\n"}, "a": {"data_offsets": [0, 4], "shape": [], "dtype": "F32"} })";
  std::string bytes = MakeFile(header, 0);
  uint8_t data[6] = {0, 0, 0x80, 0x3F, 0x40, 0xC0};  // F32 1.0, BF16 -3.0
  bytes.append(reinterpret_cast<const char*>(data), 6);
  std::string path = TempPath("escapes.safetensors");
  WriteAll(path, bytes);
  std::unique_ptr<Reader> reader;
  zero::Status s = Reader::Open(path, &reader);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(reader->metadata().at("s\xc3\xa9"), "\xf0\x9f\x98\x80/\"\\\n");
  EXPECT_EQ(reader->tensors()[0].name, "a");  // sorted by offset
  std::vector<float> v;
  ASSERT_TRUE(reader->ReadFloat("a", &v).ok());
  EXPECT_EQ(v, std::vector<float>{1.0f});
  ASSERT_TRUE(reader->ReadFloat("b", &v).ok());
  EXPECT_EQ(v, std::vector<float>{-3.0f});
  std::remove(path.c_str());
}

// The file tests/safetensors_numpy_check.py reads (ctest fixture: LORA_SAFETENSORS_FIXTURE names the path). Its
// command line in tests/CMakeLists.txt states the expected tensors and metadata independently of this code.
// Without the variable it writes to a temporary file and checks it here.
TEST(NumpyFixture, Write) {
  const char* env = std::getenv("LORA_SAFETENSORS_FIXTURE");
  std::string path = env ? env : TempPath("fixture.safetensors");
  Model m = MakeModel();
  std::map<std::string, std::string> metadata = {{"format", "pt"}, {"config", "{\"dim\": 4}"}};
  Layout layout;
  ASSERT_TRUE(ComputeLayout(m.specs, metadata, &layout).ok());
  ASSERT_TRUE(WriteHeader(path, layout).ok());
  for (size_t t = 0; t < m.specs.size(); ++t) {
    ASSERT_TRUE(WriteRangeFromFloat(path, layout, static_cast<int>(t), 0, static_cast<int64_t>(m.values[t].size()),
                                    m.values[t].data())
                    .ok());
  }
  std::unique_ptr<Reader> reader;
  ASSERT_TRUE(Reader::Open(path, &reader).ok());
  if (!env) std::remove(path.c_str());
}

}  // namespace
}  // namespace lora

// GGUF files (the ggml / llama.cpp format, versions 2 and 3, little-endian): a validating reader of the metadata
// and tensor directory, and range reads that dequantize F32 / F16 / BF16 / Q8_0 / Q4_1 tensors to float.
//
// File layout (all integers little-endian):
//   "GGUF" u32 version, u64 tensor_count, u64 metadata_kv_count,
//   metadata_kv_count x { string key, u32 value_type, value },
//   tensor_count x { string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset },
//   zero padding to `alignment`, then the data section; a tensor's offset is relative to the data section and a
//   multiple of `alignment` (metadata "general.alignment", default 32).
// A string is u64 length + bytes (no terminator); an array is u32 element_type, u64 count, count values.
//
// Dimension order: GGUF lists dims innermost (fastest-varying) first, as ggml's ne[0], ne[1], ... For a linear
// layer's weight stored as PyTorch row-major [out, in], the GGUF dims are {in, out}: element (r, c) of the
// row-major matrix is flat element r * in + c. GgufTensor::shape() returns the row-major order (dims reversed),
// and ReadRange counts elements in that flat order, so a row-major shard [first_row, last_row) of an [out, in]
// matrix is elements [first_row * in, last_row * in).
//
// Quantized blocks (32 elements each, along dims[0]; dims[0] must be a multiple of 32):
//   Q8_0: f16 d, int8 q[32];            value[j] = d * q[j]
//   Q4_1: f16 d, f16 m, u8 qs[16];      value[j] = d * nibble[j] + m, where elements 0..15 are the low nibbles of
//                                        qs[0..15] and elements 16..31 the high nibbles.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "zero/status.h"

namespace lora {

// Metadata value types, numbered as in the file.
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* GgufTypeName(GgufType type);  // "uint32", "string", "array", ...

// ggml tensor types, numbered as in the file. Only those named here are recognised; Open rejects others.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kBF16 = 30,
};
const char* GgmlTypeName(GgmlType type);  // "F32", "Q8_0", ...; "unknown" for values not listed above
// Whether ReadRange converts this type to float (F32, F16, BF16, Q8_0, Q4_1).
bool GgmlTypeDequantizable(GgmlType type);

// One metadata value. Scalars: integers in `i` (signed types) or `u` (unsigned types and bool), floats in `f`,
// strings in `s`. Arrays: `element_type` and `array` (each element a scalar of that type, or a nested array).
struct GgufValue {
  GgufType type = GgufType::kUint8;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string s;
  GgufType element_type = GgufType::kUint8;
  std::vector<GgufValue> array;
};

struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<int64_t> dims;  // GGUF order, innermost first (ne[0], ne[1], ...); each >= 1
  uint64_t offset = 0;        // bytes, relative to the data section; a multiple of the alignment
  uint64_t bytes = 0;         // size of the data in the file
  int64_t numel() const;
  std::vector<int64_t> shape() const;  // row-major order: dims reversed ({in, out} -> {out, in})
};

// A validated, open GGUF file. Reads use pread: const methods are thread-safe. Move-only (by unique_ptr).
class GgufFile {
 public:
  // Parses and validates the header, metadata and tensor directory against the file size: counts and lengths
  // fit in the bytes that remain, dims are positive and their product fits, types are known, offsets are aligned,
  // every tensor lies inside the file, and no two overlap. Failures name the file, the byte offset or tensor, and
  // the problem ("truncated at byte 1234 reading the name of tensor 7").
  static zero::Status Open(const std::string& path, std::unique_ptr<GgufFile>* file);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_start() const { return data_start_; }  // absolute byte offset of the data section
  uint64_t file_size() const { return file_size_; }

  // Metadata in file order; keys are unique.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const GgufValue* FindValue(std::string_view key) const;  // nullptr when absent
  // Typed accessors: a missing key or a value of another type is an error naming the key and both types.
  zero::Status GetString(std::string_view key, std::string* out) const;
  zero::Status GetInt(std::string_view key, int64_t* out) const;   // any integer type (uint64 must fit int64)
  zero::Status GetFloat(std::string_view key, double* out) const;  // float32, float64, or any integer type
  zero::Status GetStringArray(std::string_view key, std::vector<std::string>* out) const;
  zero::Status GetIntArray(std::string_view key, std::vector<int64_t>* out) const;
  zero::Status GetFloatArray(std::string_view key, std::vector<double>* out) const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }  // in file (directory) order
  const GgufTensor* Find(std::string_view name) const;                 // nullptr when absent

  // Elements [first_element, first_element + count) of `name` in row-major flat order (see the top of this file),
  // as float. Reads and dequantizes only the blocks that cover the range, in bounded chunks. An unsupported type
  // is an error naming it.
  zero::Status ReadRange(std::string_view name, int64_t first_element, int64_t count, float* out) const;
  // The whole tensor; resizes *out to numel.
  zero::Status ReadFloat(std::string_view name, std::vector<float>* out) const;

 private:
  class Parser;
  GgufFile() = default;
  std::string path_;
  int fd_ = -1;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_start_ = 0;
  uint64_t file_size_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::map<std::string, size_t, std::less<>> metadata_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace lora

// safetensors files (the Hugging Face format): a layout computed identically on every rank, a header written
// once, tensor element ranges written in parallel with pwrite by whichever rank owns them, and a validating
// reader that returns float.
//
// File format: an 8-byte little-endian header length N, then N bytes of JSON
//   {"__metadata__": {"k": "v", ...}, "name": {"dtype": "F32"|"F16"|"BF16", "shape": [d0, d1, ...],
//                                              "data_offsets": [begin, end]}, ...}
// padded with spaces so that 8 + N is a multiple of 8, then the tensor data, little-endian, row-major.
// Offsets are relative to the first data byte. This writer places the tensors contiguously in the order given.
//
// Parallel protocol (no rank holds the whole model):
//   1. every rank calls ComputeLayout with the same specs and metadata (the result is a pure function of them);
//   2. rank 0 calls WriteHeader, which creates the file at its final size (data zero-filled);
//   3. after a barrier, each rank calls WriteRange for the element ranges it owns (disjoint ranges may be
//      written concurrently from any process or thread; they never touch the same bytes).
// Save does all three in one process, atomically (temporary file + rename).
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

enum class DType { kF32, kF16, kBF16 };

const char* DTypeName(DType dtype);  // "F32", "F16", "BF16"
size_t DTypeSize(DType dtype);       // bytes per element
bool ParseDType(std::string_view name, DType* dtype);

// Exact conversions from 16-bit floats, and round-to-nearest-even conversions to them (NaN stays NaN,
// overflow becomes infinity).
float HalfToFloat(uint16_t h);
float BFloat16ToFloat(uint16_t b);
uint16_t FloatToHalf(float f);
uint16_t FloatToBFloat16(float f);

struct TensorSpec {
  std::string name;  // unique, non-empty, not "__metadata__"
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // each dimension >= 0; {} is a scalar (1 element)
};

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data section: [begin, end)
  uint64_t end = 0;
  int64_t numel() const;
};

struct Layout {
  std::vector<TensorInfo> tensors;              // in file order (increasing offsets)
  std::map<std::string, std::string> metadata;  // "__metadata__"
  std::string header;                           // the JSON, space-padded; header.size() % 8 == 0
  uint64_t data_start = 0;                      // 8 + header.size()
  uint64_t file_size = 0;                       // data_start + total data bytes
  // Index into tensors, or -1.
  int Find(std::string_view name) const;
};

// Deterministic: the same specs and metadata give the same layout and header bytes on every rank.
zero::Status ComputeLayout(const std::vector<TensorSpec>& specs, const std::map<std::string, std::string>& metadata,
                           Layout* layout);

// Creates (or truncates) `path`, writes the length and the header, and extends the file to layout.file_size with
// zeros. REQUIRES: called once, before any WriteRange on this path.
zero::Status WriteHeader(const std::string& path, const Layout& layout);

// Writes elements [first_element, first_element + count) of tensor `tensor_index`; `data` holds `count` elements
// already in the tensor's dtype (little-endian). Fails if the file is not layout.file_size bytes (WriteHeader
// not yet run, or run with another layout). Thread-safe for disjoint ranges.
zero::Status WriteRange(const std::string& path, const Layout& layout, int tensor_index, int64_t first_element,
                        int64_t count, const void* data);
// Same, from float: converts to the tensor's dtype (round to nearest even) before writing.
zero::Status WriteRangeFromFloat(const std::string& path, const Layout& layout, int tensor_index, int64_t first_element,
                                 int64_t count, const float* data);

// A whole tensor for Save: `data` holds numel elements in spec.dtype.
struct TensorData {
  TensorSpec spec;
  const void* data = nullptr;
};
// Single-process convenience: writes the whole file to `path` + ".tmp" and renames it into place.
zero::Status Save(const std::string& path, const std::vector<TensorData>& tensors,
                  const std::map<std::string, std::string>& metadata);

// A validated, open safetensors file. Reads use pread: const methods are thread-safe. Move-only.
class Reader {
 public:
  // Parses and validates the whole header against the file size; every failure names the file, the tensor (when
  // there is one) and the problem.
  static zero::Status Open(const std::string& path, std::unique_ptr<Reader>* reader);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // sorted by offset
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t data_start() const { return data_start_; }
  const TensorInfo* Find(std::string_view name) const;

  // Elements [first_element, first_element + count) of `name` as float (F16/BF16 widened exactly).
  zero::Status ReadRange(std::string_view name, int64_t first_element, int64_t count, float* out) const;
  // The whole tensor; resizes *out to numel.
  zero::Status ReadFloat(std::string_view name, std::vector<float>* out) const;
  // The raw little-endian bytes of the whole tensor.
  zero::Status ReadBytes(std::string_view name, std::vector<uint8_t>* out) const;

 private:
  Reader() = default;
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace lora

// A minimal GGUF v3 writer for the LoRA example's tests: metadata (strings, integers, floats, arrays of strings and
// int32) and F32 tensors given in row-major order. It writes what llama.cpp's converter writes for these types; the
// reader's own validation is tested in gguf_test.cc with a lower-level builder.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "examples/lora_finetune/gguf.h"

namespace lora::testing {

class GgufWriter {
 public:
  void String(const std::string& key, const std::string& v) { Key(key, GgufType::kString), Str(v); }
  void U32(const std::string& key, uint32_t v) { Key(key, GgufType::kUint32), Raw(v); }
  void I32(const std::string& key, int32_t v) { Key(key, GgufType::kInt32), Raw(v); }
  void F32(const std::string& key, float v) { Key(key, GgufType::kFloat32), Raw(v); }
  void Strings(const std::string& key, const std::vector<std::string>& v) {
    Key(key, GgufType::kArray);
    Raw(static_cast<uint32_t>(GgufType::kString)), Raw(static_cast<uint64_t>(v.size()));
    for (const std::string& s : v) Str(s);
  }
  void I32s(const std::string& key, const std::vector<int32_t>& v) {
    Key(key, GgufType::kArray);
    Raw(static_cast<uint32_t>(GgufType::kInt32)), Raw(static_cast<uint64_t>(v.size()));
    for (int32_t x : v) Raw(x);
  }
  // `shape` row-major (PyTorch order); written with GGUF's reversed dims.
  void Tensor(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& data) {
    tensors_.push_back({name, shape, data});
  }

  std::string Bytes() const {
    std::string out = "GGUF";
    auto raw = [&](auto v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); };
    auto str = [&](const std::string& s) { raw(static_cast<uint64_t>(s.size())), out += s; };
    raw(uint32_t{3});
    raw(static_cast<uint64_t>(tensors_.size()));
    raw(kv_count_);
    out += kvs_;
    uint64_t at = 0;
    std::vector<uint64_t> offsets;
    for (const T& t : tensors_) {
      offsets.push_back(at);
      at = (at + t.data.size() * 4 + 31) / 32 * 32;
    }
    for (size_t k = 0; k < tensors_.size(); ++k) {
      str(tensors_[k].name);
      raw(static_cast<uint32_t>(tensors_[k].shape.size()));
      for (auto d = tensors_[k].shape.rbegin(); d != tensors_[k].shape.rend(); ++d) raw(static_cast<uint64_t>(*d));
      raw(static_cast<uint32_t>(GgmlType::kF32));
      raw(offsets[k]);
    }
    while (out.size() % 32 != 0) out.push_back('\0');
    const size_t start = out.size();
    for (size_t k = 0; k < tensors_.size(); ++k) {
      out.resize(start + offsets[k], '\0');
      out.append(reinterpret_cast<const char*>(tensors_[k].data.data()), tensors_[k].data.size() * 4);
    }
    return out;
  }
  void Write(const std::string& path) const {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << Bytes();
  }

 private:
  struct T {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> data;
  };
  template <typename V>
  void Raw(V v) {
    kvs_.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void Str(const std::string& s) { Raw(static_cast<uint64_t>(s.size())), kvs_ += s; }
  void Key(const std::string& key, GgufType type) {
    Str(key);
    Raw(static_cast<uint32_t>(type));
    ++kv_count_;
  }
  std::string kvs_;
  uint64_t kv_count_ = 0;
  std::vector<T> tensors_;
};

}  // namespace lora::testing

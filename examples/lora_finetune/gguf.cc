// GGUF reader: header, metadata and tensor directory parsed through a bounds-checked buffered cursor, validated
// against the file size before anything is allocated, and range reads that dequantize block by block.
#include "examples/lora_finetune/gguf.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <span>
#include <utility>

#include "examples/lora_finetune/safetensors.h"  // HalfToFloat, BFloat16ToFloat

namespace lora {
namespace {

using zero::Status;

static_assert(std::endian::native == std::endian::little, "the GGUF reader assumes a little-endian host");

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint64_t kDefaultAlignment = 32;
constexpr int kMaxArrayDepth = 8;
constexpr uint32_t kMaxDims = 4;  // ggml's GGML_MAX_DIMS
// ReadRange reads at most this many bytes per pread, so a rank's scratch stays small whatever the range.
constexpr uint64_t kChunkBytes = uint64_t{1} << 20;

// Elements per block and bytes per block of each recognised ggml type; block == 0 for unknown values.
struct TypeTraits {
  const char* name;
  uint64_t block;
  uint64_t bytes;
};

TypeTraits Traits(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return {"F32", 1, 4};
    case GgmlType::kF16:
      return {"F16", 1, 2};
    case GgmlType::kQ4_0:
      return {"Q4_0", 32, 18};
    case GgmlType::kQ4_1:
      return {"Q4_1", 32, 20};
    case GgmlType::kQ5_0:
      return {"Q5_0", 32, 22};
    case GgmlType::kQ5_1:
      return {"Q5_1", 32, 24};
    case GgmlType::kQ8_0:
      return {"Q8_0", 32, 34};
    case GgmlType::kQ8_1:
      return {"Q8_1", 32, 36};
    case GgmlType::kQ2_K:
      return {"Q2_K", 256, 84};
    case GgmlType::kQ3_K:
      return {"Q3_K", 256, 110};
    case GgmlType::kQ4_K:
      return {"Q4_K", 256, 144};
    case GgmlType::kQ5_K:
      return {"Q5_K", 256, 176};
    case GgmlType::kQ6_K:
      return {"Q6_K", 256, 210};
    case GgmlType::kQ8_K:
      return {"Q8_K", 256, 292};
    case GgmlType::kI8:
      return {"I8", 1, 1};
    case GgmlType::kI16:
      return {"I16", 1, 2};
    case GgmlType::kI32:
      return {"I32", 1, 4};
    case GgmlType::kI64:
      return {"I64", 1, 8};
    case GgmlType::kF64:
      return {"F64", 1, 8};
    case GgmlType::kBF16:
      return {"BF16", 1, 2};
  }
  return {"unknown", 0, 0};
}

// Smallest encoding of one value of each metadata type: bounds array counts before anything is allocated.
uint64_t MinValueBytes(GgufType type) {
  switch (type) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
    case GgufType::kString:  // u64 length
      return 8;
    case GgufType::kArray:  // u32 element type + u64 count
      return 12;
  }
  return 0;
}

bool ValidGgufType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kFloat64); }

bool IsInteger(GgufType t) {
  return t == GgufType::kUint8 || t == GgufType::kInt8 || t == GgufType::kUint16 || t == GgufType::kInt16 ||
         t == GgufType::kUint32 || t == GgufType::kInt32 || t == GgufType::kUint64 || t == GgufType::kInt64;
}
bool IsSigned(GgufType t) {
  return t == GgufType::kInt8 || t == GgufType::kInt16 || t == GgufType::kInt32 || t == GgufType::kInt64;
}

std::string Quote(std::string_view s) {
  // Names come from untrusted files: keep messages one line and bounded.
  std::string out = "'";
  for (char c : s.substr(0, 80)) out.push_back(c >= 0x20 && c < 0x7F ? c : '?');
  if (s.size() > 80) out += "...";
  return out + "'";
}

// pread exactly n bytes at `offset`; false with errno set (0 for end of file) otherwise.
bool PreadFull(int fd, void* dst, size_t n, uint64_t offset) {
  auto* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      if (r == 0) errno = 0;
      return false;
    }
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return true;
}

// Value j of each supported block: `in` holds whole blocks, `out` receives blocks * block-size floats.
void Dequantize(GgmlType type, const uint8_t* in, uint64_t blocks, float* out) {
  auto half_at = [](const uint8_t* p) { return HalfToFloat(static_cast<uint16_t>(p[0] | (p[1] << 8))); };
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(out, in, blocks * 4);
      return;
    case GgmlType::kF16:
      for (uint64_t i = 0; i < blocks; ++i) out[i] = half_at(in + 2 * i);
      return;
    case GgmlType::kBF16:
      for (uint64_t i = 0; i < blocks; ++i) {
        out[i] = BFloat16ToFloat(static_cast<uint16_t>(in[2 * i] | (in[2 * i + 1] << 8)));
      }
      return;
    case GgmlType::kQ8_0:
      for (uint64_t b = 0; b < blocks; ++b, in += 34, out += 32) {
        const float d = half_at(in);
        for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(static_cast<int8_t>(in[2 + j]));
      }
      return;
    case GgmlType::kQ4_1:
      for (uint64_t b = 0; b < blocks; ++b, in += 20, out += 32) {
        const float d = half_at(in);
        const float m = half_at(in + 2);
        for (int j = 0; j < 16; ++j) {
          out[j] = d * static_cast<float>(in[4 + j] & 0x0F) + m;
          out[j + 16] = d * static_cast<float>(in[4 + j] >> 4) + m;
        }
      }
      return;
    default:
      return;  // callers check GgmlTypeDequantizable first
  }
}

}  // namespace

const char* GgufTypeName(GgufType type) {
  switch (type) {
    case GgufType::kUint8:
      return "uint8";
    case GgufType::kInt8:
      return "int8";
    case GgufType::kUint16:
      return "uint16";
    case GgufType::kInt16:
      return "int16";
    case GgufType::kUint32:
      return "uint32";
    case GgufType::kInt32:
      return "int32";
    case GgufType::kFloat32:
      return "float32";
    case GgufType::kBool:
      return "bool";
    case GgufType::kString:
      return "string";
    case GgufType::kArray:
      return "array";
    case GgufType::kUint64:
      return "uint64";
    case GgufType::kInt64:
      return "int64";
    case GgufType::kFloat64:
      return "float64";
  }
  return "unknown";
}

const char* GgmlTypeName(GgmlType type) { return Traits(type).name; }

bool GgmlTypeDequantizable(GgmlType type) {
  return type == GgmlType::kF32 || type == GgmlType::kF16 || type == GgmlType::kBF16 || type == GgmlType::kQ8_0 ||
         type == GgmlType::kQ4_1;
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;  // Open checked that the product fits
  return n;
}

std::vector<int64_t> GgufTensor::shape() const { return std::vector<int64_t>(dims.rbegin(), dims.rend()); }

// Reads the header front to back through a buffer; every read is checked against the file size first, and the
// position of a failed read is kept for the message.
class GgufFile::Parser {
 public:
  explicit Parser(GgufFile* file) : f_(file), buf_(64 * 1024) {}

  Status Run();

 private:
  uint64_t Remaining() const { return f_->file_size_ - pos_; }

  // Fills dst with the next n bytes; false (position unchanged, io_errno_ set for a read error) when they are
  // not all there.
  bool Read(void* dst, uint64_t n) {
    if (n > Remaining()) return false;
    auto* out = static_cast<uint8_t*>(dst);
    while (n > 0) {
      if (pos_ < buf_start_ || pos_ >= buf_start_ + buf_len_) {
        uint64_t want = std::min<uint64_t>(buf_.size(), f_->file_size_ - pos_);
        if (!PreadFull(f_->fd_, buf_.data(), want, pos_)) {
          io_errno_ = errno == 0 ? -1 : errno;
          return false;
        }
        buf_start_ = pos_;
        buf_len_ = want;
      }
      uint64_t take = std::min(n, buf_start_ + buf_len_ - pos_);
      std::memcpy(out, buf_.data() + (pos_ - buf_start_), take);
      out += take;
      pos_ += take;
      n -= take;
    }
    return true;
  }
  template <typename T>
  bool ReadPod(T* v) {
    return Read(v, sizeof(T));
  }

  // The error for a failed Read at the current position.
  Status Fail(const std::string& what, uint64_t need) const {
    if (io_errno_ != 0) {
      return Status::IoError(f_->path_ + ": read error at byte " + std::to_string(pos_) + " reading " + what + ": " +
                             (io_errno_ > 0 ? std::strerror(io_errno_) : "the file shrank while open"));
    }
    return Status::InvalidArgument(f_->path_ + ": truncated at byte " + std::to_string(pos_) + " reading " + what +
                                   " (needs " + std::to_string(need) + " bytes, " + std::to_string(Remaining()) +
                                   " remain of " + std::to_string(f_->file_size_) + ")");
  }
  Status Invalid(uint64_t at, const std::string& msg) const {
    return Status::InvalidArgument(f_->path_ + ": at byte " + std::to_string(at) + ": " + msg);
  }

  // A u64-length string; the length is checked against the remaining bytes before allocating.
  Status ReadString(const std::string& what, std::string* s) {
    uint64_t len;
    if (!ReadPod(&len)) return Fail("the length of " + what, 8);
    if (len > Remaining()) return Fail(what + " (length " + std::to_string(len) + ")", len);
    s->resize(len);
    if (!Read(s->data(), len)) return Fail(what, len);
    return Status::Ok();
  }

  Status ReadValue(GgufType type, int depth, const std::string& what, GgufValue* v);

  GgufFile* f_;
  std::vector<uint8_t> buf_;
  uint64_t buf_start_ = 0;
  uint64_t buf_len_ = 0;
  uint64_t pos_ = 0;
  int io_errno_ = 0;
};

Status GgufFile::Parser::ReadValue(GgufType type, int depth, const std::string& what, GgufValue* v) {
  v->type = type;
  const uint64_t at = pos_;
  switch (type) {
    case GgufType::kUint8: {
      uint8_t x;
      if (!ReadPod(&x)) return Fail(what, 1);
      v->u = x;
      return Status::Ok();
    }
    case GgufType::kInt8: {
      int8_t x;
      if (!ReadPod(&x)) return Fail(what, 1);
      v->i = x;
      return Status::Ok();
    }
    case GgufType::kUint16: {
      uint16_t x;
      if (!ReadPod(&x)) return Fail(what, 2);
      v->u = x;
      return Status::Ok();
    }
    case GgufType::kInt16: {
      int16_t x;
      if (!ReadPod(&x)) return Fail(what, 2);
      v->i = x;
      return Status::Ok();
    }
    case GgufType::kUint32: {
      uint32_t x;
      if (!ReadPod(&x)) return Fail(what, 4);
      v->u = x;
      return Status::Ok();
    }
    case GgufType::kInt32: {
      int32_t x;
      if (!ReadPod(&x)) return Fail(what, 4);
      v->i = x;
      return Status::Ok();
    }
    case GgufType::kUint64: {
      if (!ReadPod(&v->u)) return Fail(what, 8);
      return Status::Ok();
    }
    case GgufType::kInt64: {
      if (!ReadPod(&v->i)) return Fail(what, 8);
      return Status::Ok();
    }
    case GgufType::kFloat32: {
      float x;
      if (!ReadPod(&x)) return Fail(what, 4);
      v->f = x;
      return Status::Ok();
    }
    case GgufType::kFloat64: {
      if (!ReadPod(&v->f)) return Fail(what, 8);
      return Status::Ok();
    }
    case GgufType::kBool: {
      uint8_t x;
      if (!ReadPod(&x)) return Fail(what, 1);
      if (x > 1) return Invalid(at, what + " is a bool with byte value " + std::to_string(x) + " (must be 0 or 1)");
      v->u = x;
      return Status::Ok();
    }
    case GgufType::kString:
      return ReadString(what, &v->s);
    case GgufType::kArray: {
      if (depth >= kMaxArrayDepth) {
        return Invalid(at, what + " nests arrays deeper than " + std::to_string(kMaxArrayDepth));
      }
      uint32_t et;
      if (!ReadPod(&et)) return Fail("the element type of " + what, 4);
      if (!ValidGgufType(et)) {
        return Invalid(at, what + " is an array of unknown value type " + std::to_string(et));
      }
      uint64_t count;
      if (!ReadPod(&count)) return Fail("the element count of " + what, 8);
      v->element_type = static_cast<GgufType>(et);
      const uint64_t min_bytes = MinValueBytes(v->element_type);
      if (count > Remaining() / min_bytes) {
        return Invalid(at, what + " claims " + std::to_string(count) + " " + GgufTypeName(v->element_type) +
                               " elements, more than the " + std::to_string(Remaining()) + " remaining bytes can hold");
      }
      v->array.resize(count);
      for (uint64_t k = 0; k < count; ++k) {
        ZERO_RETURN_IF_ERROR(ReadValue(v->element_type, depth + 1, what, &v->array[k]));
      }
      return Status::Ok();
    }
  }
  return Status::Internal("unreachable metadata type");
}

Status GgufFile::Parser::Run() {
  const std::string& path = f_->path_;
  uint32_t magic;
  if (!ReadPod(&magic)) return Fail("the magic", 4);
  if (magic != kMagic) {
    char shown[5] = {};
    std::memcpy(shown, &magic, 4);
    for (char& c : std::span<char>(shown, 4)) c = c >= 0x20 && c < 0x7F ? c : '?';
    return Status::InvalidArgument(path + ": not a GGUF file: magic is \"" + shown + "\" (0x" + [&] {
      char hex[16];
      std::snprintf(hex, sizeof hex, "%08x", magic);
      return std::string(hex);
    }() + "), expected \"GGUF\"");
  }
  if (!ReadPod(&f_->version_)) return Fail("the version", 4);
  const uint32_t v = f_->version_;
  if (v != 2 && v != 3) {
    std::string why = v == 1 ? " (GGUF v1 used 32-bit counts; re-convert the model with a current llama.cpp)"
                      : ((v & 0xFFFF) == 0 && (v >> 16) != 0)
                          ? " (this looks like a big-endian file; only little-endian GGUF is supported)"
                          : "";
    return Status::InvalidArgument(path + ": unsupported GGUF version " + std::to_string(v) +
                                   "; this reader supports versions 2 and 3" + why);
  }
  uint64_t tensor_count, kv_count;
  if (!ReadPod(&tensor_count)) return Fail("the tensor count", 8);
  if (!ReadPod(&kv_count)) return Fail("the metadata key-value count", 8);
  // A key-value pair takes at least 8 (key length) + 1 (key) + 4 (type) + 1 (value) bytes; a tensor info at least
  // 8 + 1 (name) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
  if (kv_count > Remaining() / 14) {
    return Invalid(16, "metadata key-value count " + std::to_string(kv_count) + " cannot fit in a " +
                           std::to_string(f_->file_size_) + "-byte file");
  }
  if (tensor_count > Remaining() / 33) {
    return Invalid(8, "tensor count " + std::to_string(tensor_count) + " cannot fit in a " +
                          std::to_string(f_->file_size_) + "-byte file");
  }

  f_->metadata_.reserve(kv_count);
  for (uint64_t k = 0; k < kv_count; ++k) {
    const uint64_t at = pos_;
    std::string key;
    ZERO_RETURN_IF_ERROR(ReadString("the key of metadata entry " + std::to_string(k), &key));
    if (key.empty()) return Invalid(at, "metadata entry " + std::to_string(k) + " has an empty key");
    if (f_->metadata_index_.count(key)) return Invalid(at, "metadata key " + Quote(key) + " appears twice");
    uint32_t type;
    if (!ReadPod(&type)) return Fail("the value type of metadata key " + Quote(key), 4);
    if (!ValidGgufType(type)) {
      return Invalid(pos_ - 4, "metadata key " + Quote(key) + " has unknown value type " + std::to_string(type));
    }
    GgufValue value;
    ZERO_RETURN_IF_ERROR(ReadValue(static_cast<GgufType>(type), 0, "the value of metadata key " + Quote(key), &value));
    f_->metadata_index_.emplace(key, f_->metadata_.size());
    f_->metadata_.emplace_back(std::move(key), std::move(value));
  }

  f_->alignment_ = kDefaultAlignment;
  if (const GgufValue* a = f_->FindValue("general.alignment")) {
    if (!IsInteger(a->type)) {
      return Status::InvalidArgument(path + ": general.alignment is a " + GgufTypeName(a->type) +
                                     ", expected an unsigned integer");
    }
    const bool negative = IsSigned(a->type) && a->i < 0;
    const uint64_t align = IsSigned(a->type) ? static_cast<uint64_t>(a->i) : a->u;
    if (negative || align == 0 || !std::has_single_bit(align) || align > (uint64_t{1} << 30)) {
      return Status::InvalidArgument(path + ": general.alignment " +
                                     (negative ? std::to_string(a->i) : std::to_string(align)) +
                                     " is not a power of two between 1 and 2^30");
    }
    f_->alignment_ = align;
  }

  f_->tensors_.resize(tensor_count);
  for (uint64_t t = 0; t < tensor_count; ++t) {
    GgufTensor& info = f_->tensors_[t];
    const std::string id = "tensor " + std::to_string(t);
    const uint64_t at = pos_;
    ZERO_RETURN_IF_ERROR(ReadString("the name of " + id, &info.name));
    if (info.name.empty()) return Invalid(at, id + " has an empty name");
    if (f_->tensor_index_.count(info.name)) return Invalid(at, "tensor name " + Quote(info.name) + " appears twice");
    const std::string named = id + " (" + Quote(info.name) + ")";
    uint32_t n_dims;
    if (!ReadPod(&n_dims)) return Fail("the dimension count of " + named, 4);
    if (n_dims == 0 || n_dims > kMaxDims) {
      return Invalid(pos_ - 4, named + " has " + std::to_string(n_dims) + " dimensions; expected 1 to " +
                                   std::to_string(kMaxDims));
    }
    info.dims.resize(n_dims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t dim;
      if (!ReadPod(&dim)) return Fail("dimension " + std::to_string(d) + " of " + named, 8);
      if (dim == 0 || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim) {
        return Invalid(pos_ - 8, named + " has dimension " + std::to_string(d) + " = " + std::to_string(dim) +
                                     (dim == 0 ? " (must be positive)" : " (the element count overflows)"));
      }
      numel *= dim;
      info.dims[d] = static_cast<int64_t>(dim);
    }
    uint32_t type;
    if (!ReadPod(&type)) return Fail("the type of " + named, 4);
    info.type = static_cast<GgmlType>(type);
    const TypeTraits traits = Traits(info.type);
    if (traits.block == 0) {
      return Invalid(pos_ - 4, named + " has unknown ggml type " + std::to_string(type));
    }
    if (static_cast<uint64_t>(info.dims[0]) % traits.block != 0) {
      return Invalid(at, named + " has type " + traits.name + " (blocks of " + std::to_string(traits.block) +
                             ") but its innermost dimension " + std::to_string(info.dims[0]) +
                             " is not a multiple of the block size");
    }
    const uint64_t blocks = numel / traits.block;
    if (blocks > f_->file_size_ / traits.bytes) {
      return Invalid(at, named + " needs " + std::to_string(blocks) + " blocks of " + std::to_string(traits.bytes) +
                             " bytes, more than the whole " + std::to_string(f_->file_size_) + "-byte file");
    }
    info.bytes = blocks * traits.bytes;
    if (!ReadPod(&info.offset)) return Fail("the data offset of " + named, 8);
    f_->tensor_index_.emplace(info.name, t);
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t align = f_->alignment_;
  const uint64_t header_end = pos_;
  f_->data_start_ = (header_end + align - 1) / align * align;
  const uint64_t data_start = f_->data_start_;

  std::vector<size_t> order(f_->tensors_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  for (size_t t : order) {
    const GgufTensor& info = f_->tensors_[t];
    const std::string named = "tensor " + std::to_string(t) + " (" + Quote(info.name) + ")";
    if (info.offset % align != 0) {
      return Status::InvalidArgument(path + ": " + named + " has data offset " + std::to_string(info.offset) +
                                     ", not a multiple of the alignment " + std::to_string(align));
    }
    if (data_start > f_->file_size_ || info.offset > f_->file_size_ - data_start ||
        info.bytes > f_->file_size_ - data_start - info.offset) {
      return Status::InvalidArgument(
          path + ": " + named + " (" + GgmlTypeName(info.type) + ", " + std::to_string(info.bytes) +
          " bytes at data offset " + std::to_string(info.offset) + ", byte " +
          (info.offset > f_->file_size_ ? std::string("beyond 2^64") : std::to_string(data_start + info.offset)) +
          ") extends past the end of the file (" + std::to_string(f_->file_size_) + " bytes)");
    }
  }
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return f_->tensors_[a].offset < f_->tensors_[b].offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const GgufTensor& prev = f_->tensors_[order[k - 1]];
    const GgufTensor& next = f_->tensors_[order[k]];
    if (prev.offset + prev.bytes > next.offset) {
      return Status::InvalidArgument(path + ": tensors " + Quote(prev.name) + " (data offsets " +
                                     std::to_string(prev.offset) + ".." + std::to_string(prev.offset + prev.bytes) +
                                     ") and " + Quote(next.name) + " (from " + std::to_string(next.offset) +
                                     ") overlap");
    }
  }
  return Status::Ok();
}

Status GgufFile::Open(const std::string& path, std::unique_ptr<GgufFile>* file) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f->fd_ < 0) return Status::IoError(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(f->fd_, &st) != 0) return Status::IoError(path + ": cannot stat: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(path + ": not a regular file");
  f->file_size_ = static_cast<uint64_t>(st.st_size);
  Parser parser(f.get());
  ZERO_RETURN_IF_ERROR(parser.Run());
  *file = std::move(f);
  return Status::Ok();
}

GgufFile::~GgufFile() {
  if (fd_ >= 0) ::close(fd_);
}

const GgufValue* GgufFile::FindValue(std::string_view key) const {
  auto it = metadata_index_.find(key);
  return it == metadata_index_.end() ? nullptr : &metadata_[it->second].second;
}

namespace {

Status Missing(const std::string& path, std::string_view key) {
  return Status::InvalidArgument(path + ": no metadata key " + Quote(key));
}
Status WrongType(const std::string& path, std::string_view key, const GgufValue& v, const char* want) {
  std::string have = GgufTypeName(v.type);
  if (v.type == GgufType::kArray) have += std::string(" of ") + GgufTypeName(v.element_type);
  return Status::InvalidArgument(path + ": metadata key " + Quote(key) + " is " + have + ", expected " + want);
}

// Integer value of a scalar; false when not an integer or out of int64 range.
bool AsInt(const GgufValue& v, int64_t* out) {
  if (!IsInteger(v.type)) return false;
  if (IsSigned(v.type)) {
    *out = v.i;
    return true;
  }
  if (v.u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
  *out = static_cast<int64_t>(v.u);
  return true;
}
bool AsFloat(const GgufValue& v, double* out) {
  if (v.type == GgufType::kFloat32 || v.type == GgufType::kFloat64) {
    *out = v.f;
    return true;
  }
  if (!IsInteger(v.type)) return false;
  *out = IsSigned(v.type) ? static_cast<double>(v.i) : static_cast<double>(v.u);
  return true;
}

}  // namespace

Status GgufFile::GetString(std::string_view key, std::string* out) const {
  const GgufValue* v = FindValue(key);
  if (!v) return Missing(path_, key);
  if (v->type != GgufType::kString) return WrongType(path_, key, *v, "a string");
  *out = v->s;
  return Status::Ok();
}

Status GgufFile::GetInt(std::string_view key, int64_t* out) const {
  const GgufValue* v = FindValue(key);
  if (!v) return Missing(path_, key);
  if (!AsInt(*v, out)) return WrongType(path_, key, *v, "an integer that fits int64");
  return Status::Ok();
}

Status GgufFile::GetFloat(std::string_view key, double* out) const {
  const GgufValue* v = FindValue(key);
  if (!v) return Missing(path_, key);
  if (!AsFloat(*v, out)) return WrongType(path_, key, *v, "a number");
  return Status::Ok();
}

Status GgufFile::GetStringArray(std::string_view key, std::vector<std::string>* out) const {
  const GgufValue* v = FindValue(key);
  if (!v) return Missing(path_, key);
  if (v->type != GgufType::kArray || v->element_type != GgufType::kString) {
    return WrongType(path_, key, *v, "an array of string");
  }
  out->clear();
  out->reserve(v->array.size());
  for (const GgufValue& e : v->array) out->push_back(e.s);
  return Status::Ok();
}

Status GgufFile::GetIntArray(std::string_view key, std::vector<int64_t>* out) const {
  const GgufValue* v = FindValue(key);
  if (!v) return Missing(path_, key);
  if (v->type != GgufType::kArray || !IsInteger(v->element_type)) {
    return WrongType(path_, key, *v, "an array of integers");
  }
  out->assign(v->array.size(), 0);
  for (size_t k = 0; k < v->array.size(); ++k) {
    if (!AsInt(v->array[k], &(*out)[k])) {
      return Status::InvalidArgument(path_ + ": metadata key " + Quote(key) + " element " + std::to_string(k) +
                                     " does not fit int64");
    }
  }
  return Status::Ok();
}

Status GgufFile::GetFloatArray(std::string_view key, std::vector<double>* out) const {
  const GgufValue* v = FindValue(key);
  if (!v) return Missing(path_, key);
  if (v->type != GgufType::kArray ||
      !(IsInteger(v->element_type) || v->element_type == GgufType::kFloat32 || v->element_type == GgufType::kFloat64)) {
    return WrongType(path_, key, *v, "an array of numbers");
  }
  out->assign(v->array.size(), 0.0);
  for (size_t k = 0; k < v->array.size(); ++k) AsFloat(v->array[k], &(*out)[k]);
  return Status::Ok();
}

const GgufTensor* GgufFile::Find(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

Status GgufFile::ReadRange(std::string_view name, int64_t first_element, int64_t count, float* out) const {
  const GgufTensor* t = Find(name);
  if (!t) return Status::InvalidArgument(path_ + ": no tensor named " + Quote(name));
  const int64_t numel = t->numel();
  if (first_element < 0 || count < 0 || first_element > numel || count > numel - first_element) {
    return Status::InvalidArgument(path_ + ": tensor " + Quote(name) + ": range [" + std::to_string(first_element) +
                                   ", +" + std::to_string(count) + ") is outside its " + std::to_string(numel) +
                                   " elements");
  }
  if (!GgmlTypeDequantizable(t->type)) {
    return Status::InvalidArgument(path_ + ": tensor " + Quote(name) + " has type " + GgmlTypeName(t->type) +
                                   ", which this reader does not dequantize (supported: F32, F16, BF16, Q8_0, Q4_1)");
  }
  if (count == 0) return Status::Ok();
  const TypeTraits traits = Traits(t->type);
  const uint64_t first = static_cast<uint64_t>(first_element);
  const uint64_t end = first + static_cast<uint64_t>(count);
  const uint64_t first_block = first / traits.block;
  const uint64_t end_block = (end + traits.block - 1) / traits.block;
  const uint64_t chunk_blocks = std::max<uint64_t>(1, kChunkBytes / traits.bytes);
  std::vector<uint8_t> raw;
  std::vector<float> values;
  for (uint64_t b = first_block; b < end_block; b += chunk_blocks) {
    const uint64_t nb = std::min(chunk_blocks, end_block - b);
    raw.resize(nb * traits.bytes);
    values.resize(nb * traits.block);
    const uint64_t at = data_start_ + t->offset + b * traits.bytes;
    if (!PreadFull(fd_, raw.data(), raw.size(), at)) {
      return Status::IoError(path_ + ": tensor " + Quote(name) + ": reading " + std::to_string(raw.size()) +
                             " bytes at byte " + std::to_string(at) + ": " +
                             (errno != 0 ? std::strerror(errno) : "the file shrank while open"));
    }
    Dequantize(t->type, raw.data(), nb, values.data());
    // Copy the part of these blocks that lies inside [first, end).
    const uint64_t chunk_first = b * traits.block;
    const uint64_t lo = std::max(first, chunk_first);
    const uint64_t hi = std::min(end, chunk_first + nb * traits.block);
    std::memcpy(out + (lo - first), values.data() + (lo - chunk_first), (hi - lo) * sizeof(float));
  }
  return Status::Ok();
}

Status GgufFile::ReadFloat(std::string_view name, std::vector<float>* out) const {
  const GgufTensor* t = Find(name);
  if (!t) return Status::InvalidArgument(path_ + ": no tensor named " + Quote(name));
  out->resize(static_cast<size_t>(t->numel()));
  return ReadRange(name, 0, t->numel(), out->data());
}

}  // namespace lora

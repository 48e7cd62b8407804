// safetensors writer (layout, header, parallel ranges, Save) and validating reader.
//
// The header is JSON of a fixed shape (an object of objects, strings and integer arrays), so a small emitter and
// a strict recursive-descent parser live here rather than a third-party JSON library: the parser must reject
// exactly what safetensors rejects and say where, it never sees floats, and it keeps the example free of a
// dependency for ~200 lines.
#include "examples/lora_finetune/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <set>
#include <utility>

#include "examples/lora_finetune/utf8.h"

namespace lora {
namespace {

using zero::Status;

// safetensors' own limit: larger headers are refused before reading them.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr int kMaxJsonDepth = 16;

std::string Errno() { return std::strerror(errno); }

// ---- JSON ----------------------------------------------------------------------------------------------------

struct Json {
  enum class Kind { kNull, kBool, kInt, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  int64_t integer = 0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::string> keys;  // object members in document order: keys[i] -> values[i]
  std::vector<Json> values;
};

const char* KindName(Json::Kind kind) {
  switch (kind) {
    case Json::Kind::kNull:
      return "null";
    case Json::Kind::kBool:
      return "a boolean";
    case Json::Kind::kInt:
      return "an integer";
    case Json::Kind::kString:
      return "a string";
    case Json::Kind::kArray:
      return "an array";
    case Json::Kind::kObject:
      return "an object";
  }
  return "?";
}

// Strict JSON (RFC 8259) except that numbers must be integers fitting int64: safetensors headers have no others.
class JsonParser {
 public:
  explicit JsonParser(std::string_view text) : text_(text) {}

  // On failure *error says what and at which byte of the header.
  bool ParseDocument(Json* out, std::string* error) {
    if (!ParseValue(out, 0)) {
      *error = error_;
      return false;
    }
    SkipSpace();
    if (pos_ != text_.size()) {
      *error = "unexpected '" + std::string(1, text_[pos_]) + "' after the JSON value at byte " + std::to_string(pos_);
      return false;
    }
    return true;
  }

 private:
  bool Fail(const std::string& what) {
    error_ = what + " at byte " + std::to_string(pos_);
    return false;
  }
  void SkipSpace() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  bool Literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return Fail("invalid literal");
    pos_ += word.size();
    return true;
  }

  bool ParseValue(Json* out, int depth) {
    if (depth > kMaxJsonDepth) return Fail("JSON nested too deeply");
    SkipSpace();
    if (pos_ >= text_.size()) return Fail("unexpected end of JSON");
    char c = text_[pos_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      out->kind = Json::Kind::kString;
      return ParseString(&out->string);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseInteger(out);
    if (c == 't') {
      out->kind = Json::Kind::kBool;
      out->boolean = true;
      return Literal("true");
    }
    if (c == 'f') {
      out->kind = Json::Kind::kBool;
      return Literal("false");
    }
    if (c == 'n') return Literal("null");
    return Fail("unexpected character '" + std::string(1, c) + "'");
  }

  bool ParseObject(Json* out, int depth) {
    out->kind = Json::Kind::kObject;
    ++pos_;  // '{'
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == '}') {
      ++pos_;
      return true;
    }
    while (true) {
      SkipSpace();
      if (pos_ >= text_.size() || text_[pos_] != '"') return Fail("expected a string key");
      std::string key;
      if (!ParseString(&key)) return false;
      SkipSpace();
      if (pos_ >= text_.size() || text_[pos_] != ':') return Fail("expected ':'");
      ++pos_;
      Json value;
      if (!ParseValue(&value, depth + 1)) return false;
      out->keys.push_back(std::move(key));
      out->values.push_back(std::move(value));
      SkipSpace();
      if (pos_ < text_.size() && text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < text_.size() && text_[pos_] == '}') {
        ++pos_;
        return true;
      }
      return Fail("expected ',' or '}'");
    }
  }

  bool ParseArray(Json* out, int depth) {
    out->kind = Json::Kind::kArray;
    ++pos_;  // '['
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == ']') {
      ++pos_;
      return true;
    }
    while (true) {
      Json value;
      if (!ParseValue(&value, depth + 1)) return false;
      out->array.push_back(std::move(value));
      SkipSpace();
      if (pos_ < text_.size() && text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < text_.size() && text_[pos_] == ']') {
        ++pos_;
        return true;
      }
      return Fail("expected ',' or ']'");
    }
  }

  bool ParseHex4(uint32_t* value) {
    if (pos_ + 4 > text_.size()) return Fail("truncated \\u escape");
    *value = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_++];
      uint32_t d;
      if (c >= '0' && c <= '9') {
        d = c - '0';
      } else if (c >= 'a' && c <= 'f') {
        d = c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        d = c - 'A' + 10;
      } else {
        return Fail("bad hex digit in \\u escape");
      }
      *value = *value * 16 + d;
    }
    return true;
  }

  bool ParseString(std::string* out) {
    ++pos_;  // '"'
    while (true) {
      if (pos_ >= text_.size()) return Fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return Fail("control character in string");
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ >= text_.size()) return Fail("unterminated string");
      char e = text_[pos_++];
      switch (e) {
        case '"':
          out->push_back('"');
          break;
        case '\\':
          out->push_back('\\');
          break;
        case '/':
          out->push_back('/');
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          uint32_t cp = 0;
          if (!ParseHex4(&cp)) return false;
          if (cp >= 0xD800 && cp < 0xDC00) {  // high surrogate: a low one must follow
            uint32_t lo = 0;
            if (text_.substr(pos_, 2) != "\\u") return Fail("unpaired surrogate in \\u escape");
            pos_ += 2;
            if (!ParseHex4(&lo)) return false;
            if (lo < 0xDC00 || lo >= 0xE000) return Fail("unpaired surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            return Fail("unpaired surrogate in \\u escape");
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          return Fail("bad escape '\\" + std::string(1, e) + "'");
      }
    }
  }

  bool ParseInteger(Json* out) {
    out->kind = Json::Kind::kInt;
    size_t start = pos_;
    bool negative = text_[pos_] == '-';
    if (negative) ++pos_;
    if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9') return Fail("bad number");
    if (text_[pos_] == '0' && pos_ + 1 < text_.size() && text_[pos_ + 1] >= '0' && text_[pos_ + 1] <= '9') {
      return Fail("leading zero in number");
    }
    uint64_t magnitude = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      uint64_t digit = text_[pos_] - '0';
      if (magnitude > (UINT64_C(1) << 63) / 10 || magnitude * 10 + digit > (UINT64_C(1) << 63) - (negative ? 0 : 1)) {
        pos_ = start;
        return Fail("integer out of range");
      }
      magnitude = magnitude * 10 + digit;
      ++pos_;
    }
    if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E')) {
      pos_ = start;
      return Fail("non-integer number (safetensors headers hold integers only)");
    }
    out->integer = negative ? static_cast<int64_t>(0 - magnitude) : static_cast<int64_t>(magnitude);
    return true;
  }

  std::string_view text_;
  size_t pos_ = 0;
  std::string error_;
};

void AppendJsonString(std::string_view s, std::string* out) {
  static const char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (char c : s) {
    unsigned char u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        *out += "\\\"";
        break;
      case '\\':
        *out += "\\\\";
        break;
      case '\n':
        *out += "\\n";
        break;
      case '\r':
        *out += "\\r";
        break;
      case '\t':
        *out += "\\t";
        break;
      case '\b':
        *out += "\\b";
        break;
      case '\f':
        *out += "\\f";
        break;
      default:
        if (u < 0x20) {
          *out += "\\u00";
          out->push_back(kHex[u >> 4]);
          out->push_back(kHex[u & 15]);
        } else {
          out->push_back(c);  // UTF-8 passes through unchanged
        }
    }
  }
  out->push_back('"');
}

// ---- I/O helpers ---------------------------------------------------------------------------------------------

// Move-only file descriptor.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

Status PwriteAll(int fd, const void* data, size_t bytes, uint64_t offset, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::pwrite(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      return Status::IoError(path + ": write of " + std::to_string(bytes) + " bytes at offset " +
                             std::to_string(offset) + " failed: " + Errno());
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status PreadAll(int fd, void* data, size_t bytes, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    ssize_t n = ::pread(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::IoError(path + ": read at offset " + std::to_string(offset) + " failed: " + Errno());
    if (n == 0) return Status::IoError(path + ": unexpected end of file at offset " + std::to_string(offset));
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

bool CheckedNumel(const std::vector<int64_t>& shape, int64_t* numel) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
  }
  *numel = n;
  return true;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// Converts `count` elements of `dtype` at `src` to float.
void WidenToFloat(DType dtype, const uint8_t* src, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    if (dtype == DType::kF32) {
      uint32_t bits = uint32_t{src[4 * i]} | uint32_t{src[4 * i + 1]} << 8 | uint32_t{src[4 * i + 2]} << 16 |
                      uint32_t{src[4 * i + 3]} << 24;
      std::memcpy(&out[i], &bits, 4);
    } else {
      uint16_t bits = static_cast<uint16_t>(src[2 * i] | src[2 * i + 1] << 8);
      out[i] = dtype == DType::kF16 ? HalfToFloat(bits) : BFloat16ToFloat(bits);
    }
  }
}

}  // namespace

// ---- dtypes ----------------------------------------------------------------------------------------------------

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

bool ParseDType(std::string_view name, DType* dtype) {
  if (name == "F32") {
    *dtype = DType::kF32;
  } else if (name == "F16") {
    *dtype = DType::kF16;
  } else if (name == "BF16") {
    *dtype = DType::kBF16;
  } else {
    return false;
  }
  return true;
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = uint32_t{h & 0x8000u} << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal: value = mant * 2^-24; normalise the mantissa.
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400) == 0);
    bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float BFloat16ToFloat(uint16_t b) {
  uint32_t bits = uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToBFloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

uint16_t FloatToHalf(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00;           // NaN
  if (abs >= 0x477FF000u) return sign | 0x7C00;          // rounds to >= 65520: infinity
  if (abs >= 0x38800000u) {                              // normal half (>= 2^-14)
    uint32_t rounded = abs + 0xFFF + ((abs >> 13) & 1);  // round to nearest even at bit 13
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
  }
  if (abs < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25)
  // Subnormal half: value / 2^-24, rounded to nearest even.
  uint32_t exp = abs >> 23;
  uint32_t mant = (abs & 0x7FFFFF) | 0x800000;
  uint32_t shift = 126 - exp;  // 14..24 for exp in [102, 112]
  uint32_t result = mant >> shift;
  uint32_t rem = mant & ((1u << shift) - 1);
  uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (result & 1))) ++result;
  return sign | static_cast<uint16_t>(result);
}

// ---- layout and writing -----------------------------------------------------------------------------------------

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int Layout::Find(std::string_view name) const {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

Status ComputeLayout(const std::vector<TensorSpec>& specs, const std::map<std::string, std::string>& metadata,
                     Layout* layout) {
  Layout out;
  out.metadata = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  std::string json = "{";
  bool first = true;
  if (!metadata.empty()) {
    json += "\"__metadata__\":{";
    for (auto it = metadata.begin(); it != metadata.end(); ++it) {
      if (it != metadata.begin()) json += ",";
      AppendJsonString(it->first, &json);
      json += ":";
      AppendJsonString(it->second, &json);
    }
    json += "}";
    first = false;
  }
  for (const TensorSpec& spec : specs) {
    if (spec.name.empty() || spec.name == "__metadata__") {
      return Status::InvalidArgument("safetensors layout: invalid tensor name '" + spec.name + "'");
    }
    if (!names.insert(spec.name).second) {
      return Status::InvalidArgument("safetensors layout: tensor '" + spec.name + "' appears twice");
    }
    int64_t numel;
    uint64_t bytes;
    if (!CheckedNumel(spec.shape, &numel) ||
        __builtin_mul_overflow(static_cast<uint64_t>(numel), DTypeSize(spec.dtype), &bytes)) {
      return Status::InvalidArgument("safetensors layout: tensor '" + spec.name + "' has invalid shape " +
                                     ShapeString(spec.shape));
    }
    TensorInfo info{spec.name, spec.dtype, spec.shape, offset, offset + bytes};
    offset += bytes;
    if (!first) json += ",";
    first = false;
    AppendJsonString(spec.name, &json);
    json += ":{\"dtype\":\"" + std::string(DTypeName(spec.dtype)) + "\",\"shape\":[";
    for (size_t i = 0; i < spec.shape.size(); ++i) {
      if (i) json += ",";
      json += std::to_string(spec.shape[i]);
    }
    json += "],\"data_offsets\":[" + std::to_string(info.begin) + "," + std::to_string(info.end) + "]}";
    out.tensors.push_back(std::move(info));
  }
  json += "}";
  // Pad so that the data section starts 8-byte aligned (8 + header length is a multiple of 8).
  json.append((8 - json.size() % 8) % 8, ' ');
  out.header = std::move(json);
  out.data_start = 8 + out.header.size();
  out.file_size = out.data_start + offset;
  *layout = std::move(out);
  return Status::Ok();
}

namespace {

Status WriteHeaderTo(int fd, const std::string& path, const Layout& layout) {
  uint8_t len[8];
  uint64_t n = layout.header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  ZERO_RETURN_IF_ERROR(PwriteAll(fd, len, 8, 0, path));
  ZERO_RETURN_IF_ERROR(PwriteAll(fd, layout.header.data(), layout.header.size(), 8, path));
  if (::ftruncate(fd, static_cast<off_t>(layout.file_size)) != 0) {
    return Status::IoError(path + ": cannot size the file to " + std::to_string(layout.file_size) +
                           " bytes: " + Errno());
  }
  return Status::Ok();
}

// Checks the range against the layout and returns its byte position in the file.
Status RangeBytes(const std::string& path, const Layout& layout, int tensor_index, int64_t first_element, int64_t count,
                  uint64_t* offset, size_t* bytes) {
  if (tensor_index < 0 || static_cast<size_t>(tensor_index) >= layout.tensors.size()) {
    return Status::InvalidArgument(path + ": tensor index " + std::to_string(tensor_index) + " out of range (" +
                                   std::to_string(layout.tensors.size()) + " tensors)");
  }
  const TensorInfo& t = layout.tensors[tensor_index];
  if (first_element < 0 || count < 0 || first_element > t.numel() || count > t.numel() - first_element) {
    return Status::InvalidArgument(path + ": tensor '" + t.name + "': elements [" + std::to_string(first_element) +
                                   ", +" + std::to_string(count) + ") outside its " + std::to_string(t.numel()) +
                                   " elements");
  }
  *offset = layout.data_start + t.begin + static_cast<uint64_t>(first_element) * DTypeSize(t.dtype);
  *bytes = static_cast<size_t>(count) * DTypeSize(t.dtype);
  return Status::Ok();
}

}  // namespace

Status WriteHeader(const std::string& path, const Layout& layout) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return Status::IoError(path + ": cannot create: " + Errno());
  ZERO_RETURN_IF_ERROR(WriteHeaderTo(fd.get(), path, layout));
  if (::close(fd.release()) != 0) return Status::IoError(path + ": close failed: " + Errno());
  return Status::Ok();
}

Status WriteRange(const std::string& path, const Layout& layout, int tensor_index, int64_t first_element, int64_t count,
                  const void* data) {
  uint64_t offset;
  size_t bytes;
  ZERO_RETURN_IF_ERROR(RangeBytes(path, layout, tensor_index, first_element, count, &offset, &bytes));
  Fd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (fd.get() < 0) return Status::IoError(path + ": cannot open for writing (was WriteHeader run?): " + Errno());
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return Status::IoError(path + ": stat failed: " + Errno());
  if (static_cast<uint64_t>(st.st_size) != layout.file_size) {
    return Status::FailedPrecondition(path + ": file is " + std::to_string(st.st_size) + " bytes, the layout says " +
                                      std::to_string(layout.file_size) +
                                      "; run WriteHeader with this layout (and a barrier) before WriteRange");
  }
  ZERO_RETURN_IF_ERROR(PwriteAll(fd.get(), data, bytes, offset, path));
  if (::close(fd.release()) != 0) return Status::IoError(path + ": close failed: " + Errno());
  return Status::Ok();
}

Status WriteRangeFromFloat(const std::string& path, const Layout& layout, int tensor_index, int64_t first_element,
                           int64_t count, const float* data) {
  uint64_t offset;
  size_t bytes;
  ZERO_RETURN_IF_ERROR(RangeBytes(path, layout, tensor_index, first_element, count, &offset, &bytes));
  DType dtype = layout.tensors[tensor_index].dtype;
  std::vector<uint8_t> buf(bytes);
  for (int64_t i = 0; i < count; ++i) {
    if (dtype == DType::kF32) {
      uint32_t bits;
      std::memcpy(&bits, &data[i], 4);
      for (int b = 0; b < 4; ++b) buf[4 * i + b] = static_cast<uint8_t>(bits >> (8 * b));
    } else {
      uint16_t bits = dtype == DType::kF16 ? FloatToHalf(data[i]) : FloatToBFloat16(data[i]);
      buf[2 * i] = static_cast<uint8_t>(bits);
      buf[2 * i + 1] = static_cast<uint8_t>(bits >> 8);
    }
  }
  return WriteRange(path, layout, tensor_index, first_element, count, buf.data());
}

Status Save(const std::string& path, const std::vector<TensorData>& tensors,
            const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  for (const TensorData& t : tensors) specs.push_back(t.spec);
  Layout layout;
  ZERO_RETURN_IF_ERROR(ComputeLayout(specs, metadata, &layout).WithContext(path));
  std::string tmp = path + ".tmp";
  {
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) return Status::IoError(tmp + ": cannot create: " + Errno());
    ZERO_RETURN_IF_ERROR(WriteHeaderTo(fd.get(), tmp, layout));
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorInfo& t = layout.tensors[i];
      if (t.end > t.begin && tensors[i].data == nullptr) {
        return Status::InvalidArgument(path + ": tensor '" + t.name + "' has no data");
      }
      ZERO_RETURN_IF_ERROR(PwriteAll(fd.get(), tensors[i].data, t.end - t.begin, layout.data_start + t.begin, tmp));
    }
    if (::fsync(fd.get()) != 0 || ::close(fd.release()) != 0) {
      return Status::IoError(tmp + ": flush failed: " + Errno());
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return Status::IoError(tmp + ": cannot rename to " + path + ": " + Errno());
  }
  return Status::Ok();
}

// ---- reading ------------------------------------------------------------------------------------------------------

Reader::~Reader() {
  if (fd_ >= 0) ::close(fd_);
}

const TensorInfo* Reader::Find(std::string_view name) const {
  for (const TensorInfo& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

Status Reader::Open(const std::string& path, std::unique_ptr<Reader>* reader) {
  auto bad = [&](const std::string& what) {
    return Status::InvalidArgument(path + ": not a valid safetensors file: " + what);
  };
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return Status::IoError(path + ": cannot open: " + Errno());
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return Status::IoError(path + ": stat failed: " + Errno());
  uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    return bad("file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
  }
  uint8_t len_bytes[8];
  ZERO_RETURN_IF_ERROR(PreadAll(fd.get(), len_bytes, 8, 0, path));
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t{len_bytes[i]} << (8 * i);
  if (header_len < 2) return bad("header length " + std::to_string(header_len) + " is too small for a JSON object");
  if (header_len > kMaxHeaderBytes) {
    return bad("header length " + std::to_string(header_len) + " exceeds the " + std::to_string(kMaxHeaderBytes) +
               "-byte limit");
  }
  if (header_len > file_size - 8) {
    return bad("header length " + std::to_string(header_len) + " runs past the end of the file (" +
               std::to_string(file_size) + " bytes)");
  }
  std::string header(header_len, '\0');
  ZERO_RETURN_IF_ERROR(PreadAll(fd.get(), header.data(), header_len, 8, path));

  Json root;
  std::string error;
  if (!JsonParser(header).ParseDocument(&root, &error)) return bad("header JSON: " + error);
  if (root.kind != Json::Kind::kObject)
    return bad(std::string("header JSON is ") + KindName(root.kind) + ", not an object");

  auto out = std::unique_ptr<Reader>(new Reader());
  out->path_ = path;
  out->data_start_ = 8 + header_len;
  const uint64_t data_size = file_size - out->data_start_;
  std::set<std::string> seen;
  for (size_t m = 0; m < root.keys.size(); ++m) {
    const std::string& name = root.keys[m];
    const Json& value = root.values[m];
    if (!seen.insert(name).second) return bad("key '" + name + "' appears twice in the header");
    if (name == "__metadata__") {
      if (value.kind != Json::Kind::kObject)
        return bad("__metadata__ is " + std::string(KindName(value.kind)) + ", not an object");
      for (size_t i = 0; i < value.keys.size(); ++i) {
        const std::string& k = value.keys[i];
        const Json& v = value.values[i];
        if (v.kind != Json::Kind::kString) {
          return bad("__metadata__ value for '" + k + "' is " + KindName(v.kind) + ", not a string");
        }
        out->metadata_[k] = v.string;
      }
      continue;
    }
    auto tbad = [&](const std::string& what) { return bad("tensor '" + name + "': " + what); };
    if (value.kind != Json::Kind::kObject)
      return tbad(std::string("entry is ") + KindName(value.kind) + ", not an object");
    const Json* dtype = nullptr;
    const Json* shape = nullptr;
    const Json* offsets = nullptr;
    for (size_t i = 0; i < value.keys.size(); ++i) {
      const std::string& k = value.keys[i];
      const Json& v = value.values[i];
      if (k == "dtype") {
        dtype = &v;
      } else if (k == "shape") {
        shape = &v;
      } else if (k == "data_offsets") {
        offsets = &v;
      } else {
        return tbad("unknown field '" + k + "'");
      }
    }
    if (!dtype || !shape || !offsets) {
      return tbad(std::string("missing field '") + (!dtype ? "dtype" : !shape ? "shape" : "data_offsets") + "'");
    }
    TensorInfo info;
    info.name = name;
    if (dtype->kind != Json::Kind::kString) return tbad("dtype is not a string");
    if (!ParseDType(dtype->string, &info.dtype)) {
      return tbad("unknown or unsupported dtype '" + dtype->string + "' (this reader knows F32, F16, BF16)");
    }
    if (shape->kind != Json::Kind::kArray) return tbad("shape is not an array");
    for (const Json& d : shape->array) {
      if (d.kind != Json::Kind::kInt || d.integer < 0)
        return tbad("shape has an entry that is not a non-negative integer");
      info.shape.push_back(d.integer);
    }
    if (offsets->kind != Json::Kind::kArray || offsets->array.size() != 2 ||
        offsets->array[0].kind != Json::Kind::kInt || offsets->array[1].kind != Json::Kind::kInt ||
        offsets->array[0].integer < 0 || offsets->array[1].integer < 0) {
      return tbad("data_offsets is not [begin, end] with non-negative integers");
    }
    info.begin = static_cast<uint64_t>(offsets->array[0].integer);
    info.end = static_cast<uint64_t>(offsets->array[1].integer);
    if (info.end < info.begin) {
      return tbad("data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) +
                  "] end before begin");
    }
    int64_t numel;
    uint64_t bytes;
    if (!CheckedNumel(info.shape, &numel) ||
        __builtin_mul_overflow(static_cast<uint64_t>(numel), DTypeSize(info.dtype), &bytes)) {
      return tbad("shape " + ShapeString(info.shape) + " overflows");
    }
    if (bytes != info.end - info.begin) {
      return tbad("shape " + ShapeString(info.shape) + " x " + DTypeName(info.dtype) + " is " + std::to_string(bytes) +
                  " bytes but data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) +
                  "] span " + std::to_string(info.end - info.begin));
    }
    if (info.end > data_size) {
      return tbad("data_offsets end " + std::to_string(info.end) +
                  " is past the end of the file (the data section has " + std::to_string(data_size) + " bytes)");
    }
    out->tensors_.push_back(std::move(info));
  }
  // Contiguous from 0 to the end of the file, without overlap or gap (what safetensors itself checks).
  std::stable_sort(out->tensors_.begin(), out->tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : out->tensors_) {
    if (t.begin < expected) {
      return bad("tensor '" + t.name + "' data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                 "] overlap tensor '" + prev->name + "' [" + std::to_string(prev->begin) + ", " +
                 std::to_string(prev->end) + "]");
    }
    if (t.begin > expected) {
      return bad("gap of " + std::to_string(t.begin - expected) + " bytes before tensor '" + t.name +
                 "' (data_offsets begin " + std::to_string(t.begin) + ", expected " + std::to_string(expected) + ")");
    }
    expected = t.end;
    prev = &t;
  }
  if (expected != data_size) {
    return bad(std::to_string(data_size - expected) + " unused bytes after the last tensor (data ends at " +
               std::to_string(expected) + ", the data section has " + std::to_string(data_size) + ")");
  }
  out->fd_ = fd.release();
  *reader = std::move(out);
  return Status::Ok();
}

Status Reader::ReadRange(std::string_view name, int64_t first_element, int64_t count, float* out) const {
  const TensorInfo* t = Find(name);
  if (!t) return Status::InvalidArgument(path_ + ": no tensor '" + std::string(name) + "'");
  if (first_element < 0 || count < 0 || first_element > t->numel() || count > t->numel() - first_element) {
    return Status::InvalidArgument(path_ + ": tensor '" + t->name + "': elements [" + std::to_string(first_element) +
                                   ", +" + std::to_string(count) + ") outside its " + std::to_string(t->numel()) +
                                   " elements");
  }
  size_t esize = DTypeSize(t->dtype);
  std::vector<uint8_t> raw(static_cast<size_t>(count) * esize);
  ZERO_RETURN_IF_ERROR(PreadAll(fd_, raw.data(), raw.size(),
                                data_start_ + t->begin + static_cast<uint64_t>(first_element) * esize, path_));
  WidenToFloat(t->dtype, raw.data(), count, out);
  return Status::Ok();
}

Status Reader::ReadFloat(std::string_view name, std::vector<float>* out) const {
  const TensorInfo* t = Find(name);
  if (!t) return Status::InvalidArgument(path_ + ": no tensor '" + std::string(name) + "'");
  out->resize(static_cast<size_t>(t->numel()));
  return ReadRange(name, 0, t->numel(), out->data());
}

Status Reader::ReadBytes(std::string_view name, std::vector<uint8_t>* out) const {
  const TensorInfo* t = Find(name);
  if (!t) return Status::InvalidArgument(path_ + ": no tensor '" + std::string(name) + "'");
  out->resize(t->end - t->begin);
  return PreadAll(fd_, out->data(), out->size(), data_start_ + t->begin, path_);
}

}  // namespace lora

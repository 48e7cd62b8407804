#include "checkpoint_format.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

#include <nlohmann/json.hpp>
#define XXH_INLINE_ALL
#include <xxhash.h>

namespace zero::ckpt {
namespace {

using Json = nlohmann::ordered_json;

constexpr int64_t kMaxElements = int64_t{1} << 50;  // far beyond any model, far below overflow in bytes

std::string Errno(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

const char* StoredDTypeName(DType d) {
  switch (d) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    default: return "?";
  }
}

bool StoredDType(const std::string& s, DType* d) {
  if (s == "F32") *d = DType::kF32;
  else if (s == "BF16") *d = DType::kBF16;
  else if (s == "F16") *d = DType::kF16;
  else return false;
  return true;
}

std::string Hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, v);
  return buf;
}

bool ParseHex(const std::string& s, uint64_t* v) {
  if (s.size() != 16) return false;
  uint64_t r = 0;
  for (char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else return false;
    r = (r << 4) | static_cast<uint64_t>(d);
  }
  *v = r;
  return true;
}

// Checked accessors: each failure says which field of which file is wrong.
class Fields {
 public:
  explicit Fields(const std::string& where) : where_(where) {}
  Status error;
  const Json* Get(const Json& obj, const char* key, const std::string& ctx) {
    if (!error.ok()) return nullptr;
    if (!obj.is_object()) return Fail(ctx + " is not an object");
    auto it = obj.find(key);
    if (it == obj.end()) return Fail(ctx + " has no \"" + key + "\"");
    return &*it;
  }
  bool Int(const Json& obj, const char* key, const std::string& ctx, int64_t lo, int64_t hi, int64_t* out) {
    const Json* j = Get(obj, key, ctx);
    if (j == nullptr) return false;
    return IntValue(*j, ctx + "." + key, lo, hi, out);
  }
  bool IntValue(const Json& j, const std::string& ctx, int64_t lo, int64_t hi, int64_t* out) {
    if (!error.ok()) return false;
    if (!j.is_number_integer()) return Fail(ctx + " is not an integer"), false;
    int64_t v;
    if (j.is_number_unsigned()) {
      const uint64_t u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return Fail(ctx + " is out of range"), false;
      v = static_cast<int64_t>(u);
    } else {
      v = j.get<int64_t>();
    }
    if (v < lo || v > hi) {
      return Fail(ctx + " = " + std::to_string(v) + " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) +
                  "]"),
             false;
    }
    *out = v;
    return true;
  }
  bool Str(const Json& obj, const char* key, const std::string& ctx, std::string* out) {
    const Json* j = Get(obj, key, ctx);
    if (j == nullptr) return false;
    if (!j->is_string()) return Fail(ctx + "." + key + " is not a string"), false;
    *out = j->get<std::string>();
    return true;
  }
  bool Bool(const Json& obj, const char* key, const std::string& ctx, bool* out) {
    const Json* j = Get(obj, key, ctx);
    if (j == nullptr) return false;
    if (!j->is_boolean()) return Fail(ctx + "." + key + " is not a boolean"), false;
    *out = j->get<bool>();
    return true;
  }
  bool Num(const Json& obj, const char* key, const std::string& ctx, double* out) {
    const Json* j = Get(obj, key, ctx);
    if (j == nullptr) return false;
    if (!j->is_number()) return Fail(ctx + "." + key + " is not a number"), false;
    *out = j->get<double>();
    return true;
  }
  const Json* Array(const Json& obj, const char* key, const std::string& ctx) {
    const Json* j = Get(obj, key, ctx);
    if (j == nullptr) return nullptr;
    if (!j->is_array()) return Fail(ctx + "." + key + " is not an array");
    return j;
  }
  const Json* Fail(const std::string& what) {
    if (error.ok()) error = Status::DataLoss("checkpoint index " + where_ + ": " + what);
    return nullptr;
  }

 private:
  std::string where_;
};

}  // namespace

const Tensor* Param::Find(std::string_view kind) const {
  for (const Tensor& t : tensors) {
    if (t.kind == kind) return &t;
  }
  return nullptr;
}

std::string ToJson(const Index& index) {
  Json j;
  j["format"] = kFormatName;
  j["version"] = index.version;
  j["step"] = index.step;
  j["world_size"] = index.world_size;
  j["stage"] = index.stage;
  j["optimizer"] = index.optimizer;
  j["param_dtype"] = StoredDTypeName(index.param_dtype);
  j["grad_dtype"] = StoredDTypeName(index.grad_dtype);
  j["offload_optimizer"] = index.offload_optimizer;
  j["offload_params"] = index.offload_params;
  j["sgd_first_step"] = index.sgd_first_step;
  j["loss_scaler"] = {{"dynamic", index.scaler.dynamic},
                      {"scale", index.scaler.scale},
                      {"hysteresis", index.scaler.hysteresis},
                      {"iter", index.scaler.iter},
                      {"last_overflow", index.scaler.last_overflow}};
  j["hash"] = "xxh3-64";
  j["block_bytes"] = index.block_bytes;
  j["metadata"] = {{"file", "metadata.bin"}, {"bytes", index.metadata_bytes}, {"hash", Hex(index.metadata_hash)}};
  Json files = Json::array();
  for (const File& f : index.files) {
    Json blocks = Json::array();
    for (uint64_t h : f.block_hashes) blocks.push_back(Hex(h));
    files.push_back({{"name", f.name}, {"bytes", f.bytes}, {"blocks", std::move(blocks)}});
  }
  j["files"] = std::move(files);
  Json params = Json::array();
  for (const Param& p : index.params) {
    Json tensors = Json::object();
    for (const Tensor& t : p.tensors) {
      Json frags = Json::array();
      for (const Fragment& f : t.fragments) frags.push_back({f.file, f.byte_offset, f.param_offset, f.count});
      tensors[t.kind] = {{"dtype", StoredDTypeName(t.dtype)}, {"fragments", std::move(frags)}};
    }
    params.push_back({{"name", p.name},
                      {"shape", p.shape},
                      {"unit", p.unit},
                      {"trainable", p.trainable},
                      {"tensors", std::move(tensors)}});
  }
  j["params"] = std::move(params);
  return j.dump(1) + "\n";
}

Status ParseIndex(std::string_view text, const std::string& where, Index* index) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::DataLoss("checkpoint index " + where + " is not valid JSON (truncated?)");
  Fields f(where);
  Index x;
  std::string s;
  if (!f.Str(j, "format", "the index", &s)) return f.error;
  if (s != kFormatName) return Status::DataLoss("checkpoint index " + where + ": format \"" + s + "\", not a zero checkpoint");
  int64_t v;
  if (!f.Int(j, "version", "the index", 0, 1 << 30, &v)) return f.error;
  if (v != kFormatVersion) {
    return Status::DataLoss("checkpoint index " + where + " has format version " + std::to_string(v) +
                            "; this zero reads version " + std::to_string(kFormatVersion) +
                            " (load it with the zero version that wrote it, then save again)");
  }
  x.version = static_cast<int>(v);
  if (!f.Int(j, "step", "the index", 0, kMaxElements, &x.step)) return f.error;
  if (!f.Int(j, "world_size", "the index", 1, 1 << 24, &v)) return f.error;
  x.world_size = static_cast<int>(v);
  if (!f.Int(j, "stage", "the index", 0, 3, &v)) return f.error;
  x.stage = static_cast<int>(v);
  if (!f.Str(j, "optimizer", "the index", &x.optimizer)) return f.error;
  if (x.optimizer != "adamw" && x.optimizer != "sgd") return f.Fail("unknown optimizer \"" + x.optimizer + "\""), f.error;
  for (auto [key, dst] : {std::pair{"param_dtype", &x.param_dtype}, std::pair{"grad_dtype", &x.grad_dtype}}) {
    if (!f.Str(j, key, "the index", &s)) return f.error;
    if (!StoredDType(s, dst)) return f.Fail(std::string(key) + " \"" + s + "\" is not F32, BF16 or F16"), f.error;
  }
  if (!f.Bool(j, "offload_optimizer", "the index", &x.offload_optimizer)) return f.error;
  if (!f.Bool(j, "offload_params", "the index", &x.offload_params)) return f.error;
  if (!f.Bool(j, "sgd_first_step", "the index", &x.sgd_first_step)) return f.error;
  const Json* sc = f.Get(j, "loss_scaler", "the index");
  if (sc == nullptr) return f.error;
  double scale = 0;
  if (!f.Bool(*sc, "dynamic", "loss_scaler", &x.scaler.dynamic) || !f.Num(*sc, "scale", "loss_scaler", &scale) ||
      !f.Int(*sc, "hysteresis", "loss_scaler", 0, 1 << 30, &v)) {
    return f.error;
  }
  if (!(scale > 0 && scale < 1e38)) return f.Fail("loss_scaler.scale is not a positive float"), f.error;
  x.scaler.scale = static_cast<float>(scale);
  x.scaler.hysteresis = static_cast<int>(v);
  if (!f.Int(*sc, "iter", "loss_scaler", 0, kMaxElements, &x.scaler.iter) ||
      !f.Int(*sc, "last_overflow", "loss_scaler", -1, kMaxElements, &x.scaler.last_overflow)) {
    return f.error;
  }
  if (!f.Str(j, "hash", "the index", &s)) return f.error;
  if (s != "xxh3-64") return f.Fail("unknown hash \"" + s + "\""), f.error;
  if (!f.Int(j, "block_bytes", "the index", 64, int64_t{1} << 34, &x.block_bytes)) return f.error;
  const Json* md = f.Get(j, "metadata", "the index");
  if (md == nullptr || !f.Int(*md, "bytes", "metadata", 0, int64_t{1} << 40, &x.metadata_bytes) ||
      !f.Str(*md, "hash", "metadata", &s)) {
    return f.error;
  }
  if (!ParseHex(s, &x.metadata_hash)) return f.Fail("metadata.hash is not 16 hex digits"), f.error;

  const Json* files = f.Array(j, "files", "the index");
  if (files == nullptr) return f.error;
  if (files->empty() || files->size() > (size_t{1} << 24)) return f.Fail("files is empty or too long"), f.error;
  for (size_t i = 0; i < files->size(); ++i) {
    const Json& fj = (*files)[i];
    const std::string ctx = "files[" + std::to_string(i) + "]";
    File file;
    if (!f.Str(fj, "name", ctx, &file.name) || !f.Int(fj, "bytes", ctx, 0, kMaxElements * 8, &file.bytes)) return f.error;
    if (file.name.empty() || file.name.find('/') != std::string::npos || file.name == "." || file.name == "..") {
      return f.Fail(ctx + ".name \"" + file.name + "\" is not a plain file name"), f.error;
    }
    const Json* blocks = f.Array(fj, "blocks", ctx);
    if (blocks == nullptr) return f.error;
    if (static_cast<int64_t>(blocks->size()) != NumBlocks(file.bytes, x.block_bytes)) {
      return f.Fail(ctx + " has " + std::to_string(blocks->size()) + " block hashes for " + std::to_string(file.bytes) +
                    " bytes"),
             f.error;
    }
    for (const Json& b : *blocks) {
      uint64_t h;
      if (!b.is_string() || !ParseHex(b.get<std::string>(), &h)) return f.Fail(ctx + ".blocks has a bad hash"), f.error;
      file.block_hashes.push_back(h);
    }
    x.files.push_back(std::move(file));
  }

  const Json* params = f.Array(j, "params", "the index");
  if (params == nullptr) return f.error;
  for (size_t i = 0; i < params->size(); ++i) {
    const Json& pj = (*params)[i];
    std::string ctx = "params[" + std::to_string(i) + "]";
    Param p;
    if (!f.Str(pj, "name", ctx, &p.name)) return f.error;
    ctx += " (" + p.name + ")";
    const Json* shape = f.Array(pj, "shape", ctx);
    if (shape == nullptr) return f.error;
    if (shape->size() > 16) return f.Fail(ctx + " has more than 16 dimensions"), f.error;
    p.numel = 1;
    for (const Json& d : *shape) {
      int64_t dim;
      if (!f.IntValue(d, ctx + ".shape", 0, kMaxElements, &dim)) return f.error;
      if (dim != 0 && p.numel > kMaxElements / dim) return f.Fail(ctx + ".shape is too large"), f.error;
      p.numel *= dim;
      p.shape.push_back(dim);
    }
    if (!f.Int(pj, "unit", ctx, 0, 1 << 30, &v) || !f.Bool(pj, "trainable", ctx, &p.trainable)) return f.error;
    p.unit = static_cast<int>(v);
    const Json* tensors = f.Get(pj, "tensors", ctx);
    if (tensors == nullptr) return f.error;
    if (!tensors->is_object()) return f.Fail(ctx + ".tensors is not an object"), f.error;
    for (auto it = tensors->begin(); it != tensors->end(); ++it) {
      Tensor t;
      t.kind = it.key();
      const std::string tctx = ctx + ".tensors." + t.kind;
      if (t.kind != "param" && t.kind != "master" && t.kind != "exp_avg" && t.kind != "exp_avg_sq" &&
          t.kind != "momentum") {
        return f.Fail(tctx + ": unknown tensor kind"), f.error;
      }
      if (!f.Str(it.value(), "dtype", tctx, &s)) return f.error;
      if (!StoredDType(s, &t.dtype)) return f.Fail(tctx + ".dtype \"" + s + "\" is not F32, BF16 or F16"), f.error;
      if (t.kind != "param" && t.dtype != DType::kF32) return f.Fail(tctx + " must be F32"), f.error;
      const Json* frags = f.Array(it.value(), "fragments", tctx);
      if (frags == nullptr) return f.error;
      int64_t next = 0;  // fragments cover [0, numel) in order
      const int64_t esize = static_cast<int64_t>(DTypeSize(t.dtype));
      for (const Json& fr : *frags) {
        if (!fr.is_array() || fr.size() != 4) return f.Fail(tctx + ": a fragment is not [file, byte, offset, count]"), f.error;
        Fragment g;
        int64_t file;
        if (!f.IntValue(fr[0], tctx + " fragment file", 0, static_cast<int64_t>(x.files.size()) - 1, &file) ||
            !f.IntValue(fr[1], tctx + " fragment byte offset", 0, kMaxElements * 8, &g.byte_offset) ||
            !f.IntValue(fr[2], tctx + " fragment offset", 0, p.numel, &g.param_offset) ||
            !f.IntValue(fr[3], tctx + " fragment count", 1, p.numel, &g.count)) {
          return f.error;
        }
        g.file = static_cast<int>(file);
        if (g.param_offset != next || g.count > p.numel - g.param_offset) {
          return f.Fail(tctx + ": fragments do not cover the parameter's elements exactly once, in order (at element " +
                        std::to_string(next) + ")"),
                 f.error;
        }
        if (g.byte_offset + g.count * esize > x.files[g.file].bytes) {
          return f.Fail(tctx + ": a fragment reaches past the end of " + x.files[g.file].name), f.error;
        }
        next = g.param_offset + g.count;
        t.fragments.push_back(g);
      }
      if (next != p.numel) {
        return f.Fail(tctx + ": fragments cover " + std::to_string(next) + " of " + std::to_string(p.numel) +
                      " elements"),
               f.error;
      }
      p.tensors.push_back(std::move(t));
    }
    if (p.Find("param") == nullptr) return f.Fail(ctx + " has no \"param\" tensor"), f.error;
    x.params.push_back(std::move(p));
  }
  *index = std::move(x);
  return Status::Ok();
}

uint64_t HashBlock(const void* data, int64_t bytes) { return XXH3_64bits(data, static_cast<size_t>(bytes)); }

// ---------------------------------------------------------------------------------------------------------------
// Writer

Writer::Writer(std::string path, int64_t block_bytes, int64_t fail_after)
    : path_(std::move(path)), block_bytes_(block_bytes), fail_after_(fail_after) {}

Writer::~Writer() {
  if (fd_ >= 0) ::close(fd_);
}

Status Writer::Open() {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) return Status::IoError(Errno("cannot create", path_));
  block_.reserve(static_cast<size_t>(block_bytes_));
  return Status::Ok();
}

Status Writer::Flush() {
  if (block_.empty()) return Status::Ok();
  hashes_.push_back(HashBlock(block_.data(), static_cast<int64_t>(block_.size())));
  const char* p = block_.data();
  int64_t left = static_cast<int64_t>(block_.size());
  while (left > 0) {
    int64_t chunk = left;
    if (fail_after_ >= 0) {
      chunk = std::min(chunk, fail_after_ - written_);
      if (chunk <= 0) {
        return Status::IoError("writing " + path_ + ": injected fault after " + std::to_string(written_) +
                               " bytes (test hook)");
      }
    }
    const ssize_t n = ::write(fd_, p, static_cast<size_t>(chunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::IoError(Errno("cannot write", path_));
    }
    p += n;
    left -= n;
    written_ += n;
  }
  block_.clear();
  return Status::Ok();
}

Status Writer::Write(const void* data, int64_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const int64_t room = block_bytes_ - static_cast<int64_t>(block_.size());
    const int64_t n = std::min(room, bytes);
    block_.append(p, static_cast<size_t>(n));
    p += n;
    bytes -= n;
    if (static_cast<int64_t>(block_.size()) == block_bytes_) ZERO_RETURN_IF_ERROR(Flush());
  }
  return Status::Ok();
}

Status Writer::Close() {
  ZERO_RETURN_IF_ERROR(Flush());
  if (::fsync(fd_) != 0) return Status::IoError(Errno("cannot fsync", path_));
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) return Status::IoError(Errno("cannot close", path_));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------------------------
// Reader

Reader::Reader(std::string path, const File& file, int64_t block_bytes)
    : path_(std::move(path)), file_(&file), block_bytes_(block_bytes) {}

Reader::~Reader() {
  if (fd_ >= 0) ::close(fd_);
}

Status Reader::Block(int64_t b, const std::string** data) {
  for (auto it = cache_.begin(); it != cache_.end(); ++it) {
    if (it->first == b) {
      cache_.splice(cache_.begin(), cache_, it);
      *data = &cache_.front().second;
      return Status::Ok();
    }
  }
  if (fd_ < 0) {
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return Status::IoError(Errno("cannot open", path_));
  }
  const int64_t start = b * block_bytes_;
  const int64_t len = std::min(block_bytes_, file_->bytes - start);
  std::string buf(static_cast<size_t>(len), '\0');
  int64_t got = 0;
  while (got < len) {
    const ssize_t n = ::pread(fd_, buf.data() + got, static_cast<size_t>(len - got), start + got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::IoError(Errno("cannot read", path_));
    }
    if (n == 0) {
      return Status::DataLoss(path_ + " is truncated: block " + std::to_string(b) + " ends at byte " +
                              std::to_string(start + got) + " of " + std::to_string(file_->bytes));
    }
    got += n;
  }
  if (HashBlock(buf.data(), len) != file_->block_hashes[static_cast<size_t>(b)]) {
    return Status::DataLoss("checksum mismatch in " + path_ + ", block " + std::to_string(b) + " (bytes " +
                            std::to_string(start) + ".." + std::to_string(start + len) +
                            "): the file is corrupt; load another checkpoint");
  }
  if (cache_.size() >= 4) cache_.pop_back();
  cache_.emplace_front(b, std::move(buf));
  *data = &cache_.front().second;
  return Status::Ok();
}

Status Reader::Read(int64_t offset, int64_t bytes, void* dst) {
  if (offset < 0 || bytes < 0 || offset + bytes > file_->bytes) {
    return Status::Internal("read of " + path_ + " out of range (the index was validated against its size)");
  }
  char* out = static_cast<char*>(dst);
  while (bytes > 0) {
    const int64_t b = offset / block_bytes_;
    const std::string* data = nullptr;
    ZERO_RETURN_IF_ERROR(Block(b, &data));
    const int64_t in = offset - b * block_bytes_;
    const int64_t n = std::min(bytes, static_cast<int64_t>(data->size()) - in);
    std::memcpy(out, data->data() + in, static_cast<size_t>(n));
    out += n;
    offset += n;
    bytes -= n;
  }
  return Status::Ok();
}

Status VerifyBuffer(std::string_view data, const File& file, int64_t block_bytes, const std::string& where) {
  if (static_cast<int64_t>(data.size()) != file.bytes) {
    return Status::DataLoss(where + " has " + std::to_string(data.size()) + " bytes; the index says " +
                            std::to_string(file.bytes));
  }
  for (int64_t b = 0; b < NumBlocks(file.bytes, block_bytes); ++b) {
    const int64_t start = b * block_bytes;
    const int64_t len = std::min(block_bytes, file.bytes - start);
    if (HashBlock(data.data() + start, len) != file.block_hashes[static_cast<size_t>(b)]) {
      return Status::DataLoss("checksum mismatch in " + where + ", block " + std::to_string(b));
    }
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------------------------
// File system

// MakeDirs uses std::filesystem's error_code form (it reports instead of throwing). RemoveAll walks the tree with
// POSIX nftw instead of std::filesystem::remove_all: in a process with PyTorch's own libtorch.so (its pip wheels,
// e.g. a zero::torch trainer), that library exports a copy of std::filesystem which takes precedence over
// libstdc++'s, and its remove_all calls a libstdc++ function that an older libstdc++ lacks (GCC 12's, Debian 12):
// with torch 2.11 on Debian 12 it jumps to address 0 for any non-empty directory, whichever form is called.
Status MakeDirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return Status::IoError("cannot create directory " + path + ": " + ec.message());
  return Status::Ok();
}

namespace {
// Children before their directory (FTW_DEPTH), links not followed (FTW_PHYS). A non-zero return stops the walk and
// is what nftw returns: the errno of the entry that could not be removed, its path kept for the message.
thread_local std::string remove_failed_at;
int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) {
  if (::remove(path) == 0 || errno == ENOENT) return 0;
  remove_failed_at = path;
  return errno;
}
}  // namespace

Status RemoveAll(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    return errno == ENOENT ? Status::Ok() : Status::IoError(Errno("cannot remove", path));
  }
  remove_failed_at.clear();
  const int rc = ::nftw(path.c_str(), RemoveEntry, /*fd_limit=*/16, FTW_DEPTH | FTW_PHYS);
  if (rc == 0) return Status::Ok();
  if (rc > 0) errno = rc;  // from RemoveEntry; -1: nftw itself failed, errno says why
  return Status::IoError(Errno("cannot remove", remove_failed_at.empty() ? path : remove_failed_at));
}

Status FsyncDir(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::IoError(Errno("cannot open directory", path));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    errno = err;
    return Status::IoError(Errno("cannot fsync directory", path));
  }
  return Status::Ok();
}

Status FileSize(const std::string& path, int64_t* bytes) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::IoError(Errno("cannot stat", path));
  if (!S_ISREG(st.st_mode)) return Status::IoError(path + " is not a regular file");
  *bytes = static_cast<int64_t>(st.st_size);
  return Status::Ok();
}

Status ReadWholeFile(const std::string& path, int64_t max_bytes, std::string* out) {
  int64_t size = 0;
  ZERO_RETURN_IF_ERROR(FileSize(path, &size));
  if (size > max_bytes) {
    return Status::DataLoss(path + " has " + std::to_string(size) + " bytes, more than the " +
                            std::to_string(max_bytes) + " such a file can have");
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::IoError(Errno("cannot open", path));
  out->assign(static_cast<size_t>(size), '\0');
  int64_t got = 0;
  while (got < size) {
    const ssize_t n = ::read(fd, out->data() + got, static_cast<size_t>(size - got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      errno = err;
      return n == 0 ? Status::DataLoss(path + " shrank while being read") : Status::IoError(Errno("cannot read", path));
    }
    got += n;
  }
  ::close(fd);
  return Status::Ok();
}

Status WriteFileAtomic(const std::string& path, std::string_view data) {
  const std::string tmp = path + ".tmp";
  Writer w(tmp, kDefaultBlockBytes);
  ZERO_RETURN_IF_ERROR(w.Open());
  ZERO_RETURN_IF_ERROR(w.Write(data.data(), static_cast<int64_t>(data.size())));
  ZERO_RETURN_IF_ERROR(w.Close());
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Status::IoError(Errno("cannot rename " + tmp + " to", path));
  const std::string dir = std::filesystem::path(path).parent_path().string();
  return FsyncDir(dir.empty() ? "." : dir);
}

}  // namespace zero::ckpt

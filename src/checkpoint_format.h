// The on-disk format of zero checkpoints, apart from the engine (so that the fuzzer reaches it alone).
//
//   ROOT/latest                 the tag of the newest complete checkpoint (one line; replaced atomically)
//   ROOT/TAG/index.json         everything below, written by rank 0 after every shard is durable
//   ROOT/TAG/shard-RRRRR.bin    rank R's owned fragments under the saving plan, raw little-endian values
//   ROOT/TAG/metadata.bin       the trainer's metadata blob (may be empty)
//   ROOT/TAG.tmp/               the same while being written; renamed to ROOT/TAG only when complete
//
// The index maps every parameter's tensors (kind "param" in the saved param_dtype; "master" fp32 when the saving
// engine kept a separate fp32 master; the optimizer state "exp_avg", "exp_avg_sq" or "momentum" in fp32) to 1-D
// fragments {file, byte offset, first element within the parameter, count}: a tensor's fragments cover its
// elements exactly once, in order. Each file is hashed in blocks of `block_bytes` (XXH3-64 per block), so a
// reader verifies exactly the blocks it reads.
#pragma once

#include <cstdint>
#include <list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "zero/status.h"
#include "zero/types.h"

namespace zero::ckpt {

inline constexpr int kFormatVersion = 1;
inline constexpr const char* kFormatName = "zero-checkpoint";
inline constexpr int64_t kDefaultBlockBytes = int64_t{4} << 20;

struct Fragment {
  int file = 0;
  int64_t byte_offset = 0;
  int64_t param_offset = 0;  // first element within the parameter
  int64_t count = 0;
};

// One stored tensor of a parameter.
struct Tensor {
  std::string kind;  // "param", "master", "exp_avg", "exp_avg_sq", "momentum"
  DType dtype = DType::kF32;
  std::vector<Fragment> fragments;  // by param_offset, covering [0, numel) exactly
};

struct Param {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  int unit = 0;
  bool trainable = true;
  std::vector<Tensor> tensors;
  const Tensor* Find(std::string_view kind) const;
};

struct File {
  std::string name;  // a plain file name inside the checkpoint directory
  int64_t bytes = 0;
  std::vector<uint64_t> block_hashes;
};

struct Scaler {
  bool dynamic = false;
  float scale = 1.0f;
  int hysteresis = 0;
  int64_t iter = 0;
  int64_t last_overflow = -1;
};

struct Index {
  int version = kFormatVersion;
  int64_t step = 0;
  int world_size = 1;
  int stage = 0;
  std::string optimizer;  // "adamw" or "sgd"
  DType param_dtype = DType::kF32;
  DType grad_dtype = DType::kF32;
  bool offload_optimizer = false;
  bool offload_params = false;
  bool sgd_first_step = true;
  Scaler scaler;
  int64_t block_bytes = kDefaultBlockBytes;
  std::vector<File> files;
  std::vector<Param> params;
  int64_t metadata_bytes = 0;
  uint64_t metadata_hash = 0;
};

// The index as JSON (deterministic: the same index gives the same bytes).
std::string ToJson(const Index& index);
// Parses and validates an index: types, ranges, fragment coverage and bounds against the files' sizes, block
// counts. Never trusts a number it has not checked. `where` names the file in messages.
Status ParseIndex(std::string_view json, const std::string& where, Index* index);

uint64_t HashBlock(const void* data, int64_t bytes);
inline int64_t NumBlocks(int64_t bytes, int64_t block_bytes) { return (bytes + block_bytes - 1) / block_bytes; }

// Writes a file sequentially, hashing it block by block; Close fsyncs. A fault hook for tests stops after
// `fail_after` bytes (-1: never) as if the disk had failed there.
class Writer {
 public:
  Writer(std::string path, int64_t block_bytes, int64_t fail_after = -1);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;
  Status Open();
  Status Write(const void* data, int64_t bytes);
  Status Close();  // flushes, fsyncs, closes
  int64_t bytes() const { return written_ + static_cast<int64_t>(block_.size()); }
  const std::vector<uint64_t>& block_hashes() const { return hashes_; }

 private:
  Status Flush();
  std::string path_;
  int64_t block_bytes_;
  int64_t fail_after_;
  int fd_ = -1;
  int64_t written_ = 0;
  std::string block_;
  std::vector<uint64_t> hashes_;
};

// Reads ranges of one file, verifying every block it touches against the index (a small cache of verified
// blocks, so reading a file in order reads each block once). Errors are DataLoss (checksum, short file) or
// IoError (the file system), naming the file, block and byte range.
class Reader {
 public:
  Reader(std::string path, const File& file, int64_t block_bytes);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  Status Read(int64_t offset, int64_t bytes, void* dst);

 private:
  Status Block(int64_t b, const std::string** data);
  std::string path_;
  const File* file_;
  int64_t block_bytes_;
  int fd_ = -1;
  std::list<std::pair<int64_t, std::string>> cache_;  // most recent first
};

// Verifies `data` as a whole file described by `file` (the fuzzer and small files such as metadata.bin).
Status VerifyBuffer(std::string_view data, const File& file, int64_t block_bytes, const std::string& where);

// File-system helpers (POSIX), each with a message naming the path and the errno text.
Status MakeDirs(const std::string& path);
Status RemoveAll(const std::string& path);
Status FsyncDir(const std::string& path);
Status ReadWholeFile(const std::string& path, int64_t max_bytes, std::string* out);
// Writes `data` to path + ".tmp", fsyncs, renames over `path` and fsyncs the directory.
Status WriteFileAtomic(const std::string& path, std::string_view data);
Status FileSize(const std::string& path, int64_t* bytes);

}  // namespace zero::ckpt

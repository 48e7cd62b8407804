// NvmeTier: one rank's files of the NVMe tier, where the offloaded optimizer state (and stage-3 parameter shards)
// live instead of host memory (Options::nvme_path).
//
// Layout. Each file is a sequence of records (one per bucket: its shard's fp32 master, m and v, or its parameter
// shard), each a multiple of kNvmeAlign bytes, back to back from offset 0. A transfer moves whole records, from or
// into a buffer laid out like the file. Records are checksummed in blocks of `block_bytes` counted from the
// record's start (XXH3-64, as checkpoints do): a write hashes its blocks before it is queued, a read verifies
// every block before Wait returns, so a block the disk or another process changed is never used.
//
// The files. ROOT/zero-nvme-r<rank>-p<pid>-<n>/ per tier, created at Open with O_DIRECT files (the page cache
// would hold a second copy of the state in host memory), preallocated (a full disk fails Open, not a step), and
// removed with the tier: they are working storage, not a checkpoint. Open refuses a directory on tmpfs or ramfs
// (host memory: the tier would spend what it is meant to save) and one whose file system refuses O_DIRECT.
//
// Rules the caller keeps (checked; a violation is an Internal error): a record is never read and written at
// once, and a buffer stays untouched until Wait returns for its transfer.
//
// Errors name the rank, the file, what the record holds and its bucket, the bytes, and the fix: a full disk
// (ENOSPC), any other I/O error, a short read (the file was truncated), a checksum mismatch, a file removed or
// replaced (CheckFiles), a directory that cannot be written, a file system without O_DIRECT.
// Thread-safety: every method may be called from any thread (the optimizer on the trainer's thread, stage-3 gathers
// on the communication thread).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "io_uring_queue.h"
#include "zero/status.h"

namespace zero {

// O_DIRECT needs buffers, offsets and lengths aligned to the device's logical block (512 B or 4 KiB): 4 KiB
// serves both. Records and bounce buffers are multiples of it.
inline constexpr int64_t kNvmeAlign = 4096;
inline int64_t NvmeAlign(int64_t bytes) { return (bytes + kNvmeAlign - 1) / kNvmeAlign * kNvmeAlign; }
// Checksum blocks of one record.
inline int64_t NvmeBlocks(int64_t record_bytes, int64_t block_bytes) {
  return (record_bytes + block_bytes - 1) / block_bytes;
}
// Bytes of the checksum table for `blocks` blocks: an XXH3-64 and a state byte per block, rounded to 8.
inline int64_t NvmeChecksumBytes(int64_t blocks) { return (blocks * 9 + 7) / 8 * 8; }

struct NvmeFileLayout {
  std::string name;                   // a plain file name: "optimizer.bin"
  std::string holds;                  // for messages: "optimizer state" ("the optimizer state of bucket 5")
  std::vector<int64_t> record_bytes;  // multiples of kNvmeAlign
  std::vector<int> record_bucket;     // the bucket each record belongs to (messages)
};

struct NvmeTierOptions {
  std::string root;                  // Options::nvme_path
  int rank = 0;
  int64_t block_bytes = int64_t{1} << 20;  // I/O size and checksum block: a multiple of kNvmeAlign
  int queue_depth = 8;               // chunks in flight
  int max_requests = 64;             // transfers outstanding at once
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};  // a transfer slower than this is a stalled disk
  bool preallocate = true;           // fallocate at Open; tests turn it off to fill a small disk in a transfer
  int64_t fail_open_errno = 0;       // test seam: opening the files fails with this errno (EINVAL: no O_DIRECT)
};

class NvmeTier {
 public:
  // Creates the directory and files. `checksums` (NvmeChecksumBytes of every record's blocks, zero-filled) is the
  // caller's, counted like its other host buffers, and outlives the tier.
  static Status Open(const NvmeTierOptions& options, std::vector<NvmeFileLayout> files, void* checksums,
                     int64_t checksum_bytes, std::unique_ptr<NvmeTier>* out);
  // Waits for every transfer, closes and removes the files and the directory.
  ~NvmeTier();
  NvmeTier(const NvmeTier&) = delete;
  NvmeTier& operator=(const NvmeTier&) = delete;

  // Queue a transfer of records [first, first + count) of `file` from / into `buf` (aligned to kNvmeAlign, laid
  // out like the file). Write hashes the blocks first. Never blocks on the disk.
  Status Write(int file, int first, int count, const void* buf, uint64_t* ticket);
  Status Read(int file, int first, int count, void* buf, uint64_t* ticket);
  // Waits for one transfer; for a read, verifies every block. The status names file, record and fix.
  Status Wait(uint64_t ticket);
  // Waits for every outstanding transfer; the first error.
  Status WaitAll();
  // Every file is still the one Open created, at its full size: not removed, replaced or truncated.
  Status CheckFiles() const;

  IoStats stats() const { return queue_->stats(); }
  void TEST_SetFault(const IoFault& fault) { queue_->SetFault(fault); }
  int TEST_fd(int file) const { return files_[static_cast<size_t>(file)].fd; }

  const std::string& dir() const { return dir_; }
  std::string Path(int file) const;
  int64_t FileBytes(int file) const { return files_[static_cast<size_t>(file)].bytes; }
  int num_records(int file) const { return static_cast<int>(files_[static_cast<size_t>(file)].layout.record_bytes.size()); }
  int64_t block_bytes() const { return options_.block_bytes; }
  int queue_depth() const { return options_.queue_depth; }

 private:
  struct File {
    NvmeFileLayout layout;
    std::string path;
    int fd = -1;
    int64_t bytes = 0;
    dev_t dev = 0;
    ino_t ino = 0;
    std::vector<int64_t> record_offset;  // bytes
    std::vector<int64_t> first_block;    // index into the checksum table
    std::vector<int16_t> readers;        // reads in flight per record (-1: a write)
  };
  struct Pending {  // what an outstanding ticket moves (indexed by IoQueue::SlotOf)
    bool used = false;
    bool write = false;
    int file = 0, first = 0, count = 0;
    const char* buf = nullptr;
    uint64_t ticket = 0;
  };

  explicit NvmeTier(const NvmeTierOptions& options) : options_(options) {}
  Status Start(int file, int first, int count, bool write, const void* buf, uint64_t* ticket);
  // "the optimizer state of bucket 5" / "... of buckets 5-7".
  std::string What(int file, int first, int count) const;
  std::string Prefix() const;  // "NVMe tier (rank R, DIR)"
  Status Verify(const Pending& p) const;

  NvmeTierOptions options_;
  std::string dir_;
  std::vector<File> files_;
  uint64_t* hashes_ = nullptr;  // the caller's table: hashes, then one state byte per block
  uint8_t* states_ = nullptr;
  std::unique_ptr<IoQueue> queue_;
  mutable std::mutex mu_;
  std::vector<Pending> pending_;
};

}  // namespace zero

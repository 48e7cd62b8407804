// NvmeTier: the tier's directory, O_DIRECT files, checksummed record transfers and their errors (nvme_tier.h).
#include "nvme_tier.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "checkpoint_format.h"  // ckpt::HashBlock: XXH3-64, the checkpoints' block hash

namespace zero {
namespace {

constexpr uint8_t kUnwritten = 0, kValid = 1, kWriteFailed = 2;

std::atomic<int> g_tiers{0};  // names each tier's directory apart within a process

std::string ErrnoText(int e) {
  const char* name = strerrorname_np(e);
  return std::string(std::strerror(e)) + " (" + (name != nullptr ? name : std::to_string(e)) + ")";
}

// The file system under `path`, by statfs's magic: for messages, and to refuse memory-backed ones.
std::string FsName(int64_t magic) {
  switch (static_cast<uint32_t>(magic)) {
    case 0xEF53: return "ext2/3/4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x858458F6: return "ramfs";
    case 0x6969: return "nfs";
    case 0xFF534D42: return "cifs";
    case 0x794C7630: return "overlayfs";
    case 0x65735546: return "fuse";
    case 0x2FC12FC1: return "zfs";
    case 0xF2F52010: return "f2fs";
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "magic 0x%llx", static_cast<unsigned long long>(magic));
  return buf;
}

}  // namespace

std::string NvmeTier::Prefix() const {
  return "NVMe tier (rank " + std::to_string(options_.rank) + ", " + (dir_.empty() ? options_.root : dir_) + ")";
}

std::string NvmeTier::Path(int file) const { return files_[static_cast<size_t>(file)].path; }

std::string NvmeTier::What(int file, int first, int count) const {
  const NvmeFileLayout& l = files_[static_cast<size_t>(file)].layout;
  const int a = l.record_bucket[static_cast<size_t>(first)];
  const int b = l.record_bucket[static_cast<size_t>(first + count - 1)];
  std::string out = "the " + l.holds + (a == b ? " of bucket " : " of buckets ");
  out += std::to_string(a);
  if (a != b) {
    out += '-';
    out += std::to_string(b);
  }
  return out;
}

Status NvmeTier::Open(const NvmeTierOptions& o, std::vector<NvmeFileLayout> files, void* checksums,
                      int64_t checksum_bytes, std::unique_ptr<NvmeTier>* out) {
  std::unique_ptr<NvmeTier> t(new NvmeTier(o));
  const std::string where = t->Prefix();
  if (o.root.empty()) return Status::InvalidArgument(where + ": the directory is empty");
  if (o.block_bytes < kNvmeAlign || o.block_bytes % kNvmeAlign != 0 || o.queue_depth < 1) {
    return Status::InvalidArgument(where + ": block_bytes must be a multiple of 4096 and queue_depth >= 1");
  }
  const auto fix = std::string(". Give Options::nvme_path a writable directory on a local disk (ext4, xfs)");
  Status s = ckpt::MakeDirs(o.root);
  if (!s.ok()) return Status::IoError(where + ": " + s.message() + fix);
  struct statfs fs;
  if (::statfs(o.root.c_str(), &fs) != 0) {
    return Status::IoError(where + ": cannot statfs " + o.root + ": " + ErrnoText(errno) + fix);
  }
  const std::string fs_name = FsName(static_cast<int64_t>(fs.f_type));
  if (fs_name == "tmpfs" || fs_name == "ramfs") {
    return Status::InvalidArgument(
        where + ": " + o.root + " is on " + fs_name +
        ", which keeps its files in host memory: the tier would spend the memory it is meant to save (and "
        "O_DIRECT on it is either refused or a copy). Give Options::nvme_path a directory on a local disk (ext4, "
        "xfs), or leave it empty to keep the optimizer state in host memory");
  }
  t->dir_ = o.root + "/zero-nvme-r" + std::to_string(o.rank) + "-p" + std::to_string(::getpid()) + "-" +
            std::to_string(g_tiers.fetch_add(1) + 1);
  const std::string where_dir = t->Prefix();
  (void)ckpt::RemoveAll(t->dir_);  // a directory of a killed run whose pid this process reuses
  if (::mkdir(t->dir_.c_str(), 0700) != 0) {
    const int e = errno;
    t->dir_.clear();  // nothing to remove
    return Status::IoError(where + ": cannot create its directory in " + o.root + ": " + ErrnoText(e) + fix);
  }

  // Offsets and checksum blocks.
  int64_t blocks = 0;
  for (NvmeFileLayout& l : files) {
    File f;
    if (l.record_bucket.size() != l.record_bytes.size()) return Status::Internal(where + ": bad layout");
    for (int64_t r : l.record_bytes) {
      if (r <= 0 || r % kNvmeAlign != 0) return Status::Internal(where + ": a record is not a multiple of 4096");
      f.record_offset.push_back(f.bytes);
      f.first_block.push_back(blocks);
      f.bytes += r;
      blocks += NvmeBlocks(r, o.block_bytes);
    }
    f.readers.assign(l.record_bytes.size(), 0);
    f.path = t->dir_ + "/" + l.name;
    f.layout = std::move(l);
    t->files_.push_back(std::move(f));
  }
  if (checksum_bytes < NvmeChecksumBytes(blocks)) {
    return Status::Internal(where + ": the checksum table has " + std::to_string(checksum_bytes) + " bytes; " +
                            std::to_string(blocks) + " blocks need " + std::to_string(NvmeChecksumBytes(blocks)));
  }
  t->hashes_ = static_cast<uint64_t*>(checksums);
  t->states_ = reinterpret_cast<uint8_t*>(t->hashes_ + blocks);
  std::memset(t->states_, kUnwritten, static_cast<size_t>(blocks));

  for (size_t i = 0; i < t->files_.size(); ++i) {
    File& f = t->files_[i];
    const std::string path = t->Path(static_cast<int>(i));
    // O_DIRECT: the page cache would keep a second copy of the state in host memory, which is what the tier saves.
    f.fd = o.fail_open_errno != 0 ? -1 : ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0600);
    if (f.fd < 0) {
      const int e = o.fail_open_errno != 0 ? static_cast<int>(o.fail_open_errno) : errno;
      if (e == EINVAL) {
        return Status::InvalidArgument(where_dir + ": the file system of " + o.root + " (" + fs_name +
                                       ") refuses O_DIRECT, which the tier needs so that the page cache does not "
                                       "hold a second copy of the state in host memory" + fix);
      }
      return Status::IoError(where_dir + ": cannot create " + path + ": " + ErrnoText(e) + fix);
    }
    if (f.bytes > 0) {
      int rc = -1;
      if (o.preallocate) {
        rc = ::fallocate(f.fd, 0, 0, f.bytes);
        if (rc != 0 && errno != EOPNOTSUPP) {
          const int e = errno;
          struct statfs now;
          const int64_t avail = ::statfs(o.root.c_str(), &now) == 0
                                    ? static_cast<int64_t>(now.f_bavail) * static_cast<int64_t>(now.f_bsize)
                                    : -1;
          return Status::IoError(where_dir + ": cannot allocate " + std::to_string(f.bytes) + " bytes for " + path +
                                 ": " + ErrnoText(e) +
                                 (e == ENOSPC ? ". The disk under " + o.root + " has " + std::to_string(avail) +
                                                    " bytes free: free space there or give Options::nvme_path a "
                                                    "disk with room for every rank's files (zero::Estimate lists "
                                                    "the NVMe bytes per rank)"
                                              : fix));
        }
      }
      if (rc != 0 && ::ftruncate(f.fd, f.bytes) != 0) {  // no fallocate (or not asked): a sparse file of full size
        return Status::IoError(where_dir + ": cannot size " + path + ": " + ErrnoText(errno) + fix);
      }
    }
    struct stat st;
    if (::fstat(f.fd, &st) != 0) return Status::IoError(where_dir + ": cannot stat " + path + ": " + ErrnoText(errno));
    f.dev = st.st_dev;
    f.ino = st.st_ino;
  }
  ZERO_RETURN_IF_ERROR(IoQueue::Create(o.queue_depth, o.block_bytes, o.max_requests, &t->queue_).WithContext(where_dir));
  t->pending_.resize(static_cast<size_t>(t->queue_->max_requests()));
  *out = std::move(t);
  return Status::Ok();
}

NvmeTier::~NvmeTier() {
  if (queue_) (void)WaitAll();
  queue_.reset();  // joins the I/O thread before the files close
  for (size_t i = 0; i < files_.size(); ++i) {
    if (files_[i].fd >= 0) {
      ::close(files_[i].fd);
      ::unlink(Path(static_cast<int>(i)).c_str());
    }
  }
  if (!dir_.empty()) (void)::rmdir(dir_.c_str());
}

Status NvmeTier::Start(int file, int first, int count, bool write, const void* buf, uint64_t* ticket) {
  if (file < 0 || file >= static_cast<int>(files_.size()) || first < 0 || count < 1 ||
      first + count > num_records(file) || reinterpret_cast<uintptr_t>(buf) % kNvmeAlign != 0) {
    return Status::Internal(Prefix() + ": a transfer outside the files or from an unaligned buffer");
  }
  File& f = files_[static_cast<size_t>(file)];
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int r = first; r < first + count; ++r) {
      const int16_t busy = f.readers[static_cast<size_t>(r)];
      if (write ? busy != 0 : busy < 0) {
        return Status::Internal(Prefix() + ": " + What(file, r, 1) + " is " + (busy < 0 ? "being written" : "being read") +
                                " while a " + (write ? "write" : "read") + " of it starts");
      }
    }
    for (int r = first; r < first + count; ++r) {
      int16_t& busy = f.readers[static_cast<size_t>(r)];
      busy = write ? int16_t{-1} : static_cast<int16_t>(busy + 1);
    }
  }
  const int64_t offset = f.record_offset[static_cast<size_t>(first)];
  const int64_t end = first + count < num_records(file) ? f.record_offset[static_cast<size_t>(first + count)] : f.bytes;
  if (write) {
    // The records are this thread's until the write completes (claimed above), so their table entries too.
    const char* p = static_cast<const char*>(buf);
    for (int r = first; r < first + count; ++r) {
      const int64_t rb = f.layout.record_bytes[static_cast<size_t>(r)];
      const int64_t b0 = f.first_block[static_cast<size_t>(r)];
      for (int64_t b = 0; b < NvmeBlocks(rb, options_.block_bytes); ++b) {
        const int64_t len = std::min(options_.block_bytes, rb - b * options_.block_bytes);
        hashes_[b0 + b] = ckpt::HashBlock(p + b * options_.block_bytes, len);
        states_[b0 + b] = kValid;
      }
      p += rb;
    }
  }
  Status s = queue_->Submit(f.fd, write, offset, end - offset, const_cast<void*>(buf), ticket);
  std::lock_guard<std::mutex> lock(mu_);
  if (!s.ok()) {
    for (int r = first; r < first + count; ++r) {
      int16_t& busy = f.readers[static_cast<size_t>(r)];
      busy = write ? int16_t{0} : static_cast<int16_t>(busy - 1);
    }
    return s.WithContext(Prefix());
  }
  Pending& p = pending_[static_cast<size_t>(IoQueue::SlotOf(*ticket))];
  p = Pending{true, write, file, first, count, static_cast<const char*>(buf), *ticket};
  return Status::Ok();
}

Status NvmeTier::Write(int file, int first, int count, const void* buf, uint64_t* ticket) {
  return Start(file, first, count, true, buf, ticket);
}

Status NvmeTier::Read(int file, int first, int count, void* buf, uint64_t* ticket) {
  return Start(file, first, count, false, buf, ticket);
}

Status NvmeTier::Verify(const Pending& p) const {
  const File& f = files_[static_cast<size_t>(p.file)];
  const char* data = p.buf;
  for (int r = p.first; r < p.first + p.count; ++r) {
    const int64_t rb = f.layout.record_bytes[static_cast<size_t>(r)];
    const int64_t b0 = f.first_block[static_cast<size_t>(r)];
    for (int64_t b = 0; b < NvmeBlocks(rb, options_.block_bytes); ++b) {
      const int64_t len = std::min(options_.block_bytes, rb - b * options_.block_bytes);
      // Messages are composed only on failure: this runs for every block of every step.
      auto block = [&] {
        const int64_t at = f.record_offset[static_cast<size_t>(r)] + b * options_.block_bytes;
        return "block " + std::to_string(b) + " (bytes " + std::to_string(at) + "-" + std::to_string(at + len) +
               " of " + Path(p.file) + ") of " + What(p.file, r, 1);
      };
      if (states_[b0 + b] == kWriteFailed) {
        return Status::DataLoss(Prefix() + ": " + block() + " holds nothing valid: an earlier write of it failed. "
                                "The engine's state is incomplete: Load the last checkpoint into a new engine");
      }
      if (states_[b0 + b] != kValid) {
        return Status::Internal(Prefix() + ": " + block() + " was read before anything was written to it");
      }
      if (ckpt::HashBlock(data + b * options_.block_bytes, len) != hashes_[b0 + b]) {
        return Status::DataLoss(Prefix() + ": checksum mismatch in " + block() +
                                ": what was read is not what the engine wrote. The file was changed behind the "
                                "engine's back, or the disk returned wrong data; the state is lost. Load the last "
                                "checkpoint into a new engine (and check the disk)");
      }
    }
    data += rb;
  }
  return Status::Ok();
}

Status NvmeTier::Wait(uint64_t ticket) {
  Pending p;
  {
    std::lock_guard<std::mutex> lock(mu_);
    p = pending_[static_cast<size_t>(IoQueue::SlotOf(ticket))];
    if (!p.used || p.ticket != ticket) return Status::Internal(Prefix() + ": Wait on an unknown transfer");
  }
  IoResult res;
  File& f = files_[static_cast<size_t>(p.file)];
  const int64_t offset = f.record_offset[static_cast<size_t>(p.first)];
  const int64_t end = p.first + p.count < num_records(p.file) ? f.record_offset[static_cast<size_t>(p.first + p.count)]
                                                              : f.bytes;
  auto what = [&] {  // only on failure
    return std::string(p.write ? "writing " : "reading ") + What(p.file, p.first, p.count) + " (bytes " +
           std::to_string(offset) + "-" + std::to_string(end) + " of " + Path(p.file) + ")";
  };
  Status s = queue_->Wait(ticket, options_.timeout, &res);
  if (!s.ok()) {
    // Still in flight: the records stay claimed, so nothing can reuse them before the transfer ends.
    return Status::Timeout(Prefix() + ": " + what() + " " + s.message() +
                           ": the disk is stalled or failing (see the kernel log)");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The queue released the slot already: another thread's new transfer may hold it by now. Only ours is cleared.
    Pending& mine = pending_[static_cast<size_t>(IoQueue::SlotOf(ticket))];
    if (mine.ticket == ticket) mine.used = false;
    for (int r = p.first; r < p.first + p.count; ++r) {
      int16_t& busy = f.readers[static_cast<size_t>(r)];
      busy = p.write ? int16_t{0} : static_cast<int16_t>(busy - 1);
      if (p.write && !res.ok()) {  // nothing written there can be trusted now
        const int64_t b0 = f.first_block[static_cast<size_t>(r)];
        const int64_t n = NvmeBlocks(f.layout.record_bytes[static_cast<size_t>(r)], options_.block_bytes);
        std::memset(states_ + b0, kWriteFailed, static_cast<size_t>(n));
      }
    }
  }
  static constexpr const char* lost = " The engine's state is incomplete: Load the last checkpoint into a new engine";
  if (res.error != 0) {
    const std::string at = " at byte " + std::to_string(res.error_offset) + ": " + ErrnoText(res.error);
    if (res.error == ENOSPC || res.error == EDQUOT) {
      return Status::IoError(Prefix() + ": " + what() + " failed" + at + ". The disk under " + options_.root +
                             " is full: free space there or give Options::nvme_path a disk with room (the tier's "
                             "files are preallocated at Open; a file system that cannot preallocate fills up "
                             "later)." + lost);
    }
    return Status::IoError(Prefix() + ": " + what() + " failed" + at + ". Check the disk (the kernel log says more)." +
                           lost);
  }
  if (res.short_offset >= 0) {
    const std::string got = std::to_string(res.short_done) + " of " + std::to_string(res.short_wanted) +
                            " bytes at byte " + std::to_string(res.short_offset);
    if (p.write) {
      return Status::IoError(Prefix() + ": " + what() + " wrote only " + got + ": the disk under " + options_.root +
                             " is full or failing." + lost);
    }
    return Status::DataLoss(Prefix() + ": short read: " + what() + " returned " + got +
                            ": the file ends early, so it was truncated behind the engine's back (another process, "
                            "a disk error); the state in it is lost." + lost);
  }
  if (!p.write) return Verify(p);
  return Status::Ok();
}

Status NvmeTier::WaitAll() {
  Status first;
  for (;;) {
    uint64_t ticket = 0;
    bool found = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Pending& p : pending_) {
        if (p.used) {
          ticket = p.ticket;
          found = true;
          break;
        }
      }
    }
    if (!found) return first;
    Status s = Wait(ticket);
    if (first.ok() && !s.ok()) first = s;
    if (s.code() == StatusCode::kTimeout) return first;  // still in flight: waiting again would not help
  }
}

Status NvmeTier::CheckFiles() const {
  for (size_t i = 0; i < files_.size(); ++i) {
    // Once per step: nothing is allocated unless a message is composed.
    const File& f = files_[i];
    const std::string& path = f.path;
    auto lost = [&] {
      return ". The state in it is lost for this engine: Load the last checkpoint into a new engine, and keep other "
             "processes (cleanup jobs, tmp reapers) away from " + options_.root;
    };
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      return Status::DataLoss(Prefix() + ": " + path + " (the " + f.layout.holds + ") was removed behind the engine's "
                              "back (" + ErrnoText(errno) + ")" + lost());
    }
    if (st.st_dev != f.dev || st.st_ino != f.ino) {
      return Status::DataLoss(Prefix() + ": " + path + " (the " + f.layout.holds + ") was replaced by another file" +
                              lost());
    }
    struct stat mine;
    if (::fstat(f.fd, &mine) != 0 || mine.st_size < f.bytes) {
      return Status::DataLoss(Prefix() + ": " + path + " (the " + f.layout.holds + ") was truncated to " +
                              std::to_string(mine.st_size) + " bytes behind the engine's back (the tier wrote " +
                              std::to_string(f.bytes) + ")" + lost());
    }
  }
  return Status::Ok();
}

}  // namespace zero

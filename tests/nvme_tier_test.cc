// The NVMe tier on its own (src/nvme_tier.h, src/io_uring_queue.h): records written and read back through io_uring
// with O_DIRECT, many transfers in flight from two threads, and every fault it names: a changed block (checksum), a
// truncated file (short read), a removed or replaced file, a full disk (a real one: a small loop-mounted ext4 the
// test makes, filled by a transfer and by Open's preallocation; and injected in the middle of a request), an
// unwritable directory (a read-only mount), tmpfs, a file system without O_DIRECT. Files live under the working
// directory (the build tree, on a real disk). Small records and blocks: the suite takes about a second.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "nvme_tier.h"
#include "testing/small_fs.h"

namespace zero::testing {
namespace {

namespace fs = std::filesystem;

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using Aligned = std::unique_ptr<char, FreeDeleter>;

Aligned AlignedBuffer(int64_t bytes) {
  return Aligned(static_cast<char*>(std::aligned_alloc(kNvmeAlign, static_cast<size_t>(NvmeAlign(bytes)))));
}

void Fill(char* p, int64_t bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  for (int64_t i = 0; i < bytes; ++i) p[i] = static_cast<char>(rng());
}

bool Has(const Status& s, const std::string& text) { return s.message().find(text) != std::string::npos; }

// A fresh directory under the working directory (the build tree: a real disk, never tmpfs).
class Scratch {
 public:
  explicit Scratch(const std::string& name) {
    path_ = (fs::current_path() / ("nvme_tier_test_" + name + "_" + std::to_string(::getpid()))).string();
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Two files: "optimizer state" with records of 1, 3 and 17 pages (blocks of 16 KiB: several per record, the last
// one short), and "parameter shard" with two records of 2 pages.
std::vector<NvmeFileLayout> TwoFiles() {
  NvmeFileLayout a{"optimizer.bin", "optimizer state", {4096, 3 * 4096, 17 * 4096}, {0, 1, 4}};
  NvmeFileLayout b{"params.bin", "parameter shard", {8192, 8192}, {2, 3}};
  return {a, b};
}

struct Tier {
  std::vector<uint64_t> checksums;
  std::unique_ptr<NvmeTier> tier;
};

Status OpenTier(const std::string& root, Tier* t, NvmeTierOptions o = {}, std::vector<NvmeFileLayout> files = TwoFiles()) {
  o.root = root;
  if (o.block_bytes == (int64_t{1} << 20)) o.block_bytes = 16 << 10;
  o.queue_depth = o.queue_depth == 8 ? 4 : o.queue_depth;
  int64_t blocks = 0;
  for (const NvmeFileLayout& f : files) {
    for (int64_t r : f.record_bytes) blocks += NvmeBlocks(r, o.block_bytes);
  }
  t->checksums.assign(static_cast<size_t>(NvmeChecksumBytes(blocks) / 8), 0);
  return NvmeTier::Open(o, std::move(files), t->checksums.data(), NvmeChecksumBytes(blocks), &t->tier);
}

Status WriteRecord(NvmeTier& tier, int file, int record, const char* data) {
  uint64_t ticket = 0;
  ZERO_RETURN_IF_ERROR(tier.Write(file, record, 1, data, &ticket));
  return tier.Wait(ticket);
}

Status ReadRecord(NvmeTier& tier, int file, int record, char* data) {
  uint64_t ticket = 0;
  ZERO_RETURN_IF_ERROR(tier.Read(file, record, 1, data, &ticket));
  return tier.Wait(ticket);
}

TEST(NvmeTierTest, RecordsWrittenAreReadBackExactlyOneOrSeveralAtATime) {
  Scratch dir("roundtrip");
  Tier t;
  ASSERT_TRUE(OpenTier(dir.path(), &t).ok());
  NvmeTier& tier = *t.tier;
  EXPECT_EQ(tier.FileBytes(0), 21 * 4096);
  EXPECT_EQ(tier.FileBytes(1), 4 * 4096);
  // The files exist, preallocated to their full size, in the tier's own directory.
  struct stat st;
  ASSERT_EQ(::stat(tier.Path(0).c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 21 * 4096);
  EXPECT_GE(st.st_blocks * 512, 21 * 4096) << "not preallocated";
  EXPECT_EQ(fs::path(tier.dir()).parent_path().string(), dir.path());

  Aligned all = AlignedBuffer(21 * 4096), back = AlignedBuffer(21 * 4096);
  Fill(all.get(), 21 * 4096, 7);
  // Records 0..2 written separately, read back as one transfer (their file layout is contiguous).
  int64_t off = 0;
  const int64_t sizes[] = {4096, 3 * 4096, 17 * 4096};
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(WriteRecord(tier, 0, r, all.get() + off).ok());
    off += sizes[r];
  }
  uint64_t ticket = 0;
  ASSERT_TRUE(tier.Read(0, 0, 3, back.get(), &ticket).ok());
  Status s = tier.Wait(ticket);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(std::memcmp(all.get(), back.get(), 21 * 4096), 0);
  // A rewrite replaces the record's checksums: the new contents verify, and nothing else changed.
  Fill(all.get() + 4096, 3 * 4096, 8);
  ASSERT_TRUE(WriteRecord(tier, 0, 1, all.get() + 4096).ok());
  std::memset(back.get(), 0, 21 * 4096);
  ASSERT_TRUE(tier.Read(0, 0, 3, back.get(), &ticket).ok());
  ASSERT_TRUE(tier.Wait(ticket).ok());
  EXPECT_EQ(std::memcmp(all.get(), back.get(), 21 * 4096), 0);
  // The file holds the bytes themselves (O_DIRECT wrote them to the disk, not to a cache of the tier's).
  std::vector<char> raw(21 * 4096);
  const int fd = ::open(tier.Path(0).c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pread(fd, raw.data(), raw.size(), 0), static_cast<ssize_t>(raw.size()));
  ::close(fd);
  EXPECT_EQ(std::memcmp(raw.data(), all.get(), raw.size()), 0);
}

TEST(NvmeTierTest, TransfersFromTwoThreadsInFlightAtOnce) {
  Scratch dir("threads");
  // 32 records of 64 KiB per file, blocks of 16 KiB, queue depth 4: many chunks queued behind the depth.
  std::vector<NvmeFileLayout> files = {{"a.bin", "optimizer state", {}, {}}, {"b.bin", "parameter shard", {}, {}}};
  for (NvmeFileLayout& f : files) {
    for (int r = 0; r < 32; ++r) {
      f.record_bytes.push_back(64 << 10);
      f.record_bucket.push_back(r);
    }
  }
  Tier t;
  ASSERT_TRUE(OpenTier(dir.path(), &t, {}, files).ok());
  NvmeTier& tier = *t.tier;
  auto work = [&](int file, bool* ok) {
    const int64_t rb = 64 << 10;
    Aligned data = AlignedBuffer(32 * rb), back = AlignedBuffer(32 * rb);
    Fill(data.get(), 32 * rb, 100 + file);
    std::vector<uint64_t> tickets(32);
    *ok = true;
    for (int r = 0; r < 32; ++r) *ok &= tier.Write(file, r, 1, data.get() + r * rb, &tickets[r]).ok();
    for (int r = 0; r < 32; ++r) *ok &= tier.Wait(tickets[r]).ok();
    for (int r = 0; r < 32; ++r) *ok &= tier.Read(file, r, 1, back.get() + r * rb, &tickets[r]).ok();
    for (int r = 31; r >= 0; --r) *ok &= tier.Wait(tickets[r]).ok();  // waited in another order than issued
    *ok &= std::memcmp(data.get(), back.get(), 32 * rb) == 0;
  };
  bool ok0 = false, ok1 = false;
  std::thread other(work, 1, &ok1);
  work(0, &ok0);
  other.join();
  EXPECT_TRUE(ok0);
  EXPECT_TRUE(ok1);
  EXPECT_TRUE(tier.WaitAll().ok());
}

TEST(NvmeTierTest, AChangedBlockFailsItsChecksumNamingFileBucketAndBlock) {
  Scratch dir("checksum");
  Tier t;
  ASSERT_TRUE(OpenTier(dir.path(), &t).ok());
  NvmeTier& tier = *t.tier;
  Aligned rec = AlignedBuffer(17 * 4096), back = AlignedBuffer(17 * 4096);
  Fill(rec.get(), 17 * 4096, 3);
  ASSERT_TRUE(WriteRecord(tier, 0, 2, rec.get()).ok());
  // Another process flips one byte in the record's third 16 KiB block.
  const int64_t at = (1 + 3) * 4096 + 2 * 16384 + 100;
  const int fd = ::open(tier.Path(0).c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char c = 0;
  ASSERT_EQ(::pread(fd, &c, 1, at), 1);
  c = static_cast<char>(c ^ 0x10);
  ASSERT_EQ(::pwrite(fd, &c, 1, at), 1);
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
  const Status s = ReadRecord(tier, 0, 2, back.get());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Has(s, "checksum mismatch in block 2")) << s.ToString();
  EXPECT_TRUE(Has(s, "the optimizer state of bucket 4")) << s.ToString();
  EXPECT_TRUE(Has(s, tier.Path(0))) << s.ToString();
  EXPECT_TRUE(Has(s, "Load the last checkpoint")) << s.ToString();
  // The other records are untouched and still verify.
  ASSERT_TRUE(WriteRecord(tier, 0, 0, rec.get()).ok());
  EXPECT_TRUE(ReadRecord(tier, 0, 0, back.get()).ok());
}

TEST(NvmeTierTest, ATruncatedFileIsAShortReadAndCheckFilesSaysSo) {
  Scratch dir("truncated");
  Tier t;
  ASSERT_TRUE(OpenTier(dir.path(), &t).ok());
  NvmeTier& tier = *t.tier;
  Aligned rec = AlignedBuffer(17 * 4096);
  Fill(rec.get(), 17 * 4096, 4);
  ASSERT_TRUE(WriteRecord(tier, 0, 2, rec.get()).ok());
  EXPECT_TRUE(tier.CheckFiles().ok());
  ASSERT_EQ(::truncate(tier.Path(0).c_str(), 8 * 4096), 0);  // record 2 starts at 4 pages: half of it is gone
  Status s = ReadRecord(tier, 0, 2, rec.get());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Has(s, "short read")) << s.ToString();
  EXPECT_TRUE(Has(s, "truncated behind the engine's back")) << s.ToString();
  EXPECT_TRUE(Has(s, "the optimizer state of bucket 4")) << s.ToString();
  s = tier.CheckFiles();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Has(s, "was truncated to 32768 bytes")) << s.ToString();
}

TEST(NvmeTierTest, ARemovedOrReplacedFileIsReported) {
  Scratch dir("removed");
  Tier t;
  ASSERT_TRUE(OpenTier(dir.path(), &t).ok());
  NvmeTier& tier = *t.tier;
  ASSERT_EQ(::unlink(tier.Path(1).c_str()), 0);
  Status s = tier.CheckFiles();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Has(s, tier.Path(1) + " (the parameter shard) was removed")) << s.ToString();
  // A new file under the same name is another inode: still not the tier's.
  const int fd = ::open(tier.Path(1).c_str(), O_WRONLY | O_CREAT, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, tier.FileBytes(1)), 0);
  ::close(fd);
  s = tier.CheckFiles();
  EXPECT_TRUE(Has(s, "was replaced by another file")) << s.ToString();
}

TEST(NvmeTierTest, AFullDiskFailsTheWriteNamingTheDiskAndTheBucket) {
  Scratch dir("full");
  std::unique_ptr<SmallFs> small;
  // A 2 MiB ext4 has about 1 MiB free: a 4 MiB record cannot be written.
  const Status mounted = SmallFs::Mount(dir.path() + "/disk", 2 << 20, false, &small);
  NvmeTierOptions o;
  o.preallocate = false;  // sparse files: the disk fills up in the transfer, as on a file system without fallocate
  std::vector<NvmeFileLayout> files = {{"optimizer.bin", "optimizer state", {4 << 20}, {6}}};
  Tier t;
  ASSERT_TRUE(OpenTier(mounted.ok() ? small->dir() : dir.path(), &t, o, files).ok());
  if (!mounted.ok()) {
    // No mount here: the same completion, injected (the transfer itself succeeds on the real disk).
    std::printf("[ note ] %s: ENOSPC injected into the third chunk instead\n", mounted.message().c_str());
    t.tier->TEST_SetFault({IoFault::Op::kWrite, -1, 2, ENOSPC, -1});
  }
  Aligned rec = AlignedBuffer(4 << 20);
  Fill(rec.get(), 4 << 20, 5);
  Status s = WriteRecord(*t.tier, 0, 0, rec.get());
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_TRUE(Has(s, "No space left on device (ENOSPC)")) << s.ToString();
  EXPECT_TRUE(Has(s, "writing the optimizer state of bucket 6")) << s.ToString();
  EXPECT_TRUE(Has(s, "is full: free space there")) << s.ToString();
  // Nothing of that record can be trusted: reading it is an error, never stale or partial data.
  s = ReadRecord(*t.tier, 0, 0, rec.get());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_TRUE(Has(s, "an earlier write of it failed")) << s.ToString();
  t.tier.reset();
  if (mounted.ok()) {
    // With preallocation (the engine's way) the same disk fails at Open, saying how much is free.
    Tier p;
    s = OpenTier(small->dir(), &p, NvmeTierOptions(), files);
    EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
    EXPECT_TRUE(Has(s, "No space left on device (ENOSPC)")) << s.ToString();
    EXPECT_TRUE(Has(s, "bytes free")) << s.ToString();
    for (const auto& entry : fs::directory_iterator(small->dir())) {
      EXPECT_EQ(entry.path().filename(), "lost+found") << "left behind by the failed Open";
    }
  }
}

TEST(NvmeTierTest, AnInjectedFullDiskInTheMiddleOfARequestAndAShortRead) {
  Scratch dir("injected");
  Tier t;
  ASSERT_TRUE(OpenTier(dir.path(), &t).ok());
  NvmeTier& tier = *t.tier;
  Aligned rec = AlignedBuffer(17 * 4096);
  Fill(rec.get(), 17 * 4096, 6);
  // The second of the record's five 16 KiB chunks fails: the request fails as a whole, naming where.
  tier.TEST_SetFault({IoFault::Op::kWrite, tier.TEST_fd(0), 1, ENOSPC, -1});
  Status s = WriteRecord(tier, 0, 2, rec.get());
  EXPECT_EQ(s.code(), StatusCode::kIoError);
  EXPECT_TRUE(Has(s, "ENOSPC")) << s.ToString();
  EXPECT_TRUE(Has(s, "at byte " + std::to_string(4 * 4096 + 16384))) << s.ToString();
  // Rewritten, it reads back; then a read that returns fewer bytes than asked is a short read.
  ASSERT_TRUE(WriteRecord(tier, 0, 2, rec.get()).ok());
  tier.TEST_SetFault({IoFault::Op::kRead, -1, 0, 0, 4096});
  s = ReadRecord(tier, 0, 2, rec.get());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Has(s, "short read")) << s.ToString();
  EXPECT_TRUE(Has(s, "returned 4096 of 16384 bytes")) << s.ToString();
  EXPECT_TRUE(ReadRecord(tier, 0, 2, rec.get()).ok());  // the fault fired once
  // Another errno is an I/O error that says to check the disk.
  tier.TEST_SetFault({IoFault::Op::kRead, -1, 0, EIO, -1});
  s = ReadRecord(tier, 0, 2, rec.get());
  EXPECT_EQ(s.code(), StatusCode::kIoError);
  EXPECT_TRUE(Has(s, "Input/output error (EIO)")) << s.ToString();
  EXPECT_TRUE(Has(s, "Check the disk")) << s.ToString();
}

TEST(NvmeTierTest, AnUnwritableDirectoryFailsOpenNamingItAndTheFix) {
  Scratch dir("readonly");
  std::unique_ptr<SmallFs> ro;
  std::string root;
  Status mounted = SmallFs::Mount(dir.path() + "/ro", 1 << 20, /*read_only=*/true, &ro);
  if (mounted.ok()) {
    root = ro->dir();  // EROFS, for root too
  } else if (geteuid() != 0) {
    root = dir.path() + "/locked";  // EACCES
    fs::create_directories(root);
    fs::permissions(root, fs::perms::owner_read | fs::perms::owner_exec);
  } else {
    root = "/sys/fs";  // root without mount rights: sysfs refuses new directories (EPERM)
  }
  std::printf("[ note ] unwritable directory: %s\n", root.c_str());
  Tier t;
  const Status s = OpenTier(root, &t);
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_TRUE(Has(s, "cannot create its directory in " + root)) << s.ToString();
  EXPECT_TRUE(Has(s, "Give Options::nvme_path a writable directory on a local disk")) << s.ToString();
  EXPECT_TRUE(Has(s, "rank 0")) << s.ToString();
  if (!mounted.ok() && geteuid() != 0) fs::permissions(root, fs::perms::owner_all);
}

TEST(NvmeTierTest, TmpfsAndAFileSystemWithoutODirectAreRefused) {
  std::unique_ptr<TmpfsDir> tmp;
  const Status made = TmpfsDir::Make(&tmp);
  ASSERT_TRUE(made.ok()) << made.ToString();
  Tier t;
  Status s = OpenTier(tmp->dir(), &t);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Has(s, tmp->dir() + " is on tmpfs")) << s.ToString();
  EXPECT_TRUE(Has(s, "a directory on a local disk")) << s.ToString();
  // open(O_DIRECT) refused with EINVAL, as file systems without direct I/O do.
  Scratch dir("nodirect");
  NvmeTierOptions o;
  o.fail_open_errno = EINVAL;
  s = OpenTier(dir.path(), &t, o);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Has(s, "refuses O_DIRECT")) << s.ToString();
  EXPECT_TRUE(Has(s, "ext2/3/4") || Has(s, "xfs") || Has(s, "magic")) << s.ToString();
}

TEST(NvmeTierTest, ARecordIsNeverReadAndWrittenAtOnceAndFilesGoWithTheTier) {
  Scratch dir("busy");
  Tier t;
  ASSERT_TRUE(OpenTier(dir.path(), &t).ok());
  Aligned rec = AlignedBuffer(3 * 4096);
  Fill(rec.get(), 3 * 4096, 9);
  uint64_t w = 0, r = 0;
  ASSERT_TRUE(t.tier->Write(0, 1, 1, rec.get(), &w).ok());
  Status s = t.tier->Read(0, 1, 1, rec.get(), &r);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_TRUE(Has(s, "is being written while a read of it starts")) << s.ToString();
  ASSERT_TRUE(t.tier->Wait(w).ok());
  // An unaligned buffer is refused (O_DIRECT would fail with EINVAL later, less clearly).
  s = t.tier->Read(0, 1, 1, rec.get() + 8, &r);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  const std::string tier_dir = t.tier->dir();
  EXPECT_TRUE(fs::exists(tier_dir));
  t.tier.reset();
  EXPECT_FALSE(fs::exists(tier_dir)) << "the tier's files are working storage: removed with it";
}

TEST(NvmeTierTest, AStalledDiskTimesOutAndTheTransferStaysValid) {
  Scratch dir("stall");
  Tier t;
  NvmeTierOptions o;
  o.timeout = std::chrono::milliseconds(50);
  ASSERT_TRUE(OpenTier(dir.path(), &t, o).ok());
  Aligned rec = AlignedBuffer(4096);
  Fill(rec.get(), 4096, 11);
  t.tier->TEST_SetFault({IoFault::Op::kWrite, -1, 0, 0, -1, 400});  // this completion comes 400 ms late
  uint64_t ticket = 0;
  ASSERT_TRUE(t.tier->Write(0, 0, 1, rec.get(), &ticket).ok());
  Status s = t.tier->Wait(ticket);
  EXPECT_EQ(s.code(), StatusCode::kTimeout) << s.ToString();
  EXPECT_TRUE(Has(s, "writing the optimizer state of bucket 0")) << s.ToString();
  EXPECT_TRUE(Has(s, "did not complete within 50 ms: the disk is stalled")) << s.ToString();
  // The buffer is still the transfer's: the record stays claimed, and a later wait collects it.
  EXPECT_EQ(t.tier->Read(0, 0, 1, rec.get(), &ticket).code(), StatusCode::kInternal);
  EXPECT_EQ(t.tier->WaitAll().code(), StatusCode::kTimeout);  // still held back
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_TRUE(t.tier->WaitAll().ok());
  EXPECT_TRUE(ReadRecord(*t.tier, 0, 0, rec.get()).ok());
}

TEST(IoQueueTest, ARingTheKernelRefusesIsUnavailableSayingWhy) {
  std::unique_ptr<IoQueue> q;
  // More entries than io_uring allows (IORING_MAX_ENTRIES is 32768): the kernel refuses the ring.
  const Status s = IoQueue::Create(60000, 4096, 4, &q);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_TRUE(Has(s, "io_uring_queue_init failed")) << s.ToString();
  EXPECT_TRUE(Has(s, "The NVMe tier needs io_uring")) << s.ToString();
  EXPECT_EQ(q, nullptr);
}

}  // namespace
}  // namespace zero::testing

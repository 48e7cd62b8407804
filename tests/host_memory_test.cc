// Host memory for offload (src/host_memory.h): zero fill, huge-page rounding and backing, pinning and its
// fallback, unmapping.
#include "host_memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "device.h"  // FormatBytes

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ZERO_ASAN 1
#endif
#endif
#if !defined(ZERO_ASAN) && defined(__SANITIZE_ADDRESS__)
#define ZERO_ASAN 1
#endif
#if !defined(ZERO_ASAN)
#define ZERO_ASAN 0
#endif

namespace zero {
namespace {

constexpr int64_t kKiB = 1024;
constexpr int64_t kMiB = 1024 * kKiB;

// "VmLck:  123 kB" from /proc/self/status, in bytes: what mlock holds in this process.
int64_t LockedBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stoll(line.substr(6)) * kKiB;
  }
  return -1;
}

// Resident set size from /proc/self/statm (second field, in pages).
int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// THP is usable unless the system says "[never]" or has no THP at all.
bool TransparentHugePagesAvailable() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  if (!std::getline(f, mode)) return false;
  return mode.find("[never]") == std::string::npos;
}

std::string MemlockLimitText() {
  rlimit limit{};
  if (getrlimit(RLIMIT_MEMLOCK, &limit) != 0) return "unknown";
  if (limit.rlim_cur == RLIM_INFINITY) return "unlimited";
  return FormatBytes(static_cast<int64_t>(limit.rlim_cur));
}

// Turns the pin fault on for one scope, and off again even when an assertion returns early.
class FailPinningScope {
 public:
  FailPinningScope() { TEST_FailPinning(true); }
  ~FailPinningScope() { TEST_FailPinning(false); }
};

bool AllZero(const HostAllocation& a) {
  const auto* p = static_cast<const unsigned char*>(a.ptr);
  for (int64_t i = 0; i < a.mapped_bytes; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

void ExpectWarningNamesSizeLimitAndFix(const std::string& err, int64_t mapped_bytes) {
  EXPECT_NE(err.find("could not pin " + FormatBytes(mapped_bytes)), std::string::npos) << err;
  EXPECT_NE(err.find("RLIMIT_MEMLOCK is " + MemlockLimitText()), std::string::npos) << err;
  EXPECT_NE(err.find("ulimit -l"), std::string::npos) << err;
  EXPECT_NE(err.find("--ulimit memlock"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << "one line: " << err;
}

class HostMemorySizeTest : public testing::TestWithParam<std::tuple<int64_t, bool>> {};

TEST_P(HostMemorySizeTest, ZeroFilledWritableAndRounded) {
  const auto [bytes, huge] = GetParam();
  HostAllocation a;
  ASSERT_TRUE(AllocateHost(bytes, {.huge_pages = huge}, nullptr, &a).ok());
  ASSERT_NE(a.ptr, nullptr);
  EXPECT_EQ(a.bytes, bytes);
  const int64_t granule = huge ? kHugePageBytes : sysconf(_SC_PAGESIZE);
  EXPECT_EQ(a.mapped_bytes % granule, 0);
  EXPECT_GE(a.mapped_bytes, bytes);
  EXPECT_LT(a.mapped_bytes, bytes + granule);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.ptr) % granule, 0u);
  EXPECT_EQ(a.huge_pages, huge);

  EXPECT_TRUE(AllZero(a));  // the whole mapping, rounding included
  auto* p = static_cast<unsigned char*>(a.ptr);
  for (int64_t i = 0; i < a.mapped_bytes; ++i) p[i] = static_cast<unsigned char>(i * 7 + 1);
  int64_t wrong = 0;
  for (int64_t i = 0; i < a.mapped_bytes; ++i) wrong += p[i] != static_cast<unsigned char>(i * 7 + 1);
  EXPECT_EQ(wrong, 0);
  FreeHost(a, nullptr);
}

INSTANTIATE_TEST_SUITE_P(Sizes, HostMemorySizeTest,
                         testing::Combine(testing::Values(int64_t{1}, 4 * kKiB + 1, 2 * kMiB, 64 * kMiB),
                                          testing::Bool()),
                         [](const testing::TestParamInfo<std::tuple<int64_t, bool>>& info) {
                           return std::to_string(std::get<0>(info.param)) + "B_" +
                                  (std::get<1>(info.param) ? "huge" : "base");
                         });

TEST(HostMemoryTest, HugePagesBackA64MiBAllocationWhenTheSystemHasThem) {
  HostAllocation huge, base;
  ASSERT_TRUE(AllocateHost(64 * kMiB, {.huge_pages = true}, nullptr, &huge).ok());
  ASSERT_TRUE(AllocateHost(64 * kMiB, {.huge_pages = false}, nullptr, &base).ok());
  const int64_t huge_bytes = HugePageBytes(huge);
  if (TransparentHugePagesAvailable()) {
    // Compaction may fail to find a free 2 MiB frame for some of it; none at all means the advice did not work.
    EXPECT_GT(huge_bytes, 0) << "THP is enabled but no huge page backs a 64 MiB advised allocation";
  } else {
    EXPECT_EQ(huge_bytes, 0) << "THP is off, yet huge pages were reported";
  }
  EXPECT_LE(huge_bytes, huge.mapped_bytes);
  EXPECT_EQ(HugePageBytes(base), 0) << "huge_pages=false must give base pages (MADV_NOHUGEPAGE)";
  RecordProperty("huge_page_bytes_of_64MiB", std::to_string(huge_bytes));
  FreeHost(huge, nullptr);
  FreeHost(base, nullptr);
}

TEST(HostMemoryTest, PinnedWithMlockByDefault) {
  // Root, or a memlock limit with room for the 4 MiB mapping, pins; otherwise the call must take the documented
  // fallback (pageable, one warning). Either way the outcome is asserted.
  rlimit lim{};
  getrlimit(RLIMIT_MEMLOCK, &lim);
  const int64_t locked_before = LockedBytes();
  const bool can_pin = geteuid() == 0 || lim.rlim_cur == RLIM_INFINITY ||
                       static_cast<int64_t>(lim.rlim_cur) >= locked_before + 4 * kMiB;
  HostAllocation a;
  testing::internal::CaptureStderr();
  ASSERT_TRUE(AllocateHost(3 * kMiB, {}, nullptr, &a).ok());
  const std::string err = testing::internal::GetCapturedStderr();
  if (!can_pin) {
    EXPECT_FALSE(a.pinned);
    EXPECT_NE(err.find("RLIMIT_MEMLOCK"), std::string::npos) << err;
    FreeHost(a, nullptr);
    return;
  }
  EXPECT_EQ(err, "");
  EXPECT_TRUE(a.pinned);
  EXPECT_TRUE(a.huge_pages);
  EXPECT_EQ(a.mapped_bytes, 4 * kMiB);
#if ZERO_ASAN
  // AddressSanitizer's mlock interceptor ignores the call ("mlock is not supported"): nothing is locked.
  EXPECT_EQ(LockedBytes(), locked_before);
#else
  EXPECT_EQ(LockedBytes() - locked_before, a.mapped_bytes);
#endif
  FreeHost(a, nullptr);
  EXPECT_EQ(LockedBytes(), locked_before);
}

TEST(HostMemoryTest, UnpinnedWhenNotAsked) {
  const int64_t locked_before = LockedBytes();
  HostAllocation a;
  testing::internal::CaptureStderr();
  ASSERT_TRUE(AllocateHost(kMiB, {.pin = false}, nullptr, &a).ok());
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  EXPECT_FALSE(a.pinned);
  EXPECT_EQ(LockedBytes(), locked_before);
  FreeHost(a, nullptr);
}

TEST(HostMemoryTest, RefusedMlockFallsBackToPageableWithAWarning) {
  const int64_t locked_before = LockedBytes();
  HostAllocation a;
  std::string err;
  {
    FailPinningScope fail;
    testing::internal::CaptureStderr();
    const Status s = AllocateHost(3 * kMiB, {}, nullptr, &a);
    err = testing::internal::GetCapturedStderr();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  EXPECT_FALSE(a.pinned);
  EXPECT_EQ(LockedBytes(), locked_before);
  EXPECT_NE(err.find("mlock"), std::string::npos) << err;
  ExpectWarningNamesSizeLimitAndFix(err, a.mapped_bytes);
  // Pageable memory is still whole, zeroed and writable.
  EXPECT_TRUE(AllZero(a));
  std::memset(a.ptr, 0x5a, static_cast<size_t>(a.mapped_bytes));
  FreeHost(a, nullptr);
}

TEST(HostMemoryTest, PinFunctionGetsTheWholeMappedRange) {
  struct Range {
    void* ptr;
    size_t bytes;
  };
  std::vector<Range> pinned, unpinned;
  const PinFn pin = [&](void* ptr, size_t bytes, std::string*) {
    pinned.push_back({ptr, bytes});
    return true;
  };
  const UnpinFn unpin = [&](void* ptr, size_t bytes) { unpinned.push_back({ptr, bytes}); };
  const int64_t locked_before = LockedBytes();
  HostAllocation a;
  ASSERT_TRUE(AllocateHost(3 * kMiB, {}, pin, &a).ok());
  EXPECT_TRUE(a.pinned);
  ASSERT_EQ(pinned.size(), 1u);
  EXPECT_EQ(pinned[0].ptr, a.ptr);
  EXPECT_EQ(static_cast<int64_t>(pinned[0].bytes), a.mapped_bytes);
  EXPECT_EQ(a.mapped_bytes, 4 * kMiB);
  EXPECT_EQ(LockedBytes(), locked_before) << "a pin function replaces mlock";
  FreeHost(a, unpin);
  ASSERT_EQ(unpinned.size(), 1u);
  EXPECT_EQ(unpinned[0].ptr, a.ptr);
  EXPECT_EQ(static_cast<int64_t>(unpinned[0].bytes), a.mapped_bytes);
}

TEST(HostMemoryTest, RefusedPinFunctionFallsBackTheSameWay) {
  int unpin_calls = 0;
  const PinFn pin = [](void*, size_t, std::string* error) {
    *error = "cudaHostRegister: out of memory";
    return false;
  };
  const UnpinFn unpin = [&](void*, size_t) { ++unpin_calls; };
  HostAllocation a;
  testing::internal::CaptureStderr();
  const Status s = AllocateHost(kMiB, {}, pin, &a);
  const std::string err = testing::internal::GetCapturedStderr();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_FALSE(a.pinned);
  EXPECT_NE(err.find("cudaHostRegister: out of memory"), std::string::npos) << err;
  ExpectWarningNamesSizeLimitAndFix(err, a.mapped_bytes);
  FreeHost(a, unpin);
  EXPECT_EQ(unpin_calls, 0) << "nothing was pinned, so nothing is unpinned";
}

TEST(HostMemoryTest, FailPinningAlsoRefusesPinFunctions) {
  bool called = false;
  const PinFn pin = [&](void*, size_t, std::string*) { return called = true; };
  HostAllocation a;
  std::string err;
  {
    FailPinningScope fail;
    testing::internal::CaptureStderr();
    ASSERT_TRUE(AllocateHost(kMiB, {}, pin, &a).ok());
    err = testing::internal::GetCapturedStderr();
  }
  EXPECT_FALSE(called);
  EXPECT_FALSE(a.pinned);
  ExpectWarningNamesSizeLimitAndFix(err, a.mapped_bytes);
  FreeHost(a, nullptr);
}

TEST(HostMemoryTest, FreeHostUnmaps) {
  for (const bool huge : {true, false}) {
    SCOPED_TRACE(huge ? "huge pages" : "base pages");
    constexpr int64_t kBytes = 256 * kMiB;
    constexpr int64_t kSlack = 32 * kMiB;  // gtest, the allocator and /proc reads move RSS a little
    const int64_t before = ResidentBytes();
    HostAllocation a;
    ASSERT_TRUE(AllocateHost(kBytes, {.huge_pages = huge}, nullptr, &a).ok());
    EXPECT_GE(ResidentBytes(), before + kBytes - kSlack) << "the first touch makes the allocation resident";
    FreeHost(a, nullptr);
    EXPECT_LE(ResidentBytes(), before + kSlack) << "FreeHost must return the memory";
  }
}

TEST(HostMemoryTest, BadInput) {
  HostAllocation a;
  a.ptr = &a;  // stale contents are reset
  Status s = AllocateHost(-1, {}, nullptr, &a);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("-1"), std::string::npos) << s.ToString();
  EXPECT_EQ(a.ptr, nullptr);
  EXPECT_EQ(AllocateHost(1, {}, nullptr, nullptr).code(), StatusCode::kInvalidArgument);
}

TEST(HostMemoryTest, ZeroBytesIsAnEmptyAllocation) {
  HostAllocation a;
  ASSERT_TRUE(AllocateHost(0, {}, nullptr, &a).ok());
  EXPECT_EQ(a.ptr, nullptr);
  EXPECT_EQ(a.mapped_bytes, 0);
  EXPECT_FALSE(a.pinned);
  EXPECT_EQ(HugePageBytes(a), 0);
  FreeHost(a, nullptr);  // no-op
}

TEST(HostMemoryTest, UnmappableSizesAreOutOfMemoryNamingTheSize) {
  // 1 EiB: beyond any address space (47- or 56-bit), so mmap itself refuses it.
  HostAllocation a;
  Status s = AllocateHost(int64_t{1} << 60, {}, nullptr, &a);
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  EXPECT_NE(s.message().find(FormatBytes(int64_t{1} << 60)), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("mmap"), std::string::npos) << s.ToString();
  EXPECT_EQ(a.ptr, nullptr);
  // Where rounding up to 2 MiB would overflow.
  s = AllocateHost(INT64_MAX, {}, nullptr, &a);
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  EXPECT_NE(s.message().find(FormatBytes(INT64_MAX)), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace zero

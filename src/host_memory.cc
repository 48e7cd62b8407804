// Host memory for offloaded optimizer state (see host_memory.h): mmap, THP advice, first touch, pin.
#include "host_memory.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>

#include "device.h"  // FormatBytes

// Linux 5.14; older headers lack the constant, and older kernels answer EINVAL (handled below).
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace zero {
namespace {

std::atomic<bool> g_fail_pinning{false};  // TEST_FailPinning

int64_t BasePageBytes() {
  static const int64_t bytes = sysconf(_SC_PAGESIZE);
  return bytes;
}

int64_t RoundUp(int64_t bytes, int64_t granule) { return (bytes + granule - 1) / granule * granule; }

std::string ErrnoText(int err) { return std::strerror(err); }

// Maps `bytes` (a multiple of `align`, which is a multiple of the base page) at an `align`-aligned address: maps
// `align` more than needed and unmaps the unaligned head and the tail. Returns null with errno set on failure.
char* MapAligned(int64_t bytes, int64_t align) {
  const int64_t reserve = align > BasePageBytes() ? bytes + align : bytes;
  void* raw = mmap(nullptr, static_cast<size_t>(reserve), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + static_cast<uintptr_t>(align) - 1) & ~(static_cast<uintptr_t>(align) - 1);
  const uintptr_t end = begin + static_cast<uintptr_t>(reserve);
  const uintptr_t aligned_end = aligned + static_cast<uintptr_t>(bytes);
  if (aligned > begin) munmap(raw, aligned - begin);
  if (end > aligned_end) munmap(reinterpret_cast<void*>(aligned_end), end - aligned_end);
  return reinterpret_cast<char*>(aligned);
}

// Makes every page of the range resident from the calling thread. Anonymous memory reads as zero, so this is the
// zero fill; MADV_POPULATE_WRITE faults the pages in without the store loop (4 KiB pages: ~1.3x faster than
// writing one byte a page here) and reports ENOMEM instead of leaving it to the OOM killer at first use.
bool TouchAll(char* ptr, int64_t bytes, int* err) {
  if (madvise(ptr, static_cast<size_t>(bytes), MADV_POPULATE_WRITE) == 0) return true;
  if (errno != EINVAL) {  // EINVAL: a kernel before 5.14; anything else (ENOMEM, EFAULT) is a real failure
    *err = errno;
    return false;
  }
  // A write, not a read: a read would map the shared zero page and leave the memory non-resident.
  volatile char* p = ptr;
  for (int64_t i = 0; i < bytes; i += BasePageBytes()) p[i] = 0;
  return true;
}

std::string MemlockLimitText() {
  rlimit limit{};
  if (getrlimit(RLIMIT_MEMLOCK, &limit) != 0) return "unknown";
  if (limit.rlim_cur == RLIM_INFINITY) return "unlimited";
  return FormatBytes(static_cast<int64_t>(limit.rlim_cur));
}

// One line, one write, so that ranks sharing a terminal do not interleave it.
void WarnPinRefused(int64_t bytes, const std::string& why) {
  const std::string line = "zero: warning: could not pin " + FormatBytes(bytes) + " of host memory (" + why +
                           "; RLIMIT_MEMLOCK is " + MemlockLimitText() +
                           "); using pageable memory, so host<->device copies are slower and not asynchronous. "
                           "Fix: raise the locked-memory limit (ulimit -l unlimited; in a container, "
                           "docker run --ulimit memlock=-1)\n";
  std::fputs(line.c_str(), stderr);
}

// Pins the range with `pin` or mlock; false (after the warning) when refused.
bool Pin(char* ptr, int64_t bytes, const PinFn& pin) {
  std::string why;
  if (g_fail_pinning.load(std::memory_order_relaxed)) {
    why = std::string(pin ? "pin function" : "mlock") + ": " + ErrnoText(EPERM) + ", injected by TEST_FailPinning";
  } else if (pin) {
    std::string error;
    if (pin(ptr, static_cast<size_t>(bytes), &error)) return true;
    why = error.empty() ? "pin function failed" : error;
  } else {
    // EPERM or ENOMEM: over RLIMIT_MEMLOCK without CAP_IPC_LOCK. EAGAIN (part of the range could not be locked)
    // falls back the same way: pageable memory still works.
    if (mlock(ptr, static_cast<size_t>(bytes)) == 0) return true;
    const int err = errno;
    why = "mlock: " + ErrnoText(err);
  }
  WarnPinRefused(bytes, why);
  return false;
}

}  // namespace

Status AllocateHost(int64_t bytes, const HostMemoryOptions& options, const PinFn& pin, HostAllocation* out) {
  if (out == nullptr) return Status::InvalidArgument("AllocateHost: out is null");
  *out = HostAllocation{};
  if (bytes < 0) return Status::InvalidArgument("AllocateHost: bytes is " + std::to_string(bytes) + ", below 0");
  if (bytes == 0) return Status::Ok();
  // Far above any machine's memory, and keeps the rounding below from overflowing.
  if (bytes > std::numeric_limits<int64_t>::max() / 4) {
    return Status::OutOfMemory("cannot map " + FormatBytes(bytes) + " of host memory: larger than any address space");
  }

  const int64_t granule = options.huge_pages ? kHugePageBytes : BasePageBytes();
  const int64_t mapped = RoundUp(bytes, granule);
  char* ptr = MapAligned(mapped, granule);
  if (ptr == nullptr) {
    const int err = errno;
    return Status::OutOfMemory("could not map " + FormatBytes(mapped) + " of host memory (mmap: " + ErrnoText(err) +
                               "); free host memory or offload less");
  }

  bool huge = false;
  if (options.huge_pages) {
    // EINVAL: a kernel built without THP. The memory is still fine, in base pages.
    huge = madvise(ptr, static_cast<size_t>(mapped), MADV_HUGEPAGE) == 0;
  } else {
    (void)madvise(ptr, static_cast<size_t>(mapped), MADV_NOHUGEPAGE);  // best effort, as above
  }

  int err = 0;
  if (!TouchAll(ptr, mapped, &err)) {
    munmap(ptr, static_cast<size_t>(mapped));
    return Status::OutOfMemory("could not make " + FormatBytes(mapped) + " of host memory resident (" + ErrnoText(err) +
                               "); free host memory or offload less");
  }

  out->ptr = ptr;
  out->bytes = bytes;
  out->mapped_bytes = mapped;
  out->huge_pages = huge;
  out->pinned = options.pin && Pin(ptr, mapped, pin);
  return Status::Ok();
}

void FreeHost(const HostAllocation& allocation, const UnpinFn& unpin) {
  if (allocation.ptr == nullptr) return;
  const size_t mapped = static_cast<size_t>(allocation.mapped_bytes);
  if (allocation.pinned) {
    if (unpin) {
      unpin(allocation.ptr, mapped);
    } else {
      munlock(allocation.ptr, mapped);
    }
  }
  munmap(allocation.ptr, mapped);
}

int64_t HugePageBytes(const HostAllocation& allocation) {
  if (allocation.ptr == nullptr) return 0;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(allocation.ptr);
  const uintptr_t end = begin + static_cast<uintptr_t>(allocation.mapped_bytes);
  std::ifstream smaps("/proc/self/smaps");
  int64_t total = 0;
  int64_t overlap = 0;  // of the current mapping with the allocation; 0 outside it
  std::string line;
  while (std::getline(smaps, line)) {
    // A mapping's header starts with its lowercase-hex range ("7f12a0000000-7f12a4000000 rw-p ..."); field
    // names start with a letter that is not lowercase hex ("AnonHugePages:", "Size:").
    const char c = line.empty() ? ' ' : line[0];
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) {
      unsigned long long lo = 0, hi = 0;
      if (std::sscanf(line.c_str(), "%llx-%llx", &lo, &hi) != 2) continue;
      const uintptr_t from = std::max<uintptr_t>(begin, lo);
      const uintptr_t to = std::min<uintptr_t>(end, hi);
      overlap = to > from ? static_cast<int64_t>(to - from) : 0;
    } else if (overlap > 0 && line.rfind("AnonHugePages:", 0) == 0) {
      long long kib = 0;
      if (std::sscanf(line.c_str() + std::strlen("AnonHugePages:"), "%lld", &kib) == 1) {
        total += std::min<int64_t>(kib * 1024, overlap);
      }
    }
  }
  return total;
}

void TEST_FailPinning(bool fail) { g_fail_pinning.store(fail, std::memory_order_relaxed); }

void* PinnedHostAllocations::Allocate(int64_t bytes) {
  HostMemoryOptions o;
  o.huge_pages = bytes >= kHugePageBytes;
  HostAllocation a;
  if (!AllocateHost(bytes, o, pin_, &a).ok()) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  live_[a.ptr] = a;
  return a.ptr;
}

void PinnedHostAllocations::Free(void* ptr) {
  HostAllocation a;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(ptr);
    if (it == live_.end()) return;
    a = it->second;
    live_.erase(it);
  }
  FreeHost(a, unpin_);
}

}  // namespace zero

// Host memory for offloaded optimizer state: anonymous mappings in transparent huge pages, made resident by the
// calling thread, then pinned so host<->device copies can be asynchronous.
//
// Why each step:
//   mmap, 2 MiB-aligned       THP needs an aligned 2 MiB range; malloc gives neither the alignment nor a
//                             mapping of its own that madvise and munmap can act on.
//   madvise(MADV_HUGEPAGE)    works when the system's THP mode is "madvise" (the Debian default), not only
//                             "always"; 512x fewer TLB entries for a streaming optimizer over GiBs of state.
//   first touch here          the pages come from the calling thread's NUMA node, and the cost of faulting
//                             them in is paid once at allocation, not inside the first optimizer step.
//   pin                       mlock on the CPU backend; the CUDA device passes cudaHostRegister. A refused pin
//                             (RLIMIT_MEMLOCK) is not fatal: the memory stays pageable and a warning says so.
//
// This module does not count bytes; the Device layer accounts host memory like device memory.
// Thread-safety: every function may be called from any thread; an allocation is freed once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "zero/status.h"

namespace zero {

// The granularity of a transparent huge page on x86-64 and (with 4 KiB base pages) arm64.
inline constexpr int64_t kHugePageBytes = int64_t{2} << 20;

struct HostAllocation {
  void* ptr = nullptr;       // start of the mapping; null for a 0-byte allocation
  int64_t bytes = 0;         // what the caller asked for
  int64_t mapped_bytes = 0;  // bytes rounded up to 2 MiB (huge pages) or the base page size; all of it usable
  bool huge_pages = false;   // the range was advised for THP; whether the kernel used them: HugePageBytes()
  bool pinned = false;       // pinned (mlock or the caller's pin function); false after a refused pin
};

struct HostMemoryOptions {
  // Default true: 2 MiB-aligned and advised for transparent huge pages, rounded up to 2 MiB (at most 2 MiB - 1
  // bytes of waste per allocation). False: base pages even where THP is "always" (MADV_NOHUGEPAGE), which is
  // what a benchmark comparing the two needs.
  bool huge_pages = true;
  // Default true: pin the whole mapping after the first touch. Costs locked memory (RLIMIT_MEMLOCK when not
  // root); a refused pin falls back to pageable memory with a warning on stderr.
  bool pin = true;
};

// Pins [ptr, ptr + bytes); returns false and sets *error (e.g. "cudaHostRegister: out of memory") when refused.
using PinFn = std::function<bool(void* ptr, size_t bytes, std::string* error)>;
// Undoes a successful PinFn on the same range.
using UnpinFn = std::function<void(void* ptr, size_t bytes)>;

// Maps `bytes` of zero-filled, resident host memory as `options` says and pins it with `pin` (null: mlock).
// A 0-byte request succeeds with an empty allocation. Returns InvalidArgument for bytes < 0 or a null `out`,
// OutOfMemory naming the size when the mapping or the first touch fails; a refused pin is not an error.
// REQUIRES: the allocation is released with FreeHost and an `unpin` matching `pin`.
Status AllocateHost(int64_t bytes, const HostMemoryOptions& options, const PinFn& pin, HostAllocation* out);

// Unpins (when pinned; `unpin` null: munlock) and unmaps. Does nothing for an empty allocation.
void FreeHost(const HostAllocation& allocation, const UnpinFn& unpin);

// Bytes of the allocation the kernel actually backs with transparent huge pages now (AnonHugePages in
// /proc/self/smaps), for tests and reports; 0 without THP or when /proc is unreadable. smaps counts per
// mapping: if the kernel merged this range with an adjacent allocation of the same kind, the count is the
// merged mapping's, capped at this allocation's size.
int64_t HugePageBytes(const HostAllocation& allocation);

// The pinned host allocations of one Device, by pointer (a Device frees by pointer and size only): huge pages
// for buffers of 2 MiB and more, base pages below, each pinned with `pin` / released with `unpin` (null: mlock /
// munlock). Thread-safe.
class PinnedHostAllocations {
 public:
  PinnedHostAllocations(PinFn pin, UnpinFn unpin) : pin_(std::move(pin)), unpin_(std::move(unpin)) {}
  // Null when the system refuses the memory.
  void* Allocate(int64_t bytes);
  void Free(void* ptr);

 private:
  PinFn pin_;
  UnpinFn unpin_;
  std::mutex mu_;
  std::unordered_map<void*, HostAllocation> live_;
};

// Test seam: while true, every pin attempt fails as if RLIMIT_MEMLOCK refused it (CI runs as root, where mlock
// always succeeds). Affects all threads.
void TEST_FailPinning(bool fail);

}  // namespace zero

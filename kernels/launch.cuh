// Launch configuration shared by the CUDA instantiations: grid-stride kernels with a fixed block size, and the
// launch limits of every GPU zero targets (sm_80, sm_90), which the kernels' own headers check their constants
// against at compile time and the CPU launch emulation (tests/testing/cuda_emulation.h) checks every launch
// against: a real launch outside them fails with cudaErrorInvalidConfiguration, an emulated one would just run.
#pragma once

#include <algorithm>
#include <cstdint>

namespace zero::kernels {

// The runtime refuses a launch whose grid has a zero dimension, x beyond 2^31 - 1 or y, z beyond 65535, whose
// block has no thread, more than 1024 threads, x or y beyond 1024 or z beyond 64, or whose static shared memory
// exceeds 48 KiB (more needs dynamic shared memory and cudaFuncSetAttribute, which no zero kernel uses).
inline constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
inline constexpr int64_t kMaxGridYZ = 65535;
inline constexpr int64_t kMaxBlockThreads = 1024;
inline constexpr int64_t kMaxBlockZ = 64;
inline constexpr int64_t kMaxStaticSharedBytes = 48 * 1024;

// Whether grid (gx, gy, gz) of blocks (bx, by, bz) is a launch the runtime accepts (the limits above).
constexpr bool LaunchConfigValid(int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz) {
  return gx >= 1 && gy >= 1 && gz >= 1 && gx <= kMaxGridX && gy <= kMaxGridYZ && gz <= kMaxGridYZ && bx >= 1 &&
         by >= 1 && bz >= 1 && bx <= kMaxBlockThreads && by <= kMaxBlockThreads && bz <= kMaxBlockZ &&
         bx * by * bz <= kMaxBlockThreads;
}

inline constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
inline constexpr int64_t kMaxBlocks = 65535;
static_assert(kThreads % 32 == 0 && LaunchConfigValid(kMaxBlocks, 1, 1, kThreads, 1, 1),
              "the element-wise launch: whole warps, within the runtime's limits");

// Blocks for n > 0 elements, one per thread. n == 0 would be an empty grid, which the runtime refuses: every
// launcher returns before launching nothing.
inline int BlocksFor(int64_t n) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads));
}

}  // namespace zero::kernels

// Launch configuration shared by the CUDA instantiations: grid-stride kernels with a fixed block size.
#pragma once

#include <algorithm>
#include <cstdint>

namespace zero::kernels {

inline constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
inline constexpr int64_t kMaxBlocks = 65535;

inline int BlocksFor(int64_t n) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads));
}

}  // namespace zero::kernels

// Seeded random test data shared by the kernel suites.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace zero::testing {

// n floats uniform in [lo, hi), the same for the same seed.
inline std::vector<float> RandomFloats(int64_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

}  // namespace zero::testing

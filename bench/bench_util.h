// Timing helpers shared by every benchmark (no MPI: zero_bench_adamw runs as one process).
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace zero::bench {

// The median of x (0 when empty).
inline double Median(std::vector<double> x) {
  if (x.empty()) return 0.0;
  std::sort(x.begin(), x.end());
  const size_t k = x.size() / 2;
  return x.size() % 2 ? x[k] : 0.5 * (x[k - 1] + x[k]);
}

// Wall seconds of one call of fn.
template <typename Fn>
double Seconds(Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace zero::bench

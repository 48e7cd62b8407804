// CPU instantiation of the written-once device math (see optimizer.cuh) and host gradient helpers.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu_kernels.h"

namespace zero::kernels {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = int64_t{1} << 16;

int ThreadsFor(int64_t n, int threads) { return (n < kParallelMin || threads <= 1) ? 1 : threads; }

}  // namespace

void AdamWCpu(const AdamWCoeffs& c, float* p, float* m, float* v, const float* g, int64_t n, int threads) {
  const AdamWElement f{c};
#pragma omp parallel for simd num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) f(p[i], m[i], v[i], g[i]);
}

void SgdCpu(const SgdCoeffs& c, float* p, float* buf, const float* g, int64_t n, int threads) {
  const SgdElement f{c};
#pragma omp parallel for simd num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) f(p[i], buf[i], g[i]);
}

void AccumulateCpu(float* acc, const float* x, int64_t n, int threads) {
#pragma omp parallel for simd num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

SumSquares SumSquaresCpu(const float* x, int64_t n, int threads) {
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<SumSquares> partial(static_cast<size_t>(blocks));
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(n, (b + 1) * kSumBlock);
    double s = 0.0;
    int64_t bad = 0;
    for (int64_t i = b * kSumBlock; i < end; ++i) {
      const float e = x[i];
      if (std::isfinite(e)) {
        s += static_cast<double>(e) * static_cast<double>(e);
      } else {
        ++bad;
      }
    }
    partial[static_cast<size_t>(b)] = {s, bad};
  }
  SumSquares total;
  for (const SumSquares& p : partial) {
    total.sum += p.sum;
    total.nonfinite += p.nonfinite;
  }
  return total;
}

}  // namespace zero::kernels

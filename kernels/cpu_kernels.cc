// CPU instantiation of the written-once device math (optimizer.cuh, cast.cuh) and host gradient helpers.
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

namespace {

template <typename Load>
void SgdLoad(const SgdCoeffs& c, float* p, float* buf, Load load, int64_t n, int threads) {
  const SgdElement f{c};
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) f(p[i], buf[i], load(i));
}

template <float (*Widen)(uint16_t), uint16_t (*Narrow)(float)>
void AccumulateHalf(void* acc, const void* x, int64_t n, int threads) {
  auto* a = static_cast<uint16_t*>(acc);
  const auto* b = static_cast<const uint16_t*>(x);
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) a[i] = Narrow(Widen(a[i]) + Widen(b[i]));
}

}  // namespace

bool SgdCpu(const SgdCoeffs& c, float* p, float* buf, const void* g, DType g_dtype, int64_t n, int threads) {
  switch (g_dtype) {
    case DType::kF32: SgdCpu(c, p, buf, static_cast<const float*>(g), n, threads); return true;
    case DType::kBF16: {
      const auto* h = static_cast<const Bf16Bits*>(g);
      SgdLoad(c, p, buf, [h](int64_t i) { return Bf16ToFloat(h[i]); }, n, threads);
      return true;
    }
    case DType::kF16: {
      const auto* h = static_cast<const F16Bits*>(g);
      SgdLoad(c, p, buf, [h](int64_t i) { return F16ToFloat(h[i]); }, n, threads);
      return true;
    }
    default: return false;
  }
}

bool AccumulateCpu(void* acc, const void* x, DType dtype, int64_t n, int threads) {
  switch (dtype) {
    case DType::kF32: AccumulateCpu(static_cast<float*>(acc), static_cast<const float*>(x), n, threads); return true;
    case DType::kBF16: AccumulateHalf<Bf16ToFloat, FloatToBf16>(acc, x, n, threads); return true;
    case DType::kF16: AccumulateHalf<F16ToFloat, FloatToF16>(acc, x, n, threads); return true;
    default: return false;
  }
}

void ScaleCpu(float* x, float s, int64_t n, int threads) {
#pragma omp parallel for simd num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

namespace {

template <typename From, typename To, typename Fn>
void Convert(const void* src, void* dst, int64_t n, int threads, Fn fn) {
  const From* in = static_cast<const From*>(src);
  To* out = static_cast<To*>(dst);
#pragma omp parallel for simd num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = fn(in[i]);
}

// Every block of every range (blocks numbered consecutively, range by range) summed sequentially in one parallel
// loop, then each range's blocks in order: independent of the thread count, and the same partials in the same
// order as reduce.cu. `first` has count + 1 entries: range r's blocks are [first[r], first[r + 1]).
template <typename Widen>
void BatchedSumSquares(const SumSquaresRange* ranges, int64_t count, const std::vector<int64_t>& first, int threads,
                       Widen widen, SumSquares* out) {
  const int64_t blocks = first[static_cast<size_t>(count)];
  std::vector<SumSquares> partial(static_cast<size_t>(blocks));
#pragma omp parallel for num_threads(ThreadsFor(blocks * kSumBlock, threads)) schedule(static)
  for (int64_t g = 0; g < blocks; ++g) {
    // The last range starting at or before g (empty ranges share their successor's start).
    const auto r = static_cast<int64_t>(std::upper_bound(first.begin(), first.end() - 1, g) - first.begin()) - 1;
    const SumSquaresRange& range = ranges[r];
    const int64_t begin = (g - first[static_cast<size_t>(r)]) * kSumBlock;
    const void* x = range.x;
    partial[static_cast<size_t>(g)] =
        SumSquaresBlock(begin, std::min(range.n, begin + kSumBlock), [x, &widen](int64_t i) { return widen(x, i); });
  }
  for (int64_t r = 0; r < count; ++r) {
    SumSquares total;
    for (int64_t g = first[static_cast<size_t>(r)]; g < first[static_cast<size_t>(r) + 1]; ++g) {
      total.sum += partial[static_cast<size_t>(g)].sum;
      total.nonfinite += partial[static_cast<size_t>(g)].nonfinite;
    }
    out[r] = total;
  }
}

}  // namespace

bool CastCpu(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, int threads) {
  if (src_dtype == DType::kF32 && dst_dtype == DType::kF32) {
    Convert<float, float>(src, dst, n, threads, [](float v) { return v; });
  } else if (src_dtype == DType::kF32 && dst_dtype == DType::kBF16) {
    Convert<float, Bf16Bits>(src, dst, n, threads, [](float v) { return FloatToBf16(v); });
  } else if (src_dtype == DType::kF32 && dst_dtype == DType::kF16) {
    Convert<float, F16Bits>(src, dst, n, threads, [](float v) { return FloatToF16(v); });
  } else if (src_dtype == DType::kBF16 && dst_dtype == DType::kF32) {
    Convert<Bf16Bits, float>(src, dst, n, threads, [](Bf16Bits v) { return Bf16ToFloat(v); });
  } else if (src_dtype == DType::kF16 && dst_dtype == DType::kF32) {
    Convert<F16Bits, float>(src, dst, n, threads, [](F16Bits v) { return F16ToFloat(v); });
  } else {
    return false;
  }
  return true;
}

bool SumSquaresCpu(const SumSquaresRange* ranges, int64_t count, DType dtype, int threads, SumSquares* out) {
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);
  for (int64_t r = 0; r < count; ++r) {
    first[static_cast<size_t>(r) + 1] = first[static_cast<size_t>(r)] + SumBlocks(ranges[r].n);
  }
  switch (dtype) {
    case DType::kF32:
      BatchedSumSquares(ranges, count, first, threads,
                        [](const void* x, int64_t i) { return static_cast<const float*>(x)[i]; }, out);
      return true;
    case DType::kBF16:
      BatchedSumSquares(ranges, count, first, threads,
                        [](const void* x, int64_t i) { return Bf16ToFloat(static_cast<const Bf16Bits*>(x)[i]); }, out);
      return true;
    case DType::kF16:
      BatchedSumSquares(ranges, count, first, threads,
                        [](const void* x, int64_t i) { return F16ToFloat(static_cast<const F16Bits*>(x)[i]); }, out);
      return true;
    default:
      return false;
  }
}

SumSquares SumSquaresCpu(const float* x, int64_t n, int threads) { return SumSquaresCpu(x, DType::kF32, n, threads); }

SumSquares SumSquaresCpu(const void* x, DType dtype, int64_t n, int threads) {
  const SumSquaresRange range{x, n};
  SumSquares out;
  if (!SumSquaresCpu(&range, 1, dtype == DType::kBF16 || dtype == DType::kF16 ? dtype : DType::kF32, threads, &out)) {
    return SumSquares{};  // unreachable: the dtype was mapped to a supported one
  }
  return out;
}

}  // namespace zero::kernels

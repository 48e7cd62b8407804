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

// Fixed kSumBlock blocks summed sequentially, then the blocks in order: independent of the thread count.
template <typename Load>
SumSquares BlockedSumSquares(int64_t n, int threads, Load load) {
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<SumSquares> partial(static_cast<size_t>(blocks));
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    partial[static_cast<size_t>(b)] = SumSquaresBlock(b * kSumBlock, std::min(n, (b + 1) * kSumBlock), load);
  }
  SumSquares total;
  for (const SumSquares& p : partial) {
    total.sum += p.sum;
    total.nonfinite += p.nonfinite;
  }
  return total;
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

SumSquares SumSquaresCpu(const float* x, int64_t n, int threads) {
  return BlockedSumSquares(n, threads, [x](int64_t i) { return x[i]; });
}

SumSquares SumSquaresCpu(const void* x, DType dtype, int64_t n, int threads) {
  switch (dtype) {
    case DType::kBF16: {
      const auto* b = static_cast<const Bf16Bits*>(x);
      return BlockedSumSquares(n, threads, [b](int64_t i) { return Bf16ToFloat(b[i]); });
    }
    case DType::kF16: {
      const auto* h = static_cast<const F16Bits*>(x);
      return BlockedSumSquares(n, threads, [h](int64_t i) { return F16ToFloat(h[i]); });
    }
    default:
      return SumSquaresCpu(static_cast<const float*>(x), n, threads);
  }
}

}  // namespace zero::kernels

// CPU instantiation of the blockwise quantization (kernels/quantize.cuh): a block per loop iteration for
// quantizing (its maximum, then its codes, pair by pair like the CUDA threads), an element per iteration for the
// rest. OpenMP splits blocks or elements; no result depends on the thread count.
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "kernels/quantize.h"

namespace zero::kernels {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = int64_t{1} << 16;

int ThreadsFor(int64_t n, int threads) { return (n < kParallelMin || threads <= 1) ? 1 : threads; }

}  // namespace

void QuantizeCpu(const void* src, QuantElem kind, int64_t n, int bits, void* payload, int threads) {
  auto* scales = static_cast<float*>(payload);
  uint8_t* codes = static_cast<uint8_t*>(payload) + 4 * QuantBlocks(n);
  const int64_t blocks = QuantBlocks(n);
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kQuantBlock, end = std::min(n, begin + kQuantBlock);
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = begin; i < end; ++i) {
      const float x = LoadAsFloat(src, i, kind);
      finite = finite && QuantFinite(x);
      if (QuantFinite(x)) amax = std::max(amax, std::fabs(x));
    }
    const float scale = QuantScale(amax, finite, bits);
    scales[b] = scale;
    for (int64_t i = begin; i < end; i += 2) {
      const bool second = i + 1 < end;
      const int q0 = QuantEncode(LoadAsFloat(src, i, kind), scale, bits);
      const int q1 = second ? QuantEncode(LoadAsFloat(src, i + 1, kind), scale, bits) : 0;
      QuantEncodePair(q0, q1, second, bits, codes, i);
    }
  }
  // The padding after the codes is part of the payload that travels: keep it defined.
  const int64_t code_bytes = QuantCodeBytes(n, bits), padded = QuantPayloadBytes(n, bits) - 4 * blocks;
  std::fill(codes + code_bytes, codes + padded, uint8_t{0});
}

void DequantizeCpu(const void* payload, int64_t n, int bits, void* dst, QuantElem kind, int threads) {
  const auto* scales = static_cast<const float*>(payload);
  const uint8_t* codes = static_cast<const uint8_t*>(payload) + 4 * QuantBlocks(n);
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(dst, i, QuantDecode(codes, scales, i, bits), kind);
}

void DequantizeAddCpu(const void* payload, int64_t n, int bits, float* acc, int threads) {
  const auto* scales = static_cast<const float*>(payload);
  const uint8_t* codes = static_cast<const uint8_t*>(payload) + 4 * QuantBlocks(n);
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) acc[i] += QuantDecode(codes, scales, i, bits);
}

void WidenAddCpu(const void* src, QuantElem kind, int64_t n, float* acc, int threads) {
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) acc[i] += LoadAsFloat(src, i, kind);
}

void ConvertCpu(const void* src, QuantElem src_kind, void* dst, QuantElem dst_kind, int64_t n, int threads) {
#pragma omp parallel for num_threads(ThreadsFor(n, threads)) schedule(static)
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(dst, i, LoadAsFloat(src, i, src_kind), dst_kind);
}

}  // namespace zero::kernels

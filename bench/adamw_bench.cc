// zero_bench_adamw: AdamWStepCpu (kernels/cpu_adamw.h) against the memory-bandwidth roofline measured in the
// same run, and against the scalar path (AdamWCpu plus CastCpu passes, kernels/cpu_kernels.h).
//
// The roofline is a streaming kernel with exactly the optimizer's traffic: it reads master, m, v and the
// gradient, writes master, m and v in place and, for a copy, streams the same 2-byte values with non-temporal
// stores, with the same SIMD target, the same OpenMP threads and the same chunking, and almost no arithmetic. Its
// bytes/s is what the hardware gives this access pattern; roofline_ratio = t(roofline) / t(AdamW) is how close
// the optimizer comes (1.0 = bound by memory alone). Every iteration times the three in turn on the same buffers,
// and the counters are medians of the per-iteration ratios, so drift (frequency, a noisy neighbour) cancels.
//
// Counters: params_per_s and GBps of the optimizer (bytes per param: 12 read + 12 written for fp32 master/m/v,
// plus 4 or 2 for the gradient and 2 for a bf16 copy), roofline_GBps, roofline_ratio, and vs_scalar =
// t(scalar path) / t(AdamW). The scalar path is what the CPU backend had before this kernel: a bf16 gradient
// widened by CastCpu into an fp32 buffer, AdamWCpu, and CastCpu of the master into the copy.
//
// Arguments: the usual Google Benchmark flags (--benchmark_filter=..., --benchmark_format=json). Buffers are
// allocated once for the largest size, 64 B aligned and skewed against each other, in 4 KiB pages (MADV_NOHUGEPAGE)
// and, for the largest size, again in transparent huge pages (MADV_HUGEPAGE) when the kernel offers them.

// The shared part, compiled once (this file is included again per SIMD target).
#ifndef ZERO_BENCH_ADAMW_SHARED_
#define ZERO_BENCH_ADAMW_SHARED_

#include <benchmark/benchmark.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/cast.cuh"
#include "kernels/cpu_adamw.h"
#include "kernels/cpu_kernels.h"

namespace zero::bench {

// One roofline call: [begin, end) of the arrays. zero is a run-time 0.0f: adding it stores the values it loaded
// (m, v unchanged; master + 0 * grad) so the compiler cannot drop a store, and the state does not drift.
struct StreamArgs {
  float* master;
  float* m;
  float* v;
  const void* grad;
  bool grad_bf16;
  uint16_t* copy;  // null: no copy
  float zero;
};

}  // namespace zero::bench

#endif  // ZERO_BENCH_ADAMW_SHARED_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/adamw_bench.cc"
#include <hwy/cache_control.h>
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace zero::bench {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <bool kBf16Grad, bool kCopy>
void StreamRangeT(const StreamArgs& a, int64_t begin, int64_t end) {
  int64_t i = begin;
#if HWY_TARGET != HWY_SCALAR
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du32;
  const hn::Rebind<uint16_t, decltype(df)> du16h;
  const hn::Repartition<uint16_t, decltype(df)> du16;
  const int64_t n = static_cast<int64_t>(hn::Lanes(df));
  const auto zero = hn::Set(df, a.zero);
  const auto load_grad = [&](int64_t j) {
    if constexpr (kBf16Grad) {
      const auto bits = hn::PromoteTo(du32, hn::LoadU(du16h, static_cast<const uint16_t*>(a.grad) + j));
      return hn::BitCast(df, hn::ShiftLeft<16>(bits));
    } else {
      return hn::LoadU(df, static_cast<const float*>(a.grad) + j);
    }
  };
  for (; i + 2 * n <= end; i += 2 * n) {
    const auto p0 = hn::Add(hn::LoadU(df, a.master + i), hn::Mul(load_grad(i), zero));
    const auto p1 = hn::Add(hn::LoadU(df, a.master + i + n), hn::Mul(load_grad(i + n), zero));
    hn::StoreU(p0, df, a.master + i);
    hn::StoreU(p1, df, a.master + i + n);
    hn::StoreU(hn::Add(hn::LoadU(df, a.m + i), zero), df, a.m + i);
    hn::StoreU(hn::Add(hn::LoadU(df, a.m + i + n), zero), df, a.m + i + n);
    hn::StoreU(hn::Add(hn::LoadU(df, a.v + i), zero), df, a.v + i);
    hn::StoreU(hn::Add(hn::LoadU(df, a.v + i + n), zero), df, a.v + i + n);
    if constexpr (kCopy) {  // the top halves (bf16 by truncation): same bytes as the optimizer's copy
      hn::Stream(hn::ConcatOdd(du16, hn::BitCast(du16, p1), hn::BitCast(du16, p0)), du16, a.copy + i);
    }
  }
  if constexpr (kCopy) hwy::FlushStream();
#endif
  for (; i < end; ++i) {
    const float g = kBf16Grad ? kernels::Bf16ToFloat(static_cast<const uint16_t*>(a.grad)[i])
                              : static_cast<const float*>(a.grad)[i];
    a.master[i] = a.master[i] + g * a.zero;
    a.m[i] = a.m[i] + a.zero;
    a.v[i] = a.v[i] + a.zero;
    if constexpr (kCopy) a.copy[i] = kernels::FloatToBf16(a.master[i]);
  }
}

void StreamRange(const StreamArgs& a, int64_t begin, int64_t end) {
  if (a.grad_bf16) {
    return a.copy ? StreamRangeT<true, true>(a, begin, end) : StreamRangeT<true, false>(a, begin, end);
  }
  return a.copy ? StreamRangeT<false, true>(a, begin, end) : StreamRangeT<false, false>(a, begin, end);
}

}  // namespace HWY_NAMESPACE
}  // namespace zero::bench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace zero::bench {
namespace {

HWY_EXPORT(StreamRange);

using kernels::AdamWCoeffs;

constexpr int kMinLog2 = 20;
constexpr int kMaxLog2 = 26;
constexpr int64_t kMaxN = int64_t{1} << kMaxLog2;

// The roofline over [0, n) on `threads` threads, split like AdamWStepCpu (64-element chunks; the buffers are
// 64 B aligned, so every chunk starts aligned).
void StreamCpu(const StreamArgs& a, int64_t n, int threads) {
  auto* range = &HWY_DYNAMIC_DISPATCH(StreamRange);
#pragma omp parallel num_threads(threads)
  {
    const int k = omp_get_thread_num(), parts = omp_get_num_threads();
    const auto boundary = [&](int j) { return j == parts ? n : std::min(n, (n * j / parts + 63) / 64 * 64); };
    range(a, boundary(k), boundary(k + 1));
  }
}

// The optimizer's arrays for kMaxN parameters in one mapping.
class Arena {
 public:
  explicit Arena(bool huge) : huge_(huge) {
    bytes_ = 0;
    for (size_t b : {size_t{4}, size_t{4}, size_t{4}, size_t{4}, size_t{2}, size_t{2}})
      bytes_ += Round(b * kMaxN + kSkew * 6);
    base_ = mmap(nullptr, bytes_ + kAlign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) {
      std::perror("mmap");
      std::abort();
    }
    auto* p = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base_) + kAlign - 1) / kAlign * kAlign);
    // THP in "madvise" mode (Debian's default) gives huge pages only where asked; "never" ignores the advice.
    huge_ok_ = madvise(p, bytes_, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) == 0;
    size_t index = 0;
    const auto take = [&](size_t b) {
      uint8_t* r = p + kSkew * index++;
      p += Round(b * kMaxN + kSkew * 6);
      return r;
    };
    master = reinterpret_cast<float*>(take(4));
    m = reinterpret_cast<float*>(take(4));
    v = reinterpret_cast<float*>(take(4));
    grad_f32 = reinterpret_cast<float*>(take(4));
    grad_bf16 = reinterpret_cast<uint16_t*>(take(2));
    copy = reinterpret_cast<uint16_t*>(take(2));
    Fill();
  }
  ~Arena() { munmap(base_, bytes_ + kAlign); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Whether the kernel took the page-size advice (huge pages may still be partial: see AnonHugePages).
  bool huge_ok() const { return huge_ok_; }
  bool huge() const { return huge_; }

  float* master;
  float* m;
  float* v;
  float* grad_f32;
  uint16_t* grad_bf16;
  uint16_t* copy;

 private:
  static constexpr size_t kAlign = size_t{2} << 20;
  // Array k starts k * kSkew bytes into its 2 MiB region. Without it every array starts at the same offset
  // modulo a large power of two and the streams collide in cache sets and DRAM banks: the scalar AdamWCpu runs
  // 9x slower with arrays exactly 256 MiB apart than with this skew (64 B aligned, like any engine buffer).
  static constexpr size_t kSkew = 4096 + 64;
  static size_t Round(size_t b) { return (b + kAlign - 1) / kAlign * kAlign; }

  // First touch on the benchmark's threads (one NUMA node here, but the placement is then right elsewhere too),
  // with values typical of training: gradients ~1e-2, v ~ g^2. A hash of the index, not a distribution: filling
  // 2^26 parameters must not dominate the run.
  void Fill() {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < kMaxN; ++i) {
      const float g = 1e-2f * Uniform(static_cast<uint64_t>(i), 1);
      master[i] = 0.02f * Uniform(static_cast<uint64_t>(i), 2);
      m[i] = 0.1f * g;
      v[i] = g * g;
      grad_f32[i] = g;
      grad_bf16[i] = kernels::FloatToBf16(g);
      copy[i] = 0;
    }
  }
  // In [-1, 1), from a 64-bit mix of (i, stream).
  static float Uniform(uint64_t i, uint64_t stream) {
    uint64_t z = i * 0x9e3779b97f4a7c15ull + stream * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>(static_cast<double>(z >> 40) * 0x1p-23 - 1.0);
  }

  bool huge_;
  bool huge_ok_ = false;
  void* base_;
  size_t bytes_;
};

// AnonHugePages of this process in MiB (only the huge-page arena asks for them), or -1 when unreadable.
long AnonHugeMiB() {
  FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::sscanf(line, "AnonHugePages: %ld kB", &kib) == 1) break;
  }
  std::fclose(f);
  return kib < 0 ? -1 : kib / 1024;
}

Arena& GetArena(bool huge) {
  static Arena small_pages(false);
  if (!huge) return small_pages;
  static Arena huge_pages(true);
  return huge_pages;
}

struct Config {
  DType grad;
  bool copy;  // bf16 copy
  int log2n;
  int threads;
  bool huge;
};

void BM_AdamW(benchmark::State& state, Config cfg) {
  Arena& a = GetArena(cfg.huge);
  const int64_t n = int64_t{1} << cfg.log2n;
  const bool bf16 = cfg.grad == DType::kBF16;
  const void* grad = bf16 ? static_cast<const void*>(a.grad_bf16) : a.grad_f32;
  const AdamWCoeffs c = kernels::MakeAdamWCoeffs(1e-4, 0.9, 0.999, 1e-8, 0.01, 10, 0.5);
  const StreamArgs roof{a.master, a.m, a.v, grad, bf16, cfg.copy ? a.copy : nullptr, 0.0f};
  const auto adamw = [&] {
    if (!kernels::AdamWStepCpu(c, a.master, a.m, a.v, grad, cfg.grad, cfg.copy ? a.copy : nullptr, DType::kBF16, n,
                               cfg.threads)) {
      state.SkipWithError("AdamWStepCpu rejected the dtypes");
    }
  };
  const auto scalar = [&] {
    // The scalar path's fp32 gradient buffer is grad_f32 (the bf16 runs do not read it).
    if (bf16) kernels::CastCpu(a.grad_bf16, DType::kBF16, a.grad_f32, DType::kF32, n, cfg.threads);
    kernels::AdamWCpu(c, a.master, a.m, a.v, a.grad_f32, n, cfg.threads);
    if (cfg.copy) kernels::CastCpu(a.master, DType::kF32, a.copy, DType::kBF16, n, cfg.threads);
  };
  adamw();  // warm: threads started, pages and the dispatch table touched
  StreamCpu(roof, n, cfg.threads);
  std::vector<double> t_adamw, ratio_roof, ratio_scalar;
  for (auto _ : state) {
    const double tr = Seconds([&] { StreamCpu(roof, n, cfg.threads); });
    const double tk = Seconds(adamw);
    const double ts = Seconds(scalar);
    state.SetIterationTime(tk);
    t_adamw.push_back(tk);
    ratio_roof.push_back(tr / tk);
    ratio_scalar.push_back(ts / tk);
  }
  const double bytes_per_param = 24.0 + (bf16 ? 2 : 4) + (cfg.copy ? 2 : 0);
  const double tk = Median(t_adamw);
  const double roof_ratio = Median(ratio_roof);
  state.counters["params_per_s"] = static_cast<double>(n) / tk;
  state.counters["GBps"] = bytes_per_param * static_cast<double>(n) / tk * 1e-9;
  state.counters["roofline_GBps"] = state.counters["GBps"] * roof_ratio;
  state.counters["roofline_ratio"] = roof_ratio;
  state.counters["vs_scalar"] = Median(ratio_scalar);
  std::string label = kernels::AdamWTargetName();
  if (cfg.huge) label += a.huge_ok() ? " THP:" + std::to_string(AnonHugeMiB()) + "MiB" : " (no THP)";
  state.SetLabel(label);
}

void RegisterAll() {
  for (const bool huge : {false, true}) {
    for (int log2n = kMinLog2; log2n <= kMaxLog2; log2n += 2) {
      if (huge && log2n != kMaxLog2) continue;  // huge pages matter where TLB reach does: the largest size
      for (const DType grad : {DType::kF32, DType::kBF16}) {
        for (const bool copy : {false, true}) {
          for (const int threads : {1, 2}) {
            const Config cfg{grad, copy, log2n, threads, huge};
            const std::string name = std::string("AdamW/grad:") + DTypeName(grad) +
                                     "/copy:" + (copy ? "bf16" : "none") + "/n:2^" + std::to_string(log2n) +
                                     "/threads:" + std::to_string(threads) + "/pages:" + (huge ? "2M" : "4K");
            // About 2^27 parameters per configuration (3 per iteration at 2^26): ~1 s each on one thread.
            const int64_t iterations = std::max<int64_t>(3, int64_t{1} << (27 - log2n));
            benchmark::RegisterBenchmark(name.c_str(), BM_AdamW, cfg)
                ->UseManualTime()
                ->Iterations(iterations)
                ->Unit(benchmark::kMillisecond);
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace zero::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  std::printf("AdamWStepCpu target: %s, OpenMP max threads: %d\n", zero::kernels::AdamWTargetName(),
              omp_get_max_threads());
  zero::bench::RegisterAll();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
#endif  // HWY_ONCE

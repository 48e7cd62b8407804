// zero_bench_gpu's kernel-level rows (rows.h): the device optimizer kernels, the gradient norm and the offload
// copies, each against the reference measured in the same iteration.
//
// Optimizer/opt:{adamw,sgd}/param:{f32,bf16}/grad:{f32,bf16}/n:2^k
//   kernels::AdamWCuda / SgdCuda (what the engine's device optimizer runs) over n elements, bf16 params meaning
//   an fp32 master with the bf16 copy written in the pass, against StreamLikeOptimizer with exactly its bytes.
//   Counters: kernel_s, stream_s (CUDA events), GBps, stream_GBps, ratio = stream_s / kernel_s (goal >= 0.90).
// Norm/grad:{f32,bf16}/case:{step,lora}
//   Device::SumSquares over a step's trainable bucket shards (one call: one wait) against one streaming read of
//   the same bytes (StreamSumSquares + a 4-byte copy back: one wait). Counters: norm_s, stream_s, ratio =
//   norm_s / stream_s (goal <= 1.5), per_bucket_s (the same ranges one call each: the old one-wait-per-bucket
//   pattern), syncs_per_step (1), bitwise_cpu (1 when every bucket's total has the CPU twin's bits), buckets,
//   elements. Wall-clock times: the wait is part of the cost.
// OffloadCopy/dir:{d2h,h2d,duplex}/bytes:N
//   zero's path (Device::Allocate of pinned host memory: huge pages + cudaHostRegister; Device::Copy per 64 MiB
//   bucket-shard chunk on a zero stream) against one cudaMemcpyAsync of the same bytes between the same buffers.
//   Counters: zero_GBps, raw_GBps, ratio = zero/raw (goal >= 0.85), cudahostalloc_GBps and pageable_GBps (the
//   same copy with cudaHostAlloc'd and malloc'd host memory, for reference), pinned (1 when zero's host buffer
//   is registered with CUDA; 0: the pageable fallback, reported in the label).
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "bench/gpu/gpu_bench_util.h"
#include "bench/gpu/gpu_kernels.h"
#include "bench/gpu/rows.h"
#include "device.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"

namespace zero::bench::gpu {
namespace {

// cudaMalloc'd bytes, freed at scope end.
struct DeviceMem {
  void* p = nullptr;
  explicit DeviceMem(int64_t bytes) {
    if (cudaMalloc(&p, static_cast<size_t>(bytes)) != cudaSuccess) p = nullptr;
  }
  ~DeviceMem() { cudaFree(p); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// Milliseconds between two events recorded around fn() on the legacy stream.
template <typename Fn>
double EventSeconds(cudaEvent_t a, cudaEvent_t b, Fn&& fn) {
  cudaEventRecord(a, nullptr);
  fn();
  cudaEventRecord(b, nullptr);
  cudaEventSynchronize(b);
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, a, b);
  return ms * 1e-3;
}

bool Fail(benchmark::State& state, const std::string& why) {
  if (why.empty()) return false;
  state.SkipWithError(why.c_str());
  return true;
}

// ---------------------------------------------------------------------------------------------------- optimizer

struct OptimizerCase {
  bool adamw;
  bool bf16_param;  // fp32 master + bf16 copy
  bool bf16_grad;
  int log2n;
};

void BM_Optimizer(benchmark::State& state, OptimizerCase c) {
  const int64_t n = int64_t{1} << c.log2n;
  DeviceMem p(n * 4), m(n * 4), v(n * 4), g(n * 4), copy(n * 2);
  if (p.p == nullptr || m.p == nullptr || v.p == nullptr || g.p == nullptr || copy.p == nullptr) {
    state.SkipWithError("cudaMalloc failed");
    return;
  }
  FillPattern(p.p, false, n, 1, 0.02f, nullptr);
  FillPattern(m.p, false, n, 2, 1e-3f, nullptr);
  FillPattern(v.p, false, n, 3, 1e-6f, nullptr);
  cudaMemset(v.p, 0, static_cast<size_t>(n * 4));  // v >= 0: start from zero (sqrt of a negative is NaN)
  FillPattern(g.p, c.bf16_grad, n, 4, 1e-2f, nullptr);
  const auto gk = c.bf16_grad ? kernels::GradKind::kBf16 : kernels::GradKind::kF32;
  void* cp = c.bf16_param ? copy.p : nullptr;
  const auto kind = c.bf16_param ? kernels::CopyKind::kBf16 : kernels::CopyKind::kNone;
  int64_t t = 0;
  const auto kernel = [&] {
    ++t;
    int rc;
    if (c.adamw) {
      rc = kernels::AdamWCuda(kernels::MakeAdamWCoeffs(1e-4, 0.9, 0.999, 1e-8, 0.01, t, 1.0), p.as<float>(),
                              m.as<float>(), v.as<float>(), g.p, gk, cp, kind, n, nullptr);
    } else {
      rc = kernels::SgdCuda(kernels::MakeSgdCoeffs(1e-4, 0.9, 0.0, 0.0, false, t == 1, 1.0), p.as<float>(),
                            m.as<float>(), g.p, gk, cp, kind, n, nullptr);
    }
    return rc;
  };
  volatile float zero_storage = 0.0f;
  const float zero = zero_storage;
  const auto stream = [&] {
    return StreamLikeOptimizer(p.as<float>(), m.as<float>(), c.adamw ? v.as<float>() : nullptr, g.p, c.bf16_grad,
                               c.bf16_param ? copy.as<uint16_t>() : nullptr, n, zero, nullptr);
  };
  if (Fail(state, CudaErrorText(kernel(), "optimizer kernel")) || Fail(state, CudaErrorText(stream(), "stream"))) return;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> tk, ts, ratio;
  int it = 0;
  for (auto _ : state) {
    double a = 0, b = 0;
    if (it++ % 2 == 0) {  // alternate which goes first, so that neither always follows the other's tail
      a = EventSeconds(e0, e1, kernel);
      b = EventSeconds(e0, e1, stream);
    } else {
      b = EventSeconds(e0, e1, stream);
      a = EventSeconds(e0, e1, kernel);
    }
    state.SetIterationTime(a);
    tk.push_back(a);
    ts.push_back(b);
    ratio.push_back(b / a);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  if (Fail(state, CudaErrorText(static_cast<int>(cudaGetLastError()), "after the optimizer runs"))) return;
  const double bytes = static_cast<double>(n) * ((c.adamw ? 24.0 : 16.0) + (c.bf16_grad ? 2 : 4) + (c.bf16_param ? 2 : 0));
  state.counters["kernel_s"] = Median(tk);
  state.counters["stream_s"] = Median(ts);
  state.counters["GBps"] = bytes / Median(tk) * 1e-9;
  state.counters["stream_GBps"] = bytes / Median(ts) * 1e-9;
  state.counters["ratio"] = Median(ratio);
  state.counters["bytes"] = bytes;
}

// ---------------------------------------------------------------------------------------------------- norm

struct NormCase {
  const char* name;  // step | lora
  bool bf16;
  std::vector<int64_t> sizes;  // one range per trainable bucket shard
};

void BM_Norm(benchmark::State& state, NormCase c) {
  std::unique_ptr<Device> device;
  if (Status s = NewCudaDevice(0, nullptr, &device); !s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  const DType dt = c.bf16 ? DType::kBF16 : DType::kF32;
  const int64_t elem = c.bf16 ? 2 : 4;
  int64_t total = 0;
  for (int64_t n : c.sizes) total += (n + 63) / 64 * 64;  // bucket shards start 64-element aligned
  DeviceMem grads(total * elem);
  DeviceMem sum(16);
  if (grads.p == nullptr || sum.p == nullptr) {
    state.SkipWithError("cudaMalloc failed");
    return;
  }
  FillPattern(grads.p, c.bf16, total, 9, 1e-2f, nullptr);
  std::vector<kernels::SumSquaresRange> ranges;
  int64_t at = 0;
  for (int64_t n : c.sizes) {
    ranges.push_back({grads.as<char>() + at * elem, n});
    at += (n + 63) / 64 * 64;
  }
  const int64_t scratch_bytes = device->SumSquaresScratchBytes(c.sizes);
  DeviceBuffer scratch;
  if (Status s = device->Allocate(scratch_bytes, MemoryCategory::kBuffers, MemoryKind::kDevice, "norm scratch",
                                  &scratch);
      !s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  std::vector<kernels::SumSquares> out;
  const auto norm = [&] { return device->SumSquares(ranges, dt, scratch.data(), scratch_bytes, &out); };
  const auto per_bucket = [&] {
    for (const kernels::SumSquaresRange& r : ranges) {
      Status s = device->SumSquares(std::span(&r, 1), dt, scratch.data(), scratch_bytes, &out);
      if (!s.ok()) return s;
    }
    return Status::Ok();
  };
  float host_sum = 0.0f;
  const auto stream = [&] {
    cudaMemsetAsync(sum.p, 0, 4, nullptr);
    StreamSumSquares(grads.p, c.bf16, total, sum.as<float>(), nullptr);
    cudaMemcpy(&host_sum, sum.p, 4, cudaMemcpyDeviceToHost);  // the one wait
  };
  if (Status s = norm(); !s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  // Bitwise against the CPU twin over the same bytes.
  std::vector<char> host(static_cast<size_t>(total * elem));
  cudaMemcpy(host.data(), grads.p, host.size(), cudaMemcpyDeviceToHost);
  std::vector<kernels::SumSquaresRange> host_ranges = ranges;
  for (kernels::SumSquaresRange& r : host_ranges) {
    r.x = host.data() + (static_cast<const char*>(r.x) - grads.as<char>());
  }
  std::vector<kernels::SumSquares> want(ranges.size());
  kernels::SumSquaresCpu(host_ranges.data(), static_cast<int64_t>(ranges.size()), dt, 16, want.data());
  bool bitwise = out.size() == want.size();
  for (size_t r = 0; bitwise && r < want.size(); ++r) {
    bitwise = std::bit_cast<uint64_t>(out[r].sum) == std::bit_cast<uint64_t>(want[r].sum) &&
              out[r].nonfinite == want[r].nonfinite;
  }
  stream();
  std::vector<double> tn, ts, tb, ratio;
  for (auto _ : state) {
    const double a = Seconds([&] { (void)norm(); });
    const double b = Seconds(stream);
    const double d = Seconds([&] { (void)per_bucket(); });
    state.SetIterationTime(a);
    tn.push_back(a);
    ts.push_back(b);
    tb.push_back(d);
    ratio.push_back(a / b);
  }
  if (Fail(state, CudaErrorText(static_cast<int>(cudaGetLastError()), "after the norm runs"))) return;
  state.counters["norm_s"] = Median(tn);
  state.counters["stream_s"] = Median(ts);
  state.counters["per_bucket_s"] = Median(tb);
  state.counters["ratio"] = Median(ratio);
  state.counters["syncs_per_step"] = 1;
  state.counters["bitwise_cpu"] = bitwise ? 1 : 0;
  state.counters["buckets"] = static_cast<double>(c.sizes.size());
  state.counters["elements"] = static_cast<double>(total);
  state.counters["GBps"] = static_cast<double>(total * elem) / Median(tn) * 1e-9;
  state.counters["stream_GBps"] = static_cast<double>(total * elem) / Median(ts) * 1e-9;
  if (!bitwise) state.SetLabel("NOT bitwise equal to the CPU twin");
}

// ---------------------------------------------------------------------------------------------------- copies

enum class Dir { kD2H, kH2D, kDuplex };

struct CopyCase {
  Dir dir;
  int64_t bytes;
};

void BM_OffloadCopy(benchmark::State& state, CopyCase c) {
  std::unique_ptr<Device> device;
  if (Status s = NewCudaDevice(0, nullptr, &device); !s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  constexpr int64_t kChunk = int64_t{64} << 20;  // a 2^25-element bf16 bucket shard, the engine's default
  const int64_t bytes = c.bytes;
  DeviceMem dev(bytes), dev2(bytes);
  DeviceBuffer zero_host, zero_host2;
  if (dev.p == nullptr || dev2.p == nullptr) {
    state.SkipWithError("cudaMalloc failed");
    return;
  }
  for (DeviceBuffer* b : {&zero_host, &zero_host2}) {
    if (Status s = device->Allocate(bytes, MemoryCategory::kOptimizer, MemoryKind::kPinnedHost, "offload bench", b);
        !s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
  }
  cudaPointerAttributes attr{};
  const bool pinned = cudaPointerGetAttributes(&attr, zero_host.data()) == cudaSuccess &&
                      attr.type == cudaMemoryTypeHost;
  cudaGetLastError();
  void* cuda_host = nullptr;
  if (cudaHostAlloc(&cuda_host, static_cast<size_t>(bytes), cudaHostAllocPortable) != cudaSuccess) cuda_host = nullptr;
  std::vector<char> pageable(static_cast<size_t>(bytes), 1);
  std::unique_ptr<Stream> zs_down, zs_up;
  if (!device->NewStream("bench copy down", false, &zs_down).ok() || !device->NewStream("bench copy up", false, &zs_up).ok()) {
    state.SkipWithError("NewStream failed");
    return;
  }
  cudaStream_t rs_down, rs_up;
  cudaStreamCreateWithFlags(&rs_down, cudaStreamNonBlocking);
  cudaStreamCreateWithFlags(&rs_up, cudaStreamNonBlocking);
  Device* d = device.get();
  // zero: per chunk, Device::Copy through a zero Stream (the engine's copy path).
  const auto zero_copy = [&](Stream* s, void* dst, const void* src) {
    for (int64_t off = 0; off < bytes; off += kChunk) {
      const int64_t len = std::min(kChunk, bytes - off);
      char* to = static_cast<char*>(dst) + off;
      const char* from = static_cast<const char*>(src) + off;
      s->Launch([d, to, from, len](void* native) { return d->Copy(to, from, len, native); });
    }
  };
  const auto zero_run = [&] {
    if (c.dir != Dir::kH2D) zero_copy(zs_down.get(), zero_host.data(), dev.p);
    if (c.dir != Dir::kD2H) zero_copy(zs_up.get(), dev2.p, zero_host2.data());
    (void)zs_down->Synchronize(std::chrono::minutes(5));
    (void)zs_up->Synchronize(std::chrono::minutes(5));
  };
  // raw: one cudaMemcpyAsync per direction, between the same buffers (or `host` for the references).
  const auto raw_run = [&](void* host, void* host2) {
    if (c.dir != Dir::kH2D) cudaMemcpyAsync(host, dev.p, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, rs_down);
    if (c.dir != Dir::kD2H) cudaMemcpyAsync(dev2.p, host2, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, rs_up);
    cudaStreamSynchronize(rs_down);
    cudaStreamSynchronize(rs_up);
  };
  zero_run();
  raw_run(zero_host.data(), zero_host2.data());
  std::vector<double> tz, tr, th, tp, ratio;
  int it = 0;
  for (auto _ : state) {
    double a = 0, b = 0;
    if (it++ % 2 == 0) {
      a = Seconds(zero_run);
      b = Seconds([&] { raw_run(zero_host.data(), zero_host2.data()); });
    } else {
      b = Seconds([&] { raw_run(zero_host.data(), zero_host2.data()); });
      a = Seconds(zero_run);
    }
    state.SetIterationTime(a);
    tz.push_back(a);
    tr.push_back(b);
    ratio.push_back(b / a);
    if (cuda_host != nullptr) th.push_back(Seconds([&] { raw_run(cuda_host, cuda_host); }));
    if (it <= 2) tp.push_back(Seconds([&] { raw_run(pageable.data(), pageable.data()); }));  // slow: twice is enough
  }
  const double moved = static_cast<double>(bytes) * (c.dir == Dir::kDuplex ? 2 : 1);
  state.counters["zero_GBps"] = moved / Median(tz) * 1e-9;
  state.counters["raw_GBps"] = moved / Median(tr) * 1e-9;
  state.counters["ratio"] = Median(ratio);
  if (!th.empty()) state.counters["cudahostalloc_GBps"] = moved / Median(th) * 1e-9;
  if (!tp.empty()) state.counters["pageable_GBps"] = moved / Median(tp) * 1e-9;
  state.counters["pinned"] = pinned ? 1 : 0;
  state.counters["bytes"] = moved;
  state.SetLabel(pinned ? "pinned (huge pages + cudaHostRegister)" : "pageable fallback (cudaHostRegister refused)");
  cudaStreamDestroy(rs_down);
  cudaStreamDestroy(rs_up);
  if (cuda_host != nullptr) cudaFreeHost(cuda_host);
  Fail(state, CudaErrorText(static_cast<int>(cudaGetLastError()), "after the copies"));
}

}  // namespace

void RegisterKernelRows() {
  const bool quick = Config().quick;
  // Optimizer: 2^26 elements (1.5-2 GB per AdamW call, well past the 60 MB L2) in both modes; quick: fewer calls.
  for (const bool adamw : {true, false}) {
    for (const bool bf16_param : {false, true}) {
      for (const bool bf16_grad : {false, true}) {
        const OptimizerCase c{adamw, bf16_param, bf16_grad, 26};
        const std::string name = std::string("Optimizer/opt:") + (adamw ? "adamw" : "sgd") +
                                 "/param:" + (bf16_param ? "bf16" : "f32") + "/grad:" + (bf16_grad ? "bf16" : "f32") +
                                 "/n:2^" + std::to_string(c.log2n);
        benchmark::RegisterBenchmark(name.c_str(), BM_Optimizer, c)
            ->UseManualTime()
            ->Iterations(quick ? 10 : 50)
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  // Norm: a 1B-parameter step (quick: 2^28) in the default 2^25-element buckets at one rank, and the LoRA
  // example's adapters at SmolLM2's shape (r = 8 on q, k, v, o: one bucket per block).
  const int64_t step_elems = int64_t{1} << (quick ? 28 : 30);
  std::vector<int64_t> step_sizes(static_cast<size_t>(step_elems >> 25), int64_t{1} << 25);
  const int64_t lora_block = 8 * (576 + 576) + 8 * (576 + 192) * 2 + 8 * (576 + 576);
  std::vector<int64_t> lora_sizes(30, (lora_block + 63) / 64 * 64);
  for (const bool bf16 : {false, true}) {
    for (const auto& [name, sizes] : {std::pair<const char*, std::vector<int64_t>>{"step", step_sizes},
                                      std::pair<const char*, std::vector<int64_t>>{"lora", lora_sizes}}) {
      const NormCase c{name, bf16, sizes};
      const std::string n = std::string("Norm/grad:") + (bf16 ? "bf16" : "f32") + "/case:" + name;
      benchmark::RegisterBenchmark(n.c_str(), BM_Norm, c)->UseManualTime()->Iterations(quick ? 10 : 40)->Unit(
          benchmark::kMillisecond);
    }
  }
  // Offload copies: 1 GiB (quick) or 4 GiB each way.
  const int64_t copy_bytes = int64_t{quick ? 1 : 4} << 30;
  for (const auto& [dir, name] : {std::pair{Dir::kD2H, "d2h"}, std::pair{Dir::kH2D, "h2d"}, std::pair{Dir::kDuplex, "duplex"}}) {
    const std::string n = std::string("OffloadCopy/dir:") + name + "/bytes:" + std::to_string(copy_bytes);
    benchmark::RegisterBenchmark(n.c_str(), BM_OffloadCopy, CopyCase{dir, copy_bytes})
        ->UseManualTime()
        ->Iterations(quick ? 4 : 10)
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace zero::bench::gpu

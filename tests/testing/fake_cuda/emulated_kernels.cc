// The CUDA kernel launchers of kernels/cuda_kernels.h and kernels/quantize.h for the ZERO_CUDA_EMULATION build
// (no GPU, no nvcc): each checks what a launch of the real one would meet (its stream handle; every operand inside
// one device allocation, as the kernel would read or write it), runs the CPU instantiation of the same math
// (kernels/cpu_kernels.h, cpu_adamw.h, quantize.h: bitwise equal to the CUDA one by construction and by
// kernels_test/quantize_test) on the device pointers while device memory is accessible (fake_cuda::DeviceAccess),
// and returns what the real launcher returns: cudaGetLastError() after the launch, so that an earlier call's
// uncleared error is reported by the next launch here too (src/cuda_errors.h is about exactly that).
//
// What this configuration tests is the plumbing around the kernels: the host code of src/cuda_device.cc and of
// the engine choosing pointers, sizes, dtypes, streams and scratch, the copies and the error paths. The kernels'
// own sources (kernels/*.cu, their grid-stride loops, shared-memory reductions, block layouts) are not compiled
// here; they are exercised separately, run on the CPU by the kernel-launch emulator (testing/cuda_emulation.h),
// and on a GPU by scripts/gpu/.
//
// An operand outside device memory, or on another device than the stream's, is what a GPU reports as an illegal
// address (asynchronously, sticky, at the next synchronization); here it is this launch's error
// (cudaErrorIllegalAddress) with a line on stderr naming the kernel and the operand, and nothing is written. The
// operands are checked at the launch; the body runs on the stream (at once, or when the stream gets there in the fake
// runtime's deferred mode).
#include <cstdio>
#include <initializer_list>
#include <vector>

#include "cuda_runtime.h"  // the stand-in (testing/fake_cuda): this file is built only against it
#include "kernels/cpu_adamw.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"
#include "kernels/quantize.h"
#include "zero/types.h"

namespace zero::kernels {
namespace {

struct Operand {
  const char* name;
  const void* p;
  int64_t bytes;
};

// Launches `body` on `stream` as the emulation of kernel `kernel`: see the file comment.
template <typename Body>
int Launch(const char* kernel, void* stream, std::initializer_list<Operand> operands, Body body) {
  if (!fake_cuda::IsValidStream(static_cast<cudaStream_t>(stream))) {
    std::fprintf(stderr, "emulated CUDA kernel %s: launched on stream %p, which is not a live stream\n", kernel,
                 stream);
    fake_cuda::SetLastError(cudaErrorInvalidResourceHandle);
    return static_cast<int>(cudaGetLastError());
  }
  const int device = fake_cuda::StreamDevice(static_cast<cudaStream_t>(stream));
  for (const Operand& o : operands) {
    if (o.bytes > 0 && !fake_cuda::IsDevice(o.p, static_cast<size_t>(o.bytes))) {
      std::fprintf(stderr,
                   "emulated CUDA kernel %s: operand %s [%p, +%lld bytes) is not inside one device allocation\n",
                   kernel, o.name, o.p, static_cast<long long>(o.bytes));
      fake_cuda::SetLastError(cudaErrorIllegalAddress);
      return static_cast<int>(cudaGetLastError());
    }
    // Without peer access (zero enables none) a kernel reads only its own device's memory.
    if (o.bytes > 0 && fake_cuda::DeviceOf(o.p) != device) {
      std::fprintf(stderr, "emulated CUDA kernel %s: operand %s is memory of device %d, the stream's device is %d\n",
                   kernel, o.name, fake_cuda::DeviceOf(o.p), device);
      fake_cuda::SetLastError(cudaErrorIllegalAddress);
      return static_cast<int>(cudaGetLastError());
    }
  }
  // On the stream: now, or when the stream gets there in the fake runtime's deferred mode. `body` holds copies
  // of the arguments, as a kernel launch does.
  (void)fake_cuda::Enqueue(static_cast<cudaStream_t>(stream), [kernel, body] {
    if (!body()) {  // an argument the launcher should have refused: an asynchronous error, like a kernel fault
      std::fprintf(stderr, "emulated CUDA kernel %s: the CPU instantiation refused its arguments\n", kernel);
      fake_cuda::SetLastError(cudaErrorInvalidValue);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

DType DTypeOf(GradKind gk) {
  return gk == GradKind::kBf16 ? DType::kBF16 : gk == GradKind::kF16 ? DType::kF16 : DType::kF32;
}
int64_t BytesOf(GradKind gk) { return gk == GradKind::kF32 ? 4 : 2; }
DType DTypeOf(CopyKind kind) { return kind == CopyKind::kF16 ? DType::kF16 : DType::kBF16; }
int64_t CopyBytes(CopyKind kind) { return kind == CopyKind::kNone ? 0 : 2; }
int64_t BytesOf(QuantElem kind) { return kind == QuantElem::kF32 ? 4 : 2; }

}  // namespace

int AdamWCuda(const AdamWCoeffs& c, float* p, float* m, float* v, const void* g, GradKind gk, void* copy, CopyKind kind,
              int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("AdamW", stream,
                {{"p", p, 4 * n},
                 {"m", m, 4 * n},
                 {"v", v, 4 * n},
                 {"g", g, BytesOf(gk) * n},
                 {"copy", copy, CopyBytes(kind) * n}},
                [=] {
                  return AdamWStepCpu(c, p, m, v, g, DTypeOf(gk), kind == CopyKind::kNone ? nullptr : copy,
                                      DTypeOf(kind), n, 1);
                });
}

int SgdCuda(const SgdCoeffs& c, float* p, float* buf, const void* g, GradKind gk, void* copy, CopyKind kind, int64_t n,
            void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("SGD", stream,
                {{"p", p, 4 * n}, {"buf", buf, 4 * n}, {"g", g, BytesOf(gk) * n}, {"copy", copy, CopyBytes(kind) * n}},
                [=] {
                  if (!SgdCpu(c, p, buf, g, DTypeOf(gk), n, 1)) return false;
                  return kind == CopyKind::kNone || CastCpu(p, DType::kF32, copy, DTypeOf(kind), n, 1);
                });
}

int AccumulateCuda(void* acc, const void* x, GradKind gk, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("accumulate", stream, {{"acc", acc, BytesOf(gk) * n}, {"x", x, BytesOf(gk) * n}},
                [=] { return AccumulateCpu(acc, x, DTypeOf(gk), n, 1); });
}

int ScaleCuda(float* x, float s, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("scale", stream, {{"x", x, 4 * n}}, [=] {
    ScaleCpu(x, s, n, 1);
    return true;
  });
}

namespace {
int Cast(const char* kernel, const void* src, DType from, void* dst, DType to, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch(
      kernel, stream,
      {{"src", src, static_cast<int64_t>(DTypeSize(from)) * n}, {"dst", dst, static_cast<int64_t>(DTypeSize(to)) * n}},
      [=] { return CastCpu(src, from, dst, to, n, 1); });
}
}  // namespace

int CastF32ToBf16Cuda(const float* src, Bf16Bits* dst, int64_t n, void* stream) {
  return Cast("cast f32 to bf16", src, DType::kF32, dst, DType::kBF16, n, stream);
}
int CastF32ToF16Cuda(const float* src, F16Bits* dst, int64_t n, void* stream) {
  return Cast("cast f32 to f16", src, DType::kF32, dst, DType::kF16, n, stream);
}
int CastBf16ToF32Cuda(const Bf16Bits* src, float* dst, int64_t n, void* stream) {
  return Cast("cast bf16 to f32", src, DType::kBF16, dst, DType::kF32, n, stream);
}
int CastF16ToF32Cuda(const F16Bits* src, float* dst, int64_t n, void* stream) {
  return Cast("cast f16 to f32", src, DType::kF16, dst, DType::kF32, n, stream);
}

// The real launcher's plumbing step by step (kernels/reduce.cu): the task table copied into the head of `scratch`
// on the stream, the kernels reading it there and writing the totals at the scratch's tail, the totals copied to
// host_totals on the stream. The scratch must hold SumSquaresScratchBytes (checked as an operand).
int SumSquaresCuda(const SumSquaresRange* ranges, int64_t count, GradKind gk, void* scratch, SumSquares* host_totals,
                   void* stream) {
  if (count <= 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  std::vector<SumSquaresTask> table(static_cast<size_t>(count));
  std::vector<int64_t> sizes(static_cast<size_t>(count));
  const int64_t blocks = BuildSumSquaresTasks(ranges, count, table.data());
  for (int64_t r = 0; r < count; ++r) sizes[static_cast<size_t>(r)] = ranges[r].n;
  auto* tasks = static_cast<SumSquaresTask*>(scratch);
  auto* partials = reinterpret_cast<SumSquares*>(tasks + count);
  SumSquares* totals = partials + blocks;
  cudaError_t rc =
      cudaMemcpyAsync(tasks, table.data(), table.size() * sizeof(SumSquaresTask), cudaMemcpyHostToDevice, s);
  if (rc != cudaSuccess) return static_cast<int>(rc);
  for (int64_t r = 0; r < count; ++r) {  // each range's elements, as the block pass reads them
    const int launched = Launch("sum of squares (range operands)", stream,
                                {{"ranges[r].x", ranges[r].x, BytesOf(gk) * ranges[r].n}}, [] { return true; });
    if (launched != cudaSuccess) return launched;
  }
  const int launched =
      Launch("sum of squares", stream, {{"scratch", scratch, SumSquaresScratchBytes(sizes.data(), count)}}, [=] {
        for (int64_t r = 0; r < count; ++r) totals[r] = SumSquaresCpu(tasks[r].x, DTypeOf(gk), tasks[r].n, 1);
        return true;
      });
  if (launched != cudaSuccess) return launched;
  return static_cast<int>(
      cudaMemcpyAsync(host_totals, totals, static_cast<size_t>(count) * sizeof(SumSquares), cudaMemcpyDeviceToHost, s));
}

int QuantizeCuda(const void* src, QuantElem kind, int64_t n, int bits, void* payload, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("quantize", stream, {{"src", src, BytesOf(kind) * n}, {"payload", payload, QuantPayloadBytes(n, bits)}},
                [=] {
                  QuantizeCpu(src, kind, n, bits, payload, 1);
                  return true;
                });
}

int DequantizeCuda(const void* payload, int64_t n, int bits, void* dst, QuantElem kind, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("dequantize", stream,
                {{"payload", payload, QuantPayloadBytes(n, bits)}, {"dst", dst, BytesOf(kind) * n}}, [=] {
                  DequantizeCpu(payload, n, bits, dst, kind, 1);
                  return true;
                });
}

int DequantizeAddCuda(const void* payload, int64_t n, int bits, float* acc, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("dequantize-add", stream, {{"payload", payload, QuantPayloadBytes(n, bits)}, {"acc", acc, 4 * n}}, [=] {
    DequantizeAddCpu(payload, n, bits, acc, 1);
    return true;
  });
}

int WidenAddCuda(const void* src, QuantElem kind, int64_t n, float* acc, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("widen-add", stream, {{"src", src, BytesOf(kind) * n}, {"acc", acc, 4 * n}}, [=] {
    WidenAddCpu(src, kind, n, acc, 1);
    return true;
  });
}

int ConvertCuda(const void* src, QuantElem src_kind, void* dst, QuantElem dst_kind, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return Launch("convert", stream, {{"src", src, BytesOf(src_kind) * n}, {"dst", dst, BytesOf(dst_kind) * n}}, [=] {
    ConvertCpu(src, src_kind, dst, dst_kind, n, 1);
    return true;
  });
}

}  // namespace zero::kernels

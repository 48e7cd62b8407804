// CudaDevice: the Device interface over the CUDA runtime (never the driver library, so binaries load and report
// Unavailable on machines without a driver). Streams are non-blocking (no implicit ordering with the legacy
// default stream, which is the compute stream the trainer launches on unless it passes its own in
// Options::cuda_stream); events are created with cudaEventDisableTiming. Nothing here synchronizes the whole device.
//
// Because the engine's streams do not wait for the legacy stream, the calls documented as synchronous are made
// complete before they return, not merely issued: CopyToDevice waits for its copy (a cudaMemcpy from pageable
// memory returns once the data is staged, before the DMA lands), allocation zero-fills on a stream of its own and
// waits, and Zero of host memory (offloaded optimizer state) is a CPU memset after the stream's earlier work.
// Every failed call is reported through a Status and cleared from the runtime's last error (cuda_errors.h); so are
// the failures of the destroying calls nobody can report (event, stream, free), which would otherwise be what the
// next kernel launch's check (kernels/*.cu: cudaGetLastError) returns as its own.
//
// Compiled with warnings as errors; the GPU half (tests/cuda_device_test.cc, the *cuda* engine suites) runs
// through scripts/gpu/.
#include "device.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include "cuda_errors.h"
#include "host_memory.h"
#include "kernels/cuda_kernels.h"
#endif

namespace zero {

#if defined(ZERO_WITH_CUDA)
namespace {

using internal::Queried;
using internal::Reported;

Status CudaError(const std::string& what, cudaError_t rc) {
  (void)Reported(rc);
  return Status::Internal(what + " failed: " + cudaGetErrorString(rc));
}

class CudaEvent final : public Event {
 public:
  explicit CudaEvent(cudaEvent_t e) : event(e) {}
  ~CudaEvent() override { (void)Reported(cudaEventDestroy(event)); }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  // An error is not completion: the work did not run as recorded. Synchronize reports the error.
  bool Query() const override {
    const cudaError_t rc = Queried(cudaEventQuery(event));
    if (rc != cudaSuccess && rc != cudaErrorNotReady) (void)Reported(rc);
    return rc == cudaSuccess;
  }
  // Polls (never cudaEventSynchronize, which cannot time out).
  Status Synchronize(std::chrono::milliseconds timeout, const std::string& what) const override {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const cudaError_t rc = Queried(cudaEventQuery(event));
      if (rc == cudaSuccess) return Status::Ok();
      if (rc != cudaErrorNotReady) return CudaError(what, rc);
      if (std::chrono::steady_clock::now() >= deadline) {
        return Status::Timeout(what + " did not complete within " + std::to_string(timeout.count()) + " ms");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  cudaEvent_t event;
};

class CudaStream final : public Stream {
 public:
  CudaStream(cudaStream_t stream, const char* name) : stream_(stream), name_(name) {}
  ~CudaStream() override {
    (void)Synchronize(std::chrono::milliseconds(300'000));
    (void)Reported(cudaStreamDestroy(stream_));
  }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  void Launch(StreamTask task) override {
    if (!status_.ok()) return;
    Status s = task(stream_);
    if (!s.ok()) status_ = s;
  }
  void Record(Event* event) override {
    const cudaError_t rc = cudaEventRecord(static_cast<CudaEvent*>(event)->event, stream_);
    if (rc != cudaSuccess && status_.ok()) status_ = CudaError(std::string("cudaEventRecord on ") + name_, rc);
  }
  void Wait(const Event& event) override {
    const cudaError_t rc = cudaStreamWaitEvent(stream_, static_cast<const CudaEvent&>(event).event, 0);
    if (rc != cudaSuccess && status_.ok()) status_ = CudaError(std::string("cudaStreamWaitEvent on ") + name_, rc);
  }
  Status Synchronize(std::chrono::milliseconds timeout) override {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const cudaError_t rc = Queried(cudaStreamQuery(stream_));
      if (rc == cudaSuccess) return status_;
      if (rc != cudaErrorNotReady) {
        if (status_.ok()) status_ = CudaError(std::string("work on ") + name_, rc);
        return status_;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        return Status::Timeout(std::string(name_) + " did not drain within " + std::to_string(timeout.count()) +
                               " ms");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  Status status() const override { return status_; }

 private:
  cudaStream_t stream_;
  const char* name_;
  Status status_;
};

class CudaDevice final : public Device {
 public:
  // `fill_stream`: a non-blocking stream of this device for the zero-fill of new allocations (owned).
  // `compute`: the trainer's stream (not owned; nullptr: the legacy default stream).
  CudaDevice(int ordinal, cudaStream_t fill_stream, cudaStream_t compute)
      : ordinal_(ordinal), fill_stream_(fill_stream), compute_(compute) {}
  ~CudaDevice() override {
    cudaStreamDestroy(fill_stream_);
    (void)cudaGetLastError();
  }
  Backend backend() const override { return Backend::kCuda; }
  // What cudaMalloc can still give (other processes and contexts share the GPU), within the capacity.
  int64_t FreeBytes() const override {
    size_t free_bytes = 0, total_bytes = 0;
    if (Reported(cudaSetDevice(ordinal_)) != cudaSuccess ||
        Reported(cudaMemGetInfo(&free_bytes, &total_bytes)) != cudaSuccess) {
      return 0;
    }
    return std::min(Device::FreeBytes(), static_cast<int64_t>(free_bytes));
  }

  Status NewStream(const char* name, bool high_priority, std::unique_ptr<Stream>* out) override {
    int least = 0, greatest = 0;
    cudaError_t rc = cudaSetDevice(ordinal_);
    if (rc == cudaSuccess) rc = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    cudaStream_t stream = nullptr;
    if (rc == cudaSuccess) {
      rc = cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, high_priority ? greatest : least);
    }
    if (rc != cudaSuccess) return CudaError(std::string("creating stream ") + name, rc);
    *out = std::make_unique<CudaStream>(stream, name);
    return Status::Ok();
  }
  // On this device (an event recorded on another device's stream fails): the caller's current device may be
  // another one by now, NewStream and RawAllocate set it for the same reason.
  Status NewEvent(std::unique_ptr<Event>* out) override {
    cudaEvent_t e = nullptr;
    cudaError_t rc = cudaSetDevice(ordinal_);
    if (rc == cudaSuccess) rc = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    if (rc != cudaSuccess) return CudaError("cudaEventCreateWithFlags", rc);
    *out = std::make_unique<CudaEvent>(e);
    return Status::Ok();
  }
  // The compute stream is the trainer's (Options::cuda_stream; by default the legacy default stream). RecordCompute
  // cannot return a status: a failed record is kept and returned by the next WaitCompute (an event whose record
  // failed orders nothing).
  void RecordCompute(Event* event) override {
    const cudaError_t rc = cudaEventRecord(static_cast<CudaEvent*>(event)->event, compute_);
    if (rc != cudaSuccess) {
      (void)Reported(rc);
      int expected = cudaSuccess;
      record_error_.compare_exchange_strong(expected, static_cast<int>(rc));
    }
  }
  Status WaitCompute(const Event& event, std::chrono::milliseconds, const std::string& what) override {
    if (const int failed = record_error_.exchange(cudaSuccess); failed != cudaSuccess) {
      return CudaError("recording an event on the compute stream (before waiting for " + what + ")",
                       static_cast<cudaError_t>(failed));
    }
    const cudaError_t rc = cudaStreamWaitEvent(compute_, static_cast<const CudaEvent&>(event).event, 0);
    return rc == cudaSuccess ? Status::Ok() : CudaError("waiting for " + what, rc);
  }

  // Device memory: a memset on `stream`. Host memory (offloaded optimizer state, pinned or, where pinning was
  // refused, pageable): a GPU memset of host memory would run asynchronously to the CPU that reads and writes
  // these buffers next (a checkpoint's moments loaded right after InitParams zeroed them could be zeroed again
  // when the memset lands last), so the CPU zeroes them, after the work already on `stream`.
  Status Zero(void* p, int64_t bytes, void* stream) override {
    if (bytes <= 0) return Status::Ok();
    cudaPointerAttributes attr{};
    if (Reported(cudaPointerGetAttributes(&attr, p)) != cudaSuccess) attr.type = cudaMemoryTypeUnregistered;
    if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) {
      return Check("cudaMemsetAsync", cudaMemsetAsync(p, 0, static_cast<size_t>(bytes), Native(On(stream))));
    }
    ZERO_RETURN_IF_ERROR(Check("cudaStreamSynchronize before zeroing host memory",
                               cudaStreamSynchronize(Native(On(stream)))));
    std::memset(p, 0, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  Status Accumulate(void* acc, const void* x, DType dtype, int64_t n, void* stream) override {
    return Launched("accumulate", kernels::AccumulateCuda(acc, x, Grad(dtype), n, On(stream)));
  }
  Status AdamW(const kernels::AdamWCoeffs& c, float* p, float* m, float* v, const void* g, DType g_dtype, void* copy,
               DType copy_dtype, int64_t n, void* stream) override {
    return Launched("AdamW",
                    kernels::AdamWCuda(c, p, m, v, g, Grad(g_dtype), copy, Kind(copy, copy_dtype), n, On(stream)));
  }
  Status Sgd(const kernels::SgdCoeffs& c, float* p, float* buf, const void* g, DType g_dtype, void* copy,
             DType copy_dtype, int64_t n, void* stream) override {
    return Launched("SGD", kernels::SgdCuda(c, p, buf, g, Grad(g_dtype), copy, Kind(copy, copy_dtype), n, On(stream)));
  }
  // All ranges in one batch: one table upload, two kernels, one copy of the totals, one wait (kernels/reduce.cu).
  Status SumSquares(std::span<const kernels::SumSquaresRange> ranges, DType dtype, void* scratch, int64_t scratch_bytes,
                    std::vector<kernels::SumSquares>* out) override {
    out->assign(ranges.size(), kernels::SumSquares{});
    if (ranges.empty()) return Status::Ok();
    std::vector<int64_t> sizes(ranges.size());
    for (size_t r = 0; r < ranges.size(); ++r) sizes[r] = ranges[r].n;
    const int64_t need = SumSquaresScratchBytes(sizes);
    if (need > scratch_bytes) {
      return Status::Internal("sum of squares over " + std::to_string(ranges.size()) + " ranges needs " +
                              FormatBytes(need) + " of scratch, got " + FormatBytes(scratch_bytes) +
                              " (src/buffer_plan.cc sizes it with kernels::SumSquaresScratchBytes)");
    }
    ZERO_RETURN_IF_ERROR(
        Launched("sum of squares", kernels::SumSquaresCuda(ranges.data(), static_cast<int64_t>(ranges.size()),
                                                           Grad(dtype), scratch, out->data(), compute_)));
    return Check("cudaStreamSynchronize", cudaStreamSynchronize(compute_));  // the compute stream only, once
  }
  int64_t SumSquaresScratchBytes(std::span<const int64_t> sizes) const override {
    return kernels::SumSquaresScratchBytes(sizes.data(), static_cast<int64_t>(sizes.size()));
  }
  Status Copy(void* dst, const void* src, int64_t bytes, void* stream) override {
    if (bytes <= 0) return Status::Ok();
    return Check("cudaMemcpyAsync",
                 cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault, Native(On(stream))));
  }
  // cudaMemcpy from pageable memory returns once the data is staged, "but the DMA to final destination may not
  // have completed" (the runtime's API synchronization notes), and the engine's non-blocking streams do not wait
  // for the legacy stream it ran on: wait for it, so that a gather issued next reads the copied data.
  // Both copies come after the work on the compute stream (the legacy stream's own rule, which a trainer's
  // non-blocking stream does not follow: waited for here): the trainer's kernels may still read or write the
  // buffer.
  Status CopyToDevice(void* dst, const void* src, int64_t bytes) override {
    if (bytes <= 0) return Status::Ok();
    ZERO_RETURN_IF_ERROR(AfterCompute());
    ZERO_RETURN_IF_ERROR(
        Check("cudaMemcpy to the device", cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault)));
    return Check("cudaStreamSynchronize after a copy to the device", cudaStreamSynchronize(nullptr));
  }
  Status CopyToHost(void* dst, const void* src, int64_t bytes) override {
    if (bytes <= 0) return Status::Ok();
    ZERO_RETURN_IF_ERROR(AfterCompute());
    return Check("cudaMemcpy to the host", cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault));
  }
  bool host_addressable() const override { return false; }

 protected:
  // Zero-filled like CpuDevice: padding must be zero. The fill runs on a stream of its own and is waited for:
  // cudaMemset would run on the legacy stream, behind the trainer's queued kernels and unordered with the engine's
  // streams (GatherFull gathers into a fresh buffer at once), and the trainer's kernels are not ours to wait for.
  // Allocation is never on the step path. A failure returns null (Allocate reports OutOfMemory) and leaves no
  // error behind for the next launch check.
  void* RawAllocate(int64_t bytes, MemoryKind kind) override {
    if (Reported(cudaSetDevice(ordinal_)) != cudaSuccess) return nullptr;
    void* p = nullptr;
    const auto n = static_cast<size_t>(bytes);
    switch (kind) {
      case MemoryKind::kDevice:
        if (Reported(cudaMalloc(&p, n)) != cudaSuccess) return nullptr;
        if (Reported(cudaMemsetAsync(p, 0, n, fill_stream_)) != cudaSuccess ||
            Reported(cudaStreamSynchronize(fill_stream_)) != cudaSuccess) {
          cudaFree(p);
          (void)cudaGetLastError();
          return nullptr;
        }
        return p;
      case MemoryKind::kPinnedHost:
        return pinned_.Allocate(bytes);
      case MemoryKind::kPageableHost: {
        // 64-byte aligned like every Device allocation (device.h); calloc gives 16.
        const size_t rounded = (n + kHostAlign - 1) / kHostAlign * kHostAlign;
        p = std::aligned_alloc(kHostAlign, rounded);
        if (p != nullptr) std::memset(p, 0, rounded);
        return p;
      }
      case MemoryKind::kNvme:  // the tier's files are not memory (Device::Allocate refuses them)
        return nullptr;
    }
    return nullptr;
  }
  void RawFree(void* ptr, int64_t, MemoryKind kind) override {
    switch (kind) {
      case MemoryKind::kDevice: (void)Reported(cudaFree(ptr)); break;
      case MemoryKind::kPinnedHost: pinned_.Free(ptr); break;
      case MemoryKind::kPageableHost: std::free(ptr); break;
      case MemoryKind::kNvme: break;
    }
  }

 private:
  static constexpr size_t kHostAlign = 64;
  static cudaStream_t Native(void* stream) { return static_cast<cudaStream_t>(stream); }
  // A Device call's stream: a StreamTask's, or the compute stream for null (device.h).
  void* On(void* stream) const { return stream != nullptr ? stream : static_cast<void*>(compute_); }
  // The host waits for the trainer's stream when it is not the legacy one (whose work every synchronous copy
  // follows anyway).
  Status AfterCompute() const {
    if (compute_ == nullptr) return Status::Ok();
    return Check("cudaStreamSynchronize on the trainer's stream (Options::cuda_stream)", cudaStreamSynchronize(compute_));
  }
  // The engine validates dtypes at Open: gradients are kF32, kBF16 or kF16.
  static kernels::GradKind Grad(DType dtype) {
    return dtype == DType::kBF16 ? kernels::GradKind::kBf16
           : dtype == DType::kF16 ? kernels::GradKind::kF16
                                  : kernels::GradKind::kF32;
  }
  static kernels::CopyKind Kind(const void* copy, DType dtype) {
    if (copy == nullptr) return kernels::CopyKind::kNone;
    return dtype == DType::kF16 ? kernels::CopyKind::kF16 : kernels::CopyKind::kBf16;
  }
  // CudaError clears the error it reports (cuda_errors.h).
  static Status Check(const char* what, cudaError_t rc) { return rc == cudaSuccess ? Status::Ok() : CudaError(what, rc); }
  static Status Launched(const char* what, int rc) {
    return Check((std::string("launching the ") + what + " kernel").c_str(), static_cast<cudaError_t>(rc));
  }

  int ordinal_;
  cudaStream_t fill_stream_;
  cudaStream_t compute_;
  std::atomic<int> record_error_{cudaSuccess};  // a failed RecordCompute, for the next WaitCompute
  // Huge pages for large buffers, first-touched by the allocating thread, then registered with CUDA; a refused
  // registration falls back to pageable memory with a warning (host_memory.h).
  PinnedHostAllocations pinned_{
      [](void* ptr, size_t len, std::string* error) {
        const cudaError_t rc = Reported(cudaHostRegister(ptr, len, cudaHostRegisterPortable));
        if (rc == cudaSuccess) return true;
        *error = std::string("cudaHostRegister: ") + cudaGetErrorString(rc);
        return false;
      },
      [](void* ptr, size_t) { (void)Reported(cudaHostUnregister(ptr)); }};
};

}  // namespace

Status NewCudaDevice(int ordinal, void* compute_stream, std::unique_ptr<Device>* device) {
  device->reset();
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later runtime calls are not poisoned by it
    return Status::Unavailable(std::string("no usable CUDA device: ") + cudaGetErrorString(rc) +
                               "; use Backend::kCpu on machines without a GPU");
  }
  if (ordinal < 0 || ordinal >= count) {
    return Status::InvalidArgument("CUDA device " + std::to_string(ordinal) + " does not exist; this machine has " +
                                   std::to_string(count));
  }
  // The runtime's special handles: cudaStreamLegacy is the legacy default stream by name (as null); the handle
  // cudaStreamPerThread names a different stream in every host thread, so the engine's calls from another thread
  // than the one whose stream the trainer meant (a data loader's, a second trainer thread's) would order nothing
  // with the trainer's kernels: refused, naming what to pass instead.
  if (compute_stream == static_cast<void*>(cudaStreamLegacy)) compute_stream = nullptr;
  if (compute_stream == static_cast<void*>(cudaStreamPerThread)) {
    return Status::InvalidArgument(
        "Options::cuda_stream is cudaStreamPerThread, which names another stream in every host thread; pass the "
        "cudaStream_t of a stream you created on CUDA device " +
        std::to_string(ordinal) + " (cudaStreamCreateWithFlags), or nullptr for the legacy default stream");
  }
  rc = cudaSetDevice(ordinal);
  size_t free_bytes = 0, total_bytes = 0;
  if (rc == cudaSuccess) rc = cudaMemGetInfo(&free_bytes, &total_bytes);
  cudaStream_t fill_stream = nullptr;
  if (rc == cudaSuccess) rc = cudaStreamCreateWithFlags(&fill_stream, cudaStreamNonBlocking);
  if (rc != cudaSuccess) {
    (void)Reported(rc);
    return Status::Unavailable("CUDA device " + std::to_string(ordinal) + " cannot be used: " + cudaGetErrorString(rc));
  }
  // The trainer's stream must be a stream of this device: an event of the device recorded on it says so
  // (cudaEventRecord fails for a stream of another device; a destroyed handle is undefined behaviour, which the
  // runtime may or may not report).
  if (compute_stream != nullptr) {
    cudaEvent_t probe = nullptr;
    rc = cudaEventCreateWithFlags(&probe, cudaEventDisableTiming);
    if (rc == cudaSuccess) rc = cudaEventRecord(probe, static_cast<cudaStream_t>(compute_stream));
    if (probe != nullptr) (void)cudaEventDestroy(probe);
    if (rc != cudaSuccess) {
      (void)Reported(rc);
      cudaStreamDestroy(fill_stream);
      std::ostringstream os;
      os << "Options::cuda_stream (" << compute_stream << ") is not a live stream of CUDA device " << ordinal
         << ", the device this rank's Comm uses (cudaEventRecord on it: " << cudaGetErrorString(rc)
         << "); create it with that device current (cudaSetDevice(comm->cuda_device())), keep it alive while the "
            "engine is, or pass nullptr for the legacy default stream";
      return Status::InvalidArgument(os.str());
    }
  }
  auto d = std::make_unique<CudaDevice>(ordinal, fill_stream, static_cast<cudaStream_t>(compute_stream));
  d->set_capacity(static_cast<int64_t>(total_bytes));
  *device = std::move(d);
  return Status::Ok();
}

#else

Status NewCudaDevice(int ordinal, void*, std::unique_ptr<Device>* device) {
  device->reset();
  return Status::Unavailable("CUDA device " + std::to_string(ordinal) +
                             ": this build of zero has no CUDA support (configured with ZERO_WITH_CUDA=OFF or no "
                             "CUDA toolkit); use Backend::kCpu");
}

#endif

}  // namespace zero

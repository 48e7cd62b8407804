// Device: where the engine's buffers live, with every byte tagged by category and counted.
//
// CpuDevice stands in for a GPU on machines without one: "device memory" is host memory with its own
// accounting and an optional capacity limit, so stage memory savings and out-of-memory behaviour are real and
// testable. A CUDA device implements the same interface.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "kernels/optimizer.cuh"
#include "kernels/sum_squares.cuh"
#include "zero/engine.h"
#include "zero/status.h"
#include "zero/types.h"

namespace zero {

class Device;

// Move-only owner of one allocation. Memory is zero-filled at allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  int64_t bytes() const { return bytes_; }
  MemoryCategory category() const { return category_; }
  MemoryKind kind() const { return kind_; }
  void Reset();

 private:
  friend class Device;
  Device* device_ = nullptr;
  void* data_ = nullptr;
  int64_t bytes_ = 0;
  MemoryCategory category_ = MemoryCategory::kBuffers;
  MemoryKind kind_ = MemoryKind::kDevice;
};

// An event: a point in a stream's work (cudaEvent_t created with cudaEventDisableTiming; a fence on the CPU).
// An event never recorded is complete.
class Event {
 public:
  virtual ~Event() = default;
  // True when the work before its most recent Record has run.
  virtual bool Query() const = 0;
  // Blocks the calling thread until Query() is true; Timeout naming `what` after `timeout`.
  virtual Status Synchronize(std::chrono::milliseconds timeout, const std::string& what) const = 0;
};

// Work for a stream. `native` is the backend's stream handle (a cudaStream_t on CUDA, null on the CPU). On the
// CPU the task runs on the stream's worker thread, in order; on CUDA it runs at Launch on the calling thread and
// only enqueues device work on `native` (kernels, NCCL calls). A non-OK status breaks the stream.
using StreamTask = std::function<Status(void* native)>;

// An in-order queue of work (cudaStream_t; a worker thread on the CPU). Launch, Record and Wait never block the
// calling thread on the CPU backend. One thread launches on a given stream.
class Stream {
 public:
  virtual ~Stream() = default;
  virtual void Launch(StreamTask task) = 0;
  // `event` fires when everything launched before this call has run (cudaEventRecord).
  virtual void Record(Event* event) = 0;
  // Work launched after this call runs after `event`'s most recent Record (cudaStreamWaitEvent).
  virtual void Wait(const Event& event) = 0;
  // Blocks until everything launched so far has run; returns status().
  virtual Status Synchronize(std::chrono::milliseconds timeout) = 0;
  // OK, or the first failed task's status. A broken stream skips every later task (CUDA's sticky errors).
  virtual Status status() const = 0;
};

class Device {
 public:
  virtual ~Device() = default;
  virtual Backend backend() const = 0;

  // A new stream; `high_priority` asks for the device's highest stream priority (stage-3 gathers).
  virtual Status NewStream(const char* name, bool high_priority, std::unique_ptr<Stream>* out) = 0;
  virtual Status NewEvent(std::unique_ptr<Event>* out) = 0;
  // The compute stream is the trainer's (its kernels between Acquire and Release). On the CPU backend it is the
  // calling thread itself: RecordCompute makes `event` complete (everything the thread did is already done)
  // and WaitCompute blocks the thread until `event` fires. On CUDA: cudaEventRecord / cudaStreamWaitEvent on
  // the compute stream, never blocking.
  virtual void RecordCompute(Event* event) = 0;
  virtual Status WaitCompute(const Event& event, std::chrono::milliseconds timeout, const std::string& what) = 0;

  // Device math (kernels/, written once). `stream` is a native stream handle from a StreamTask, or null for the
  // compute stream. The CPU backend runs each call now, on the calling thread, over set_threads() OpenMP
  // threads; CUDA enqueues a kernel and returns the launch status.
  virtual Status Zero(void* p, int64_t bytes, void* stream) = 0;
  // acc[i] += x[i] in `dtype` (kF32, kBF16, kF16; 16-bit: fp32 add, round to nearest even).
  virtual Status Accumulate(void* acc, const void* x, DType dtype, int64_t n, void* stream) = 0;
  // Optimizer steps on fp32 p (the master) and state, with a gradient of g_dtype (kF32, kBF16, kF16; widened
  // exactly); when `copy` is not null they also write p converted to copy_dtype (kBF16 or kF16, round to nearest
  // even) there, in the same pass.
  virtual Status AdamW(const kernels::AdamWCoeffs& c, float* p, float* m, float* v, const void* g, DType g_dtype,
                       void* copy, DType copy_dtype, int64_t n, void* stream) = 0;
  virtual Status Sgd(const kernels::SgdCoeffs& c, float* p, float* buf, const void* g, DType g_dtype, void* copy,
                     DType copy_dtype, int64_t n, void* stream) = 0;
  // Sums of squares and non-finite counts of several ranges of one dtype (kF32, kBF16, kF16), e.g. every trainable
  // bucket shard of a step, on the compute stream with one wait for all of them: (*out)[r] is bitwise what
  // kernels::SumSquaresCpu gives for ranges[r] (kernels/sum_squares.cuh's fixed order). `scratch` is device memory
  // of at least SumSquaresScratchBytes(the ranges' sizes) bytes, `scratch_bytes` its size (the CPU needs none);
  // too small a scratch is an Internal error, nothing is launched.
  virtual Status SumSquares(std::span<const kernels::SumSquaresRange> ranges, DType dtype, void* scratch,
                            int64_t scratch_bytes, std::vector<kernels::SumSquares>* out) = 0;
  // Scratch bytes SumSquares needs for ranges of these element counts (0 on the CPU).
  virtual int64_t SumSquaresScratchBytes(std::span<const int64_t> sizes) const = 0;
  // The same for one range of n elements.
  int64_t SumSquaresScratchBytes(int64_t n) const { return SumSquaresScratchBytes(std::span<const int64_t>(&n, 1)); }
  // Asynchronous copy of `bytes` between any two of this device's or host memory on `stream` (CPU: now).
  virtual Status Copy(void* dst, const void* src, int64_t bytes, void* stream) = 0;
  // Synchronous copies between host memory and this device's memory (Open, InitParams: not the step path).
  virtual Status CopyToDevice(void* dst, const void* host_src, int64_t bytes) = 0;
  virtual Status CopyToHost(void* host_dst, const void* src, int64_t bytes) = 0;
  // True when device memory is host-addressable (the CPU backend).
  virtual bool host_addressable() const = 0;
  void set_threads(int threads) { threads_ = threads; }
  int threads() const { return threads_; }

  // Allocates `bytes` (zero-filled, 64-byte aligned) of `kind`, counted under `category`. Fails with
  // OutOfMemory naming `what`, the capacity and the per-category use when a device capacity would be exceeded.
  Status Allocate(int64_t bytes, MemoryCategory category, MemoryKind kind, const std::string& what,
                  DeviceBuffer* out);

  // 0 = unlimited.
  void set_capacity(int64_t bytes) { capacity_ = bytes; }
  int64_t capacity() const { return capacity_; }
  // Device bytes that can still be allocated: the capacity minus what is allocated (INT64_MAX when unlimited);
  // on CUDA at most cudaMemGetInfo's free memory (other processes and contexts use the GPU too).
  virtual int64_t FreeBytes() const;
  MemoryReport report() const;

 protected:
  virtual void* RawAllocate(int64_t bytes, MemoryKind kind) = 0;
  virtual void RawFree(void* ptr, int64_t bytes, MemoryKind kind) = 0;

 private:
  friend class DeviceBuffer;
  void Free(DeviceBuffer* buffer);

  mutable std::mutex mu_;
  int threads_ = 1;
  int64_t capacity_ = 0;
  MemoryReport report_;
};

std::unique_ptr<Device> NewCpuDevice();

// The CUDA device `ordinal`: device memory from cudaMalloc, pinned host memory mapped and first-touched by
// host_memory.h, then registered with cudaHostRegister (portable), pageable host memory 64-byte aligned; the
// capacity defaults to the device's total memory. `compute_stream` (a cudaStream_t; nullptr: the legacy default
// stream) is the trainer's stream: RecordCompute/WaitCompute and every call given a null stream use it, and
// CopyToDevice/CopyToHost wait for it first. Fails with Unavailable, saying why, when this build has no CUDA
// support or the machine has no usable device (no driver, no GPU); with InvalidArgument when `compute_stream` is
// a stream of another device.
Status NewCudaDevice(int ordinal, void* compute_stream, std::unique_ptr<Device>* device);

// Bytes of `kind` allocated through any Device in this process and not yet freed (tests: an engine's
// destruction must bring this back to where it was).
int64_t LiveBytes(MemoryKind kind);

// "1.50 MiB" style formatting for messages.
std::string FormatBytes(int64_t bytes);

}  // namespace zero

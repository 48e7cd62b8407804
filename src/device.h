// Device: where the engine's buffers live, with every byte tagged by category and counted.
//
// CpuDevice stands in for a GPU on machines without one: "device memory" is host memory with its own
// accounting and an optional capacity limit, so stage memory savings and out-of-memory behaviour are real and
// testable. A CUDA device implements the same interface.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

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

class Device {
 public:
  virtual ~Device() = default;
  virtual Backend backend() const = 0;

  // Allocates `bytes` (zero-filled, 64-byte aligned) of `kind`, counted under `category`. Fails with
  // OutOfMemory naming `what`, the capacity and the per-category use when a device capacity would be exceeded.
  Status Allocate(int64_t bytes, MemoryCategory category, MemoryKind kind, const std::string& what,
                  DeviceBuffer* out);

  // 0 = unlimited.
  void set_capacity(int64_t bytes) { capacity_ = bytes; }
  int64_t capacity() const { return capacity_; }
  MemoryReport report() const;

 protected:
  virtual void* RawAllocate(int64_t bytes, MemoryKind kind) = 0;
  virtual void RawFree(void* ptr, int64_t bytes, MemoryKind kind) = 0;

 private:
  friend class DeviceBuffer;
  void Free(DeviceBuffer* buffer);

  mutable std::mutex mu_;
  int64_t capacity_ = 0;
  MemoryReport report_;
};

std::unique_ptr<Device> NewCpuDevice();

// The CUDA device `ordinal`: device memory from cudaMalloc, pinned host memory from cudaHostAlloc, pageable
// host memory from malloc; the capacity defaults to the device's total memory. Fails with Unavailable, saying
// why, when this build has no CUDA support or the machine has no usable device (no driver, no GPU).
Status NewCudaDevice(int ordinal, std::unique_ptr<Device>* device);

// "1.50 MiB" style formatting for messages.
std::string FormatBytes(int64_t bytes);

}  // namespace zero

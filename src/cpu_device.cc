// Device accounting and the CPU backend's device: host memory standing in for GPU memory.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <sstream>

#include "cpu_stream.h"
#include "device.h"
#include "host_memory.h"
#include "kernels/cpu_adamw.h"
#include "kernels/cpu_kernels.h"

namespace zero {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    device_ = other.device_;
    data_ = other.data_;
    bytes_ = other.bytes_;
    category_ = other.category_;
    kind_ = other.kind_;
    other.device_ = nullptr;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (device_ != nullptr) device_->Free(this);
  device_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

namespace {
std::atomic<int64_t> g_live[4];  // index: MemoryKind
}  // namespace

int64_t LiveBytes(MemoryKind kind) { return g_live[static_cast<int>(kind)].load(std::memory_order_relaxed); }

std::string FormatBytes(int64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  std::ostringstream os;
  os.precision(u == 0 ? 0 : 2);
  os << std::fixed << v << " " << kUnits[u];
  return os.str();
}

Status Device::Allocate(int64_t bytes, MemoryCategory category, MemoryKind kind, const std::string& what,
                        DeviceBuffer* out) {
  out->Reset();
  if (bytes < 0) return Status::InvalidArgument("negative allocation size for " + what);
  if (kind == MemoryKind::kNvme) return Status::Internal("the NVMe tier's files are not memory: " + what);
  std::lock_guard<std::mutex> lock(mu_);
  MemoryUsage& usage = kind == MemoryKind::kDevice ? report_.device : report_.host;
  if (kind == MemoryKind::kDevice && capacity_ > 0 && usage.Total() + bytes > capacity_) {
    std::ostringstream os;
    os << "allocating " << FormatBytes(bytes) << " for " << what << " would bring device memory to "
       << FormatBytes(usage.Total() + bytes) << ", over the capacity of " << FormatBytes(capacity_)
       << " (in use: ";
    for (int c = 0; c < kNumMemoryCategories; ++c) {
      os << (c ? ", " : "") << MemoryCategoryName(static_cast<MemoryCategory>(c)) << " "
         << FormatBytes(usage.current[c]);
    }
    os << ")";
    return Status::OutOfMemory(os.str());
  }
  void* ptr = bytes == 0 ? nullptr : RawAllocate(bytes, kind);
  if (bytes > 0 && ptr == nullptr) {
    return Status::OutOfMemory("the system refused " + FormatBytes(bytes) + " for " + what);
  }
  const int c = static_cast<int>(category);
  g_live[static_cast<int>(kind)].fetch_add(bytes, std::memory_order_relaxed);
  usage.current[c] += bytes;
  usage.peak[c] = std::max(usage.peak[c], usage.current[c]);
  usage.peak_total = std::max(usage.peak_total, usage.Total());
  out->device_ = this;
  out->data_ = ptr;
  out->bytes_ = bytes;
  out->category_ = category;
  out->kind_ = kind;
  return Status::Ok();
}

void Device::Free(DeviceBuffer* buffer) {
  std::lock_guard<std::mutex> lock(mu_);
  MemoryUsage& usage = buffer->kind_ == MemoryKind::kDevice ? report_.device : report_.host;
  usage.current[static_cast<int>(buffer->category_)] -= buffer->bytes_;
  g_live[static_cast<int>(buffer->kind_)].fetch_sub(buffer->bytes_, std::memory_order_relaxed);
  if (buffer->data_ != nullptr) RawFree(buffer->data_, buffer->bytes_, buffer->kind_);
}

int64_t Device::FreeBytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (capacity_ <= 0) return std::numeric_limits<int64_t>::max();
  return std::max<int64_t>(0, capacity_ - report_.device.Total());
}

MemoryReport Device::report() const {
  std::lock_guard<std::mutex> lock(mu_);
  return report_;
}

int64_t MemoryUsage::Total() const {
  int64_t t = 0;
  for (int64_t b : current) t += b;
  return t;
}

namespace {

class CpuDeviceEvent final : public Event {
 public:
  bool Query() const override { return event.Query(); }
  Status Synchronize(std::chrono::milliseconds timeout, const std::string& what) const override {
    return event.Synchronize(timeout, what.c_str());
  }
  CpuEvent event;
};

// A CpuStream whose tasks return a status: the first failure is kept and every later task is skipped, as a CUDA
// stream after a sticky error. Record and Wait tasks still run, so events fire and waiters are released.
class CpuDeviceStream final : public Stream {
 public:
  explicit CpuDeviceStream(const char* name) : stream_(name), sticky_(std::make_shared<Sticky>()) {}

  void Launch(StreamTask task) override {
    stream_.Enqueue([sticky = sticky_, task = std::move(task)] {
      {
        std::lock_guard<std::mutex> lock(sticky->mu);
        if (!sticky->status.ok()) return;
      }
      Status s = task(nullptr);
      if (s.ok()) return;
      std::lock_guard<std::mutex> lock(sticky->mu);
      if (sticky->status.ok()) sticky->status = std::move(s);
    });
  }
  void Record(Event* event) override { stream_.Record(&static_cast<CpuDeviceEvent*>(event)->event); }
  void Wait(const Event& event) override { stream_.Wait(static_cast<const CpuDeviceEvent&>(event).event); }
  Status Synchronize(std::chrono::milliseconds timeout) override {
    ZERO_RETURN_IF_ERROR(stream_.Synchronize(timeout));
    return status();
  }
  Status status() const override {
    std::lock_guard<std::mutex> lock(sticky_->mu);
    return sticky_->status;
  }

 private:
  struct Sticky {
    std::mutex mu;
    Status status;
  };
  CpuStream stream_;
  std::shared_ptr<Sticky> sticky_;  // shared with queued tasks
};

class CpuDevice final : public Device {
 public:
  Backend backend() const override { return Backend::kCpu; }

  Status NewStream(const char* name, bool, std::unique_ptr<Stream>* out) override {
    *out = std::make_unique<CpuDeviceStream>(name);
    return Status::Ok();
  }
  Status NewEvent(std::unique_ptr<Event>* out) override {
    *out = std::make_unique<CpuDeviceEvent>();
    return Status::Ok();
  }
  // A fresh CpuEvent is complete: the calling thread's work up to here is done by definition.
  void RecordCompute(Event* event) override { static_cast<CpuDeviceEvent*>(event)->event = CpuEvent(); }
  Status WaitCompute(const Event& event, std::chrono::milliseconds timeout, const std::string& what) override {
    return event.Synchronize(timeout, what);
  }

  Status Zero(void* p, int64_t bytes, void*) override {
    if (bytes > 0) std::memset(p, 0, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  Status Accumulate(void* acc, const void* x, DType dtype, int64_t n, void*) override {
    if (!kernels::AccumulateCpu(acc, x, dtype, n, threads())) return Unsupported("accumulate", dtype);
    return Status::Ok();
  }
  // AdamW: the one SIMD CPU kernel (kernels/cpu_adamw.h), which writes the copy in its single pass.
  Status AdamW(const kernels::AdamWCoeffs& c, float* p, float* m, float* v, const void* g, DType g_dtype, void* copy,
               DType copy_dtype, int64_t n, void*) override {
    if (!kernels::AdamWStepCpu(c, p, m, v, g, g_dtype, copy, copy_dtype, n, threads())) {
      return Unsupported("AdamW", copy != nullptr ? copy_dtype : g_dtype);
    }
    return Status::Ok();
  }
  Status Sgd(const kernels::SgdCoeffs& c, float* p, float* buf, const void* g, DType g_dtype, void* copy,
             DType copy_dtype, int64_t n, void*) override {
    if (!kernels::SgdCpu(c, p, buf, g, g_dtype, n, threads())) return Unsupported("SGD", g_dtype);
    if (copy != nullptr && !kernels::CastCpu(p, DType::kF32, copy, copy_dtype, n, threads())) {
      return Unsupported("SGD copy", copy_dtype);
    }
    return Status::Ok();
  }
  Status SumSquares(std::span<const kernels::SumSquaresRange> ranges, DType dtype, void*, int64_t,
                    std::vector<kernels::SumSquares>* out) override {
    out->assign(ranges.size(), kernels::SumSquares{});
    if (!kernels::SumSquaresCpu(ranges.data(), static_cast<int64_t>(ranges.size()), dtype, threads(), out->data())) {
      return Unsupported("norm", dtype);
    }
    return Status::Ok();
  }
  int64_t SumSquaresScratchBytes(std::span<const int64_t>) const override { return 0; }
  Status Copy(void* dst, const void* src, int64_t bytes, void*) override {
    if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  Status CopyToDevice(void* dst, const void* src, int64_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  Status CopyToHost(void* dst, const void* src, int64_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  bool host_addressable() const override { return true; }

 private:
  static Status Unsupported(const char* what, DType dtype) {
    return Status::InvalidArgument(std::string(what) + ": unsupported dtype " + DTypeName(dtype));
  }

 protected:
  // Pinned host memory (offload) comes from host_memory.h: huge pages for large buffers, first-touched and
  // mlocked (pageable with a warning when the memlock limit refuses). Everything else is aligned malloc.
  void* RawAllocate(int64_t bytes, MemoryKind kind) override {
    if (kind == MemoryKind::kPinnedHost) return pinned_.Allocate(bytes);
    constexpr size_t kAlign = 64;
    const size_t rounded = (static_cast<size_t>(bytes) + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    if (p != nullptr) std::memset(p, 0, rounded);
    return p;
  }
  void RawFree(void* ptr, int64_t, MemoryKind kind) override {
    if (kind == MemoryKind::kPinnedHost) {
      pinned_.Free(ptr);
      return;
    }
    std::free(ptr);
  }

 private:
  PinnedHostAllocations pinned_{nullptr, nullptr};  // mlock
};

}  // namespace

std::unique_ptr<Device> NewCpuDevice() { return std::make_unique<CpuDevice>(); }

}  // namespace zero

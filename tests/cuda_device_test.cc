// CudaDevice: on a machine with a GPU, the same accounting and capacity rules as CpuDevice, and the calls that
// the engine treats as done when they return are done for its non-blocking streams too (zero-filled allocation,
// copies to the device, zeroing offloaded host state), and a failed call is not reported again by the next
// kernel launch. Without a GPU (the machines that build and test zero), opening it must fail with Unavailable and
// say why, never crash. The GPU cases run through scripts/gpu/ (no CPU twin can show stream ordering).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "device.h"
#include "testing/device_memory.h"

namespace zero {
namespace {

TEST(CudaDeviceTest, OpensOrSaysWhyNot) {
  std::unique_ptr<Device> device;
  const Status s = NewCudaDevice(0, nullptr, &device);
  if (!s.ok()) {
    std::printf("[ no device ] %s\n", s.ToString().c_str());
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    EXPECT_NE(s.message().find("CUDA"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("Backend::kCpu"), std::string::npos) << s.ToString();
    EXPECT_EQ(device, nullptr);
    return;
  }
  EXPECT_EQ(device->backend(), Backend::kCuda);
  EXPECT_GT(device->capacity(), 0);
}

TEST(CudaDeviceTest, RejectsAnOrdinalThatDoesNotExist) {
  std::unique_ptr<Device> device;
  const Status s = NewCudaDevice(1 << 20, nullptr, &device);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(device, nullptr);
}

TEST(CudaDeviceTest, AccountsLikeTheCpuDevice) {
  std::unique_ptr<Device> device;
  if (!NewCudaDevice(0, nullptr, &device).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  DeviceBuffer params, pinned;
  ASSERT_TRUE(device->Allocate(1 << 20, MemoryCategory::kParams, MemoryKind::kDevice, "params", &params).ok());
  ASSERT_TRUE(device->Allocate(4096, MemoryCategory::kOptimizer, MemoryKind::kPinnedHost, "state", &pinned).ok());
  const MemoryReport r = device->report();
  EXPECT_EQ(r.device.Current(MemoryCategory::kParams), 1 << 20);
  EXPECT_EQ(r.host.Current(MemoryCategory::kOptimizer), 4096);
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(pinned.as<unsigned char>()[i], 0);
  device->set_capacity(1 << 20);
  DeviceBuffer more;
  const Status s = device->Allocate(1, MemoryCategory::kGrads, MemoryKind::kDevice, "one byte too many", &more);
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
}

// Keeps the compute stream busy for a few milliseconds, as a trainer's queued kernels do: 32 passes of
// acc += x over 64 Mi floats (about 25 GB of traffic); x is all ones, so each element of acc ends at 32.
class BusyComputeStream {
 public:
  static constexpr int64_t kElements = int64_t{64} << 20;
  explicit BusyComputeStream(Device* device) : device_(device) {
    const int64_t bytes = kElements * 4;
    EXPECT_TRUE(device->Allocate(bytes, MemoryCategory::kBuffers, MemoryKind::kDevice, "busy acc", &acc_).ok());
    EXPECT_TRUE(device->Allocate(bytes, MemoryCategory::kBuffers, MemoryKind::kDevice, "busy x", &x_).ok());
    const std::vector<float> ones(static_cast<size_t>(kElements), 1.0f);
    EXPECT_TRUE(device->CopyToDevice(x_.data(), ones.data(), bytes).ok());
  }
  void Queue() {
    for (int i = 0; i < 32; ++i) {
      ASSERT_TRUE(device_->Accumulate(acc_.data(), x_.data(), DType::kF32, kElements, nullptr).ok());
    }
  }
  const DeviceBuffer& acc() const { return acc_; }

 private:
  Device* device_;
  DeviceBuffer acc_, x_;
};

// Offloaded optimizer state is host memory. InitParams zeroes it and Load then writes a checkpoint's moments into
// it with the CPU: the zeroing must be complete when Zero returns. It was a cudaMemsetAsync on the compute stream,
// which landed whenever the stream got to it (after the trainer's queued kernels), possibly after the moments.
TEST(CudaDeviceTest, ZeroOfHostMemoryIsDoneWhenItReturns) {
  std::unique_ptr<Device> device;
  if (!NewCudaDevice(0, nullptr, &device).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  const int64_t bytes = int64_t{64} << 20;
  DeviceBuffer state;
  ASSERT_TRUE(device->Allocate(bytes, MemoryCategory::kOptimizer, MemoryKind::kPinnedHost, "state", &state).ok());
  std::memset(state.data(), 0xAB, static_cast<size_t>(bytes));
  BusyComputeStream busy(device.get());
  busy.Queue();
  ASSERT_TRUE(device->Zero(state.data(), bytes, nullptr).ok());
  const auto* p = state.as<unsigned char>();
  int64_t nonzero = 0;
  for (int64_t i = 0; i < bytes; ++i) nonzero += p[i] != 0;
  EXPECT_EQ(nonzero, 0) << "bytes not yet zeroed when Zero returned";
  // The same for pageable host memory (where pinning is refused, the engine falls back to it).
  std::vector<unsigned char> pageable(1 << 20, 0xCD);
  ASSERT_TRUE(device->Zero(pageable.data(), static_cast<int64_t>(pageable.size()), nullptr).ok());
  for (size_t i = 0; i < pageable.size(); ++i) ASSERT_EQ(pageable[i], 0) << i;
}

// InitParams copies each shard with CopyToDevice and then gathers it on the (non-blocking) communication stream
// with no event between: the copy must have landed when CopyToDevice returns. A cudaMemcpy from pageable memory
// returns once the data is staged, before its DMA completes.
TEST(CudaDeviceTest, CopyToDeviceHasLandedForTheEnginesStreams) {
  std::unique_ptr<Device> device;
  if (!NewCudaDevice(0, nullptr, &device).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  const int64_t n = int64_t{64} << 20;  // 256 MiB of floats: the staged copy takes tens of milliseconds
  DeviceBuffer dev, seen;
  ASSERT_TRUE(device->Allocate(n * 4, MemoryCategory::kParams, MemoryKind::kDevice, "params", &dev).ok());
  ASSERT_TRUE(device->Allocate(4, MemoryCategory::kBuffers, MemoryKind::kPinnedHost, "seen", &seen).ok());
  std::unique_ptr<Stream> comm;
  ASSERT_TRUE(device->NewStream("test communication stream", true, &comm).ok());
  std::vector<float> host(static_cast<size_t>(n));
  int stale = 0;
  for (int it = 1; it <= 4; ++it) {
    std::fill(host.begin(), host.end(), static_cast<float>(it));
    ASSERT_TRUE(device->CopyToDevice(dev.data(), host.data(), n * 4).ok());
    Device* d = device.get();
    void* dst = seen.data();
    const void* src = dev.as<float>() + n - 1;  // the last element: the last to land
    comm->Launch([d, dst, src](void* stream) { return d->Copy(dst, src, 4, stream); });
    ASSERT_TRUE(comm->Synchronize(std::chrono::milliseconds(60'000)).ok());
    stale += *seen.as<float>() != static_cast<float>(it);
  }
  EXPECT_EQ(stale, 0) << "of 4 copies, the communication stream read stale data this often";
}

// GatherFull allocates a buffer and gathers into it on the communication stream at once: the zero-fill must be
// done when Allocate returns, not queued behind the trainer's kernels on the compute stream.
TEST(CudaDeviceTest, NewDeviceMemoryIsZeroForTheEnginesStreams) {
  std::unique_ptr<Device> device;
  if (!NewCudaDevice(0, nullptr, &device).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  const int64_t bytes = int64_t{64} << 20;
  std::vector<unsigned char> ones(static_cast<size_t>(bytes), 0xFF);
  {
    // Leave non-zero bytes where the next allocation of this size is likely to land.
    DeviceBuffer before;
    ASSERT_TRUE(device->Allocate(bytes, MemoryCategory::kBuffers, MemoryKind::kDevice, "before", &before).ok());
    ASSERT_TRUE(device->CopyToDevice(before.data(), ones.data(), bytes).ok());
  }
  DeviceBuffer host;
  ASSERT_TRUE(device->Allocate(bytes, MemoryCategory::kBuffers, MemoryKind::kPinnedHost, "host", &host).ok());
  std::unique_ptr<Stream> comm;
  ASSERT_TRUE(device->NewStream("test communication stream", true, &comm).ok());
  BusyComputeStream busy(device.get());
  busy.Queue();
  DeviceBuffer fresh;
  ASSERT_TRUE(device->Allocate(bytes, MemoryCategory::kBuffers, MemoryKind::kDevice, "fresh", &fresh).ok());
  Device* d = device.get();
  void* dst = host.data();
  const void* src = fresh.data();
  comm->Launch([d, dst, src](void* stream) { return d->Copy(dst, src, bytes, stream); });
  ASSERT_TRUE(comm->Synchronize(std::chrono::milliseconds(60'000)).ok());
  const auto* p = host.as<unsigned char>();
  int64_t nonzero = 0;
  for (int64_t i = 0; i < bytes; ++i) nonzero += p[i] != 0;
  EXPECT_EQ(nonzero, 0) << "bytes of a new allocation were not zero for the communication stream";
}

// A refused allocation is an OutOfMemory status, and nothing more: the kernels launched next are checked with
// cudaGetLastError, which reported the failed cudaMalloc as the launch's own error ("launching the accumulate
// kernel failed: out of memory").
TEST(CudaDeviceTest, AFailedAllocationIsNotReportedAgainByTheNextLaunch) {
  std::unique_ptr<Device> device;
  if (!NewCudaDevice(0, nullptr, &device).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  device->set_capacity(0);  // unlimited: let cudaMalloc itself refuse
  DeviceBuffer huge;
  const Status s = device->Allocate(int64_t{1} << 50, MemoryCategory::kBuffers, MemoryKind::kDevice, "1 PiB", &huge);
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.ToString();
  DeviceBuffer acc, x;
  ASSERT_TRUE(device->Allocate(4096, MemoryCategory::kBuffers, MemoryKind::kDevice, "acc", &acc).ok());
  ASSERT_TRUE(device->Allocate(4096, MemoryCategory::kBuffers, MemoryKind::kDevice, "x", &x).ok());
  const Status launched = device->Accumulate(acc.data(), x.data(), DType::kF32, 1024, nullptr);
  EXPECT_TRUE(launched.ok()) << launched.ToString();
}

// An event whose work is done is complete; one never recorded is complete too (device.h).
TEST(CudaDeviceTest, EventsCompleteWhenTheirWorkIsDone) {
  std::unique_ptr<Device> device;
  if (!NewCudaDevice(0, nullptr, &device).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  std::unique_ptr<Event> event;
  ASSERT_TRUE(device->NewEvent(&event).ok());
  EXPECT_TRUE(event->Query());
  BusyComputeStream busy(device.get());
  busy.Queue();
  device->RecordCompute(event.get());
  ASSERT_TRUE(event->Synchronize(std::chrono::milliseconds(60'000), "the busy kernels").ok());
  EXPECT_TRUE(event->Query());
  ASSERT_TRUE(device->WaitCompute(*event, std::chrono::milliseconds(1000), "the busy kernels").ok());
}

// Options::cuda_stream: a trainer's own non-blocking stream is the compute stream. The device's compute-side work
// (a null stream) runs there, RecordCompute captures it, and the synchronous copies wait for it: the legacy
// stream's cudaMemcpy does not wait for a non-blocking stream by itself, so without that wait the host would read
// the accumulator before the kernels queued on the trainer's stream have written it.
TEST(CudaDeviceTest, ATrainersOwnStreamIsTheComputeStream) {
  void* stream = nullptr;
  if (!testing::NewNonBlockingStream(&stream).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  {
    std::unique_ptr<Device> device;
    const Status s = NewCudaDevice(0, stream, &device);
    ASSERT_TRUE(s.ok()) << s.ToString();
    BusyComputeStream busy(device.get());
    busy.Queue();
    std::unique_ptr<Event> event;
    ASSERT_TRUE(device->NewEvent(&event).ok());
    device->RecordCompute(event.get());  // on the trainer's stream, behind the 32 passes
    std::vector<float> got(static_cast<size_t>(BusyComputeStream::kElements));
    ASSERT_TRUE(device->CopyToHost(got.data(), busy.acc().data(), BusyComputeStream::kElements * 4).ok());
    EXPECT_TRUE(event->Query()) << "CopyToHost returned before the trainer's stream got past its work";
    int64_t wrong = 0;
    for (float v : got) wrong += v != 32.0f;
    EXPECT_EQ(wrong, 0) << "elements read before the trainer's stream finished writing them";
    ASSERT_TRUE(testing::StreamSynchronize(stream).ok());
  }
  testing::DestroyStream(stream);
}

// The runtime's special handles as Options::cuda_stream: cudaStreamLegacy is the legacy default stream (Open accepts
// it as nullptr), cudaStreamPerThread names another stream in each host thread and is refused, saying what to pass.
TEST(CudaDeviceTest, SpecialStreamHandlesAreMappedOrRefused) {
  // Their values in the runtime's driver_types.h (this test builds without the CUDA headers too).
  void* const legacy = reinterpret_cast<void*>(uintptr_t{0x1});
  void* const per_thread = reinterpret_cast<void*>(uintptr_t{0x2});
  int count = 0;
  if (!testing::CudaDeviceCount(&count).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  std::unique_ptr<Device> device;
  Status s = NewCudaDevice(0, legacy, &device);
  ASSERT_TRUE(s.ok()) << s.ToString();
  {
    BusyComputeStream busy(device.get());  // compute-side work on the legacy stream, read back through it
    busy.Queue();
    std::vector<float> got(static_cast<size_t>(BusyComputeStream::kElements));
    ASSERT_TRUE(device->CopyToHost(got.data(), busy.acc().data(), BusyComputeStream::kElements * 4).ok());
    EXPECT_EQ(got.front(), 32.0f);
    EXPECT_EQ(got.back(), 32.0f);
  }  // its buffers go back to the device before the device goes
  device.reset();
  s = NewCudaDevice(0, per_thread, &device);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  for (const char* part : {"Options::cuda_stream", "cudaStreamPerThread", "cudaStreamCreateWithFlags", "nullptr"}) {
    EXPECT_NE(s.message().find(part), std::string::npos) << part << " not in: " << s.ToString();
  }
  EXPECT_EQ(device, nullptr);
}

// A stream of another device cannot be the compute stream (cudaEventRecord of the device's events on it fails):
// Open says so, naming the option, instead of failing later at the first GradsReady.
TEST(CudaDeviceTest, AStreamOfAnotherDeviceIsRefused) {
  int count = 0;
  if (!testing::CudaDeviceCount(&count).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
  if (count < 2) GTEST_SKIP() << "one CUDA device: no stream of another device to pass";
  ASSERT_TRUE(testing::CudaSetDevice(1).ok());
  void* stream = nullptr;
  ASSERT_TRUE(testing::NewNonBlockingStream(&stream).ok());
  ASSERT_TRUE(testing::CudaSetDevice(0).ok());
  std::unique_ptr<Device> device;
  const Status s = NewCudaDevice(0, stream, &device);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("Options::cuda_stream"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("device 0"), std::string::npos) << s.ToString();
  EXPECT_EQ(device, nullptr);
  testing::DestroyStream(stream);
}

}  // namespace
}  // namespace zero

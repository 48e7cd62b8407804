// CudaDevice: on a machine with a GPU, the same accounting and capacity rules as CpuDevice; without one (every
// machine that builds or tests zero today), opening it must fail with Unavailable and say why, never crash.
#include <cstdio>

#include <gtest/gtest.h>

#include "device.h"

namespace zero {
namespace {

TEST(CudaDeviceTest, OpensOrSaysWhyNot) {
  std::unique_ptr<Device> device;
  const Status s = NewCudaDevice(0, &device);
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
  const Status s = NewCudaDevice(1 << 20, &device);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(device, nullptr);
}

TEST(CudaDeviceTest, AccountsLikeTheCpuDevice) {
  std::unique_ptr<Device> device;
  if (!NewCudaDevice(0, &device).ok()) GTEST_SKIP() << "no CUDA device on this machine (GPU test)";
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

}  // namespace
}  // namespace zero

// Vectors to and from device memory for the tests of the CUDA stand-ins (fake_cuda_test, fake_nccl_test,
// emulated_kernels_test): a failed call is a test failure. ToDevice waits for the device: a copy from pageable
// memory may return before its device write, which the legacy stream does not order with the non-blocking
// streams the code under test uses (the stand-in's deferred mode shows it).
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <initializer_list>
#include <vector>

#include "cuda_runtime.h"  // the stand-in (testing/fake_cuda)

namespace zero::testing {

template <typename T>
T* ToDevice(const std::vector<T>& host) {
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, host.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return static_cast<T*>(p);
}

inline float* ToDevice(std::initializer_list<float> host) { return ToDevice(std::vector<float>(host)); }

template <typename T>
std::vector<T> ToHost(const T* device, size_t n) {
  std::vector<T> host(n);
  EXPECT_EQ(cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

}  // namespace zero::testing

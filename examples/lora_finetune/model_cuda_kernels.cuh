// The LoRA example model's CUDA executors of model_kernels.cuh's functors: ForEachKernel (an element functor over a
// grid-stride loop) and RowKernel with BlockRow (a row functor on a block of kRowLanes threads). In a header so that
// nvcc (model_cuda.cu, which launches them) and the CPU emulation test (tests/cuda_emulation_test.cc, through
// tests/testing/cuda_emulation.h) compile the same source.
//
// defines: ForEachKernel, BlockRow, RowKernel
//
// Everything is in an unnamed namespace, as it was in model_cuda.cu: each includer gets its own copy.
#pragma once

#include <cmath>
#include <cstdint>

#include "examples/lora_finetune/model_kernels.cuh"
#include "kernels/device_code.cuh"

#if !defined(__CUDACC__) && !defined(ZERO_CUDA_EMULATION)
#error "kernel source: compile it with nvcc, or include tests/testing/cuda_emulation.h first"
#endif

namespace lora {
namespace {

using kernels::kRowLanes;

template <typename F>
__global__ void ForEachKernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    f(i);
  }
}

// The row executor of model_kernels.cuh on a block of kRowLanes threads: lane l takes elements l, l + kRowLanes,
// ..., and partials combine pairwise in shared memory, in kernels::SerialRow's order. Every thread of the block
// calls every method (they synchronize the block). Host code never runs it: the branches for nvcc's host pass
// (ZERO_DEVICE_CODE 0) only satisfy the __host__ __device__ functors that take it.
struct BlockRow {
  float* shared;  // kRowLanes floats
  int lane;

  template <typename Op>
  __host__ __device__ float Combine(float v, Op op) const {
#if ZERO_DEVICE_CODE
    __syncthreads();  // the previous reduction's readers of shared[0] are done
    shared[lane] = v;
    __syncthreads();
    for (int s = kRowLanes / 2; s > 0; s >>= 1) {
      if (lane < s) shared[lane] = op(shared[lane], shared[lane + s]);
      __syncthreads();
    }
    return shared[0];
#else
    return v;
#endif
  }
  template <typename F>
  __host__ __device__ float Sum(int64_t count, const F& f) const {
    float acc = 0.f;
    for (int64_t i = lane; i < count; i += kRowLanes) acc += f(i);
    return Combine(acc, [](float a, float b) { return a + b; });
  }
  template <typename F>
  __host__ __device__ float Max(int64_t count, const F& f) const {
    float acc = -INFINITY;
    for (int64_t i = lane; i < count; i += kRowLanes) {
      const float v = f(i);
      acc = acc < v ? v : acc;
    }
    return Combine(acc, [](float a, float b) { return a < b ? b : a; });
  }
  template <typename F>
  __host__ __device__ void For(int64_t count, const F& f) const {
    for (int64_t i = lane; i < count; i += kRowLanes) f(i);
#if ZERO_DEVICE_CODE
    __syncthreads();  // the row's elements are written before anyone reads them
#endif
  }
  __host__ __device__ bool Leader() const { return lane == 0; }
};

template <typename F>
__global__ void RowKernel(int64_t rows, F f) {
  __shared__ float shared[kRowLanes];
  const BlockRow r{shared, static_cast<int>(threadIdx.x)};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) f.Row(r, row);
}

}  // namespace
}  // namespace lora

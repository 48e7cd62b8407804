// ZERO_DEVICE_CODE: 1 where kernel source is compiled to run as threads of a block, 0 elsewhere.
//
// 1 in nvcc's device pass (__CUDA_ARCH__) and in a host test that emulates CUDA (tests/testing/cuda_emulation.h
// defines ZERO_CUDA_EMULATION before including this); 0 in nvcc's host pass and in plain host code. Code that
// synchronizes a block (__syncthreads, shared memory) is guarded by it instead of by __CUDA_ARCH__, so that the
// emulated build runs the same lines the GPU does.
#pragma once

#if defined(__CUDA_ARCH__) || defined(ZERO_CUDA_EMULATION)
#define ZERO_DEVICE_CODE 1
#else
#define ZERO_DEVICE_CODE 0
#endif

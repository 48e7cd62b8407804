// The CUDA instantiation of the toy model's work items (toy_kernels.cu). Kept apart from toy_kernels.h so that
// nvcc (C++17) never sees zero's C++20 headers.
#pragma once

#include <string>

#include "testing/toy_math.cuh"

namespace zero::testing {

// Enqueues one grid-stride kernel running every item of `op` on `stream` (a cudaStream_t; nullptr: the legacy
// default stream), without waiting. Returns the launch's error text, empty on success.
std::string LaunchToyOpCuda(ToyOp op, const ToyArgs& args, void* stream);

}  // namespace zero::testing

// Runs the toy model's work items (toy_math.cuh) on an executor: the CPU (the items in a loop) or CUDA (kernels).
#pragma once

#include "testing/toy_math.cuh"
#include "zero/status.h"

namespace zero::testing {

enum class ToyExec {
  kCpu,   // pointers in ToyArgs are host memory; an op runs to completion on the calling thread
  kCuda,  // pointers are device memory; an op is a kernel on a stream (the trainer's), not waited for
};

// Runs every item of `op`, in ascending order on the CPU. kCuda returns once the kernel is enqueued on `stream`
// (a cudaStream_t; nullptr: the legacy default stream), or with the launch error; Unavailable in a build
// without CUDA.
Status RunToyOp(ToyExec exec, ToyOp op, const ToyArgs& args, void* stream = nullptr);

}  // namespace zero::testing

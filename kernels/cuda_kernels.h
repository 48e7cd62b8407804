// CUDA instantiations of zero's device math (kernels/optimizer.cuh): thin grid-stride launchers. Streams are
// passed as void* (a cudaStream_t) so that this header needs no CUDA headers. Each call only enqueues work on
// the stream and returns the launch status as a cudaError_t value (0 = success).
#pragma once

#include <cstdint>

#include "kernels/optimizer.cuh"

namespace zero::kernels {

int AdamWCuda(const AdamWCoeffs& c, float* p, float* m, float* v, const float* g, int64_t n, void* stream);
int SgdCuda(const SgdCoeffs& c, float* p, float* buf, const float* g, int64_t n, void* stream);
int AccumulateCuda(float* acc, const float* x, int64_t n, void* stream);

}  // namespace zero::kernels

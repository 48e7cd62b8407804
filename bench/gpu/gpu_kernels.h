// The GPU benchmarks' own kernels: the references zero's kernels are timed against (streaming kernels that move
// exactly the same bytes with almost no arithmetic), a pattern fill for gradients, and the bench model's
// element-wise helpers. Compiled by nvcc as C++17, so this header includes no zero header; streams are passed as
// void* (a cudaStream_t) and every call returns the launch's cudaError_t as an int (0 = success).
#pragma once

#include <cstdint>

namespace zero::bench::gpu {

// The bytes of one fused optimizer call over n elements, streamed: reads p, s0, s1 (fp32; s1 null for SGD, whose
// state is one buffer) and g (fp32, or bf16 when g_bf16), writes p, s0 and s1 back and, when copy is not null, 2
// bytes per element there (the bf16 compute copy). `zero` must be 0.0f at run time: the values written are the
// values read (plus g * zero), so the state does not drift and no store can be elided. Four elements per thread
// per iteration with 16-byte (fp32) and 8-byte (bf16) accesses: what the memory system gives this traffic, the
// roofline AdamWCuda/SgdCuda are measured against. REQUIRES: every pointer 16-byte aligned.
int StreamLikeOptimizer(float* p, float* s0, float* s1, const void* g, bool g_bf16, uint16_t* copy, int64_t n,
                        float zero, void* stream);

// Reads x[0, n) (fp32, or bf16 when bf16) once and adds the squares in any order (per-thread, warp shuffles, one
// fp32 atomicAdd per block into *out, which must be zeroed first): the bytes of a gradient norm without its fixed
// order or fp64 chains. REQUIRES: x 16-byte aligned.
int StreamSumSquares(const void* x, bool bf16, int64_t n, float* out, void* stream);

// x[i] = scale * u(seed, i) with u a hash of (seed, i) in [-1, 1), stored as fp32 or bf16 (round to nearest).
int FillPattern(void* x, bool bf16, int64_t n, uint64_t seed, float scale, void* stream);

}  // namespace zero::bench::gpu

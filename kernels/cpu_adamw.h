// The CPU AdamW step: one SIMD, multi-threaded pass over fp32 master/m/v and a bf16/fp16/fp32 gradient that
// also writes the low-precision copy of the new master. Used by the CPU backend and by the offload path.
//
// defines: AdamWStepCpu, AdamWTargetName, AdamWTargets, TEST_AdamWForceTarget
//
// Every element is bitwise equal to AdamWElement (optimizer.cuh) applied to the gradient widened exactly to
// fp32, followed by cast.cuh's FloatToBf16 / FloatToF16 (round to nearest even) for the copy: the vector code
// uses the functor's operations in the functor's order, with no FMA and no approximate square root or
// reciprocal. Results do not depend on the thread count or on the SIMD target chosen at run time (Highway's
// dynamic dispatch: AVX-512, AVX2, SSE4, SSSE3 or portable scalar code, whichever is best on this CPU).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/optimizer.cuh"
#include "zero/types.h"

namespace zero::kernels {

// master, m, v: n floats, updated in place. grad: n elements of grad_dtype (kF32, kBF16 or kF16), multiplied
// by c.grad_scale after widening. copy: null, or n elements of copy_dtype (kF32, kBF16 or kF16) that receive the
// new master, written with non-temporal stores (they are not read back by this pass; the caller's next reader
// is an all-gather or a device copy). threads: at most this many OpenMP threads (1 below 2^16 elements).
// Any alignment is accepted; the copy is streamed once its pointer is aligned to the vector size.
// Returns false (and writes nothing) for an unsupported grad_dtype, or copy_dtype when copy is not null.
// REQUIRES: the arrays do not overlap (grad and copy may not alias master).
bool AdamWStepCpu(const AdamWCoeffs& c, float* master, float* m, float* v, const void* grad, DType grad_dtype,
                  void* copy, DType copy_dtype, int64_t n, int threads);

// Highway's name of the SIMD target AdamWStepCpu dispatches to on this CPU ("AVX3", "AVX2", "SSE4", "EMU128"...).
const char* AdamWTargetName();

// The SIMD targets compiled into AdamWStepCpu that this CPU can run, best first, as Highway target bits.
std::vector<int64_t> AdamWTargets();

// Test seam: makes AdamWStepCpu (and every other Highway-dispatched function in the process) use `target`, one
// of AdamWTargets(); 0 restores the best target. REQUIRES: no concurrent call of a dispatched function.
void TEST_AdamWForceTarget(int64_t target);

}  // namespace zero::kernels

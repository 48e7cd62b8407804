// The fixed summation order of MpiComm's ring reduce-scatter and all-reduce, for references (tests, the engine's
// unsharded reference) that must reproduce the CPU backend's sums bitwise.
//
// The element of chunk c (owned by rank c) is summed as the partial sum travels around the ring, starting at
// rank c+1; each rank adds its own value to the partial it received, in the element's dtype:
//     result = (((x[c+1] + x[c+2]) + x[c+3]) + ... + x[c-1]) + x[c]        (rank indices mod world)
// Reduce-scatter's chunk c is [c*count, (c+1)*count). All-reduce splits its `count` elements into `world` chunks
// as evenly as possible, chunk c = [RingChunkBegin(count, world, c), RingChunkBegin(count, world, c + 1)),
// so an all-reduce's element i is summed in the order of owner RingChunkOwner(count, world, i).
#pragma once

#include <cstdint>

namespace zero {

// One element summed over `world` ranks in the ring order above; values_by_rank[k] is rank k's value.
template <class T>
T RingSum(const T* values_by_rank, int world, int owner) {
  T partial = values_by_rank[(owner + 1) % world];
  for (int k = 2; k <= world; ++k) partial = partial + values_by_rank[(owner + k) % world];
  return partial;
}

// First element of chunk `chunk` when `count` elements are split into `world` near-equal chunks (integer
// arithmetic; chunk == world gives count).
inline int64_t RingChunkBegin(int64_t count, int world, int chunk) { return chunk * count / world; }

// The chunk (= owning rank) that element `index` (< count) belongs to: the largest c with begin(c) <= index.
// begin(c) <= index  <=>  c * count < (index + 1) * world; empty chunks are skipped by taking the largest c.
inline int RingChunkOwner(int64_t count, int world, int64_t index) {
  return static_cast<int>(((index + 1) * world - 1) / count);
}

}  // namespace zero

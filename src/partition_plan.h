// PartitionPlan: how parameters are laid out in flat, padded buckets and which rank owns which elements.
//
// A pure function of (param specs, world size, bucket size). Every rank computes the same plan, so ownership
// is arithmetic, not communication. Layout rules:
//  * Each unit gets two bucket sets: trainable parameters and frozen ones. Units never share buckets.
//  * Within a set, parameters keep spec order; each starts at a multiple of kParamAlign elements; a bucket closes
//    when adding the next parameter would exceed bucket_elements (a larger parameter gets a bucket of its own).
//  * A bucket's padded size is a multiple of kShardAlign * world, so every rank's shard has padded/world
//    elements and starts on a kShardAlign boundary. Rank r owns [r * shard, (r + 1) * shard) of every bucket.
//  * Padding (alignment gaps and the tail) belongs to no parameter and is kept zero.
//  * Buckets are numbered in plan order: units ascending, trainable set before frozen, in order within a set.
//    Offsets: each set of buckets (trainable, frozen) is laid out contiguously in plan order, so
//    bucket.offset is the bucket's start in its set's flat buffer and bucket.shard_offset its shard's start in
//    the set's flat shard buffer (sum of previous buckets' shard sizes).
#pragma once

#include <cstdint>
#include <vector>

#include "zero/options.h"
#include "zero/status.h"

namespace zero {

inline constexpr int64_t kParamAlign = 8;   // elements; keeps views 16-byte aligned in 16-bit dtypes
inline constexpr int64_t kShardAlign = 64;  // elements; bucket padded to a multiple of kShardAlign * world

// One parameter's part of one rank's shard of one bucket.
struct Fragment {
  int param = 0;           // index into the specs
  int64_t param_off = 0;   // first element within the parameter
  int64_t shard_off = 0;   // first element within the rank's shard of the bucket
  int64_t count = 0;
};

// A parameter's place in its bucket.
struct ParamPlacement {
  int param = 0;
  int64_t offset = 0;  // first element within the bucket
  int64_t numel = 0;
};

struct Bucket {
  int index = 0;            // plan order, across both sets
  int unit = 0;
  bool trainable = true;
  int64_t used = 0;         // elements up to the end of the last parameter (includes alignment gaps)
  int64_t padded = 0;       // multiple of kShardAlign * world
  int64_t shard = 0;        // padded / world
  int64_t offset = 0;       // start in its set's full flat buffer
  int64_t shard_offset = 0; // start in its set's flat shard buffer
  std::vector<ParamPlacement> params;
  // fragments[r]: what rank r owns of this bucket, ordered by shard_off.
  std::vector<std::vector<Fragment>> fragments;
};

struct UnitPlan {
  std::vector<int> trainable_buckets;  // indices into PartitionPlan::buckets
  std::vector<int> frozen_buckets;
  std::vector<int> params;             // spec indices in this unit
  int64_t trainable_padded = 0;        // sum of padded sizes of its trainable buckets
  int64_t frozen_padded = 0;
};

// Where a parameter lives.
struct ParamLocation {
  int bucket = 0;
  int64_t offset = 0;  // element offset within the bucket
};

struct PartitionPlan {
  int world_size = 1;
  int64_t bucket_elements = 0;
  std::vector<Bucket> buckets;       // plan order
  std::vector<UnitPlan> units;       // index = unit id; 0 .. max(spec.unit)
  std::vector<ParamLocation> params; // index = spec index
  int64_t trainable_padded = 0;      // total padded elements of trainable buckets (Ψt)
  int64_t frozen_padded = 0;         // total padded elements of frozen buckets (Ψf)
  int64_t trainable_shard = 0;       // per-rank shard elements of trainable buckets (Ψt / world)
  int64_t frozen_shard = 0;
  uint64_t hash = 0;                 // of everything above; equal plans have equal hashes (52 bits, exact in fp64)

  // Builds the plan. Fails with InvalidArgument naming the parameter for: empty specs, negative dims,
  // duplicate names, unit < 0, units with no parameters in between (unit ids must be 0..U-1, all used),
  // world_size < 1, bucket_elements < 1.
  static Status Build(const std::vector<ParamSpec>& specs, int world_size, int64_t bucket_elements,
                      PartitionPlan* plan);
};

}  // namespace zero

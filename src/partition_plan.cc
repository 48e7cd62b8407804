// PartitionPlan::Build: validates the parameter specs and lays them out in padded, sharded buckets.
//
// Decisions the header leaves open (tests pin each one):
//  * A zero-element parameter (some dim is 0) takes no space: it is placed at AlignUp(used, kParamAlign) of the
//    bucket being filled, leaves `used` unchanged, never closes a bucket and has no fragments. Before the
//    first non-empty parameter of its set it opens the set's first bucket (offset 0), so every parameter has a
//    ParamLocation and a set of only empty parameters still has one bucket. Its offset may pass `used` and
//    bucket_elements but never `padded`.
//  * Every bucket has padded >= kShardAlign * world, also a bucket whose parameters are all empty (used == 0):
//    every rank then owns a non-empty shard of every bucket, so no buffer, view or collective is ever
//    zero-sized. That costs kShardAlign elements per rank only for such degenerate buckets.
//  * Totals are capped at kMaxElements (2^62) per set so every offset and sum fits int64_t with headroom.
#include "partition_plan.h"

#include <algorithm>
#include <limits>
#include <string>
#include <unordered_map>
#include <utility>

namespace zero {
namespace {

// Largest parameter, bucket and per-set total accepted; far beyond any device, far below int64 overflow.
constexpr int64_t kMaxElements = int64_t{1} << 62;

int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

std::string ParamName(const std::vector<ParamSpec>& specs, size_t i) {
  return "parameter " + std::to_string(i) + " ('" + specs[i].name + "')";
}

// numel with the checks ParamSpec::numel() cannot make (it has no way to report overflow).
Status CheckedNumel(const std::vector<ParamSpec>& specs, size_t i, int64_t* numel) {
  const std::vector<int64_t>& shape = specs[i].shape;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0) {
      return Status::InvalidArgument(ParamName(specs, i) + " has dimension " + std::to_string(d) + " = " +
                                     std::to_string(shape[d]) + "; dimensions must be >= 0");
    }
  }
  // A zero dim makes the product 0 however large the other dims are, so test for it before multiplying.
  if (std::find(shape.begin(), shape.end(), int64_t{0}) != shape.end()) {
    *numel = 0;
    return Status::Ok();
  }
  int64_t n = 1;
  for (int64_t d : shape) {
    if (n > kMaxElements / d) {
      return Status::InvalidArgument(ParamName(specs, i) + " has more than 2^62 elements; check its shape");
    }
    n *= d;
  }
  *numel = n;
  return Status::Ok();
}

// FNV-1a over 64-bit words, byte by byte, so the hash does not depend on the host's endianness.
class Fnv1a {
 public:
  void Add(int64_t v) {
    uint64_t u = static_cast<uint64_t>(v);
    for (int b = 0; b < 8; ++b) {
      h_ ^= (u >> (8 * b)) & 0xff;
      h_ *= 0x100000001b3ull;
    }
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

// Lays out one (unit, trainable) set: the params in spec order. Appends buckets to plan->buckets and their
// indices to *bucket_ids, advancing the set's running *offset / *shard_offset.
Status LayOutSet(const std::vector<int>& set, const std::vector<int64_t>& numels, int unit, bool trainable,
                 PartitionPlan* plan, std::vector<int>* bucket_ids, int64_t* offset, int64_t* shard_offset) {
  const int world = plan->world_size;
  const int64_t quantum = kShardAlign * world;
  std::vector<Bucket>& buckets = plan->buckets;
  size_t first = buckets.size();

  auto open_bucket = [&] {
    Bucket b;
    b.index = static_cast<int>(buckets.size());
    b.unit = unit;
    b.trainable = trainable;
    buckets.push_back(std::move(b));
  };

  for (int p : set) {
    const int64_t n = numels[p];
    if (buckets.size() == first) open_bucket();
    Bucket* b = &buckets.back();
    int64_t off = AlignUp(b->used, kParamAlign);
    // Close only a bucket that holds elements: an empty parameter never forces a new bucket, and a parameter
    // larger than bucket_elements then lands at offset 0 of a bucket that holds nothing else.
    if (n > 0 && b->used > 0 && off + n > plan->bucket_elements) {
      open_bucket();
      b = &buckets.back();
      off = 0;
    }
    b->params.push_back(ParamPlacement{p, off, n});
    if (n > 0) b->used = off + n;
    plan->params[p] = ParamLocation{b->index, off};
  }

  for (size_t i = first; i < buckets.size(); ++i) {
    Bucket& b = buckets[i];
    b.padded = std::max(AlignUp(b.used, quantum), quantum);
    b.shard = b.padded / world;
    if (*offset > kMaxElements - b.padded) {
      return Status::InvalidArgument("the " + std::string(trainable ? "trainable" : "frozen") +
                                     " parameters total more than 2^62 elements after padding; check the shapes");
    }
    b.offset = *offset;
    b.shard_offset = *shard_offset;
    *offset += b.padded;
    *shard_offset += b.shard;

    // Rank r owns [r * shard, (r + 1) * shard). Params are in ascending offset order, so each rank's fragments
    // come out ordered by shard_off. Empty params overlap nothing; padding belongs to no param.
    b.fragments.assign(world, {});
    for (const ParamPlacement& pp : b.params) {
      if (pp.numel == 0) continue;
      const int64_t end = pp.offset + pp.numel;
      for (int r = static_cast<int>(pp.offset / b.shard); r < world && r * b.shard < end; ++r) {
        const int64_t lo = std::max(pp.offset, r * b.shard);
        const int64_t hi = std::min(end, (r + 1) * b.shard);
        b.fragments[r].push_back(Fragment{pp.param, lo - pp.offset, lo - r * b.shard, hi - lo});
      }
    }
    bucket_ids->push_back(b.index);
  }
  return Status::Ok();
}

}  // namespace

Status PartitionPlan::Build(const std::vector<ParamSpec>& specs, int world_size, int64_t bucket_elements,
                            PartitionPlan* plan) {
  if (plan == nullptr) return Status::InvalidArgument("PartitionPlan::Build: plan must not be null");
  if (world_size < 1) {
    return Status::InvalidArgument("world size is " + std::to_string(world_size) + "; it must be >= 1");
  }
  if (bucket_elements < 1) {
    return Status::InvalidArgument("bucket_elements is " + std::to_string(bucket_elements) +
                                   "; it must be >= 1 (default 2^25)");
  }
  if (specs.empty()) return Status::InvalidArgument("no parameters: register at least one ParamSpec");
  if (specs.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return Status::InvalidArgument("more than 2^31 - 1 parameters; merge some into fewer tensors");
  }

  std::vector<int64_t> numels(specs.size());
  std::unordered_map<std::string, size_t> first_with_name;
  int max_unit = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& s = specs[i];
    if (s.name.empty()) {
      return Status::InvalidArgument("parameter " + std::to_string(i) + " has an empty name; give it a unique name");
    }
    auto [it, inserted] = first_with_name.emplace(s.name, i);
    if (!inserted) {
      return Status::InvalidArgument(ParamName(specs, i) + " has the same name as parameter " +
                                     std::to_string(it->second) + "; names must be unique");
    }
    ZERO_RETURN_IF_ERROR(CheckedNumel(specs, i, &numels[i]));
    if (s.unit < 0) {
      return Status::InvalidArgument(ParamName(specs, i) + " has unit " + std::to_string(s.unit) +
                                     "; units must be >= 0");
    }
    max_unit = std::max(max_unit, s.unit);
  }

  // Find a missing unit id from the sorted distinct ids, before sizing anything by max_unit: a stray unit id
  // of 2^31 - 1 must be an error, not a 2^31-entry allocation.
  std::vector<int> unit_ids;
  unit_ids.reserve(specs.size());
  for (const ParamSpec& s : specs) unit_ids.push_back(s.unit);
  std::sort(unit_ids.begin(), unit_ids.end());
  unit_ids.erase(std::unique(unit_ids.begin(), unit_ids.end()), unit_ids.end());
  for (size_t u = 0; u < unit_ids.size(); ++u) {
    if (unit_ids[u] != static_cast<int>(u)) {
      return Status::InvalidArgument("unit " + std::to_string(u) + " has no parameters but unit " +
                                     std::to_string(max_unit) + " does; unit ids must be 0.." +
                                     std::to_string(max_unit) + " with every id used, so renumber the units");
    }
  }

  PartitionPlan out;
  out.world_size = world_size;
  out.bucket_elements = bucket_elements;
  out.units.resize(static_cast<size_t>(max_unit) + 1);
  out.params.resize(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) out.units[specs[i].unit].params.push_back(static_cast<int>(i));

  int64_t trainable_offset = 0, trainable_shard_offset = 0, frozen_offset = 0, frozen_shard_offset = 0;
  for (size_t u = 0; u < out.units.size(); ++u) {
    UnitPlan& unit = out.units[u];
    std::vector<int> trainable, frozen;
    for (int p : unit.params) (specs[p].trainable ? trainable : frozen).push_back(p);
    ZERO_RETURN_IF_ERROR(LayOutSet(trainable, numels, static_cast<int>(u), true, &out, &unit.trainable_buckets,
                                   &trainable_offset, &trainable_shard_offset));
    ZERO_RETURN_IF_ERROR(LayOutSet(frozen, numels, static_cast<int>(u), false, &out, &unit.frozen_buckets,
                                   &frozen_offset, &frozen_shard_offset));
    for (int b : unit.trainable_buckets) unit.trainable_padded += out.buckets[b].padded;
    for (int b : unit.frozen_buckets) unit.frozen_padded += out.buckets[b].padded;
  }
  out.trainable_padded = trainable_offset;
  out.frozen_padded = frozen_offset;
  out.trainable_shard = trainable_shard_offset;
  out.frozen_shard = frozen_shard_offset;

  // Everything else in the plan (shards, offsets, fragments, totals) is derived from these inputs.
  Fnv1a h;
  h.Add(world_size);
  h.Add(bucket_elements);
  h.Add(static_cast<int64_t>(out.buckets.size()));
  for (const Bucket& b : out.buckets) {
    h.Add(b.unit);
    h.Add(b.trainable ? 1 : 0);
    h.Add(b.used);
    h.Add(b.padded);
    h.Add(static_cast<int64_t>(b.params.size()));
    for (const ParamPlacement& pp : b.params) {
      h.Add(pp.param);
      h.Add(pp.offset);
      h.Add(pp.numel);
    }
  }
  out.hash = h.value() & ((uint64_t{1} << 52) - 1);

  *plan = std::move(out);
  return Status::Ok();
}

}  // namespace zero

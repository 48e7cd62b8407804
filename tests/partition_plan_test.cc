// PartitionPlan: hand-computed layouts, an exhaustive sweep of small spec lists × world sizes × bucket sizes
// checked against the layout rules of partition_plan.h, hash behaviour, and every validation error.
//
// CheckPlan() restates the header's rules independently of the implementation (tight packing, greedy bucket
// closing, padding, ownership by arithmetic), so together they pin the layout exactly rather than just
// "some valid layout". A mutation test proves CheckPlan can fail.
#include "partition_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace zero {
namespace {

constexpr int64_t kHuge = std::numeric_limits<int64_t>::max();

ParamSpec Spec(std::string name, std::vector<int64_t> shape, int unit = 0, bool trainable = true) {
  ParamSpec s;
  s.name = std::move(name);
  s.shape = std::move(shape);
  s.unit = unit;
  s.trainable = trainable;
  return s;
}

// Specs named p0, p1, ... with 1-D shapes of the given sizes, all in unit 0, trainable.
std::vector<ParamSpec> Sized(const std::vector<int64_t>& sizes) {
  std::vector<ParamSpec> specs;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string name = "p";  // not "p" + to_string(i): GCC 12 warns falsely (-Wrestrict, PR 105329)
    name += std::to_string(i);
    specs.push_back(Spec(std::move(name), {sizes[i]}));
  }
  return specs;
}

PartitionPlan MustBuild(const std::vector<ParamSpec>& specs, int world, int64_t bucket_elements) {
  PartitionPlan plan;
  Status s = PartitionPlan::Build(specs, world, bucket_elements, &plan);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return plan;
}

int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

int64_t Numel(const ParamSpec& s) {
  int64_t n = 1;
  for (int64_t d : s.shape) n *= d;
  return n;
}

// Checks every rule of partition_plan.h; returns "" or a description of the first violation.
std::string CheckPlan(const std::vector<ParamSpec>& specs, int world, int64_t be, const PartitionPlan& plan) {
  std::ostringstream err;
  auto fail = [&](const std::string& what) {
    err << what;
    return err.str();
  };
  const int64_t quantum = kShardAlign * world;
  const int n = static_cast<int>(specs.size());
  if (plan.world_size != world || plan.bucket_elements != be) return fail("inputs not echoed");
  if (plan.hash >= (uint64_t{1} << 52)) return fail("hash wider than 52 bits");

  int max_unit = 0;
  for (const ParamSpec& s : specs) max_unit = std::max(max_unit, s.unit);
  if (plan.units.size() != static_cast<size_t>(max_unit) + 1) return fail("units.size() != max unit + 1");
  if (plan.params.size() != specs.size()) return fail("params.size() != specs.size()");

  // Plan order: (unit, frozen) never decreases; indices are positions.
  for (size_t i = 0; i < plan.buckets.size(); ++i) {
    const Bucket& b = plan.buckets[i];
    if (b.index != static_cast<int>(i))
      return fail("bucket " + std::to_string(i) + " has index " + std::to_string(b.index));
    if (i > 0) {
      const Bucket& a = plan.buckets[i - 1];
      if (std::make_pair(a.unit, !a.trainable) > std::make_pair(b.unit, !b.trainable)) {
        return fail("bucket " + std::to_string(i) + " out of plan order");
      }
    }
  }

  std::vector<int> placed(n, 0);
  int64_t set_offset[2] = {0, 0}, set_shard_offset[2] = {0, 0};  // [trainable ? 0 : 1]
  for (int u = 0; u <= max_unit; ++u) {
    const UnitPlan& unit = plan.units[u];
    std::vector<int> expect_params;
    for (int p = 0; p < n; ++p) {
      if (specs[p].unit == u) expect_params.push_back(p);
    }
    if (unit.params != expect_params) return fail("unit " + std::to_string(u) + " params differ from spec order");

    for (bool trainable : {true, false}) {
      const std::vector<int>& ids = trainable ? unit.trainable_buckets : unit.frozen_buckets;
      const int set = trainable ? 0 : 1;
      const std::string where = "unit " + std::to_string(u) + (trainable ? " trainable" : " frozen");
      std::vector<int> set_params;  // spec order
      for (int p : expect_params) {
        if (specs[p].trainable == trainable) set_params.push_back(p);
      }
      if (set_params.empty() != ids.empty()) return fail(where + ": has buckets iff it has params violated");
      std::vector<int> seen_params;
      int64_t padded_sum = 0;
      bool set_has_elements = false;
      for (int p : set_params) set_has_elements |= Numel(specs[p]) > 0;
      for (size_t k = 0; k < ids.size(); ++k) {
        if (ids[k] < 0 || ids[k] >= static_cast<int>(plan.buckets.size())) return fail(where + ": bad bucket id");
        // A set's buckets are consecutive in plan order.
        if (k > 0 && ids[k] != ids[k - 1] + 1) return fail(where + ": buckets not consecutive");
        const Bucket& b = plan.buckets[ids[k]];
        const std::string bw = where + " bucket " + std::to_string(b.index);
        if (b.unit != u || b.trainable != trainable) return fail(bw + ": wrong unit or set");
        if (b.params.empty()) return fail(bw + ": no params");

        // Tight packing: each non-empty param at the first kParamAlign boundary after the previous one's end;
        // an empty param at the boundary after the elements so far, taking no space.
        int64_t end = 0;
        int nonempty = 0;
        for (const ParamPlacement& pp : b.params) {
          if (pp.param < 0 || pp.param >= n) return fail(bw + ": bad param index");
          seen_params.push_back(pp.param);
          ++placed[pp.param];
          if (pp.numel != Numel(specs[pp.param]))
            return fail(bw + ": numel mismatch for param " + std::to_string(pp.param));
          if (pp.offset % kParamAlign != 0) return fail(bw + ": param offset not aligned");
          if (pp.offset != AlignUp(end, kParamAlign))
            return fail(bw + ": param " + std::to_string(pp.param) + " not tightly packed");
          if (pp.numel > 0) {
            end = pp.offset + pp.numel;
            ++nonempty;
          }
          if (plan.params[pp.param].bucket != b.index || plan.params[pp.param].offset != pp.offset) {
            return fail(bw + ": ParamLocation of " + std::to_string(pp.param) + " disagrees");
          }
        }
        if (b.used != end) return fail(bw + ": used != end of last param");
        if (b.used > be && nonempty != 1) return fail(bw + ": exceeds bucket_elements with several params");
        // Greedy closing: a later bucket starts with a non-empty param that did not fit in the previous one.
        if (k > 0) {
          const Bucket& prev = plan.buckets[ids[k - 1]];
          const ParamPlacement& first = b.params.front();
          if (first.numel == 0) return fail(bw + ": opened by an empty param");
          if (AlignUp(prev.used, kParamAlign) + first.numel <= be) return fail(bw + ": opened although the param fit");
        }
        if (b.used == 0 && set_has_elements) return fail(bw + ": empty bucket in a set with elements");

        // Padding: smallest multiple of kShardAlign * world holding used, at least one quantum.
        if (b.padded % quantum != 0) return fail(bw + ": padded not a multiple of kShardAlign * world");
        if (b.padded != std::max(AlignUp(b.used, quantum), quantum)) return fail(bw + ": padded not minimal");
        if (b.shard * world != b.padded || b.shard % kShardAlign != 0) return fail(bw + ": bad shard");
        if (b.offset != set_offset[set] || b.shard_offset != set_shard_offset[set])
          return fail(bw + ": offsets not running sums");
        set_offset[set] += b.padded;
        set_shard_offset[set] += b.shard;
        padded_sum += b.padded;

        // Ownership: owner[i] is the param at bucket element i, -1 for padding (gaps and tail).
        std::vector<int> owner(b.padded, -1);
        std::vector<int64_t> param_pos(b.padded, -1);
        for (const ParamPlacement& pp : b.params) {
          if (pp.offset + pp.numel > b.padded) return fail(bw + ": param beyond padded");
          for (int64_t i = 0; i < pp.numel; ++i) {
            if (owner[pp.offset + i] != -1) return fail(bw + ": params overlap");
            owner[pp.offset + i] = pp.param;
            param_pos[pp.offset + i] = i;
          }
        }
        std::vector<int> covered(b.padded, 0);
        if (b.fragments.size() != static_cast<size_t>(world)) return fail(bw + ": fragments.size() != world");
        for (int r = 0; r < world; ++r) {
          int64_t last_end = 0;
          for (const Fragment& f : b.fragments[r]) {
            const std::string fw = bw + " rank " + std::to_string(r) + " fragment of param " + std::to_string(f.param);
            if (f.count <= 0) return fail(fw + ": empty fragment");
            if (f.shard_off < last_end) return fail(fw + ": not ordered by shard_off or overlapping");
            last_end = f.shard_off + f.count;
            if (f.shard_off < 0 || last_end > b.shard) return fail(fw + ": outside the shard");
            for (int64_t i = 0; i < f.count; ++i) {
              const int64_t pos = r * b.shard + f.shard_off + i;
              if (owner[pos] == -1) return fail(fw + ": covers padding");
              if (owner[pos] != f.param || param_pos[pos] != f.param_off + i)
                return fail(fw + ": maps to the wrong element");
              ++covered[pos];
            }
          }
        }
        for (int64_t i = 0; i < b.padded; ++i) {
          if (owner[i] != -1 && covered[i] != 1) {
            return fail(bw + ": element " + std::to_string(param_pos[i]) + " of param " + std::to_string(owner[i]) +
                        " covered " + std::to_string(covered[i]) + " times");
          }
        }
      }
      if (seen_params != set_params) return fail(where + ": params not in spec order across buckets");
      if ((trainable ? unit.trainable_padded : unit.frozen_padded) != padded_sum) return fail(where + ": padded total");
    }
  }
  for (int p = 0; p < n; ++p) {
    if (placed[p] != 1) return fail("param " + std::to_string(p) + " placed " + std::to_string(placed[p]) + " times");
  }
  if (plan.trainable_padded != set_offset[0] || plan.frozen_padded != set_offset[1]) return fail("padded totals");
  if (plan.trainable_shard != set_shard_offset[0] || plan.frozen_shard != set_shard_offset[1])
    return fail("shard totals");
  if (plan.trainable_shard * world != plan.trainable_padded || plan.frozen_shard * world != plan.frozen_padded) {
    return fail("totals: shard * world != padded");
  }
  return "";
}

// splitmix64: deterministic across platforms, unlike std distributions.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int64_t Uniform(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(Next() % static_cast<uint64_t>(hi - lo + 1));
  }

 private:
  uint64_t s_;
};

// A shape of `size` elements: 1-D, a scalar for 1, or 2-D when size factors; sizes of 0 get a zero dim.
std::vector<int64_t> ShapeOf(int64_t size, Rng* rng) {
  if (size == 0) return rng->Uniform(0, 1) ? std::vector<int64_t>{0} : std::vector<int64_t>{3, 0};
  if (size == 1 && rng->Uniform(0, 1)) return {};
  for (int64_t d : {3, 4, 5, 7}) {
    if (size % d == 0 && rng->Uniform(0, 1)) return {size / d, d};
  }
  return {size};
}

// Small spec lists: 1-7 params, sizes 0..300 biased towards edges of kParamAlign / kShardAlign, 1-4 dense units
// (in any spec order), trainable/frozen mixes.
std::vector<ParamSpec> RandomSpecs(Rng* rng) {
  static const int64_t kEdges[] = {0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 191, 192, 300};
  const int n = static_cast<int>(rng->Uniform(1, 7));
  const int units = static_cast<int>(rng->Uniform(1, std::min(n, 4)));
  const int frozen_mode = static_cast<int>(rng->Uniform(0, 3));  // 0 all trainable, 1 all frozen, 2-3 mixed
  std::vector<int> unit_of(n);
  for (int i = 0; i < n; ++i) unit_of[i] = i < units ? i : static_cast<int>(rng->Uniform(0, units - 1));
  for (int i = n - 1; i > 0; --i) std::swap(unit_of[i], unit_of[rng->Uniform(0, i)]);  // every unit used
  std::vector<ParamSpec> specs;
  for (int i = 0; i < n; ++i) {
    const int64_t size =
        rng->Uniform(0, 2) == 0 ? kEdges[rng->Uniform(0, std::size(kEdges) - 1)] : rng->Uniform(0, 300);
    const bool trainable = frozen_mode == 0 || (frozen_mode >= 2 && rng->Uniform(0, 1));
    specs.push_back(Spec("layer" + std::to_string(i) + ".w", ShapeOf(size, rng), unit_of[i], trainable));
  }
  return specs;
}

const int64_t kBucketSizes[] = {1, 7, 64, 100, 1000, kHuge};

std::string Describe(const std::vector<ParamSpec>& specs, int world, int64_t be) {
  std::ostringstream os;
  os << "world " << world << " bucket_elements " << be << " specs:";
  for (const ParamSpec& s : specs)
    os << " [" << s.name << " numel " << Numel(s) << " unit " << s.unit << (s.trainable ? " T]" : " F]");
  return os.str();
}

// ---------------------------------------------------------------------------------------------------------------
// Hand-computed layouts.

TEST(PartitionPlanTest, TwoParamsOneBucket) {
  const std::vector<ParamSpec> specs = Sized({10, 3});
  PartitionPlan plan = MustBuild(specs, 2, kHuge);
  EXPECT_EQ(CheckPlan(specs, 2, kHuge, plan), "");
  ASSERT_EQ(plan.buckets.size(), 1u);
  const Bucket& b = plan.buckets[0];
  EXPECT_EQ(b.params[0].offset, 0);
  EXPECT_EQ(b.params[1].offset, 16);  // 10 rounded up to kParamAlign
  EXPECT_EQ(b.used, 19);
  EXPECT_EQ(b.padded, 128);  // kShardAlign * 2
  EXPECT_EQ(b.shard, 64);
  EXPECT_EQ(plan.params[1].bucket, 0);
  EXPECT_EQ(plan.params[1].offset, 16);
  // Rank 0 owns both params whole; rank 1 owns only padding.
  ASSERT_EQ(b.fragments[0].size(), 2u);
  EXPECT_EQ(b.fragments[0][0].param, 0);
  EXPECT_EQ(b.fragments[0][0].count, 10);
  EXPECT_EQ(b.fragments[0][1].param, 1);
  EXPECT_EQ(b.fragments[0][1].shard_off, 16);
  EXPECT_EQ(b.fragments[0][1].count, 3);
  EXPECT_TRUE(b.fragments[1].empty());
  EXPECT_EQ(plan.trainable_padded, 128);
  EXPECT_EQ(plan.trainable_shard, 64);
  EXPECT_EQ(plan.frozen_padded, 0);
  EXPECT_EQ(plan.frozen_shard, 0);
}

TEST(PartitionPlanTest, ParamStraddlesShards) {
  PartitionPlan plan = MustBuild(Sized({100}), 2, kHuge);
  const Bucket& b = plan.buckets.at(0);
  EXPECT_EQ(b.padded, 128);
  ASSERT_EQ(b.fragments[0].size(), 1u);
  ASSERT_EQ(b.fragments[1].size(), 1u);
  EXPECT_EQ(b.fragments[0][0].param_off, 0);
  EXPECT_EQ(b.fragments[0][0].count, 64);
  EXPECT_EQ(b.fragments[1][0].param_off, 64);
  EXPECT_EQ(b.fragments[1][0].shard_off, 0);
  EXPECT_EQ(b.fragments[1][0].count, 36);
}

TEST(PartitionPlanTest, BucketClosesOnlyWhenUsedWouldExceed) {
  // 8 + 8 = 16 fits exactly; 8 + 9 = 17 does not.
  EXPECT_EQ(MustBuild(Sized({8, 8}), 1, 16).buckets.size(), 1u);
  EXPECT_EQ(MustBuild(Sized({8, 9}), 1, 16).buckets.size(), 2u);
  // The alignment gap counts: 10 -> next at 16, 16 + 3 = 19 > 16; then 3 -> next at 8, 8 + 5 = 13 <= 16.
  PartitionPlan plan = MustBuild(Sized({10, 3, 5}), 1, 16);
  ASSERT_EQ(plan.buckets.size(), 2u);
  EXPECT_EQ(plan.buckets[0].used, 10);
  ASSERT_EQ(plan.buckets[1].params.size(), 2u);
  EXPECT_EQ(plan.buckets[1].params[1].offset, 8);
  EXPECT_EQ(plan.buckets[1].used, 13);
  EXPECT_EQ(plan.buckets[1].offset, 64);
}

TEST(PartitionPlanTest, OversizedParamGetsItsOwnBucket) {
  PartitionPlan plan = MustBuild(Sized({4, 30, 4}), 1, 10);
  ASSERT_EQ(plan.buckets.size(), 3u);
  EXPECT_EQ(plan.buckets[1].params.size(), 1u);
  EXPECT_EQ(plan.buckets[1].params[0].offset, 0);
  EXPECT_EQ(plan.buckets[1].used, 30);
  EXPECT_EQ(plan.params[2].bucket, 2);
  EXPECT_EQ(plan.params[2].offset, 0);
}

TEST(PartitionPlanTest, UnitsAndFrozenSets) {
  // a(u0 T 10), b(u1 F 5), c(u0 F 3), d(u1 T 200), e(u0 T 7); bucket 64; world 3 -> quantum 192.
  const std::vector<ParamSpec> specs = {Spec("a", {10}, 0, true), Spec("b", {5}, 1, false), Spec("c", {3}, 0, false),
                                        Spec("d", {20, 10}, 1, true), Spec("e", {7}, 0, true)};
  PartitionPlan plan = MustBuild(specs, 3, 64);
  EXPECT_EQ(CheckPlan(specs, 3, 64, plan), "");
  ASSERT_EQ(plan.buckets.size(), 4u);
  const Bucket& b0 = plan.buckets[0];  // unit 0 trainable: a@0, e@16
  EXPECT_TRUE(b0.unit == 0 && b0.trainable);
  EXPECT_EQ(b0.params[1].param, 4);
  EXPECT_EQ(b0.params[1].offset, 16);
  EXPECT_EQ(b0.used, 23);
  EXPECT_EQ(b0.padded, 192);
  const Bucket& b1 = plan.buckets[1];  // unit 0 frozen: c
  EXPECT_TRUE(b1.unit == 0 && !b1.trainable);
  EXPECT_EQ(b1.offset, 0);
  const Bucket& b2 = plan.buckets[2];  // unit 1 trainable: d, larger than the bucket
  EXPECT_TRUE(b2.unit == 1 && b2.trainable);
  EXPECT_EQ(b2.padded, 384);
  EXPECT_EQ(b2.shard, 128);
  EXPECT_EQ(b2.offset, 192);
  EXPECT_EQ(b2.shard_offset, 64);
  ASSERT_EQ(b2.fragments[1].size(), 1u);
  EXPECT_EQ(b2.fragments[1][0].param_off, 128);
  EXPECT_EQ(b2.fragments[1][0].count, 72);
  EXPECT_TRUE(b2.fragments[2].empty());
  const Bucket& b3 = plan.buckets[3];  // unit 1 frozen: b
  EXPECT_TRUE(b3.unit == 1 && !b3.trainable);
  EXPECT_EQ(b3.offset, 192);
  EXPECT_EQ(b3.shard_offset, 64);
  EXPECT_EQ(plan.trainable_padded, 576);
  EXPECT_EQ(plan.trainable_shard, 192);
  EXPECT_EQ(plan.frozen_padded, 384);
  EXPECT_EQ(plan.frozen_shard, 128);
  EXPECT_EQ(plan.units[0].params, (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(plan.units[1].params, (std::vector<int>{1, 3}));
  EXPECT_EQ(plan.units[0].trainable_buckets, std::vector<int>{0});
  EXPECT_EQ(plan.units[1].frozen_buckets, std::vector<int>{3});
  EXPECT_EQ(plan.units[1].trainable_padded, 384);
  EXPECT_EQ(plan.units[1].frozen_padded, 192);
}

TEST(PartitionPlanTest, EmptyParamTakesNoSpace) {
  // An empty param sits at the next aligned offset without moving `used`; the next param starts there too.
  const std::vector<ParamSpec> specs = {Spec("a", {5}), Spec("empty", {4, 0}), Spec("b", {3})};
  PartitionPlan plan = MustBuild(specs, 1, kHuge);
  ASSERT_EQ(plan.buckets.size(), 1u);
  EXPECT_EQ(plan.buckets[0].params[1].offset, 8);
  EXPECT_EQ(plan.buckets[0].params[1].numel, 0);
  EXPECT_EQ(plan.buckets[0].params[2].offset, 8);
  EXPECT_EQ(plan.buckets[0].used, 11);
  EXPECT_EQ(plan.params[1].bucket, 0);
  for (const Fragment& f : plan.buckets[0].fragments[0]) EXPECT_NE(f.param, 1);

  // An empty param after a full bucket joins it rather than opening a new one.
  PartitionPlan full = MustBuild({Spec("a", {8}), Spec("empty", {0})}, 1, 8);
  ASSERT_EQ(full.buckets.size(), 1u);
  EXPECT_EQ(full.buckets[0].params[1].offset, 8);
  EXPECT_EQ(full.buckets[0].used, 8);
}

TEST(PartitionPlanTest, SetOfOnlyEmptyParamsGetsOneMinimalBucket) {
  // The frozen set holds only an empty param: one bucket, used 0, still one quantum so shards are non-empty.
  const std::vector<ParamSpec> specs = {Spec("w", {3}), Spec("empty", {0, kHuge}, 0, false)};
  PartitionPlan plan = MustBuild(specs, 4, kHuge);
  EXPECT_EQ(CheckPlan(specs, 4, kHuge, plan), "");
  ASSERT_EQ(plan.buckets.size(), 2u);
  EXPECT_EQ(plan.buckets[1].used, 0);
  EXPECT_EQ(plan.buckets[1].padded, 256);
  EXPECT_EQ(plan.frozen_shard, 64);
  for (const auto& frags : plan.buckets[1].fragments) EXPECT_TRUE(frags.empty());
  EXPECT_EQ(plan.params[1].bucket, 1);
}

TEST(PartitionPlanTest, LargestAcceptedParam) {
  // 2^62 elements is the limit; layout is arithmetic, so this is cheap.
  PartitionPlan plan = MustBuild({Spec("big", {int64_t{1} << 31, int64_t{1} << 31})}, 1, 1 << 20);
  EXPECT_EQ(plan.buckets.at(0).padded, int64_t{1} << 62);
  EXPECT_EQ(plan.buckets[0].fragments[0].at(0).count, int64_t{1} << 62);
}

// ---------------------------------------------------------------------------------------------------------------
// Exhaustive sweep.

TEST(PartitionPlanTest, SweepSatisfiesEveryRule) {
  Rng rng(20240531);
  int plans = 0, failures = 0;
  // How often the sweep hits the cases that are easy to get wrong; each must be exercised, or the sweep
  // proves little.
  int shared_buckets = 0, oversized = 0, split_params = 0, empty_params = 0, empty_buckets = 0, mixed_sets = 0;
  for (int list = 0; list < 500 && failures < 5; ++list) {
    const std::vector<ParamSpec> specs = RandomSpecs(&rng);
    for (int world = 1; world <= 8; ++world) {
      for (int64_t be : kBucketSizes) {
        PartitionPlan plan;
        Status s = PartitionPlan::Build(specs, world, be, &plan);
        ASSERT_TRUE(s.ok()) << s.ToString() << "\n" << Describe(specs, world, be);
        const std::string violation = CheckPlan(specs, world, be, plan);
        EXPECT_EQ(violation, "") << Describe(specs, world, be);
        failures += !violation.empty();
        ++plans;

        mixed_sets += plan.trainable_padded > 0 && plan.frozen_padded > 0;
        for (const Bucket& b : plan.buckets) {
          shared_buckets += b.params.size() > 1 && b.used > 0;
          oversized += b.used > be;
          empty_buckets += b.used == 0;
          for (const ParamPlacement& pp : b.params) empty_params += pp.numel == 0;
          std::vector<int> ranks_holding(specs.size(), 0);
          for (const auto& frags : b.fragments) {
            for (const Fragment& f : frags) ++ranks_holding[f.param];
          }
          for (int n : ranks_holding) split_params += n > 1;
        }
      }
    }
  }
  EXPECT_EQ(plans, 500 * 8 * 6);
  EXPECT_GT(shared_buckets, 0);
  EXPECT_GT(oversized, 0);
  EXPECT_GT(split_params, 0);
  EXPECT_GT(empty_params, 0);
  EXPECT_GT(empty_buckets, 0);
  EXPECT_GT(mixed_sets, 0);
  std::printf(
      "plans %d: shared buckets %d, oversized %d, split params %d, empty params %d, empty buckets %d, "
      "plans with both sets %d\n",
      plans, shared_buckets, oversized, split_params, empty_params, empty_buckets, mixed_sets);
}

// The checker must be able to fail: each mutation of a valid plan breaks one rule.
TEST(PartitionPlanTest, CheckerRejectsBrokenPlans) {
  const std::vector<ParamSpec> specs = {Spec("a", {100}), Spec("b", {30}), Spec("c", {9}, 0, false), Spec("d", {5}, 1)};
  const int world = 3;
  const int64_t be = 64;
  const PartitionPlan good = MustBuild(specs, world, be);
  ASSERT_EQ(CheckPlan(specs, world, be, good), "");
  ASSERT_GE(good.buckets.size(), 3u);
  ASSERT_FALSE(good.buckets[0].fragments[0].empty());

  std::vector<std::pair<std::string, void (*)(PartitionPlan*)>> mutations = {
      {"shifted fragment", [](PartitionPlan* p) { p->buckets[0].fragments[0][0].shard_off += 1; }},
      {"shortened fragment", [](PartitionPlan* p) { p->buckets[0].fragments[0][0].count -= 1; }},
      {"dropped fragment", [](PartitionPlan* p) { p->buckets[0].fragments[0].pop_back(); }},
      {"duplicated fragment", [](PartitionPlan* p) { p->buckets[0].fragments[1] = p->buckets[0].fragments[0]; }},
      {"over-padded",
       [](PartitionPlan* p) {
         p->buckets[0].padded += kShardAlign * 3;
         p->buckets[0].shard += kShardAlign;
       }},
      {"unaligned offset", [](PartitionPlan* p) { p->buckets[1].params.back().offset += 1; }},
      {"wrong used", [](PartitionPlan* p) { p->buckets[0].used += 1; }},
      {"wrong running offset", [](PartitionPlan* p) { p->buckets[1].offset += 1; }},
      {"wrong total", [](PartitionPlan* p) { p->trainable_shard += 1; }},
      {"wrong location", [](PartitionPlan* p) { p->params[0].offset = 8; }},
      {"swapped buckets", [](PartitionPlan* p) { std::swap(p->buckets[0], p->buckets[1]); }},
      {"wrong unit", [](PartitionPlan* p) { p->buckets.back().unit = 0; }},
      {"hash too wide", [](PartitionPlan* p) { p->hash |= uint64_t{1} << 60; }},
  };
  for (const auto& [name, mutate] : mutations) {
    PartitionPlan bad = good;
    mutate(&bad);
    EXPECT_NE(CheckPlan(specs, world, be, bad), "") << name << " went unnoticed";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Hash.

TEST(PartitionPlanTest, HashIsDeterministicAndSensitive) {
  Rng rng(7);
  for (int list = 0; list < 200; ++list) {
    std::vector<ParamSpec> specs = RandomSpecs(&rng);
    const int64_t be = kBucketSizes[list % std::size(kBucketSizes)];
    std::vector<uint64_t> by_world;
    for (int world = 1; world <= 8; ++world) {
      const PartitionPlan a = MustBuild(specs, world, be);
      const std::vector<ParamSpec> copy = specs;
      const PartitionPlan b = MustBuild(copy, world, be);
      EXPECT_EQ(a.hash, b.hash);
      EXPECT_EQ(static_cast<uint64_t>(static_cast<double>(a.hash)), a.hash);  // exact in fp64
      for (uint64_t h : by_world) EXPECT_NE(h, a.hash) << "world " << world << " collides";
      by_world.push_back(a.hash);
    }
    const uint64_t base = MustBuild(specs, 2, be).hash;
    EXPECT_NE(MustBuild(specs, 2, be == kHuge ? 1000 : be + 1).hash, base);
    std::vector<ParamSpec> grown = specs;
    const size_t i = list % specs.size();
    grown[i].shape = {Numel(specs[i]) + 1};
    EXPECT_NE(MustBuild(grown, 2, be).hash, base) << "size change of param " << i;
    std::vector<ParamSpec> flipped = specs;
    flipped[i].trainable = !flipped[i].trainable;
    EXPECT_NE(MustBuild(flipped, 2, be).hash, base) << "trainable flip of param " << i;
  }
}

TEST(PartitionPlanTest, HashCoversLayoutOnly) {
  // Names, shapes with equal numel and lr/wd multipliers don't change the layout, so they don't change the hash;
  // rank divergence in those must be caught by whoever hashes the specs themselves.
  std::vector<ParamSpec> specs = {Spec("a", {6, 4}), Spec("b", {5})};
  const uint64_t base = MustBuild(specs, 2, 64).hash;
  specs[0].name = "renamed";
  specs[0].shape = {24};
  specs[1].lr_mult = 0.5f;
  specs[1].wd_mult = 0.0f;
  EXPECT_EQ(MustBuild(specs, 2, 64).hash, base);
}

// ---------------------------------------------------------------------------------------------------------------
// Validation.

// Builds and expects InvalidArgument whose message contains every fragment in `needles`; the output plan must be
// left as it was.
void ExpectInvalid(const std::vector<ParamSpec>& specs, int world, int64_t be,
                   const std::vector<std::string>& needles) {
  PartitionPlan plan;
  plan.hash = 12345;
  Status s = PartitionPlan::Build(specs, world, be, &plan);
  ASSERT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  for (const std::string& n : needles)
    EXPECT_NE(s.message().find(n), std::string::npos) << s.message() << " lacks '" << n << "'";
  EXPECT_EQ(plan.hash, 12345u);
  EXPECT_TRUE(plan.buckets.empty());
}

TEST(PartitionPlanTest, RejectsBadArguments) {
  const std::vector<ParamSpec> ok = {Spec("w", {4})};
  ExpectInvalid({}, 1, 64, {"no parameters"});
  ExpectInvalid(ok, 0, 64, {"world size", "0", ">= 1"});
  ExpectInvalid(ok, -3, 64, {"world size", "-3"});
  ExpectInvalid(ok, 1, 0, {"bucket_elements", ">= 1"});
  ExpectInvalid(ok, 1, -5, {"bucket_elements", "-5"});
  EXPECT_EQ(PartitionPlan::Build(ok, 1, 64, nullptr).code(), StatusCode::kInvalidArgument);
}

TEST(PartitionPlanTest, RejectsBadSpecs) {
  ExpectInvalid({Spec("a", {4}), Spec("", {4})}, 1, 64, {"parameter 1", "empty name"});
  ExpectInvalid({Spec("a", {4}), Spec("b", {2}), Spec("a", {3})}, 1, 64,
                {"parameter 2 ('a')", "parameter 0", "unique"});
  ExpectInvalid({Spec("a", {4}), Spec("neg", {3, -2})}, 1, 64, {"parameter 1 ('neg')", "dimension 1", "-2", ">= 0"});
  // A negative dim is an error even next to a zero dim.
  ExpectInvalid({Spec("z", {0, -1})}, 1, 64, {"parameter 0 ('z')", "-1"});
  ExpectInvalid({Spec("a", {4}), Spec("u", {4}, -1)}, 1, 64, {"parameter 1 ('u')", "unit -1", ">= 0"});
  ExpectInvalid({Spec("a", {4}, 0), Spec("b", {4}, 2)}, 1, 64, {"unit 1 has no parameters", "0..2", "renumber"});
  ExpectInvalid({Spec("a", {4}, 1)}, 1, 64, {"unit 0 has no parameters"});
  // A stray huge unit id is a gap like any other (and must not size anything by it).
  ExpectInvalid({Spec("a", {4}, 0), Spec("b", {4}, std::numeric_limits<int>::max())}, 1, 64,
                {"unit 1 has no parameters"});
  ExpectInvalid({Spec("huge", {(int64_t{1} << 62) + 1})}, 1, 64, {"parameter 0 ('huge')", "2^62"});
  ExpectInvalid({Spec("a", {4}), Spec("huge", {int64_t{1} << 32, int64_t{1} << 32})}, 1, 64,
                {"parameter 1 ('huge')", "2^62"});
  ExpectInvalid({Spec("huge", {kHuge, kHuge, 2})}, 1, 64, {"parameter 0 ('huge')", "2^62"});
  // Each param fits, their padded total does not.
  const int64_t q = int64_t{1} << 61;
  ExpectInvalid({Spec("a", {q}), Spec("b", {q}), Spec("c", {q})}, 1, 64, {"trainable", "2^62"});
}

}  // namespace
}  // namespace zero

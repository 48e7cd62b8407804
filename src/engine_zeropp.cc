// Engine: ZeRO++'s hooks (Options::zeropp). hpZ and qwZ shape stage 3's Acquire gathers (GatherSlotUnit, called
// by GatherInto); qgZ replaces the gradient reduce-scatter of stages 1-3 (ReduceBucket calls the HierarchicalComm).
// The collectives themselves are src/comm_hierarchical.h's; the buffers are BufferPlan's.
//
// hpZ's secondary partition. Bucket b of a non-persistent unit has a piece of padded_b / L elements per rank of a
// node (L ranks, local index l: elements [l * padded_b / L, (l + 1) * padded_b / L) of the bucket's layout). A gather
// from the primary shards (across nodes) is followed, in the same task on the communication stream, by the copy of
// this rank's piece out of the gathered unit, and the unit's hpz_epoch is set to params_epoch. Until the parameters
// change (params_epoch moves at InitParams and Step), the unit's gathers are all-gathers of the pieces over the
// node's Comm. Every decision depends only on the sequence of engine calls, so every rank makes the same
// collectives; the pieces hold what the primary gather gave (dequantized, with qwZ), so forward and backward compute
// with the same values.
//
// Traffic, stage 3, per micro-step (nothing frozen or persistent, M = 1, Ψ padded elements, N ranks on n nodes of L,
// rings in rank order with each node's ranks consecutive; Pq(c, bits) = kernels::QuantPayloadBytes(c, bits), s_b a
// bucket's shard, p and g the parameter and gradient bytes). Bytes a node sends to other nodes:
//   forward gather   (N - 1) / N · Ψ · p, or with qwZ (N - 1) · Σ_b Pq(s_b, 8)
//   backward gather  the same, or 0 with hpZ
//   reduce-scatter   (N - 1) / N · Ψ · g, or with qgZ L · (n - 1) · Σ_b Pq(s_b, bits)
// engine_zeropp_test checks the counted bytes against these, and bench/zeropp_bench.cc reports them.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "comm_hierarchical.h"
#include "engine_impl.h"

namespace zero {

Status ValidateZeroPlusPlus(const Options& o) {
  const ZeroPlusPlusOptions& z = o.zeropp;
  auto bad = [](const std::string& why) { return Status::InvalidArgument("Options.zeropp: " + why); };
  if (z.qgz_bits != 0 && z.qgz_bits != 4 && z.qgz_bits != 8) {
    return bad("qgz_bits must be 0 (off), 4 or 8, not " + std::to_string(z.qgz_bits));
  }
  if (!z.hpz && !z.qwz && z.qgz_bits == 0) return Status::Ok();
  if (o.stage == Stage::kAuto) {
    return bad("ZeRO++ needs an explicit stage (Stage::kAuto may choose one without its collectives); choose "
               "Stage::kParameters for hpz and qwz, stages 1-3 for qgz_bits");
  }
  if ((z.hpz || z.qwz) && o.stage != Stage::kParameters) {
    return bad(std::string(z.hpz ? "hpz" : "qwz") + " shapes stage 3's parameter gathers, and the stage is " +
               StageName(o.stage) + "; use Stage::kParameters or turn it off");
  }
  if (z.qgz_bits != 0 && o.stage == Stage::kDataParallel) {
    return bad("qgz_bits quantizes the gradient reduce-scatter of stages 1-3; stage 0 all-reduces. Use stage 1, 2 or 3, "
               "or set qgz_bits = 0");
  }
  return Status::Ok();
}

Status Engine::Impl::OpenZeroPlusPlus(const BufferPlan& bp) {
  const ZeroPlusPlusOptions& z = options.zeropp;
  const bool split = z.hpz || z.qgz_bits > 0;
  // The node Comms exist only when something runs over them; qwZ alone gathers over the whole Comm.
  ZERO_RETURN_IF_ERROR(internal::HierarchicalComm::Create(comm, options.backend, threads, split, &hier)
                           .WithContext("Engine::Open (Options.zeropp) on rank " + std::to_string(rank)));
  hpz_offset = bp.hpz_offset;
  hpz_ranks = bp.hpz_ranks;
  hpz_epoch.assign(units.size(), 0);
  return Status::Ok();
}

void Engine::Impl::GatherSlotUnit(int unit, char* dst) {
  const ZeroPlusPlusOptions& z = options.zeropp;
  if (hier == nullptr || (!z.hpz && !z.qwz)) {
    GatherUnit(unit, dst);
    return;
  }
  const UnitPlan& up = plan.units[static_cast<size_t>(unit)];
  std::vector<int> all(up.trainable_buckets);
  all.insert(all.end(), up.frozen_buckets.begin(), up.frozen_buckets.end());
  std::string which = "bucket " + std::to_string(all.front());
  if (all.size() > 1) which = "buckets " + std::to_string(all.front()) + "-" + std::to_string(all.back());
  uint64_t& epoch = hpz_epoch[static_cast<size_t>(unit)];
  if (z.hpz && epoch == params_epoch) {
    LaunchSecondaryGathers(all, dst, "hpZ gather of " + which + " (" + UnitName(unit) + ") inside the node at " +
                                         Where());
  } else {
    const std::string what = "gather of " + which + " (" + UnitName(unit) + ") at " + Where();
    if (z.qwz) {
      LaunchQuantizedGathers(all, dst, "qwZ " + what);
    } else {
      LaunchGathers(all, dst, what);
    }
    if (z.hpz) {
      RefreshSecondary(all, dst);
      epoch = params_epoch;
    }
  }
  for (int bi : all) Log(Engine::Event::kGather, unit, bi);
}

void Engine::Impl::LaunchQuantizedGathers(const std::vector<int>& bucket_list, char* dst, const std::string& what) {
  // Shards on the NVMe tier (nvme_params) are first read into their place in the gathered layout, as LaunchGathers
  // does, and quantized from there (in place). Otherwise quantized straight from the shards, except where a kernel
  // quantizes and the shards are host memory (offload_params on CUDA): a kernel handed a pinned host pointer faults
  // wherever the registration is not mapped for the device or fell back to pageable memory, so the shard is first
  // copied into its place in the gathered layout, as LaunchGathers does (the dequantized gather overwrites it later,
  // in stream order). On the CPU, host memory is what the quantization reads anyway: nothing to copy.
  struct Copy {
    char* to;
    const char* from;
    int64_t bytes;
  };
  std::vector<Copy> copies;
  std::shared_ptr<NvmeGather> from_nvme = nvme_layout.params ? StartNvmeGather(bucket_list, dst) : nullptr;
  std::vector<Comm::GatherItem> items;
  for (int bi : bucket_list) {
    const Bucket& b = plan.buckets[static_cast<size_t>(bi)];
    char* out = PAt(dst, buckets[static_cast<size_t>(bi)].unit_offset);
    const char* src = from_nvme ? PAt(out, rank * b.shard) : ShardParamBase(b);
    if (offload_params && !from_nvme && !device->host_addressable()) {
      char* mine = PAt(out, rank * b.shard);
      copies.push_back({mine, src, b.shard * pe});
      src = mine;
    }
    items.push_back({src, out, b.shard});
  }
  internal::HierarchicalComm* h = hier.get();
  void* staging = qwz_staging.data();
  const DType dt = pdt;
  Device* dev = device.get();
  LaunchComm([=, this, what = what](void* stream) -> Status {
    if (from_nvme) ZERO_RETURN_IF_ERROR(FinishNvmeGather(*from_nvme, stream));
    for (const Copy& cp : copies) ZERO_RETURN_IF_ERROR(dev->Copy(cp.to, cp.from, cp.bytes, stream));
    CollectiveOptions co;
    co.what = what.c_str();
    co.stream = stream;
    return h->QuantizedAllGatherMany(items, dt, staging, co);
  });
  if (from_nvme) comm_stream->Record(nvme_gather_free[static_cast<size_t>(from_nvme->bounce)].get());
}

void Engine::Impl::RefreshSecondary(const std::vector<int>& bucket_list, const char* dst) {
  struct Piece {
    char* to;
    const char* from;
    int64_t bytes;
  };
  std::vector<Piece> pieces;
  const int local = hier->topology().local_rank;
  for (int bi : bucket_list) {
    const Bucket& b = plan.buckets[static_cast<size_t>(bi)];
    const int64_t len = b.padded / hpz_ranks;
    const char* from = dst + (buckets[static_cast<size_t>(bi)].unit_offset + local * len) * pe;
    pieces.push_back({PAt(hpz_secondary.as<char>(), hpz_offset[static_cast<size_t>(bi)]), from, len * pe});
  }
  Device* dev = device.get();
  LaunchComm([dev, pieces = std::move(pieces)](void* stream) -> Status {
    for (const Piece& p : pieces) ZERO_RETURN_IF_ERROR(dev->Copy(p.to, p.from, p.bytes, stream));
    return Status::Ok();
  });
}

void Engine::Impl::LaunchSecondaryGathers(const std::vector<int>& bucket_list, char* dst, const std::string& what) {
  std::vector<Comm::GatherItem> items;
  for (int bi : bucket_list) {
    const Bucket& b = plan.buckets[static_cast<size_t>(bi)];
    items.push_back({PAt(hpz_secondary.as<char>(), hpz_offset[static_cast<size_t>(bi)]),
                     PAt(dst, buckets[static_cast<size_t>(bi)].unit_offset), b.padded / hpz_ranks});
  }
  Comm* node = hier->intra();
  const DType dt = pdt;
  LaunchComm([=, what = what](void* stream) -> Status {
    CollectiveOptions co;
    co.what = what.c_str();
    co.stream = stream;
    return node->AllGatherMany(items, dt, co);
  });
}

}  // namespace zero

// HierarchicalComm: ZeRO++'s collectives (Wang et al., "ZeRO++", 2023) over a Comm and its split by node.
//
//  * QuantizedAllGatherMany (qwZ): every rank quantizes its `count` elements (8 bits, kernels/quantize.cuh) into its
//    slot of a staging buffer, the payloads are all-gathered as bytes over the whole Comm (in place), and every rank
//    dequantizes every payload, its own included, so that all ranks hold the same values.
//  * intra(): the ranks of this rank's node, by rank. An all-gather there (hpZ's secondary partition) never leaves
//    the node.
//  * QuantizedReduceScatter (qgZ): NCCL's contract (rank r gets the sum of every rank's slice r), in two levels.
//    Level 1, inside the node: every rank sends each local peer l, quantized, the slices whose owners have local
//    index l (one per node), by AllToAll over intra(); each rank sums its node's contributions to those slices in
//    fp32. Level 2, across nodes: the node partials go, quantized, to the slices' owners by AllToAll over inter() (the
//    ranks with this rank's local index, by node), which sum them in fp32 and round to the slice's dtype once. Each
//    value is quantized at most twice whatever the world size, and the sums run in a fixed order (local index, then
//    node; a rank's own contribution and its own node's partial enter unquantized), so results are bitwise
//    reproducible run to run and do not depend on message timing.
//
// Traffic (Pq(c) = kernels::QuantPayloadBytes(c, bits), N = nodes * L ranks, per reduce-scatter of c elements per
// rank): each rank sends (L - 1) * nodes * Pq(c) bytes inside its node and (nodes - 1) * Pq(c) bytes across nodes,
// so a node puts L * (nodes - 1) * Pq(c) bytes on its inter-node link, against (N - 1) * c * element bytes for a
// ring in rank order. Error bound: see README ("ZeRO++").
//
// Device math runs between the collectives: on the calling thread for Backend::kCpu (the engine's communication
// thread), enqueued on CollectiveOptions::stream for kCuda, where NcclComm enqueues the collectives too. Every rank
// must make the same calls with the same arguments (like any Comm call). Not thread-safe: one thread issues.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "zero/comm.h"
#include "zero/status.h"
#include "zero/types.h"

namespace zero::internal {

class HierarchicalComm {
 public:
  // Over `world` (kept, not owned; it must outlive this). With `split` (collective over `world`): splits it by node
  // and by local index (Comm::Split twice), which QuantizedReduceScatter and intra() need; InvalidArgument on every
  // rank when the nodes have different numbers of ranks. Without: QuantizedAllGatherMany only.
  static Status Create(Comm* world, Backend backend, int threads, bool split, std::unique_ptr<HierarchicalComm>* out);

  Comm* world() const { return world_; }
  Comm* intra() const { return intra_.get(); }
  Comm* inter() const { return inter_.get(); }
  const NodeTopology& topology() const { return world_->topology(); }
  // The node groups' counters (intra() + inter(), when split); world()'s are its own.
  CommCounters counters() const;

  // Staging bytes of QuantizedAllGatherMany for items of these per-rank counts over `world` ranks.
  static int64_t GatherStagingBytes(std::span<const int64_t> counts, int world);
  // The all-gathers of `items` (dtype f32, bf16 or f16) through 8-bit payloads, as one group over world().
  // In place is allowed (send == recv + rank * count). REQUIRES staging of GatherStagingBytes(counts) bytes.
  Status QuantizedAllGatherMany(std::span<const Comm::GatherItem> items, DType dtype, void* staging,
                                const CollectiveOptions& opts);

  // Staging bytes of QuantizedReduceScatter of `count` elements per rank.
  static int64_t ReduceStagingBytes(int64_t count, int nodes, int ranks_per_node, int bits);
  // Sum of every rank's slice rank() of `send` (world_size * count elements, dtype f32, bf16 or f16) into recv,
  // quantized to `bits` (8 or 4) on the wire; in place when recv == send + rank * count.
  Status QuantizedReduceScatter(const void* send, void* recv, int64_t count, DType dtype, int bits, void* staging,
                                const CollectiveOptions& opts);

 private:
  HierarchicalComm(Comm* world, std::unique_ptr<Comm> intra, std::unique_ptr<Comm> inter, Backend backend,
                   int threads);

  // The device math, dispatched on the backend; `what` names the step for error messages.
  Status Quantize(const void* src, DType dtype, int64_t n, int bits, void* payload, const CollectiveOptions& opts);
  Status Dequantize(const void* payload, int64_t n, int bits, void* dst, DType dtype, const CollectiveOptions& opts);
  Status DequantizeAdd(const void* payload, int64_t n, int bits, float* acc, const CollectiveOptions& opts);
  Status WidenAdd(const void* src, DType dtype, int64_t n, float* acc, const CollectiveOptions& opts);
  Status Convert(const void* src, DType from, void* dst, DType to, int64_t n, const CollectiveOptions& opts);
  Status Checked(int cuda_error, const char* step, const CollectiveOptions& opts) const;

  Comm* world_;
  std::unique_ptr<Comm> intra_, inter_;
  Backend backend_;
  int threads_;
  int nodes_, local_size_, node_, local_rank_;
  std::vector<int> rank_at_;  // rank_at_[node * local_size_ + local]: the world rank there
};

}  // namespace zero::internal

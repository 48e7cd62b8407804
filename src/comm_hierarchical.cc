// HierarchicalComm: ZeRO++'s quantized and hierarchical collectives (comm_hierarchical.h says what each does).
//
// Error of QuantizedReduceScatter, per element, with q = 127 (8 bits) or 7 (4 bits), L ranks per node, n nodes,
// N = n * L, and A the largest |x| of any rank's input in that element's 256-element block (blocks are laid out
// from the start of every rank-sized slice, so level 1 and level 2 blocks cover the same elements):
//   level 1: the L - 1 other ranks' contributions to a node partial are quantized once, each off by at most
//            A / (2q) (kernels/quantize.cuh), so a node partial is off by at most (L - 1) A / (2q) and is at most
//            A_P = L A + (L - 1) A / (2q) in magnitude;
//   level 2: the n - 1 other nodes' partials are quantized once, each off by at most A_P / (2q) more.
//   |result - exact sum| <= n (L - 1) A / (2q) + (n - 1) A_P / (2q)   (+ fp32 rounding: N sums of N terms)
// which tests/hierarchical_comm_test.cc asserts with the fp32 term as 4 N ulp(N A) and the quantization's own
// fp32 slack (A 2^-22 per quantized term).
#include "comm_hierarchical.h"

#include <cstring>
#include <string>
#include <utility>

#include "kernels/quantize.h"

namespace zero::internal {
namespace {

using kernels::QuantElem;
using kernels::QuantPayloadBytes;

QuantElem ElemOf(DType dtype) {
  return dtype == DType::kBF16 ? QuantElem::kBf16 : dtype == DType::kF16 ? QuantElem::kF16 : QuantElem::kF32;
}

bool Quantizable(DType dtype) { return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16; }

std::string What(const CollectiveOptions& opts) {
  return opts.what != nullptr && opts.what[0] != '\0' ? std::string(" \"") + opts.what + "\"" : std::string();
}

}  // namespace

HierarchicalComm::HierarchicalComm(Comm* world, std::unique_ptr<Comm> intra, std::unique_ptr<Comm> inter,
                                   Backend backend, int threads)
    : world_(world), intra_(std::move(intra)), inter_(std::move(inter)), backend_(backend), threads_(threads) {
  const NodeTopology& t = world_->topology();
  nodes_ = t.nodes;
  local_size_ = t.local_size;
  node_ = t.node;
  local_rank_ = t.local_rank;
  if (intra_ == nullptr) return;  // no node split: the layout below needs nodes of one size
  rank_at_.resize(static_cast<size_t>(nodes_) * local_size_);
  for (int j = 0; j < nodes_; ++j) {
    const std::vector<int> ranks = t.RanksOf(j);
    for (int l = 0; l < local_size_; ++l) rank_at_[static_cast<size_t>(j) * local_size_ + l] = ranks[l];
  }
}

Status HierarchicalComm::Create(Comm* world, Backend backend, int threads, bool split,
                                std::unique_ptr<HierarchicalComm>* out) {
  out->reset();
  const NodeTopology& t = world->topology();
  if (!split) {
    out->reset(new HierarchicalComm(world, nullptr, nullptr, backend, threads));
    return Status::Ok();
  }
  // The topology is the same on every rank (comm.h), so every rank refuses alike, before any collective.
  if (!t.uniform()) {
    return Status::InvalidArgument("rank " + std::to_string(world->rank()) + ": ZeRO++'s hierarchical collectives "
                                   "need the same number of ranks on every node, and this job has " + t.ToString() +
                                   "; start as many ranks on every node, or set CommOptions::ranks_per_node");
  }
  std::unique_ptr<Comm> intra, inter;
  ZERO_RETURN_IF_ERROR(world->Split(t.node, world->rank(), &intra));
  ZERO_RETURN_IF_ERROR(world->Split(t.local_rank, t.node, &inter));
  out->reset(new HierarchicalComm(world, std::move(intra), std::move(inter), backend, threads));
  return Status::Ok();
}

CommCounters HierarchicalComm::counters() const {
  CommCounters c;
  if (intra_ != nullptr) c += intra_->counters();
  if (inter_ != nullptr) c += inter_->counters();
  return c;
}

// --- device math -------------------------------------------------------------------------------------------------

Status HierarchicalComm::Checked(int cuda_error, const char* step, const CollectiveOptions& opts) const {
  if (cuda_error == 0) return Status::Ok();
  return Status::Internal(std::string(step) + What(opts) + " on rank " + std::to_string(world_->rank()) +
                          ": CUDA error " + std::to_string(cuda_error) + " launching the kernel");
}

#if defined(ZERO_WITH_CUDA)
#define ZERO_HIER_CUDA(call, step) return Checked(call, step, opts)
#else
#define ZERO_HIER_CUDA(call, step) \
  return Status::Unavailable(std::string(step) + ": this build of zero has no CUDA")
#endif

Status HierarchicalComm::Quantize(const void* src, DType dtype, int64_t n, int bits, void* payload,
                                  const CollectiveOptions& opts) {
  if (backend_ == Backend::kCpu) {
    kernels::QuantizeCpu(src, ElemOf(dtype), n, bits, payload, threads_);
    return Status::Ok();
  }
  ZERO_HIER_CUDA(kernels::QuantizeCuda(src, ElemOf(dtype), n, bits, payload, opts.stream), "quantizing");
}

Status HierarchicalComm::Dequantize(const void* payload, int64_t n, int bits, void* dst, DType dtype,
                                    const CollectiveOptions& opts) {
  if (backend_ == Backend::kCpu) {
    kernels::DequantizeCpu(payload, n, bits, dst, ElemOf(dtype), threads_);
    return Status::Ok();
  }
  ZERO_HIER_CUDA(kernels::DequantizeCuda(payload, n, bits, dst, ElemOf(dtype), opts.stream), "dequantizing");
}

Status HierarchicalComm::DequantizeAdd(const void* payload, int64_t n, int bits, float* acc,
                                       const CollectiveOptions& opts) {
  if (backend_ == Backend::kCpu) {
    kernels::DequantizeAddCpu(payload, n, bits, acc, threads_);
    return Status::Ok();
  }
  ZERO_HIER_CUDA(kernels::DequantizeAddCuda(payload, n, bits, acc, opts.stream), "summing dequantized values");
}

Status HierarchicalComm::WidenAdd(const void* src, DType dtype, int64_t n, float* acc, const CollectiveOptions& opts) {
  if (backend_ == Backend::kCpu) {
    kernels::WidenAddCpu(src, ElemOf(dtype), n, acc, threads_);
    return Status::Ok();
  }
  ZERO_HIER_CUDA(kernels::WidenAddCuda(src, ElemOf(dtype), n, acc, opts.stream), "summing");
}

Status HierarchicalComm::Convert(const void* src, DType from, void* dst, DType to, int64_t n,
                                 const CollectiveOptions& opts) {
  if (backend_ == Backend::kCpu) {
    kernels::ConvertCpu(src, ElemOf(from), dst, ElemOf(to), n, threads_);
    return Status::Ok();
  }
  ZERO_HIER_CUDA(kernels::ConvertCuda(src, ElemOf(from), dst, ElemOf(to), n, opts.stream), "converting");
}

#undef ZERO_HIER_CUDA

// --- qwZ ---------------------------------------------------------------------------------------------------------

int64_t HierarchicalComm::GatherStagingBytes(std::span<const int64_t> counts, int world) {
  int64_t bytes = 0;
  for (int64_t c : counts) bytes += world * QuantPayloadBytes(c, 8);
  return bytes;
}

Status HierarchicalComm::QuantizedAllGatherMany(std::span<const Comm::GatherItem> items, DType dtype, void* staging,
                                                const CollectiveOptions& opts) {
  const int n = world_->world_size(), r = world_->rank();
  if (!Quantizable(dtype)) {
    return Status::InvalidArgument("quantized AllGather" + What(opts) + " on rank " + std::to_string(r) +
                                   ": f32, bf16 or f16 only, not " + DTypeName(dtype));
  }
  // Every rank's payload of item k sits at region_k + rank * Pk; the group gathers them in place.
  std::vector<Comm::GatherItem> bytes_items;
  std::vector<char*> regions;
  char* at = static_cast<char*>(staging);
  for (const Comm::GatherItem& item : items) {
    const int64_t pk = QuantPayloadBytes(item.count, 8);
    char* mine = at + r * pk;
    ZERO_RETURN_IF_ERROR(Quantize(item.send, dtype, item.count, 8, mine, opts));
    bytes_items.push_back({mine, at, pk});
    regions.push_back(at);
    at += n * pk;
  }
  ZERO_RETURN_IF_ERROR(world_->AllGatherMany(bytes_items, DType::kU8, opts));
  const size_t es = DTypeSize(dtype);
  for (size_t k = 0; k < items.size(); ++k) {
    const int64_t c = items[k].count, pk = bytes_items[k].count;
    for (int q = 0; q < n; ++q) {
      ZERO_RETURN_IF_ERROR(Dequantize(regions[k] + q * pk, c, 8, static_cast<char*>(items[k].recv) + q * c * es,
                                      dtype, opts));
    }
  }
  return Status::Ok();
}

// --- qgZ ---------------------------------------------------------------------------------------------------------
//
// Staging layout (Pq = QuantPayloadBytes(count, bits), N = nodes * L):
//   send1  N * Pq      level-1 payloads, block l' (nodes payloads) for local rank l'
//   recv1  N * Pq      level-1 payloads received, block k from local rank k
//   send2  nodes * Pq  level-2 payloads, block j' for node j'
//   recv2  nodes * Pq  level-2 payloads received, block j' from node j'
//   part   nodes * count fp32: this node's partial sums of the slices owned by (j', this local index)
//   acc    count fp32: the final sum

int64_t HierarchicalComm::ReduceStagingBytes(int64_t count, int nodes, int ranks_per_node, int bits) {
  const int64_t pq = QuantPayloadBytes(count, bits);
  return (2 * int64_t{nodes} * ranks_per_node + 2 * int64_t{nodes}) * pq + 4 * (int64_t{nodes} + 1) * count;
}

Status HierarchicalComm::QuantizedReduceScatter(const void* send, void* recv, int64_t count, DType dtype, int bits,
                                                void* staging, const CollectiveOptions& opts) {
  const int rank = world_->rank();
  if (!Quantizable(dtype) || (bits != 8 && bits != 4)) {
    return Status::InvalidArgument("quantized ReduceScatter" + What(opts) + " on rank " + std::to_string(rank) +
                                   ": f32, bf16 or f16 in 8 or 4 bits only, not " + DTypeName(dtype) + " in " +
                                   std::to_string(bits));
  }
  if (intra_ == nullptr) {
    return Status::Internal("quantized ReduceScatter" + What(opts) + " on rank " + std::to_string(rank) +
                            ": this HierarchicalComm was created without the node split");
  }
  if (count == 0) return Status::Ok();
  const int L = local_size_, nodes = nodes_, me = local_rank_;
  const int64_t pq = QuantPayloadBytes(count, bits);
  const size_t es = DTypeSize(dtype);
  char* send1 = static_cast<char*>(staging);
  char* recv1 = send1 + int64_t{nodes} * L * pq;
  char* send2 = recv1 + int64_t{nodes} * L * pq;
  char* recv2 = send2 + int64_t{nodes} * pq;
  auto* part = reinterpret_cast<float*>(recv2 + int64_t{nodes} * pq);
  float* acc = part + int64_t{nodes} * count;
  const char* in = static_cast<const char*>(send);
  auto slice = [&](int owner) { return in + static_cast<size_t>(owner) * count * es; };
  auto owner = [&](int node, int local) { return rank_at_[static_cast<size_t>(node) * L + local]; };

  // Level 1, inside the node: local rank l' gets, quantized, this rank's slices owned by (j', l') for every node j'.
  if (L > 1) {
    for (int l = 0; l < L; ++l) {
      if (l == me) continue;  // this rank's own contribution stays exact
      for (int j = 0; j < nodes; ++j) {
        ZERO_RETURN_IF_ERROR(Quantize(slice(owner(j, l)), dtype, count, bits, send1 + (int64_t{l} * nodes + j) * pq,
                                      opts));
      }
    }
    ZERO_RETURN_IF_ERROR(intra_->AllToAll(send1, recv1, nodes * pq, DType::kU8, opts));
  }
  // part[j'] = sum over local ranks k, in order, of their contribution to the slice owned by (j', me).
  for (int j = 0; j < nodes; ++j) {
    float* p = part + int64_t{j} * count;
    for (int k = 0; k < L; ++k) {
      if (k == me) {
        if (k == 0) {
          ZERO_RETURN_IF_ERROR(Convert(slice(owner(j, me)), dtype, p, DType::kF32, count, opts));
        } else {
          ZERO_RETURN_IF_ERROR(WidenAdd(slice(owner(j, me)), dtype, count, p, opts));
        }
        continue;
      }
      const char* payload = recv1 + (int64_t{k} * nodes + j) * pq;
      if (k == 0) {
        ZERO_RETURN_IF_ERROR(Dequantize(payload, count, bits, p, DType::kF32, opts));
      } else {
        ZERO_RETURN_IF_ERROR(DequantizeAdd(payload, count, bits, p, opts));
      }
    }
  }
  // Level 2, across nodes: node j' gets, quantized, this node's partial of the slice its rank (j', me) owns.
  if (nodes > 1) {
    for (int j = 0; j < nodes; ++j) {
      if (j == node_) continue;
      ZERO_RETURN_IF_ERROR(Quantize(part + int64_t{j} * count, DType::kF32, count, bits, send2 + j * pq, opts));
    }
    ZERO_RETURN_IF_ERROR(inter_->AllToAll(send2, recv2, pq, DType::kU8, opts));
  }
  // acc = sum over nodes, in order, of their partials of this rank's slice; then rounded once into recv.
  for (int j = 0; j < nodes; ++j) {
    if (j == node_) {
      const float* own = part + int64_t{node_} * count;
      if (j == 0) {
        ZERO_RETURN_IF_ERROR(Convert(own, DType::kF32, acc, DType::kF32, count, opts));
      } else {
        ZERO_RETURN_IF_ERROR(WidenAdd(own, DType::kF32, count, acc, opts));
      }
    } else if (j == 0) {
      ZERO_RETURN_IF_ERROR(Dequantize(recv2 + j * pq, count, bits, acc, DType::kF32, opts));
    } else {
      ZERO_RETURN_IF_ERROR(DequantizeAdd(recv2 + j * pq, count, bits, acc, opts));
    }
  }
  return Convert(acc, DType::kF32, recv, dtype, count, opts);
}

}  // namespace zero::internal

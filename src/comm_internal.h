// Pieces shared by the Comm backends (MpiComm, SingleComm): argument validation, descriptions of a call for
// error messages, the counter rules and the wording of abort statuses, so every backend reports alike.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "zero/comm.h"
#include "zero/status.h"
#include "zero/types.h"

namespace zero::internal {

enum class CollectiveKind : uint8_t { kReduceScatter, kAllGather, kAllReduce, kBroadcast, kBarrier, kAllToAll };

inline const char* CollectiveName(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kReduceScatter: return "ReduceScatter";
    case CollectiveKind::kAllGather: return "AllGather";
    case CollectiveKind::kAllReduce: return "AllReduce";
    case CollectiveKind::kBroadcast: return "Broadcast";
    case CollectiveKind::kBarrier: return "Barrier";
    case CollectiveKind::kAllToAll: return "AllToAll";
  }
  return "?";
}

inline const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

// Everything an error message says about one call.
struct CallInfo {
  CollectiveKind kind = CollectiveKind::kBarrier;
  const char* what = nullptr;  // CollectiveOptions::what
  int64_t count = 0;
  DType dtype = DType::kU8;
  ReduceOp op = ReduceOp::kSum;
  int root = 0;
};

// "AllReduce(sum) "grad norm" of 2 f64", "ReduceScatter "bucket 3" of 1003 f32 per rank", "Barrier".
inline std::string DescribeCall(const CallInfo& call) {
  std::string s = CollectiveName(call.kind);
  if (call.kind == CollectiveKind::kAllReduce) s += std::string("(") + ReduceOpName(call.op) + ")";
  if (call.what != nullptr && call.what[0] != '\0') s += std::string(" \"") + call.what + "\"";
  if (call.kind == CollectiveKind::kBarrier) return s;
  if (call.kind == CollectiveKind::kBroadcast) s += " from root " + std::to_string(call.root);
  s += " of " + std::to_string(call.count) + " " + DTypeName(call.dtype);
  if (call.kind == CollectiveKind::kReduceScatter || call.kind == CollectiveKind::kAllGather) s += " per rank";
  if (call.kind == CollectiveKind::kAllToAll) s += " per block";
  return s;
}

// Byte ranges [a, a + a_len) and [b, b + b_len) overlap. Compared as integers: the buffers may be unrelated.
inline bool Overlaps(const void* a, uint64_t a_len, const void* b, uint64_t b_len) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return a_len > 0 && b_len > 0 && x < y + b_len && y < x + a_len;
}

// Checks one call's arguments against the contract in comm.h. `send`/`recv` are null for Broadcast/Barrier
// (Broadcast passes its buffer as recv). Overlapping buffers are allowed only in the documented in-place forms.
inline Status ValidateCall(const CallInfo& call, const void* send, const void* recv, int rank, int world) {
  auto invalid = [&](const std::string& why) {
    return Status::InvalidArgument(DescribeCall(call) + " on rank " + std::to_string(rank) + ": " + why);
  };
  if (call.kind == CollectiveKind::kBarrier) return Status::Ok();
  const size_t elem = DTypeSize(call.dtype);
  if (elem == 0) return invalid("unknown dtype");
  if (call.count < 0) return invalid("count must be >= 0");
  const bool half = call.dtype == DType::kBF16 || call.dtype == DType::kF16;
  if (call.kind == CollectiveKind::kReduceScatter && call.dtype != DType::kF32 && call.dtype != DType::kF64 && !half) {
    return invalid("ReduceScatter supports f32, f64, bf16 and f16 only");
  }
  if (call.kind == CollectiveKind::kAllReduce) {
    if (call.dtype != DType::kF32 && call.dtype != DType::kF64 && call.dtype != DType::kI64 && !half) {
      return invalid("AllReduce supports f32, f64, i64, bf16 and f16 only");
    }
    if (half && call.op != ReduceOp::kSum) return invalid("bf16 and f16 AllReduce support kSum only");
    if (call.op != ReduceOp::kSum && call.op != ReduceOp::kMax && call.op != ReduceOp::kMin) {
      return invalid("unknown ReduceOp");
    }
  }
  if (call.kind == CollectiveKind::kBroadcast && (call.root < 0 || call.root >= world)) {
    return invalid("root must be in [0, " + std::to_string(world) + ")");
  }
  if (call.count == 0) return Status::Ok();
  const bool needs_send = call.kind != CollectiveKind::kBroadcast;
  if ((needs_send && send == nullptr) || recv == nullptr) return invalid("null buffer with count > 0");
  const uint64_t bytes = static_cast<uint64_t>(call.count) * elem;
  const uint64_t all = bytes * static_cast<uint64_t>(world);
  const auto* s = static_cast<const char*>(send);
  const auto* r = static_cast<const char*>(recv);
  switch (call.kind) {
    case CollectiveKind::kReduceScatter:
      if (Overlaps(send, all, recv, bytes) && r != s + rank * bytes) {
        return invalid("recv overlaps send but is not the in-place slice send + rank * count");
      }
      break;
    case CollectiveKind::kAllGather:
      if (Overlaps(send, bytes, recv, all) && s != r + rank * bytes) {
        return invalid("send overlaps recv but is not the in-place slice recv + rank * count");
      }
      break;
    case CollectiveKind::kAllReduce:
      if (Overlaps(send, bytes, recv, bytes) && s != r) return invalid("send and recv partially overlap");
      break;
    case CollectiveKind::kAllToAll:
      if (Overlaps(send, all, recv, all)) return invalid("send and recv overlap (AllToAll is never in place)");
      break;
    default: break;
  }
  return Status::Ok();
}

// The counter rules of CommCounters: data collectives count their elements by kind (reduce-scatter and
// all-gather the whole world * count buffer); control collectives count apart. Barrier moves no data: it counts
// one control call (0 elements) when marked control, and nothing otherwise.
inline void CountCall(CommCounters* counters, const CallInfo& call, const CollectiveOptions& opts, int world) {
  const bool per_rank = call.kind == CollectiveKind::kReduceScatter || call.kind == CollectiveKind::kAllGather ||
                        call.kind == CollectiveKind::kAllToAll;
  const int64_t elements = call.kind == CollectiveKind::kBarrier ? 0 : per_rank ? call.count * world : call.count;
  if (opts.control) {
    counters->control_calls += 1;
    counters->control_elements += elements;
    return;
  }
  switch (call.kind) {
    case CollectiveKind::kReduceScatter: counters->reduce_scatter += elements; break;
    case CollectiveKind::kAllGather: counters->all_gather += elements; break;
    case CollectiveKind::kAllReduce: counters->all_reduce += elements; break;
    case CollectiveKind::kBroadcast: counters->broadcast += elements; break;
    case CollectiveKind::kAllToAll: counters->all_to_all += elements; break;
    case CollectiveKind::kBarrier: break;
  }
}

// Counts `bytes` sent by this rank to rank `peer` in its link kind (CommCounters::intra_node_bytes / inter).
inline void CountSent(CommCounters* counters, const NodeTopology& topology, int peer, int64_t bytes) {
  if (topology.node_of[static_cast<size_t>(peer)] == topology.node) {
    counters->intra_node_bytes += bytes;
  } else {
    counters->inter_node_bytes += bytes;
  }
}

// What MpiComm's algorithms send from `rank` for one data call, peer by peer (comm_mpi.cc describes them): rings
// in rank order (reduce-scatter and all-gather: world - 1 blocks to the next rank; all-reduce: every ring chunk but
// one, twice), a root that sends to every peer, direct all-to-all blocks. MpiComm counts its real messages; NcclComm
// counts this model (NCCL chooses its own rings and trees); comm_topology_test checks that the two agree.
template <typename Sent>
void ModelSends(const CallInfo& call, int rank, int world, Sent&& sent) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(call.dtype));
  const int next = (rank + 1) % world;
  if (world == 1 || call.count == 0) return;
  switch (call.kind) {
    case CollectiveKind::kReduceScatter:
    case CollectiveKind::kAllGather: sent(next, (world - 1) * call.count * elem); break;
    case CollectiveKind::kAllReduce: {
      // RingReduce sends every chunk but this rank's own; RingGather every chunk but the next rank's.
      auto len = [&](int c) { return (c + 1) * call.count / world - c * call.count / world; };
      sent(next, (2 * call.count - len(rank) - len(next)) * elem);
      break;
    }
    case CollectiveKind::kBroadcast:
      if (rank == call.root) {
        for (int p = 0; p < world; ++p) {
          if (p != rank) sent(p, call.count * elem);
        }
      }
      break;
    case CollectiveKind::kAllToAll:
      for (int p = 0; p < world; ++p) {
        if (p != rank) sent(p, call.count * elem);
      }
      break;
    case CollectiveKind::kBarrier: break;
  }
}

// The text an aborting rank sends to its peers (and keeps for itself): the reason's code and message.
inline std::string AbortReasonText(const Status& reason) {
  return reason.ok() ? std::string("Abort called without a reason") : reason.ToString();
}

// The status a Comm takes when rank `origin` (this rank or a peer) aborted it.
inline Status AbortedBy(int origin, const std::string& reason_text) {
  return Status::Aborted("rank " + std::to_string(origin) + " aborted the communicator: " + reason_text);
}

// memmove unless the buffers are the same (the in-place forms).
inline void CopyUnlessSame(void* dst, const void* src, size_t bytes) {
  if (dst != src && bytes > 0) std::memmove(dst, src, bytes);
}

}  // namespace zero::internal

// NodeTopology's construction (comm.h declares the struct): from per-rank node keys, restricted to a Comm's
// subset, and detected over MPI (MPI_Comm_split_type with MPI_COMM_TYPE_SHARED, or CommOptions::ranks_per_node).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <vector>

#include "zero/comm.h"
#include "zero/status.h"

namespace zero::internal {

// Every rank on node 0.
NodeTopology OneNode(int rank, int world);

// From one key per rank (equal keys: same node); nodes are numbered in the order of their lowest rank.
NodeTopology FromNodeKeys(const std::vector<int64_t>& keys, int rank);

// The topology of a Comm over `members` (ranks of `parent`, in the new Comm's order), seen from the member at
// `position`. Node numbers are renumbered by lowest new rank.
NodeTopology Restrict(const NodeTopology& parent, const std::vector<int>& members, int position);

// Collective over `comm` (blocking MPI calls: every rank must call it, right after a completed collective such
// as the communicator's creation). ranks_per_node > 0 overrides the shared-memory split; ranks that pass
// different values get kMismatch on every rank.
Status DetectNodeTopology(MPI_Comm comm, int ranks_per_node, NodeTopology* out);

}  // namespace zero::internal

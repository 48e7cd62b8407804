// NodeTopology: which node each rank runs on, and the Comm-level helpers that build it (node_topology.h).
#include "node_topology.h"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "comm_mpi.h"

namespace zero {

bool NodeTopology::uniform() const {
  std::vector<int> count(static_cast<size_t>(nodes), 0);
  for (int n : node_of) ++count[static_cast<size_t>(n)];
  return std::all_of(count.begin(), count.end(), [&](int c) { return c == count[0]; });
}

std::vector<int> NodeTopology::RanksOf(int n) const {
  std::vector<int> ranks;
  for (size_t r = 0; r < node_of.size(); ++r) {
    if (node_of[r] == n) ranks.push_back(static_cast<int>(r));
  }
  return ranks;
}

std::string NodeTopology::ToString() const {
  const std::string head = std::to_string(node_of.size()) + " rank" + (node_of.size() == 1 ? "" : "s") + " on " +
                           std::to_string(nodes) + " node" + (nodes == 1 ? "" : "s");
  if (uniform()) return head + " of " + std::to_string(node_of.size() / static_cast<size_t>(nodes));
  std::string sizes;
  for (int n = 0; n < nodes; ++n) sizes += (n ? ", " : "") + std::to_string(RanksOf(n).size());
  return head + " (" + sizes + ")";
}

namespace internal {

NodeTopology OneNode(int rank, int world) {
  NodeTopology t;
  t.node_of.assign(static_cast<size_t>(world), 0);
  t.nodes = 1;
  t.node = 0;
  t.local_rank = rank;
  t.local_size = world;
  return t;
}

NodeTopology FromNodeKeys(const std::vector<int64_t>& keys, int rank) {
  NodeTopology t;
  std::map<int64_t, int> number;  // key -> node, in order of first appearance (= lowest rank)
  t.node_of.resize(keys.size());
  for (size_t r = 0; r < keys.size(); ++r) {
    auto it = number.find(keys[r]);
    if (it == number.end()) it = number.emplace(keys[r], static_cast<int>(number.size())).first;
    t.node_of[r] = it->second;
  }
  t.nodes = static_cast<int>(number.size());
  t.node = t.node_of[static_cast<size_t>(rank)];
  t.local_rank = 0;
  t.local_size = 0;
  for (size_t r = 0; r < keys.size(); ++r) {
    if (t.node_of[r] != t.node) continue;
    if (static_cast<int>(r) < rank) ++t.local_rank;
    ++t.local_size;
  }
  return t;
}

NodeTopology Restrict(const NodeTopology& parent, const std::vector<int>& members, int position) {
  std::vector<int64_t> keys(members.size());
  for (size_t i = 0; i < members.size(); ++i) keys[i] = parent.node_of[static_cast<size_t>(members[i])];
  return FromNodeKeys(keys, position);
}

Status DetectNodeTopology(MPI_Comm comm, int ranks_per_node, NodeTopology* out) {
  int rank = 0, world = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  // Key: the lowest rank of this rank's node (shared-memory split), or rank / ranks_per_node.
  int64_t key = rank;
  if (ranks_per_node > 0) {
    key = rank / ranks_per_node;
  } else {
    MPI_Comm shared = MPI_COMM_NULL;
    int rc = MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shared);
    int leader = rank;
    if (rc == MPI_SUCCESS) rc = MPI_Bcast(&leader, 1, MPI_INT, 0, shared);  // its rank 0 has the lowest rank
    if (shared != MPI_COMM_NULL) MPI_Comm_free(&shared);
    if (rc != MPI_SUCCESS) {
      return Status::Internal("finding the node of rank " + std::to_string(rank) +
                              " (MPI_Comm_split_type with MPI_COMM_TYPE_SHARED) failed: " + MpiErrorString(rc));
    }
    key = leader;
  }
  const int64_t mine[2] = {key, ranks_per_node};
  std::vector<int64_t> all(2 * static_cast<size_t>(world));
  const int rc = MPI_Allgather(mine, 2, MPI_INT64_T, all.data(), 2, MPI_INT64_T, comm);
  if (rc != MPI_SUCCESS) {
    return Status::Internal("exchanging the nodes of the ranks (MPI_Allgather) failed on rank " +
                            std::to_string(rank) + ": " + MpiErrorString(rc));
  }
  std::vector<int64_t> keys(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    keys[static_cast<size_t>(r)] = all[2 * static_cast<size_t>(r)];
    if (all[2 * static_cast<size_t>(r) + 1] != all[1]) {
      return Status::Mismatch("creating a communicator on rank " + std::to_string(rank) +
                              ": CommOptions::ranks_per_node differs between ranks (rank 0 passed " +
                              std::to_string(all[1]) + ", rank " + std::to_string(r) + " passed " +
                              std::to_string(all[2 * static_cast<size_t>(r) + 1]) +
                              "); every rank must pass the same value");
    }
  }
  *out = FromNodeKeys(keys, rank);
  return Status::Ok();
}

}  // namespace internal
}  // namespace zero

// Comm's node topology, Split and AllToAll, and the per-link-kind byte counters, at 1-4 ranks.
//
// "Nodes" on one machine come from CommOptions::ranks_per_node; without it the shared-memory split decides: one node
// here, and one per host on the namespace cluster (scripts/netns_cluster.sh), where tests/multihost_test.sh sets
// ZERO_TEST_NODES to the number of hosts. The link counters are checked message by message against
// comm_internal.h's model of MpiComm's algorithms (the model NcclComm counts with), for every collective, with the
// detected nodes and with 1, 2 and all ranks per node.
#include <mpi.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "comm_internal.h"
#include "testing/mpi_env.h"
#include "zero/comm.h"

namespace zero {
namespace {

using zero::testing::WorldRank;
using zero::testing::WorldSize;

std::unique_ptr<Comm> CommWith(int ranks_per_node, int64_t max_message = int64_t{1} << 30, Status* status = nullptr) {
  CommOptions options;
  options.timeout = std::chrono::milliseconds(20'000);
  options.ranks_per_node = ranks_per_node;
  options.TEST_max_message_elements = max_message;
  std::unique_ptr<Comm> comm;
  Status s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm);
  if (status != nullptr) {
    *status = s;
  } else {
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  return comm;
}

// Hosts: 1 on one machine, ZERO_TEST_NODES on the namespace cluster (whose hostfile fills each host in turn).
int ExpectedHosts() {
  const char* v = std::getenv("ZERO_TEST_NODES");
  return v != nullptr ? std::atoi(v) : 1;
}

TEST(CommTopologyTest, DetectedNodesAreTheHosts) {
  auto comm = CommWith(0);
  const NodeTopology& t = comm->topology();
  const int hosts = ExpectedHosts(), per_host = WorldSize() / hosts;
  EXPECT_EQ(t.nodes, hosts) << t.ToString();
  EXPECT_EQ(t.local_size, per_host);
  EXPECT_EQ(t.local_rank, WorldRank() % per_host);
  EXPECT_TRUE(t.uniform());
  for (int q = 0; q < WorldSize(); ++q) EXPECT_EQ(t.node_of[static_cast<size_t>(q)], q / per_host);
}

TEST(CommTopologyTest, RanksPerNodeOverride) {
  const int n = WorldSize(), r = WorldRank();
  for (int k = 1; k <= n; ++k) {
    SCOPED_TRACE("ranks_per_node " + std::to_string(k));
    auto comm = CommWith(k);
    const NodeTopology& t = comm->topology();
    EXPECT_EQ(t.nodes, (n + k - 1) / k);
    EXPECT_EQ(t.node, r / k);
    EXPECT_EQ(t.local_rank, r % k);
    EXPECT_EQ(t.local_size, std::min(k, n - r / k * k));
    EXPECT_EQ(t.uniform(), n % k == 0) << t.ToString();
    for (int q = 0; q < n; ++q) EXPECT_EQ(t.node_of[static_cast<size_t>(q)], q / k);
    EXPECT_EQ(t.RanksOf(t.node).size(), static_cast<size_t>(t.local_size));
    // Duplicates keep the topology.
    std::unique_ptr<Comm> dup;
    ASSERT_TRUE(comm->Duplicate(&dup).ok());
    EXPECT_EQ(dup->topology().node_of, t.node_of);
  }
}

TEST(CommTopologyTest, NegativeRanksPerNodeIsRefused) {
  Status s;
  auto comm = CommWith(-1, int64_t{1} << 30, &s);
  EXPECT_EQ(comm, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("ranks_per_node must be >= 0"), std::string::npos) << s.ToString();
}

TEST(CommTopologyTest, SingleIsOneNode) {
  auto comm = Comm::Single();
  EXPECT_EQ(comm->topology().nodes, 1);
  EXPECT_EQ(comm->topology().node_of, std::vector<int>{0});
  std::unique_ptr<Comm> part;
  ASSERT_TRUE(comm->Split(0, 0, &part).ok());
  EXPECT_EQ(part->world_size(), 1);
  const float in[3] = {1, 2, 3};
  float out[3] = {};
  ASSERT_TRUE(part->AllToAll(in, out, 3, DType::kF32).ok());
  EXPECT_EQ(out[2], 3.0f);
  EXPECT_EQ(part->counters().all_to_all, 3);
}

// Ranks that pass different ranks_per_node fail alike, naming the values.
TEST(CommTopologyPeerTest, DifferentRanksPerNodeIsAMismatchOnEveryRank) {
  Status s;
  auto comm = CommWith(WorldRank() == 1 ? 1 : 2, int64_t{1} << 30, &s);
  EXPECT_EQ(comm, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kMismatch) << s.ToString();
  EXPECT_NE(s.message().find("ranks_per_node differs"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("rank 1 passed 1"), std::string::npos) << s.ToString();
}

// By node and by local index: the two splits ZeRO++ uses. Ranks are ordered by key, topology is restricted.
TEST(CommTopologyTest, SplitByNodeAndByLocalIndex) {
  const int n = WorldSize(), r = WorldRank();
  for (int override = 0; override <= n; ++override) {
    if (override > 0 && n % override != 0) continue;
    SCOPED_TRACE("ranks_per_node " + std::to_string(override));
    auto comm = CommWith(override);
    const NodeTopology& t = comm->topology();
    const int k = t.local_size;
    std::unique_ptr<Comm> intra, inter;
    ASSERT_TRUE(comm->Split(t.node, r, &intra).ok());
    ASSERT_TRUE(comm->Split(t.local_rank, -t.node, &inter).ok());  // reversed: highest node first
    EXPECT_EQ(intra->world_size(), k);
    EXPECT_EQ(intra->rank(), t.local_rank);
    EXPECT_EQ(intra->topology().nodes, 1);
    EXPECT_EQ(inter->world_size(), n / k);
    EXPECT_EQ(inter->rank(), n / k - 1 - t.node);
    EXPECT_EQ(inter->topology().nodes, n / k);
    EXPECT_EQ(inter->topology().local_size, 1);
    // Each group sums its own members' ranks.
    double mine = r, sum = 0;
    ASSERT_TRUE(intra->AllReduce(&mine, &sum, 1, DType::kF64, ReduceOp::kSum).ok());
    double want = 0;
    for (int q : t.RanksOf(t.node)) want += q;
    EXPECT_EQ(sum, want);
    ASSERT_TRUE(inter->AllReduce(&mine, &sum, 1, DType::kF64, ReduceOp::kSum).ok());
    want = 0;
    for (int m = 0; m < n / k; ++m) want += m * k + t.local_rank;
    EXPECT_EQ(sum, want);
    // Only data crossed: the splits' own color exchange is control traffic.
    EXPECT_EQ(comm->counters().control_calls, 2);
    EXPECT_EQ(intra->counters().inter_node_bytes, 0) << "a node's own Comm never crosses nodes";
    if (n > k) {
      EXPECT_EQ(inter->counters().intra_node_bytes, 0) << "one rank per node: everything crosses";
    }
  }
}

TEST(CommTopologyTest, SplitRejectsNegativeColorOnEveryRank) {
  auto comm = CommWith(0);
  std::unique_ptr<Comm> part;
  const Status s = comm->Split(WorldRank() == 0 ? -1 : 0, 0, &part);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("rank 0 passed color -1"), std::string::npos) << s.ToString();
  EXPECT_TRUE(comm->health().ok()) << "a refused split leaves the Comm usable";
}

int64_t Value(int from, int to, int64_t i) { return int64_t{1000003} * from + int64_t{1009} * to + i; }

TEST(CommTopologyTest, AllToAllDeliversEveryBlock) {
  const int n = WorldSize(), r = WorldRank();
  for (int64_t max_message : {int64_t{1} << 30, int64_t{7}}) {
    auto comm = CommWith(0, max_message);
    for (int64_t count : {0, 1, 7, 1003}) {
      SCOPED_TRACE("count " + std::to_string(count) + " max_message " + std::to_string(max_message));
      std::vector<int64_t> send(static_cast<size_t>(n * count)), recv(static_cast<size_t>(n * count), -1);
      for (int to = 0; to < n; ++to) {
        for (int64_t i = 0; i < count; ++i) send[static_cast<size_t>(to * count + i)] = Value(r, to, i);
      }
      ASSERT_TRUE(comm->AllToAll(send.data(), recv.data(), count, DType::kI64).ok());
      int64_t bad = 0;
      for (int from = 0; from < n; ++from) {
        for (int64_t i = 0; i < count; ++i) bad += recv[static_cast<size_t>(from * count + i)] != Value(from, r, i);
      }
      EXPECT_EQ(bad, 0);
      // Bytes too (u8): a block of 1003 bytes is not a multiple of anything.
      std::vector<uint8_t> bs(static_cast<size_t>(n * count)), br(static_cast<size_t>(n * count));
      for (size_t i = 0; i < bs.size(); ++i) bs[i] = static_cast<uint8_t>(i * 7 + r);
      ASSERT_TRUE(comm->AllToAll(bs.data(), br.data(), count, DType::kU8).ok());
      bad = 0;
      for (int from = 0; from < n; ++from) {
        for (int64_t i = 0; i < count; ++i) {
          bad += br[static_cast<size_t>(from * count + i)] != static_cast<uint8_t>((r * count + i) * 7 + from);
        }
      }
      EXPECT_EQ(bad, 0);
    }
    EXPECT_EQ(comm->counters().all_to_all, 2 * (0 + 1 + 7 + 1003) * n);
  }
}

TEST(CommTopologyTest, AllToAllRejectsOverlap) {
  auto comm = CommWith(0);
  std::vector<float> buf(static_cast<size_t>(4 * WorldSize()));
  const Status s = comm->AllToAll(buf.data(), buf.data() + 1, 2, DType::kF32);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("never in place"), std::string::npos) << s.ToString();
}

// Every collective's bytes per link kind, as MpiComm sent them, equal the model (comm_internal.h's ModelSends).
TEST(CommTopologyTest, LinkCountersEqualTheModel) {
  const int n = WorldSize(), r = WorldRank();
  for (int override : {0, 1, 2, n}) {
    if (override > 0 && n % override != 0) continue;
    auto comm = CommWith(override, /*max_message=*/7);
    const int k = comm->topology().local_size;
    SCOPED_TRACE(comm->topology().ToString());
    CommCounters want;
    auto expect = [&](internal::CollectiveKind kind, int64_t count, DType dtype, int root = 0) {
      const internal::CallInfo call{kind, nullptr, count, dtype, ReduceOp::kSum, root};
      internal::ModelSends(call, r, n, [&](int peer, int64_t bytes) {
        internal::CountSent(&want, comm->topology(), peer, bytes);
      });
    };
    std::vector<double> a(static_cast<size_t>(64 * n), 1.0), b(static_cast<size_t>(64 * n), 0.0);
    CollectiveOptions control;
    control.control = true;
    ASSERT_TRUE(comm->ReduceScatter(a.data(), b.data(), 13, DType::kF64).ok());
    expect(internal::CollectiveKind::kReduceScatter, 13, DType::kF64);
    ASSERT_TRUE(comm->AllGather(a.data(), b.data(), 9, DType::kF32).ok());
    expect(internal::CollectiveKind::kAllGather, 9, DType::kF32);
    for (int64_t count : {1, 5, 61}) {
      ASSERT_TRUE(comm->AllReduce(a.data(), b.data(), count, DType::kF64, ReduceOp::kSum).ok());
      expect(internal::CollectiveKind::kAllReduce, count, DType::kF64);
    }
    ASSERT_TRUE(comm->Broadcast(a.data(), 17, DType::kF64, n - 1).ok());
    expect(internal::CollectiveKind::kBroadcast, 17, DType::kF64, n - 1);
    ASSERT_TRUE(comm->AllToAll(a.data(), b.data(), 11, DType::kF64).ok());
    expect(internal::CollectiveKind::kAllToAll, 11, DType::kF64);
    // Control traffic is not data: not counted.
    ASSERT_TRUE(comm->AllReduce(a.data(), b.data(), 8, DType::kF64, ReduceOp::kMax, control).ok());
    ASSERT_TRUE(comm->Barrier().ok());
    EXPECT_EQ(comm->counters().intra_node_bytes, want.intra_node_bytes);
    EXPECT_EQ(comm->counters().inter_node_bytes, want.inter_node_bytes);
    if (n > 1 && k == n) {
      EXPECT_EQ(comm->counters().inter_node_bytes, 0) << "one node: nothing crosses nodes";
    }
    if (n > 1 && k == 1) {
      EXPECT_EQ(comm->counters().intra_node_bytes, 0) << "a rank per node: everything crosses";
    }
  }
}

}  // namespace
}  // namespace zero

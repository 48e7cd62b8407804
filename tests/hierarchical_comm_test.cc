// ZeRO++'s collectives (src/comm_hierarchical.h) at 1-4 ranks, with "nodes" of 1, 2 and all ranks made by
// CommOptions::ranks_per_node.
//  * The quantized all-gather gives every rank, bitwise, each rank's values quantized and dequantized once (the
//    kernels are checked against a scalar reference in quantize_test), within A / 254 + rounding of the inputs.
//  * The quantized reduce-scatter equals, bitwise, a single-process simulation of the two levels (quantize each
//    other rank's slice, sum in local-rank order in fp32, quantize each other node's partial, sum in node order,
//    round once), stays within the bound derived in comm_hierarchical.cc of the exact (double) sum, gives the same
//    bits when repeated, and sends (L - 1) * nodes * Pq bytes inside the node and (nodes - 1) * Pq across.
//  * Non-uniform nodes are refused on every rank; two threads with their own HierarchicalComm run concurrently
//    (the tsan phase runs this suite).
#include <mpi.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm_hierarchical.h"
#include "kernels/cast.cuh"
#include "kernels/quantize.h"
#include "testing/mpi_env.h"
#include "zero/comm.h"

namespace zero::internal {
namespace {

using kernels::QuantElem;
using kernels::QuantPayloadBytes;
using zero::testing::WorldRank;
using zero::testing::WorldSize;

std::unique_ptr<Comm> CommWith(int ranks_per_node) {
  CommOptions options;
  options.timeout = std::chrono::milliseconds(20'000);
  options.ranks_per_node = ranks_per_node;
  std::unique_ptr<Comm> comm;
  Status s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return comm;
}

uint64_t Hash(uint64_t x) {
  x = (x ^ (x >> 33)) * 0xff51afd7ed558ccdULL;
  x = (x ^ (x >> 33)) * 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

// Rank r's input element i: magnitudes from 1e-3 to 1e2, both signs, so blocks have very different scales.
float Input(int rank, int64_t i, uint64_t salt) {
  const uint64_t h = Hash((static_cast<uint64_t>(rank) << 40) ^ static_cast<uint64_t>(i) ^ (salt << 20));
  const double u = static_cast<double>(h >> 11) / 9007199254740992.0;  // [0, 1)
  const double mag = std::pow(10.0, -3.0 + 5.0 * static_cast<double>((h >> 3) % 64) / 64.0);
  return static_cast<float>((2.0 * u - 1.0) * mag);
}

QuantElem ElemOf(DType d) {
  return d == DType::kBF16 ? QuantElem::kBf16 : d == DType::kF16 ? QuantElem::kF16 : QuantElem::kF32;
}

// `values` in dtype's bytes (rounded to nearest even), and their exact widening.
std::vector<uint8_t> ToBytes(const std::vector<float>& values, DType dtype, std::vector<float>* widened) {
  std::vector<uint8_t> out(values.size() * DTypeSize(dtype));
  kernels::ConvertCpu(values.data(), QuantElem::kF32, out.data(), ElemOf(dtype), static_cast<int64_t>(values.size()),
                      1);
  if (widened != nullptr) {
    widened->resize(values.size());
    kernels::ConvertCpu(out.data(), ElemOf(dtype), widened->data(), QuantElem::kF32,
                        static_cast<int64_t>(values.size()), 1);
  }
  return out;
}

// One quantize-dequantize round trip of n fp32 values (what the other side of a link sees).
std::vector<float> RoundTrip(const float* x, int64_t n, int bits) {
  std::vector<uint8_t> payload(static_cast<size_t>(QuantPayloadBytes(n, bits)));
  kernels::QuantizeCpu(x, QuantElem::kF32, n, bits, payload.data(), 1);
  std::vector<float> y(static_cast<size_t>(n));
  kernels::DequantizeCpu(payload.data(), n, bits, y.data(), QuantElem::kF32, 1);
  return y;
}

std::unique_ptr<HierarchicalComm> MakeHier(Comm* world) {
  std::unique_ptr<HierarchicalComm> h;
  const Status s = HierarchicalComm::Create(world, Backend::kCpu, 2, /*split=*/true, &h);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return h;
}

// The ranks_per_node values whose nodes are uniform here: 0 (the detected nodes: one, or the cluster's hosts) and
// every divisor of the world size.
std::vector<int> UniformCases() {
  std::vector<int> cases = {0};
  for (int k = 1; k <= WorldSize(); ++k) {
    if (WorldSize() % k == 0) cases.push_back(k);
  }
  return cases;
}

TEST(HierarchicalCommTest, SplitsByNodeAndLocalIndex) {
  const int n = WorldSize(), r = WorldRank();
  for (int override : UniformCases()) {
    auto world = CommWith(override);
    const int k = world->topology().local_size;
    auto h = MakeHier(world.get());
    ASSERT_NE(h, nullptr);
    EXPECT_EQ(h->intra()->world_size(), k);
    EXPECT_EQ(h->intra()->rank(), r % k);
    EXPECT_EQ(h->inter()->world_size(), n / k);
    EXPECT_EQ(h->inter()->rank(), r / k);
  }
}

// Nodes of N-1 and 1 ranks (at 3 and 4 ranks) are refused on every rank, naming the sizes. At 2 ranks no split is
// unequal: there 2 nodes of 1 must be accepted (the check is about equal nodes, not about how many there are).
TEST(HierarchicalCommPeerTest, RefusesNodesOfDifferentSizesOnEveryRank) {
  const int n = WorldSize();
  const bool unequal = n >= 3;
  auto world = CommWith(unequal ? n - 1 : 1);
  std::unique_ptr<HierarchicalComm> h;
  const Status s = HierarchicalComm::Create(world.get(), Backend::kCpu, 1, /*split=*/true, &h);
  if (unequal) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find("same number of ranks on every node"), std::string::npos) << s.ToString();
    std::string sizes = "(";  // appended, not one + chain: GCC 12's -Wrestrict misfires on that
    sizes += std::to_string(n - 1);
    sizes += ", 1)";
    EXPECT_NE(s.message().find(sizes), std::string::npos) << s.ToString();
  } else {
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(h->inter()->world_size(), 2);
    EXPECT_EQ(h->intra()->world_size(), 1);
  }
  EXPECT_TRUE(world->health().ok());
}

TEST(HierarchicalCommTest, QuantizedAllGatherGivesEveryRankTheSameRoundTrip) {
  const int n = WorldSize(), r = WorldRank();
  const int64_t counts[] = {0, 1, 257, 1003};
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (bool in_place : {false, true}) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + (in_place ? " in place" : ""));
      auto world = CommWith(0);
      auto h = MakeHier(world.get());
      const size_t es = DTypeSize(dtype);
      std::vector<std::vector<uint8_t>> mine, out;
      std::vector<Comm::GatherItem> items;
      for (int64_t c : counts) {
        std::vector<float> v(static_cast<size_t>(c));
        for (int64_t i = 0; i < c; ++i) v[static_cast<size_t>(i)] = Input(r, i, static_cast<uint64_t>(c));
        mine.push_back(ToBytes(v, dtype, nullptr));
        out.emplace_back(static_cast<size_t>(c * n) * es, 0xCD);
      }
      for (size_t k = 0; k < mine.size(); ++k) {
        if (in_place && counts[k] > 0) std::memcpy(out[k].data() + r * counts[k] * es, mine[k].data(), mine[k].size());
        const void* src = in_place ? static_cast<const void*>(out[k].data() + r * counts[k] * es) : mine[k].data();
        items.push_back({src, out[k].data(), counts[k]});
      }
      std::vector<uint8_t> staging(static_cast<size_t>(HierarchicalComm::GatherStagingBytes(counts, n)));
      ASSERT_TRUE(h->QuantizedAllGatherMany(items, dtype, staging.data(), {}).ok());
      int64_t bad = 0, beyond = 0;
      for (size_t k = 0; k < mine.size(); ++k) {
        const int64_t c = counts[k];
        for (int q = 0; q < n; ++q) {
          std::vector<float> v(static_cast<size_t>(c)), x;
          for (int64_t i = 0; i < c; ++i) v[static_cast<size_t>(i)] = Input(q, i, static_cast<uint64_t>(c));
          const std::vector<uint8_t> bytes = ToBytes(v, dtype, &x);
          // The expected bytes: rank q's values quantized once and dequantized into dtype.
          std::vector<uint8_t> payload(static_cast<size_t>(QuantPayloadBytes(c, 8)));
          kernels::QuantizeCpu(bytes.data(), ElemOf(dtype), c, 8, payload.data(), 1);
          std::vector<uint8_t> want(static_cast<size_t>(c) * es);
          kernels::DequantizeCpu(payload.data(), c, 8, want.data(), ElemOf(dtype), 1);
          bad += c > 0 && std::memcmp(out[k].data() + q * c * es, want.data(), want.size()) != 0;  // no null memcmp
          std::vector<float> got(static_cast<size_t>(c));
          kernels::ConvertCpu(out[k].data() + q * c * es, ElemOf(dtype), got.data(), QuantElem::kF32, c, 1);
          for (int64_t i = 0; i < c; ++i) {
            double amax = 0;
            for (int64_t j = i / 256 * 256; j < std::min(c, i / 256 * 256 + 256); ++j) {
              amax = std::max(amax, std::fabs(static_cast<double>(x[static_cast<size_t>(j)])));
            }
            // Half a step of 8 bits, fp32 slack, then the rounding into dtype: half an ulp of the value (2^-8 of it
            // for bf16, 2^-11 for fp16, 0 for fp32).
            const double ulp = dtype == DType::kBF16 ? 0x1p-8 : dtype == DType::kF16 ? 0x1p-11 : 0.0;
            const double bound = amax / 254.0 + amax * 0x1p-22 + std::fabs(got[static_cast<size_t>(i)]) * ulp + 1e-7;
            beyond += std::fabs(got[static_cast<size_t>(i)] - x[static_cast<size_t>(i)]) > bound;
          }
        }
      }
      EXPECT_EQ(bad, 0) << "gathered payloads differ from the ranks' round trips";
      EXPECT_EQ(beyond, 0) << "gathered values beyond the stated error";
      // What crossed: the bytes of the payloads, counted by the world Comm like an all-gather of u8.
      int64_t payload_bytes = 0;
      for (int64_t c : counts) payload_bytes += QuantPayloadBytes(c, 8);
      EXPECT_EQ(world->counters().all_gather, payload_bytes * n);
    }
  }
}

// The reference: the two levels computed in one process from every rank's input, in the documented order.
std::vector<float> SimulatedReduceScatter(const NodeTopology& t, int owner, int64_t count, DType dtype, int bits,
                                          uint64_t salt) {
  const int nodes = t.nodes, L = static_cast<int>(t.node_of.size()) / t.nodes;
  const int world = nodes * L;
  // Every rank's slice `owner`, as the dtype holds it.
  std::vector<std::vector<float>> x(static_cast<size_t>(world));
  for (int q = 0; q < world; ++q) {
    std::vector<float> v(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) v[static_cast<size_t>(i)] = Input(q, owner * count + i, salt);
    ToBytes(v, dtype, &x[static_cast<size_t>(q)]);
  }
  const int owner_node = t.node_of[static_cast<size_t>(owner)];
  int owner_local = 0;
  for (int q = 0; q < owner; ++q) owner_local += t.node_of[static_cast<size_t>(q)] == owner_node;
  std::vector<float> acc(static_cast<size_t>(count), 0.0f);
  for (int j = 0; j < nodes; ++j) {
    // Node j's partial at its rank with the owner's local index: own exact, the others round-tripped.
    const std::vector<int> ranks = t.RanksOf(j);
    std::vector<float> part(static_cast<size_t>(count), 0.0f);
    for (int k = 0; k < L; ++k) {
      const std::vector<float>& xk = x[static_cast<size_t>(ranks[static_cast<size_t>(k)])];
      const std::vector<float> term = k == owner_local ? xk : RoundTrip(xk.data(), count, bits);
      for (int64_t i = 0; i < count; ++i) {
        part[static_cast<size_t>(i)] = k == 0 ? term[static_cast<size_t>(i)] : part[static_cast<size_t>(i)] + term[static_cast<size_t>(i)];
      }
    }
    const std::vector<float> term = j == owner_node ? part : RoundTrip(part.data(), count, bits);
    for (int64_t i = 0; i < count; ++i) {
      acc[static_cast<size_t>(i)] = j == 0 ? term[static_cast<size_t>(i)] : acc[static_cast<size_t>(i)] + term[static_cast<size_t>(i)];
    }
  }
  std::vector<float> rounded;
  ToBytes(acc, dtype, &rounded);
  return rounded;
}

TEST(HierarchicalCommTest, QuantizedReduceScatterEqualsTheTwoLevelSimulation) {
  const int n = WorldSize(), r = WorldRank();
  for (int override : UniformCases()) {
    auto world = CommWith(override);
    auto h = MakeHier(world.get());
    const NodeTopology& t = world->topology();
    const int nodes = t.nodes, L = t.local_size;
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (int bits : {8, 4}) {
        for (int64_t count : {1, 7, 256, 1003}) {
          for (bool in_place : {false, true}) {
            SCOPED_TRACE(t.ToString() + ", " + DTypeName(dtype) + ", " + std::to_string(bits) + " bits, count " +
                         std::to_string(count) + (in_place ? ", in place" : ""));
            const uint64_t salt = static_cast<uint64_t>(count * 16 + bits + (dtype == DType::kBF16));
            const size_t es = DTypeSize(dtype);
            std::vector<float> v(static_cast<size_t>(n * count));
            for (int64_t i = 0; i < n * count; ++i) v[static_cast<size_t>(i)] = Input(r, i, salt);
            std::vector<uint8_t> send = ToBytes(v, dtype, nullptr);
            std::vector<uint8_t> out(static_cast<size_t>(count) * es, 0xEE);
            void* recv = in_place ? send.data() + r * count * es : out.data();
            std::vector<uint8_t> staging(
                static_cast<size_t>(HierarchicalComm::ReduceStagingBytes(count, nodes, L, bits)));
            const CommCounters before = h->counters();
            ASSERT_TRUE(h->QuantizedReduceScatter(send.data(), recv, count, dtype, bits, staging.data(), {}).ok());
            const CommCounters after = h->counters();
            std::vector<float> got(static_cast<size_t>(count));
            kernels::ConvertCpu(recv, ElemOf(dtype), got.data(), QuantElem::kF32, count, 1);
            const std::vector<float> want = SimulatedReduceScatter(t, r, count, dtype, bits, salt);
            EXPECT_EQ(std::memcmp(got.data(), want.data(), static_cast<size_t>(count) * 4), 0)
                << "differs from the simulation of the two levels";
            // Against the exact sum: the bound of comm_hierarchical.cc, A per block over every rank's input.
            const double q = bits == 8 ? 127 : 7;
            std::vector<std::vector<float>> xs(static_cast<size_t>(n));  // every rank's slice r, as dtype holds it
            for (int p = 0; p < n; ++p) {
              std::vector<float> slice(static_cast<size_t>(count));
              for (int64_t i = 0; i < count; ++i) slice[static_cast<size_t>(i)] = Input(p, r * count + i, salt);
              ToBytes(slice, dtype, &xs[static_cast<size_t>(p)]);
            }
            int64_t beyond = 0;
            for (int64_t i = 0; i < count; ++i) {
              double exact = 0, amax = 0;
              for (int p = 0; p < n; ++p) {
                exact += xs[static_cast<size_t>(p)][static_cast<size_t>(i)];
                for (int64_t j = i / 256 * 256; j < std::min(count, i / 256 * 256 + 256); ++j) {
                  amax = std::max(amax, std::fabs(static_cast<double>(xs[static_cast<size_t>(p)][static_cast<size_t>(j)])));
                }
              }
              const double ap = L * amax + (L - 1) * amax / (2 * q);
              const double quant = nodes * (L - 1) * amax / (2 * q) + (nodes - 1) * ap / (2 * q);
              const double slack = (nodes * (L - 1) + nodes - 1) * ap * 0x1p-22 + 4.0 * n * n * amax * 0x1p-24;
              const double round = dtype == DType::kBF16 ? std::fabs(got[static_cast<size_t>(i)]) * 0x1p-8 : 0.0;
              beyond += std::fabs(got[static_cast<size_t>(i)] - exact) > quant + slack + round;
            }
            EXPECT_EQ(beyond, 0) << "elements beyond the bound of comm_hierarchical.cc";
            // Traffic per level, as the intra and inter Comms sent it.
            const int64_t pq = QuantPayloadBytes(count, bits);
            EXPECT_EQ(after.intra_node_bytes - before.intra_node_bytes, int64_t{L - 1} * nodes * pq);
            EXPECT_EQ(after.inter_node_bytes - before.inter_node_bytes, int64_t{nodes - 1} * pq);
            // Reproducible: the same call gives the same bits.
            if (!in_place) {
              std::vector<uint8_t> again(out.size(), 0x11);
              ASSERT_TRUE(h->QuantizedReduceScatter(send.data(), again.data(), count, dtype, bits, staging.data(), {})
                              .ok());
              EXPECT_EQ(again, out);
            }
          }
        }
      }
    }
  }
}

TEST(HierarchicalCommTest, RejectsUnsupportedDtypesAndBits) {
  auto world = CommWith(1);
  auto h = MakeHier(world.get());
  std::vector<uint8_t> staging(1 << 16), buf(1 << 12);
  Status s = h->QuantizedReduceScatter(buf.data(), buf.data(), 4, DType::kF32, 2, staging.data(), {});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  s = h->QuantizedReduceScatter(buf.data(), buf.data(), 4, DType::kI64, 8, staging.data(), {});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  const Comm::GatherItem item{buf.data(), buf.data() + 64, 2};
  s = h->QuantizedAllGatherMany({&item, 1}, DType::kU8, staging.data(), {});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
}

// Two threads, each with its own duplicate and HierarchicalComm, reduce at once: nothing is shared between them.
TEST(HierarchicalCommTest, IndependentInstancesRunConcurrently) {
  const int n = WorldSize(), r = WorldRank();
  auto base = CommWith(0);
  std::unique_ptr<Comm> dup[2];
  ASSERT_TRUE(base->Duplicate(&dup[0]).ok());
  ASSERT_TRUE(base->Duplicate(&dup[1]).ok());
  std::unique_ptr<HierarchicalComm> h[2] = {MakeHier(dup[0].get()), MakeHier(dup[1].get())};
  const NodeTopology& t = base->topology();
  const int64_t count = 600;
  std::vector<float> results[2];
  Status status[2];
  auto work = [&](int which) {
    std::vector<float> v(static_cast<size_t>(n * count));
    for (int64_t i = 0; i < n * count; ++i) v[static_cast<size_t>(i)] = Input(r, i, 99);
    std::vector<uint8_t> staging(static_cast<size_t>(HierarchicalComm::ReduceStagingBytes(count, t.nodes,
                                                                                          t.local_size, 8)));
    results[which].resize(static_cast<size_t>(count));
    for (int rep = 0; rep < 5 && status[which].ok(); ++rep) {
      status[which] = h[which]->QuantizedReduceScatter(v.data(), results[which].data(), count, DType::kF32, 8,
                                                       staging.data(), {});
    }
  };
  std::thread other(work, 1);
  work(0);
  other.join();
  ASSERT_TRUE(status[0].ok()) << status[0].ToString();
  ASSERT_TRUE(status[1].ok()) << status[1].ToString();
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], SimulatedReduceScatter(t, r, count, DType::kF32, 8, 99));
}

}  // namespace
}  // namespace zero::internal

// Comm: every collective of the MPI backend (and Comm::Single) against exact references, run at 1-4 ranks.
//
// Inputs mix magnitudes (±1e8 with small values in f32, ±1e17 in f64) so that float association matters: sums
// must equal RingSum (ring_order.h) bitwise, which pins the documented summation order, not just "a sum".
// Every shape runs with the default message size and with 7-element messages (chunking), in place and out of
// place. The broken-communicator tests (timeout, abort, mismatched calls, bad arguments) each use a fresh Comm
// and check that every rank gets an error, never a hang.
#include <mpi.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iomanip>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "kernels/cast.cuh"
#include "ring_order.h"
#include "testing/mpi_env.h"
#include "zero/comm.h"

namespace zero {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using zero::testing::WorldRank;
using zero::testing::WorldSize;

constexpr int64_t kDefaultMessage = int64_t{1} << 30;
constexpr int64_t kMessageSizes[] = {kDefaultMessage, 7};
constexpr int64_t kCounts[] = {0, 1, 7, 1003};

std::unique_ptr<Comm> MakeComm(int64_t max_message = kDefaultMessage, milliseconds timeout = milliseconds(20'000),
                               MPI_Comm base = MPI_COMM_WORLD) {
  CommOptions options;
  options.timeout = timeout;
  options.TEST_max_message_elements = max_message;
  std::unique_ptr<Comm> comm;
  Status s = Comm::FromMpiComm(MPI_Comm_c2f(base), options, &comm);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return comm;
}

double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

uint64_t Hash(uint64_t x) {
  x = (x ^ (x >> 33)) * 0xff51afd7ed558ccdULL;
  x = (x ^ (x >> 33)) * 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

// Rank `rank`'s input element i: huge values of both signs mixed with small ones for floats (so each addition
// order rounds differently), bounded integers otherwise.
template <class T>
T Value(int rank, int64_t i) {
  const uint64_t h = Hash(static_cast<uint64_t>(rank) * 1'000'003 + static_cast<uint64_t>(i) + 17);
  if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(static_cast<int64_t>(h % 2'000'001) - 1'000'000);
  } else {
    const double big = sizeof(T) == 4 ? 1e8 : 1e17;
    switch (h % 5) {
      case 0: return static_cast<T>(big * static_cast<double>(1 + (h >> 8) % 4));
      case 1: return static_cast<T>(-big * static_cast<double>(1 + (h >> 12) % 4));
      case 2: return static_cast<T>(1.0 + static_cast<double>((h >> 16) % 64) / 64.0);
      case 3: return static_cast<T>(-0.5 - static_cast<double>((h >> 20) % 16) / 32.0);
      default: return static_cast<T>((h >> 24) % 1000);
    }
  }
}

template <class T>
std::vector<T> Values(int rank, int64_t n) {
  std::vector<T> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = Value<T>(rank, i);
  return v;
}

template <class T>
::testing::AssertionResult BitwiseEqual(const T* got, const T* want, int64_t n) {
  int64_t bad = 0;
  std::ostringstream first;
  first << std::setprecision(17);
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) == 0) continue;
    if (bad++ < 5) first << " [" << i << "] got " << +got[i] << " want " << +want[i] << ";";
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << n << " elements differ:" << first.str();
}

template <class T>
constexpr DType DTypeOf() {
  if constexpr (std::is_same_v<T, float>) return DType::kF32;
  if constexpr (std::is_same_v<T, double>) return DType::kF64;
  if constexpr (std::is_same_v<T, int64_t>) return DType::kI64;
  if constexpr (std::is_same_v<T, uint16_t>) return DType::kBF16;  // moved as opaque 16-bit words
  return DType::kU8;
}

template <class T>
void CheckReduceScatter(Comm* comm, int64_t count, bool in_place) {
  SCOPED_TRACE(::testing::Message() << "ReduceScatter " << DTypeName(DTypeOf<T>()) << " count " << count
                                    << (in_place ? " in place" : " out of place"));
  const int n = comm->world_size(), r = comm->rank();
  const std::vector<T> input = Values<T>(r, n * count);
  std::vector<T> want(count), by_rank(n);
  for (int64_t j = 0; j < count; ++j) {
    for (int k = 0; k < n; ++k) by_rank[k] = Value<T>(k, r * count + j);
    want[j] = RingSum(by_rank.data(), n, r);
  }
  std::vector<T> buf = input, recv(count, T(-7));
  T* out = in_place ? buf.data() + r * count : recv.data();
  Status s = comm->ReduceScatter(buf.data(), out, count, DTypeOf<T>());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(BitwiseEqual(out, want.data(), count));
  // Only this rank's slice may change (in place), and the send buffer never (out of place).
  for (int k = 0; k < n; ++k) {
    if (in_place && k == r) continue;
    EXPECT_TRUE(BitwiseEqual(buf.data() + k * count, input.data() + k * count, count)) << "slice " << k;
  }
}

template <class T>
void CheckAllGather(Comm* comm, int64_t count, bool in_place) {
  SCOPED_TRACE(::testing::Message() << "AllGather " << DTypeName(DTypeOf<T>()) << " count " << count
                                    << (in_place ? " in place" : " out of place"));
  const int n = comm->world_size(), r = comm->rank();
  std::vector<T> want;
  for (int k = 0; k < n; ++k) {
    const std::vector<T> v = Values<T>(k, count);
    want.insert(want.end(), v.begin(), v.end());
  }
  const std::vector<T> mine = Values<T>(r, count);
  std::vector<T> recv(n * count, T(99));
  if (in_place) std::copy(mine.begin(), mine.end(), recv.begin() + r * count);
  const T* send = in_place ? recv.data() + r * count : mine.data();
  Status s = comm->AllGather(send, recv.data(), count, DTypeOf<T>());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(BitwiseEqual(recv.data(), want.data(), n * count));
}

template <class T>
void CheckAllReduce(Comm* comm, int64_t count, ReduceOp op, bool in_place) {
  SCOPED_TRACE(::testing::Message() << "AllReduce op " << static_cast<int>(op) << " " << DTypeName(DTypeOf<T>())
                                    << " count " << count << (in_place ? " in place" : " out of place"));
  const int n = comm->world_size(), r = comm->rank();
  std::vector<T> want(count), by_rank(n);
  for (int64_t i = 0; i < count; ++i) {
    for (int k = 0; k < n; ++k) by_rank[k] = Value<T>(k, i);
    if (op == ReduceOp::kSum) {
      want[i] = RingSum(by_rank.data(), n, RingChunkOwner(count, n, i));
    } else {
      want[i] = by_rank[0];
      for (int k = 1; k < n; ++k) {
        want[i] = op == ReduceOp::kMax ? std::max(want[i], by_rank[k]) : std::min(want[i], by_rank[k]);
      }
    }
  }
  const std::vector<T> input = Values<T>(r, count);
  std::vector<T> buf = input, recv(count, T(-3));
  T* out = in_place ? buf.data() : recv.data();
  Status s = comm->AllReduce(buf.data(), out, count, DTypeOf<T>(), op);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(BitwiseEqual(out, want.data(), count));
  if (!in_place) {
    EXPECT_TRUE(BitwiseEqual(buf.data(), input.data(), count)) << "send changed";
  }
}

template <class T>
void CheckBroadcast(Comm* comm, int64_t count) {
  for (int root = 0; root < comm->world_size(); ++root) {
    SCOPED_TRACE(::testing::Message() << "Broadcast " << DTypeName(DTypeOf<T>()) << " count " << count << " root "
                                      << root);
    const std::vector<T> want = Values<T>(root, count);
    std::vector<T> buf = comm->rank() == root ? want : std::vector<T>(count, T(5));
    Status s = comm->Broadcast(buf.data(), count, DTypeOf<T>(), root);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(BitwiseEqual(buf.data(), want.data(), count));
  }
}

// The bitwise checks are meaningful only if another summation order gives different bits for these inputs.
TEST(CommInputsTest, SummationOrderChangesTheBits) {
  for (int n : {3, 4}) {
    int64_t f32_differs = 0, f64_differs = 0;
    for (int64_t i = 0; i < 1003; ++i) {
      float f[4] = {};
      double d[4] = {};
      for (int k = 0; k < n; ++k) f[k] = Value<float>(k, i), d[k] = Value<double>(k, i);
      float fs = f[0];
      double ds = d[0];
      for (int k = 1; k < n; ++k) fs += f[k], ds += d[k];  // rank order, not ring order
      f32_differs += RingSum(f, n, 0) != fs;
      f64_differs += RingSum(d, n, 0) != ds;
    }
    EXPECT_GT(f32_differs, 10) << n << " ranks";
    EXPECT_GT(f64_differs, 10) << n << " ranks";
  }
}

TEST(CommInputsTest, RingChunksCoverTheBuffer) {
  for (int n = 1; n <= 5; ++n) {
    for (int64_t count : {1, 2, 3, 7, 1003}) {
      for (int64_t i = 0; i < count; ++i) {
        const int c = RingChunkOwner(count, n, i);
        ASSERT_TRUE(c >= 0 && c < n && RingChunkBegin(count, n, c) <= i && i < RingChunkBegin(count, n, c + 1))
            << "n " << n << " count " << count << " i " << i << " owner " << c;
      }
    }
  }
}

TEST(CommTest, RankAndSizeMatchTheWorld) {
  auto comm = zero::testing::WorldComm();
  ASSERT_NE(comm, nullptr);
  EXPECT_EQ(comm->rank(), WorldRank());
  EXPECT_EQ(comm->world_size(), WorldSize());
  EXPECT_TRUE(comm->health().ok());
}

TEST(CommTest, ReduceScatterMatchesRingOrderBitwise) {
  for (int64_t max_message : kMessageSizes) {
    SCOPED_TRACE(::testing::Message() << "max message " << max_message);
    auto comm = MakeComm(max_message);
    for (int64_t count : kCounts) {
      for (bool in_place : {false, true}) {
        CheckReduceScatter<float>(comm.get(), count, in_place);
        CheckReduceScatter<double>(comm.get(), count, in_place);
      }
    }
  }
}

TEST(CommTest, AllGatherEveryDType) {
  for (int64_t max_message : kMessageSizes) {
    SCOPED_TRACE(::testing::Message() << "max message " << max_message);
    auto comm = MakeComm(max_message);
    for (int64_t count : kCounts) {
      for (bool in_place : {false, true}) {
        CheckAllGather<float>(comm.get(), count, in_place);
        CheckAllGather<double>(comm.get(), count, in_place);
        CheckAllGather<int64_t>(comm.get(), count, in_place);
        CheckAllGather<uint16_t>(comm.get(), count, in_place);
        CheckAllGather<uint8_t>(comm.get(), count, in_place);
      }
    }
  }
}

TEST(CommTest, AllReduceSumMatchesRingOrderBitwise) {
  for (int64_t max_message : kMessageSizes) {
    SCOPED_TRACE(::testing::Message() << "max message " << max_message);
    auto comm = MakeComm(max_message);
    for (int64_t count : kCounts) {
      for (bool in_place : {false, true}) {
        CheckAllReduce<float>(comm.get(), count, ReduceOp::kSum, in_place);
        CheckAllReduce<double>(comm.get(), count, ReduceOp::kSum, in_place);
        CheckAllReduce<int64_t>(comm.get(), count, ReduceOp::kSum, in_place);
      }
    }
  }
}

TEST(CommTest, AllReduceMaxMin) {
  for (int64_t max_message : kMessageSizes) {
    auto comm = MakeComm(max_message);
    for (int64_t count : kCounts) {
      for (ReduceOp op : {ReduceOp::kMax, ReduceOp::kMin}) {
        CheckAllReduce<float>(comm.get(), count, op, /*in_place=*/count % 2 == 1);
        CheckAllReduce<double>(comm.get(), count, op, /*in_place=*/false);
        CheckAllReduce<int64_t>(comm.get(), count, op, /*in_place=*/true);
      }
    }
  }
}

// Counts above the scratch window (2 MiB per half) run the ring once per window; the order must not change.
TEST(CommTest, LargeBuffersSpanSeveralWindows) {
  auto comm = MakeComm();
  CheckReduceScatter<double>(comm.get(), 300'001, /*in_place=*/true);
  CheckReduceScatter<float>(comm.get(), 600'001, /*in_place=*/false);
  CheckAllReduce<float>(comm.get(), 3 * (1 << 20) + 5, ReduceOp::kSum, /*in_place=*/true);
}

TEST(CommTest, BroadcastFromEveryRoot) {
  for (int64_t max_message : kMessageSizes) {
    auto comm = MakeComm(max_message);
    for (int64_t count : kCounts) {
      CheckBroadcast<float>(comm.get(), count);
      CheckBroadcast<double>(comm.get(), count);
      CheckBroadcast<uint8_t>(comm.get(), count);
    }
  }
}

TEST(CommPeerTest, BarrierWaitsForTheSlowestRank) {
  auto comm = MakeComm();
  if (comm->rank() == 0) std::this_thread::sleep_for(milliseconds(300));
  const auto start = Clock::now();
  Status s = comm->Barrier();
  ASSERT_TRUE(s.ok()) << s.ToString();
  // Rank 0 entered 300 ms late; nobody may leave before it arrived.
  if (comm->rank() != 0) {
    EXPECT_GE(Seconds(start), 0.25);
  }
}

void CheckCounters(Comm* comm) {
  const int n = comm->world_size();
  std::vector<double> a(8 * n, 1.0), b(8 * n, 0.0);
  std::vector<uint8_t> bytes(3 * n, 1);
  CollectiveOptions control;
  control.control = true;
  comm->ResetCounters();
  ASSERT_TRUE(comm->ReduceScatter(a.data(), b.data(), 5, DType::kF64).ok());
  ASSERT_TRUE(comm->AllGather(bytes.data(), b.data(), 3, DType::kU8).ok());
  ASSERT_TRUE(comm->AllReduce(a.data(), b.data(), 4, DType::kF64, ReduceOp::kSum).ok());
  ASSERT_TRUE(comm->AllReduce(a.data(), b.data(), 2, DType::kF64, ReduceOp::kMax, control).ok());
  ASSERT_TRUE(comm->Broadcast(a.data(), 6, DType::kF64, 0).ok());
  ASSERT_TRUE(comm->Broadcast(a.data(), 1, DType::kF64, n - 1, control).ok());
  ASSERT_TRUE(comm->ReduceScatter(a.data(), b.data(), 2, DType::kF64, control).ok());
  ASSERT_TRUE(comm->Barrier().ok());
  ASSERT_TRUE(comm->Barrier(control).ok());
  const CommCounters& c = comm->counters();
  EXPECT_EQ(c.reduce_scatter, 5 * n);
  EXPECT_EQ(c.all_gather, 3 * n);
  EXPECT_EQ(c.all_reduce, 4);
  EXPECT_EQ(c.broadcast, 6);
  EXPECT_EQ(c.control_calls, 4);
  EXPECT_EQ(c.control_elements, 2 + 1 + 2 * n);
  EXPECT_EQ(c.Volume(), 5 * n + 3 * n + 2 * 4);
  comm->ResetCounters();
  EXPECT_EQ(comm->counters().Volume(), 0);
  EXPECT_EQ(comm->counters().control_calls, 0);
}

TEST(CommTest, CountersSeparateDataFromControl) {
  auto comm = MakeComm();
  CheckCounters(comm.get());
}

// Even and odd ranks form two groups that run different collectives at the same time.
TEST(CommTest, SubgroupCommunicatorsAreIndependent) {
  const int r = WorldRank(), n = WorldSize();
  MPI_Comm half;
  ASSERT_EQ(MPI_Comm_split(MPI_COMM_WORLD, r % 2, r, &half), MPI_SUCCESS);
  {
    auto group = MakeComm(7, milliseconds(20'000), half);
    auto world = MakeComm();
    ASSERT_NE(group, nullptr);
    EXPECT_EQ(group->rank(), r / 2);
    EXPECT_EQ(group->world_size(), r % 2 == 0 ? (n + 1) / 2 : n / 2);
    // Sum of the world ranks in this group: proves the Comm spans exactly the group.
    int64_t mine = r, sum = -1, want = 0;
    for (int k = r % 2; k < n; k += 2) want += k;
    ASSERT_TRUE(group->AllReduce(&mine, &sum, 1, DType::kI64, ReduceOp::kSum).ok());
    EXPECT_EQ(sum, want);
    if (r % 2 == 0) {
      CheckReduceScatter<float>(group.get(), 1003, /*in_place=*/false);
    } else {
      CheckAllReduce<double>(group.get(), 1003, ReduceOp::kSum, /*in_place=*/true);
    }
    CheckAllReduce<int64_t>(world.get(), 7, ReduceOp::kSum, /*in_place=*/false);
    CheckAllGather<float>(group.get(), 7, /*in_place=*/true);
  }
  MPI_Comm_free(&half);
}

TEST(CommTest, OpenMpiUsesTheWorldAndLeavesMpiRunning) {
  std::unique_ptr<Comm> comm;
  Status s = Comm::OpenMpi(CommOptions(), &comm);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(comm->world_size(), WorldSize());
  int64_t one = 1, sum = 0;
  ASSERT_TRUE(comm->AllReduce(&one, &sum, 1, DType::kI64, ReduceOp::kSum).ok());
  EXPECT_EQ(sum, WorldSize());
  comm.reset();
  int finalized = 1;
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0) << "MPI was initialized by main, so the Comm must not finalize it";
}

TEST(CommTest, BadOptionsAreRejected) {
  std::unique_ptr<Comm> comm;
  CommOptions options;
  options.timeout = milliseconds(0);
  EXPECT_EQ(Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm).code(), StatusCode::kInvalidArgument);
  options = CommOptions();
  options.TEST_max_message_elements = 0;
  EXPECT_EQ(Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(comm, nullptr);
}

TEST(SingleCommTest, CopiesCountsAndAborts) {
  auto comm = Comm::Single();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->world_size(), 1);
  for (int64_t count : kCounts) {
    for (bool in_place : {false, true}) {
      CheckReduceScatter<float>(comm.get(), count, in_place);
      CheckAllGather<uint8_t>(comm.get(), count, in_place);
      CheckAllReduce<int64_t>(comm.get(), count, ReduceOp::kMin, in_place);
    }
    CheckBroadcast<double>(comm.get(), count);
  }
  CheckCounters(comm.get());
  EXPECT_EQ(comm->ReduceScatter(nullptr, nullptr, 1, DType::kF32).code(), StatusCode::kInvalidArgument);
  auto fresh = Comm::Single();
  fresh->Abort(Status::Internal("test reason"));
  Status s = fresh->health();
  EXPECT_EQ(s.code(), StatusCode::kAborted);
  EXPECT_TRUE(Contains(s.message(), "rank 0") && Contains(s.message(), "test reason")) << s.ToString();
  EXPECT_EQ(fresh->Barrier().message(), s.message());
}

// ---- Broken communicators: every rank gets an error, never a hang. ----

// The last rank stalls for 2.5 s before a reduce-scatter; the others have a 1 s timeout.
void CheckTimeout(int64_t count) {
  const int n = WorldSize(), r = WorldRank(), late = n - 1;
  auto comm = MakeComm(kDefaultMessage, milliseconds(1000));
  std::vector<float> send(count * n, 1.0f), recv(count);
  CollectiveOptions opts;
  opts.what = "bucket 3 of unit 2, step 7";
  if (r == late) std::this_thread::sleep_for(milliseconds(2500));  // a stalled rank
  const auto start = Clock::now();
  Status s = comm->ReduceScatter(send.data(), recv.data(), count, DType::kF32, opts);
  const double took = Seconds(start);
  const std::string& m = s.message();
  EXPECT_TRUE(Contains(m, "ReduceScatter") && Contains(m, opts.what) && Contains(m, std::to_string(count) + " f32"))
      << s.ToString();
  if (r != late) {
    // Either this rank's own timeout, or a peer's, relayed through the abort channel while this rank waited.
    const bool own = s.code() == StatusCode::kTimeout;
    const bool relayed = s.code() == StatusCode::kAborted && Contains(m, "Timeout:");
    EXPECT_TRUE(own || relayed) << s.ToString();
    if (own) {
      EXPECT_TRUE(Contains(m, "rank " + std::to_string(r) + " of " + std::to_string(n)) && Contains(m, "1000 ms") &&
                  Contains(m, "unusable") &&
                  (Contains(m, "waiting to receive from rank") || Contains(m, "to receive this rank's data")))
          << s.ToString();
    }
    EXPECT_GT(took, 0.5);
    EXPECT_LT(took, 10.0);
  } else {
    // The stalled rank finds its peers' notices as soon as it calls in.
    EXPECT_TRUE(s.code() == StatusCode::kAborted || s.code() == StatusCode::kTimeout) << s.ToString();
    EXPECT_LT(took, 0.9);
  }
  // The first rank to give up saw a genuine timeout.
  int timed_out = r != late && s.code() == StatusCode::kTimeout, any = 0;
  MPI_Allreduce(&timed_out, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_EQ(any, 1);
  // Broken stays broken, with the same status.
  Status again = comm->AllGather(send.data(), recv.data(), 1, DType::kF32);
  EXPECT_EQ(again.code(), s.code());
  EXPECT_EQ(again.message(), s.message());
  EXPECT_EQ(comm->health().message(), s.message());
}

TEST(CommBrokenPeerTest, TimeoutNamesTheCollectiveOnEveryRank) {
  CheckTimeout(16);
}

// Large messages go rendezvous in Open MPI: their sends cannot be cancelled and are left to MPI, which must
// still let every rank fail, and later finalize.
TEST(CommBrokenPeerTest, TimeoutWithLargeMessages) {
  CheckTimeout(100'003);
}

TEST(CommBrokenTest, AbortReachesEveryPeer) {
  auto comm = MakeComm();
  std::vector<double> buf(4, 1.0);
  Status s;
  const auto start = Clock::now();
  if (comm->rank() == 0) {
    comm->Abort(Status::Internal("test reason"));
    s = comm->health();
  } else {
    CollectiveOptions opts;
    opts.what = "after the abort";
    s = comm->AllReduce(buf.data(), buf.data(), 4, DType::kF64, ReduceOp::kSum, opts);
  }
  EXPECT_LT(Seconds(start), 10.0) << "the notice must end the wait long before the 20 s timeout";
  EXPECT_EQ(s.code(), StatusCode::kAborted) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "rank 0 aborted") && Contains(s.message(), "test reason")) << s.ToString();
  Status again = comm->Barrier();
  EXPECT_EQ(again.code(), StatusCode::kAborted);
  EXPECT_EQ(again.message(), s.message());
  EXPECT_EQ(comm->health().message(), s.message());
}

// Every rank aborts at once, so nobody reads its peers' notices; MPI may reuse the freed communicators' context
// ids for the next ones. The stale notices must not break those.
TEST(CommBrokenTest, StaleNoticesDoNotBreakALaterComm) {
  for (int round = 0; round < 3; ++round) {
    auto comm = MakeComm();
    comm->Abort(Status::Internal("everyone aborts"));
    EXPECT_EQ(comm->health().code(), StatusCode::kAborted);
    MPI_Barrier(MPI_COMM_WORLD);  // all notices are sent before the communicators are freed
  }
  auto fresh = MakeComm();
  std::vector<double> buf(4, 1.0);
  Status s = fresh->AllReduce(buf.data(), buf.data(), 4, DType::kF64, ReduceOp::kSum);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(buf[0], fresh->world_size());
  EXPECT_TRUE(fresh->health().ok());
}

TEST(CommBrokenPeerTest, AbortNoticesAreBounded) {
  auto comm = MakeComm();
  if (comm->rank() == 0) {
    comm->Abort(Status::Internal(std::string(5000, 'x')));
    EXPECT_EQ(comm->health().code(), StatusCode::kAborted);
  } else {
    Status s = comm->Barrier();
    EXPECT_EQ(s.code(), StatusCode::kAborted);
    EXPECT_TRUE(Contains(s.message(), "rank 0 aborted the communicator: Internal: xxx")) << s.message().substr(0, 80);
    EXPECT_LT(s.message().size(), 1100u);
  }
}

// Abort from another thread ends a wait that would otherwise last until the timeout.
TEST(CommBrokenPeerTest, AbortFromAnotherThreadEndsAWait) {
  int provided = 0;
  MPI_Query_thread(&provided);
  ASSERT_GE(provided, MPI_THREAD_MULTIPLE) << "the test main asks for MPI_THREAD_MULTIPLE";
  auto comm = MakeComm();
  const int r = comm->rank();
  std::thread aborter;
  if (r == 0) {
    aborter = std::thread([&comm] {
      std::this_thread::sleep_for(milliseconds(300));
      comm->Abort(Status::Internal("from another thread"));
    });
  }
  // Rank 0's count differs, so this all-reduce can never complete.
  std::vector<float> buf(5, 1.0f);
  const auto start = Clock::now();
  Status s = comm->AllReduce(buf.data(), buf.data(), r == 0 ? 4 : 5, DType::kF32, ReduceOp::kSum);
  if (aborter.joinable()) aborter.join();
  EXPECT_LT(Seconds(start), 10.0);
  EXPECT_EQ(s.code(), StatusCode::kAborted) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "rank 0 aborted") && Contains(s.message(), "from another thread"))
      << s.ToString();
}

// Counts that differ by one element, with 7-element messages: without the count in the tags, the first piece of
// the longer all-gather would match the shorter one and some ranks would return OK with wrong data.
TEST(CommBrokenPeerTest, MismatchedCountsFailOnEveryRank) {
  const int n = WorldSize(), r = WorldRank();
  auto comm = MakeComm(7, milliseconds(1000));
  const int64_t count = r == n - 1 ? 8 : 7;
  std::vector<uint8_t> send(count, 1), recv(8 * n);
  const auto start = Clock::now();
  Status s = comm->AllGather(send.data(), recv.data(), count, DType::kU8);
  EXPECT_LT(Seconds(start), 10.0);
  EXPECT_TRUE(s.code() == StatusCode::kTimeout || s.code() == StatusCode::kAborted ||
              s.code() == StatusCode::kMismatch)
      << s.ToString();
  EXPECT_FALSE(comm->health().ok());
}

TEST(CommBrokenPeerTest, MismatchedOrderFailsOnEveryRank) {
  auto comm = MakeComm(kDefaultMessage, milliseconds(1000));
  std::vector<double> send(4 * WorldSize(), 1.0), recv(4 * WorldSize());
  const Status s = comm->rank() == 0 ? comm->AllGather(send.data(), recv.data(), 4, DType::kF64)
                                     : comm->AllReduce(send.data(), recv.data(), 4, DType::kF64, ReduceOp::kSum);
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(comm->Barrier().ok());
}

// Bad arguments break the Comm on the rank that made them (and tell its peers), naming the problem.
TEST(CommBrokenTest, BadArgumentsAreRejected) {
  const int n = WorldSize();
  std::vector<double> a(8 * n), b(8 * n);
  struct Case {
    const char* expect;
    std::function<Status(Comm*)> call;
  };
  const Case cases[] = {
      {"f32, f64, bf16 and f16 only", [&](Comm* c) { return c->ReduceScatter(a.data(), b.data(), 2, DType::kI64); }},
      {"kSum only", [&](Comm* c) { return c->AllReduce(a.data(), b.data(), 2, DType::kBF16, ReduceOp::kMax); }},
      {"f32, f64, i64, bf16 and f16 only",
       [&](Comm* c) { return c->AllReduce(a.data(), b.data(), 2, DType::kU8, ReduceOp::kSum); }},
      {"count must be >= 0", [&](Comm* c) { return c->AllGather(a.data(), b.data(), -1, DType::kF64); }},
      {"root must be in", [&](Comm* c) { return c->Broadcast(a.data(), 2, DType::kF64, n); }},
      {"partially overlap",
       [&](Comm* c) { return c->AllReduce(a.data(), a.data() + 1, 4, DType::kF64, ReduceOp::kSum); }},
  };
  for (const Case& c : cases) {
    auto comm = MakeComm();
    Status s = c.call(comm.get());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_TRUE(Contains(s.message(), c.expect)) << s.ToString();
    EXPECT_EQ(comm->health().message(), s.message());
    EXPECT_EQ(comm->Barrier().code(), StatusCode::kInvalidArgument);
  }
}

// bf16 / fp16 sums (the gradient reductions of grad_dtype = kBF16 / kF16): every hop widens to fp32, adds and
// rounds to nearest even, in the ring order of ring_order.h. The reference is RingSum over a 16-bit type whose
// + does exactly that.
template <float (*Widen)(uint16_t), uint16_t (*Narrow)(float)>
struct Half {
  uint16_t bits;
  Half operator+(Half o) const { return {Narrow(Widen(bits) + Widen(o.bits))}; }
};

template <float (*Widen)(uint16_t), uint16_t (*Narrow)(float)>
void CheckHalfSums(Comm* comm, DType dtype, int64_t count) {
  SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " count " << count);
  using H = Half<Widen, Narrow>;
  const int n = comm->world_size(), r = comm->rank();
  // Values with many significant bits, so that each hop really rounds.
  auto value = [](int rank, int64_t j) {
    return Narrow(std::sin(static_cast<float>(rank * 31 + j) * 0.37f) * 3.0f);
  };
  std::vector<uint16_t> buf(static_cast<size_t>(n * count)), out(static_cast<size_t>(count));
  for (int64_t j = 0; j < n * count; ++j) buf[static_cast<size_t>(j)] = value(r, j);
  Status s = comm->ReduceScatter(buf.data(), out.data(), count, dtype);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<H> by_rank(static_cast<size_t>(n));
  int bad = 0;
  for (int64_t j = 0; j < count; ++j) {
    for (int k = 0; k < n; ++k) by_rank[static_cast<size_t>(k)] = {value(k, r * count + j)};
    bad += RingSum(by_rank.data(), n, r).bits != out[static_cast<size_t>(j)];
  }
  EXPECT_EQ(bad, 0) << "reduce-scatter elements differ from the per-hop-rounded ring sum";
  std::vector<uint16_t> all(static_cast<size_t>(count)), sum(static_cast<size_t>(count));
  for (int64_t j = 0; j < count; ++j) all[static_cast<size_t>(j)] = value(r, j);
  s = comm->AllReduce(all.data(), sum.data(), count, dtype, ReduceOp::kSum);
  ASSERT_TRUE(s.ok()) << s.ToString();
  bad = 0;
  for (int64_t j = 0; j < count; ++j) {
    for (int k = 0; k < n; ++k) by_rank[static_cast<size_t>(k)] = {value(k, j)};
    bad += RingSum(by_rank.data(), n, RingChunkOwner(count, n, j)).bits != sum[static_cast<size_t>(j)];
  }
  EXPECT_EQ(bad, 0) << "all-reduce elements differ from the per-hop-rounded ring sum";
}

TEST(CommTest, HalfPrecisionSumsRoundEveryHopInRingOrder) {
  auto comm = testing::WorldComm();
  for (int64_t count : {0, 1, 7, 1000}) {
    CheckHalfSums<kernels::Bf16ToFloat, kernels::FloatToBf16>(comm.get(), DType::kBF16, count);
    CheckHalfSums<kernels::F16ToFloat, kernels::FloatToF16>(comm.get(), DType::kF16, count);
  }
}

// A group of all-gathers (a stage-3 unit's buckets) gives what the same all-gathers give one by one, and counts
// each item like a separate call.
TEST(CommTest, AllGatherManyEqualsSeparateAllGathers) {
  auto comm = testing::WorldComm();
  const int n = comm->world_size(), r = comm->rank();
  const int64_t counts[] = {5, 0, 64, 1};
  std::vector<std::vector<float>> mine, grouped, separate;
  std::vector<Comm::GatherItem> items;
  for (int64_t c : counts) {
    std::vector<float> v(static_cast<size_t>(c));
    for (int64_t i = 0; i < c; ++i) v[static_cast<size_t>(i)] = static_cast<float>(r * 1000 + c * 10 + i);
    mine.push_back(v);
    grouped.emplace_back(static_cast<size_t>(c * n), -1.0f);
    separate.emplace_back(static_cast<size_t>(c * n), -2.0f);
  }
  for (size_t k = 0; k < mine.size(); ++k) items.push_back({mine[k].data(), grouped[k].data(), counts[k]});
  const CommCounters before = comm->counters();
  ASSERT_TRUE(comm->AllGatherMany(items, DType::kF32).ok());
  const int64_t grouped_elements = comm->counters().all_gather - before.all_gather;
  for (size_t k = 0; k < mine.size(); ++k) {
    ASSERT_TRUE(comm->AllGather(mine[k].data(), separate[k].data(), counts[k], DType::kF32).ok());
  }
  EXPECT_EQ(grouped, separate);
  EXPECT_EQ(grouped_elements, (5 + 0 + 64 + 1) * n);
  // An invalid item fails like the same AllGather would: this rank reports it, and since the items before it
  // already went out, a rank still inside them may instead get the abort notice carrying the same reason.
  items[2].count = -1;
  const Status s = comm->AllGatherMany(items, DType::kF32);
  EXPECT_TRUE(s.code() == StatusCode::kInvalidArgument || s.code() == StatusCode::kAborted) << s.ToString();
  EXPECT_NE(s.message().find("count must be >= 0"), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace zero

namespace zero {
namespace {

// Comm::Duplicate: a communicator over the same ranks whose collectives never meet the original's, with counters of
// its own (what Engine::Open uses so that a trainer's collectives on its Comm never interleave with the engine's).
TEST(CommDuplicateTest, DuplicatesAreIndependentWithTheirOwnCounters) {
  auto comm = MakeComm();
  ASSERT_NE(comm, nullptr);
  for (auto* c : {comm.get()}) {
    std::unique_ptr<Comm> dup;
    ASSERT_TRUE(c->Duplicate(&dup).ok());
    ASSERT_NE(dup, nullptr);
    EXPECT_EQ(dup->rank(), c->rank());
    EXPECT_EQ(dup->world_size(), c->world_size());
    EXPECT_EQ(dup->counters().Volume(), 0);
    // A second thread runs collectives on the duplicate while this one runs others on the original: different
    // kinds and counts, so a message of one that met the other would fail the call (or its value check).
    std::thread other([&] {
      for (int i = 0; i < 50; ++i) CheckAllReduce<double>(dup.get(), 1003, ReduceOp::kSum, /*in_place=*/false);
    });
    for (int i = 0; i < 50; ++i) CheckAllGather<float>(c, 7, /*in_place=*/true);
    other.join();
    EXPECT_EQ(dup->counters().all_gather, 0);
    EXPECT_EQ(dup->counters().all_reduce, 50 * 1003);
    EXPECT_TRUE(dup->health().ok());
    ASSERT_TRUE(c->Barrier().ok());  // every rank is done with the duplicate before any breaks it
    // Breaking the duplicate leaves the original usable.
    dup->Abort(Status::Internal("test"));
    EXPECT_EQ(dup->health().code(), StatusCode::kAborted);
    EXPECT_TRUE(c->health().ok());
    CheckAllGather<float>(c, 7, /*in_place=*/false);
  }
  std::unique_ptr<Comm> single_dup;
  ASSERT_TRUE(Comm::Single()->Duplicate(&single_dup).ok());
  EXPECT_EQ(single_dup->world_size(), 1);
}

// A rank that never duplicates: every other rank gets a Timeout naming the call and the cause, never a hang. The
// parent is leaked on purpose: the others' abandoned MPI_Comm_idup stays pending on it (MPI cannot cancel it).
TEST(CommDuplicatePeerTest, ARankThatNeverDuplicatesTimesOutTheOthers) {
  MPI_Comm parent = MPI_COMM_NULL;
  ASSERT_EQ(MPI_Comm_dup(MPI_COMM_WORLD, &parent), MPI_SUCCESS);
  // Leaked with `parent`, but through a static pointer so that LeakSanitizer counts it reachable (deliberate).
  static Comm* kept = nullptr;
  kept = MakeComm(kDefaultMessage, milliseconds(1'500), parent).release();
  Comm* comm = kept;
  ASSERT_NE(comm, nullptr);
  if (comm->rank() != 0) {
    std::unique_ptr<Comm> dup;
    const Status s = comm->Duplicate(&dup);
    EXPECT_EQ(s.code(), StatusCode::kTimeout) << s.ToString();
    EXPECT_TRUE(Contains(s.message(), "a peer is stalled or skipped the call")) << s.ToString();
    EXPECT_EQ(dup, nullptr);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace zero

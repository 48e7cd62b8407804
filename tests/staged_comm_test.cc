// StagedComm (testing/staged_comm.h), the test-only Comm that lets the engine's CUDA cases run several ranks on one
// GPU. Its staging logic is checked here on host memory (HostStaging; what runs on this machine) and, where a GPU
// is, on device memory (CudaStaging, `*cuda*`):
//  * Every collective, in place and not, and AllGatherMany give the bits of a plain MpiComm given the same inputs,
//    and count the same elements; a Duplicate is an independent StagedComm on the same device.
//  * With CollectiveOptions::stream set, the stream is waited for before any buffer is read, and the results are
//    back in the caller's buffers when the call returns (CUDA: buffers filled by cudaMemsetAsync on a
//    non-blocking stream just before the call).
//  * A bad call, or a copy that fails on one rank, breaks that rank's Comm and every peer gets an error instead of
//    waiting forever.
//  * The engine on Backend::kCpu over a StagedComm(HostStaging) trains bit for bit like over a plain MpiComm.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "testing/device_copy.h"
#include "testing/device_memory.h"
#include "testing/engine_harness.h"
#include "testing/mpi_env.h"
#include "testing/staged_comm.h"

namespace zero::testing {
namespace {

std::unique_ptr<StagedComm> Staged(std::shared_ptr<StagingMemory> memory) {
  auto inner = WorldComm();
  if (inner == nullptr) return nullptr;
  return std::make_unique<StagedComm>(std::move(inner), std::move(memory));
}

// Buffers in the memory a StagedComm is tested with: host vectors, or device memory.
class Buffers {
 public:
  explicit Buffers(bool device) : device_(device) {}
  ~Buffers() {
    for (void* p : device_mem_) DeviceFree(p);
  }
  // `bytes` of the test memory holding `host` (zero-filled past it).
  char* Put(const std::vector<char>& host, int64_t bytes) {
    std::vector<char> init(static_cast<size_t>(bytes), 0);
    std::copy(host.begin(), host.begin() + std::min<int64_t>(bytes, static_cast<int64_t>(host.size())), init.begin());
    if (!device_) {
      host_mem_.push_back(std::make_unique<double[]>(static_cast<size_t>(bytes / 8 + 1)));
      if (!init.empty()) std::memcpy(host_mem_.back().get(), init.data(), init.size());
      return reinterpret_cast<char*>(host_mem_.back().get());
    }
    void* p = nullptr;
    EXPECT_TRUE(DeviceMalloc(std::max<int64_t>(bytes, 8), &p).ok());
    device_mem_.push_back(p);
    if (bytes > 0) {
      EXPECT_TRUE(CopyToDevice(p, init.data(), bytes).ok());
    }
    return static_cast<char*>(p);
  }
  std::vector<char> Get(const char* at, int64_t bytes) const {
    std::vector<char> out(static_cast<size_t>(bytes));
    if (bytes == 0) return out;
    if (!device_) {
      std::memcpy(out.data(), at, out.size());
    } else {
      EXPECT_TRUE(CopyFromDevice(out.data(), at, bytes).ok());
    }
    return out;
  }

 private:
  bool device_;
  std::vector<std::unique_ptr<double[]>> host_mem_;
  std::vector<void*> device_mem_;
};

// Rank r's deterministic input of n elements of `dtype` (small integers and halves: exact in every dtype, so
// sums are exact and only their order could differ).
std::vector<char> Input(int rank, int64_t n, DType dtype, int salt) {
  std::vector<char> out(static_cast<size_t>(n) * DTypeSize(dtype));
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>((rank * 7 + i * 3 + salt) % 23) * 0.5f - 4.0f;
    if (dtype == DType::kF32) {
      std::memcpy(out.data() + i * 4, &v, 4);
    } else if (dtype == DType::kF64) {
      const double d = v;
      std::memcpy(out.data() + i * 8, &d, 8);
    } else if (dtype == DType::kBF16) {
      const uint16_t b = kernels::FloatToBf16(v);
      std::memcpy(out.data() + i * 2, &b, 2);
    } else {  // kI64
      const int64_t k = static_cast<int64_t>(v * 2);
      std::memcpy(out.data() + i * 8, &k, 8);
    }
  }
  return out;
}

bool SameCounters(const CommCounters& a, const CommCounters& b) {
  return a.reduce_scatter == b.reduce_scatter && a.all_gather == b.all_gather && a.all_reduce == b.all_reduce &&
         a.broadcast == b.broadcast && a.control_calls == b.control_calls && a.control_elements == b.control_elements;
}

// Which memory a StagedComm under test moves: the parameter's backend.
std::string MemoryName(const ::testing::TestParamInfo<Backend>& info) { return BackendName(info.param); }

class StagedCollectivesTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (GetParam() == Backend::kCpu) {
      memory_ = NewHostStaging();
      return;
    }
    std::string skip;
    const int device = LocalCudaDevice(MPI_COMM_WORLD, &skip);  // collective: every rank agrees
    if (device < 0) GTEST_SKIP() << skip;                        // no GPU: the cpu twin ran
    std::unique_ptr<StagingMemory> cuda;
    ZERO_ASSERT_OK(NewCudaStaging(device, &cuda));
    ZERO_ASSERT_OK(CudaSetDevice(device));
    memory_ = std::move(cuda);
  }
  bool device() const { return GetParam() == Backend::kCuda; }
  std::shared_ptr<StagingMemory> memory_;
};

TEST_P(StagedCollectivesTest, EqualAPlainMpiCommBitForBit) {
  auto staged = Staged(memory_);
  auto plain = WorldComm();
  ASSERT_NE(staged, nullptr);
  ASSERT_NE(plain, nullptr);
  EXPECT_EQ(staged->cuda_device(), memory_->device());
  const int r = plain->rank(), w = plain->world_size();
  Buffers mem(device());
  int salt = 0;
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{1000}}) {
    for (const DType dt : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE("count " + std::to_string(n) + " " + DTypeName(dt));
      const int64_t e = static_cast<int64_t>(DTypeSize(dt)), bytes = n * e, all = bytes * w;
      ++salt;
      // ReduceScatter, out of place and in place.
      for (const bool in_place : {false, true}) {
        const std::vector<char> in = Input(r, n * w, dt, salt);
        std::vector<char> want(static_cast<size_t>(bytes));
        std::vector<char> hin = in;
        ZERO_ASSERT_OK(plain->ReduceScatter(hin.data(), want.data(), n, dt));
        char* send = mem.Put(in, all);
        char* recv = in_place ? send + r * bytes : mem.Put({}, bytes);
        ZERO_ASSERT_OK(staged->ReduceScatter(send, recv, n, dt));
        EXPECT_EQ(mem.Get(recv, bytes), want) << "ReduceScatter in place " << in_place;
      }
      // AllGather, out of place and in place.
      for (const bool in_place : {false, true}) {
        const std::vector<char> in = Input(r, n, dt, salt);
        std::vector<char> want(static_cast<size_t>(all));
        ZERO_ASSERT_OK(plain->AllGather(in.data(), want.data(), n, dt));
        char* recv = nullptr;
        char* send = nullptr;
        if (in_place) {
          std::vector<char> slot(static_cast<size_t>(all), 0);
          std::copy(in.begin(), in.end(), slot.begin() + r * bytes);
          recv = mem.Put(slot, all);
          send = recv + r * bytes;
        } else {
          recv = mem.Put({}, all);
          send = mem.Put(in, bytes);
        }
        ZERO_ASSERT_OK(staged->AllGather(send, recv, n, dt));
        EXPECT_EQ(mem.Get(recv, all), want) << "AllGather in place " << in_place;
      }
      // AllReduce (sum), out of place and in place.
      for (const bool in_place : {false, true}) {
        const std::vector<char> in = Input(r, n, dt, salt);
        std::vector<char> want(static_cast<size_t>(bytes));
        ZERO_ASSERT_OK(plain->AllReduce(in.data(), want.data(), n, dt, ReduceOp::kSum));
        char* send = mem.Put(in, bytes);
        char* recv = in_place ? send : mem.Put({}, bytes);
        ZERO_ASSERT_OK(staged->AllReduce(send, recv, n, dt, ReduceOp::kSum));
        EXPECT_EQ(mem.Get(recv, bytes), want) << "AllReduce in place " << in_place;
      }
      // Broadcast from the last rank.
      {
        std::vector<char> want = Input(r, n, dt, salt);
        ZERO_ASSERT_OK(plain->Broadcast(want.data(), n, dt, w - 1));
        char* buf = mem.Put(Input(r, n, dt, salt), bytes);
        ZERO_ASSERT_OK(staged->Broadcast(buf, n, dt, w - 1));
        EXPECT_EQ(mem.Get(buf, bytes), want) << "Broadcast";
      }
    }
  }
  // AllReduce max on i64 and f64 (control traffic: counted apart), Barrier.
  for (const DType dt : {DType::kI64, DType::kF64}) {
    const std::vector<char> in = Input(r, 5, dt, 3);
    std::vector<char> want(in.size());
    CollectiveOptions control;
    control.control = true;
    ZERO_ASSERT_OK(plain->AllReduce(in.data(), want.data(), 5, dt, ReduceOp::kMax, control));
    char* buf = mem.Put(in, static_cast<int64_t>(in.size()));
    ZERO_ASSERT_OK(staged->AllReduce(buf, buf, 5, dt, ReduceOp::kMax, control));
    EXPECT_EQ(mem.Get(buf, static_cast<int64_t>(in.size())), want) << DTypeName(dt) << " max";
  }
  ZERO_ASSERT_OK(plain->Barrier());
  ZERO_ASSERT_OK(staged->Barrier());
  // AllGatherMany: one item in place, one not, one empty.
  {
    const int64_t counts[3] = {5, 0, 12};
    std::vector<std::vector<char>> want(3);
    std::vector<Comm::GatherItem> plain_items, staged_items;
    std::vector<std::vector<char>> inputs(3);
    std::vector<char*> recvs(3);
    for (int i = 0; i < 3; ++i) {
      inputs[i] = Input(r, counts[i], DType::kF32, 40 + i);
      want[i].resize(static_cast<size_t>(counts[i] * 4 * w));
      plain_items.push_back({inputs[i].data(), want[i].data(), counts[i]});
      const int64_t bytes = counts[i] * 4;
      if (i == 0) {
        std::vector<char> slot(static_cast<size_t>(bytes * w), 0);
        std::copy(inputs[i].begin(), inputs[i].end(), slot.begin() + r * bytes);
        recvs[i] = mem.Put(slot, bytes * w);
        staged_items.push_back({recvs[i] + r * bytes, recvs[i], counts[i]});
      } else {
        recvs[i] = mem.Put({}, bytes * w);
        staged_items.push_back({mem.Put(inputs[i], bytes), recvs[i], counts[i]});
      }
    }
    ZERO_ASSERT_OK(plain->AllGatherMany(plain_items, DType::kF32));
    ZERO_ASSERT_OK(staged->AllGatherMany(staged_items, DType::kF32));
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(mem.Get(recvs[i], counts[i] * 4 * w), want[i]) << "AllGatherMany item " << i;
    }
  }
  EXPECT_TRUE(SameCounters(staged->counters(), plain->counters()))
      << "staged volume " << staged->counters().Volume() << ", plain " << plain->counters().Volume();
  EXPECT_GT(staged->counters().Volume(), 0);
  EXPECT_EQ(staged->counters().control_calls, 2);
  staged->ResetCounters();
  EXPECT_EQ(staged->counters().Volume(), 0);
  ZERO_EXPECT_OK(staged->health());
}

TEST_P(StagedCollectivesTest, DuplicateIsAnIndependentStagedComm) {
  auto staged = Staged(memory_);
  ASSERT_NE(staged, nullptr);
  std::unique_ptr<Comm> dup;
  ZERO_ASSERT_OK(staged->Duplicate(&dup));
  ASSERT_NE(dynamic_cast<StagedComm*>(dup.get()), nullptr);
  EXPECT_EQ(dup->cuda_device(), staged->cuda_device());
  EXPECT_EQ(dup->rank(), staged->rank());
  EXPECT_EQ(dup->world_size(), staged->world_size());
  EXPECT_EQ(dup->timeout(), staged->timeout());
  Buffers mem(device());
  const std::vector<char> in = Input(staged->rank(), 9, DType::kF32, 1);
  char* buf = mem.Put(in, 36);
  ZERO_ASSERT_OK(dup->AllReduce(buf, buf, 9, DType::kF32, ReduceOp::kSum));
  EXPECT_EQ(dup->counters().all_reduce, 9);
  EXPECT_EQ(staged->counters().all_reduce, 0) << "a duplicate's counters are its own";
  // Breaking the duplicate leaves the original working. (Every rank first finishes its AllReduce on the
  // duplicate: a peer that is still in it would get this rank's abort.)
  ZERO_ASSERT_OK(staged->Barrier());
  dup->Abort(Status::Internal("done with the duplicate"));
  EXPECT_FALSE(dup->health().ok());
  ZERO_EXPECT_OK(staged->Barrier());
  ZERO_EXPECT_OK(staged->health());
  dup.reset();
}

// AllToAll gives a plain MpiComm's bits, and Split gives StagedComms on the same memory whose
// topology is the inner Comm's (CommOptions::ranks_per_node), restricted: what ZeRO++'s HierarchicalComm needs
// from the Comm the engine's GPU cases run over. Bytes per link kind are the inner Comm's.
TEST_P(StagedCollectivesTest, AllToAllAndSplitFollowTheInnerComm) {
  const int per_node = WorldSize() % 2 == 0 ? 2 : 1;
  CommOptions options;
  options.timeout = std::chrono::milliseconds(20'000);
  options.ranks_per_node = per_node;
  std::unique_ptr<Comm> inner, plain;
  ZERO_ASSERT_OK(Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &inner));
  ZERO_ASSERT_OK(Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), options, &plain));
  StagedComm staged(std::move(inner), memory_);
  EXPECT_EQ(staged.topology().nodes, plain->topology().nodes);
  EXPECT_EQ(staged.topology().local_size, per_node);
  const int n = staged.world_size(), r = staged.rank();
  constexpr int64_t kCount = 5;
  const int64_t bytes = kCount * n * 4;
  const std::vector<char> in = Input(r, kCount * n, DType::kF32, 3);
  std::vector<char> want(static_cast<size_t>(bytes));
  ZERO_ASSERT_OK(plain->AllToAll(in.data(), want.data(), kCount, DType::kF32));
  Buffers mem(device());
  char* send = mem.Put(in, bytes);
  char* recv = mem.Put({}, bytes);
  ZERO_ASSERT_OK(staged.AllToAll(send, recv, kCount, DType::kF32));
  EXPECT_EQ(mem.Get(recv, bytes), want);
  EXPECT_EQ(staged.counters().all_to_all, plain->counters().all_to_all);
  EXPECT_EQ(staged.counters().inter_node_bytes, plain->counters().inter_node_bytes);
  EXPECT_EQ(staged.counters().intra_node_bytes, plain->counters().intra_node_bytes);
  if (n > per_node) {
    EXPECT_GT(staged.counters().inter_node_bytes, 0);
  }

  // Split by node: the node's ranks, one node each, and a collective on the device memory works.
  std::unique_ptr<Comm> node;
  ZERO_ASSERT_OK(staged.Split(staged.topology().node, r, &node));
  ASSERT_NE(dynamic_cast<StagedComm*>(node.get()), nullptr);
  EXPECT_EQ(node->cuda_device(), staged.cuda_device());
  EXPECT_EQ(node->world_size(), per_node);
  EXPECT_EQ(node->topology().nodes, 1);
  const std::vector<char> one = Input(r, 3, DType::kF32, 4);
  char* buf = mem.Put(one, 12);
  ZERO_ASSERT_OK(node->AllReduce(buf, buf, 3, DType::kF32, ReduceOp::kSum));
  const auto got = mem.Get(buf, 12);
  for (int i = 0; i < 3; ++i) {
    float sum = 0;
    for (int k = 0; k < per_node; ++k) {
      const std::vector<char> peer = Input(staged.topology().node * per_node + k, 3, DType::kF32, 4);
      float v = 0;
      std::memcpy(&v, peer.data() + i * 4, 4);
      sum += v;
    }
    float g = 0;
    std::memcpy(&g, got.data() + i * 4, 4);
    EXPECT_EQ(g, sum) << "element " << i;
  }
  ZERO_EXPECT_OK(staged.Barrier());
}

// A stand-in for a stream on the CPU: work enqueued on it runs only when someone waits for it, so a StagedComm that
// read a buffer without waiting for the caller's stream would read it unwritten.
struct FakeStream {
  std::vector<std::function<void()>> pending;
};

class FakeStreamStaging final : public StagingMemory {
 public:
  int device() const override { return -1; }
  Status Synchronize(void* stream) override {
    auto* s = static_cast<FakeStream*>(stream);
    for (auto& work : s->pending) work();
    s->pending.clear();
    return Status::Ok();
  }
  Status ToHost(void* host, const void* src, int64_t bytes, void*) override {
    std::memcpy(host, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  Status FromHost(void* dst, const void* host, int64_t bytes, void*) override {
    std::memcpy(dst, host, static_cast<size_t>(bytes));
    return Status::Ok();
  }
};

// With a stream, the buffers are read after the stream's earlier work and written back before the call returns.
// CUDA: the inputs are written by cudaMemsetAsync on a non-blocking stream right before the call (nothing else
// orders them), and the outputs are read on the host right after it. CPU: the same with a FakeStream.
TEST_P(StagedCollectivesTest, StreamWorkBeforeTheCallIsSeenAndResultsAreBackOnReturn) {
  FakeStream fake;
  void* stream = &fake;
  std::shared_ptr<StagingMemory> memory = memory_;
  if (device()) {
    ZERO_ASSERT_OK(NewNonBlockingStream(&stream));
  } else {
    memory = std::make_shared<FakeStreamStaging>();
  }
  auto staged = Staged(memory);
  auto plain = WorldComm();
  ASSERT_NE(staged, nullptr);
  Buffers mem(device());
  const int64_t n = device() ? 1 << 20 : 1000;  // 4 MiB on a GPU: the fill takes long enough to be caught unfinished
  const int r = plain->rank(), w = plain->world_size();
  char* send = mem.Put({}, n * 4 * w);
  const int byte = 0x3c + r;  // each float is that byte repeated: a small positive number
  if (device()) {
    ZERO_ASSERT_OK(MemsetAsync(send, byte, n * 4 * w, stream));
  } else {
    fake.pending.push_back([=] { std::memset(send, byte, static_cast<size_t>(n * 4 * w)); });
  }
  CollectiveOptions opts;
  opts.stream = stream;
  ZERO_ASSERT_OK(staged->ReduceScatter(send, send + r * n * 4, n, DType::kF32, opts));
  const std::vector<char> got = mem.Get(send + r * n * 4, n * 4);
  std::vector<char> in(static_cast<size_t>(n * 4 * w), static_cast<char>(byte)), want(static_cast<size_t>(n * 4));
  ZERO_ASSERT_OK(plain->ReduceScatter(in.data(), want.data(), n, DType::kF32));
  EXPECT_EQ(got, want) << "the reduction did not see the stream's fill";
  if (device()) {
    ZERO_EXPECT_OK(StreamSynchronize(stream));
    DestroyStream(stream);
  }
}

INSTANTIATE_TEST_SUITE_P(Memories, StagedCollectivesTest, ::testing::Values(Backend::kCpu, Backend::kCuda), MemoryName);

// ---------------------------------------------------------------------------------------------------------------
// The ordering logic on the CPU: a staging memory that records what it is asked to do.

struct Event {
  std::string what;
  void* stream;
};

class RecordingStaging final : public StagingMemory {
 public:
  int device() const override { return -1; }
  Status Synchronize(void* stream) override {
    events.push_back({"sync", stream});
    return Status::Ok();
  }
  Status ToHost(void* host, const void* src, int64_t bytes, void* stream) override {
    events.push_back({"read", stream});
    if (fail_reads) return Status::Internal("injected copy failure");
    std::memcpy(host, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  Status FromHost(void* dst, const void* host, int64_t bytes, void* stream) override {
    events.push_back({"write", stream});
    std::memcpy(dst, host, static_cast<size_t>(bytes));
    return Status::Ok();
  }
  std::vector<Event> events;
  bool fail_reads = false;
};

TEST(StagedStreamOrderTest, TheStreamIsWaitedForFirstAndEveryCopyUsesIt) {
  auto recording = std::make_shared<RecordingStaging>();
  auto staged = Staged(recording);
  ASSERT_NE(staged, nullptr);
  const int w = staged->world_size();
  void* const stream = reinterpret_cast<void*>(uintptr_t{0x5000});  // never dereferenced
  CollectiveOptions opts;
  opts.stream = stream;
  std::vector<float> buf(static_cast<size_t>(4 * w), 1.0f);
  auto check = [&](const char* call, int reads, int writes) {
    SCOPED_TRACE(call);
    ASSERT_FALSE(recording->events.empty());
    EXPECT_EQ(recording->events[0].what, "sync");
    int r = 0, wr = 0;
    for (size_t i = 0; i < recording->events.size(); ++i) {
      const Event& e = recording->events[i];
      EXPECT_EQ(e.stream, stream) << "event " << i << " (" << e.what << ") on another stream";
      if (i > 0) {
        EXPECT_NE(e.what, "sync") << "one wait per call, before any copy";
      }
      if (e.what == "read") {
        EXPECT_EQ(wr, 0) << "a read after a write: inputs must all be staged before the collective";
        ++r;
      }
      wr += e.what == "write";
    }
    EXPECT_EQ(r, reads);
    EXPECT_EQ(wr, writes);
    recording->events.clear();
  };
  ZERO_ASSERT_OK(staged->AllReduce(buf.data(), buf.data(), 4, DType::kF32, ReduceOp::kSum, opts));
  check("AllReduce", 1, 1);
  EXPECT_EQ(buf[0], static_cast<float>(w)) << "the result is in the buffer when the call returns";
  ZERO_ASSERT_OK(staged->ReduceScatter(buf.data(), buf.data() + staged->rank() * 4, 4, DType::kF32, opts));
  check("ReduceScatter", 1, 1);
  ZERO_ASSERT_OK(staged->AllGather(buf.data() + staged->rank() * 4, buf.data(), 4, DType::kF32, opts));
  check("AllGather", 1, 1);
  ZERO_ASSERT_OK(staged->Broadcast(buf.data(), 4, DType::kF32, 0, opts));
  check("Broadcast", staged->rank() == 0 ? 1 : 0, staged->rank() == 0 ? 0 : 1);
  ZERO_ASSERT_OK(staged->Barrier(opts));
  check("Barrier", 0, 0);
  std::vector<float> other(static_cast<size_t>(2 * w));
  const Comm::GatherItem items[2] = {{buf.data() + staged->rank() * 4, buf.data(), 4}, {&buf[0], other.data(), 2}};
  ZERO_ASSERT_OK(staged->AllGatherMany(items, DType::kF32, opts));
  check("AllGatherMany", 2, 2);
  // Without a stream nothing is waited for, and the copies are told so.
  ZERO_ASSERT_OK(staged->AllReduce(buf.data(), buf.data(), 4, DType::kF32, ReduceOp::kSum));
  ASSERT_EQ(recording->events.size(), 2u);
  EXPECT_EQ(recording->events[0].what, "read");
  EXPECT_EQ(recording->events[0].stream, nullptr);
  EXPECT_EQ(recording->events[1].what, "write");
}

// ---------------------------------------------------------------------------------------------------------------
// Failures end in errors on every rank.

TEST(StagedFailureTest, BadArgumentsBreakThisRankAndPeersAreTold) {
  auto staged = Staged(NewHostStaging());
  ASSERT_NE(staged, nullptr);
  std::vector<float> buf(16, 1.0f);
  Status s;
  if (staged->rank() == 0) {
    // send and recv overlap without being the same buffer: no backend accepts it.
    s = staged->AllReduce(buf.data(), buf.data() + 1, 4, DType::kF32, ReduceOp::kSum);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_TRUE(Contains(s, "partially overlap")) << s.ToString();
    EXPECT_EQ(staged->health().code(), StatusCode::kInvalidArgument) << "the Comm stays broken";
  } else {
    s = staged->AllReduce(buf.data(), buf.data(), 4, DType::kF32, ReduceOp::kSum);
    EXPECT_FALSE(s.ok()) << "a peer of the rank that broke must get an error, not wait forever";
    EXPECT_TRUE(Contains(s, "rank 0")) << s.ToString();
  }
  // Every later call answers with the breaking status.
  EXPECT_FALSE(staged->Barrier().ok());
}

TEST(StagedFailureTest, AFailedCopyAbortsThePeers) {
  auto recording = std::make_shared<RecordingStaging>();
  const int rank = WorldRank(), last = WorldSize() - 1;
  recording->fail_reads = rank == last;
  auto staged = Staged(recording);
  ASSERT_NE(staged, nullptr);
  std::vector<float> buf(8, 1.0f);
  const Status s = staged->AllReduce(buf.data(), buf.data(), 8, DType::kF32, ReduceOp::kSum);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s, "injected copy failure")) << s.ToString();
  if (rank != last) {
    EXPECT_EQ(s.code(), StatusCode::kAborted) << s.ToString();
    EXPECT_TRUE(Contains(s, "rank " + std::to_string(last))) << s.ToString();
  }
  EXPECT_FALSE(staged->health().ok());
}

// ---------------------------------------------------------------------------------------------------------------
// The engine over a StagedComm (host memory, Backend::kCpu) against the engine over a plain MpiComm.

TEST(StagedEngineTest, TrainsBitForBitLikeAPlainMpiComm) {
  for (const Stage stage : {Stage::kDataParallel, Stage::kOptimizerStates, Stage::kGradients, Stage::kParameters}) {
    SCOPED_TRACE(StageName(stage));
    Options o = SmallToyOptions(stage);
    o.clip_norm = 0.5;
    // One engine after the other: two engines with collectives in flight at once would let either comm thread's
    // MPI progress complete the other's receives, which ThreadSanitizer cannot see ordered (tests/tsan.supp).
    auto run = [&](Comm* comm, std::vector<double>* norms) {
      auto e = OpenToyEngine(o, comm);
      EXPECT_NE(e, nullptr);
      if (e == nullptr) return std::vector<std::vector<float>>{};
      for (int step = 0; step < 4; ++step) norms->push_back(TrainToyStep(*e, *comm, step, 2, 24).grad_norm);
      ZERO_EXPECT_OK(e->healthy());
      return GatherToyParams(*e);
    };
    auto staged = Staged(NewHostStaging());
    auto plain = WorldComm();
    ASSERT_NE(staged, nullptr);
    std::vector<double> staged_norms, plain_norms;
    const auto staged_params = run(staged.get(), &staged_norms);
    const auto plain_params = run(plain.get(), &plain_norms);
    EXPECT_EQ(staged_norms, plain_norms);
    EXPECT_EQ(staged_params, plain_params);
  }
}

// ZeRO++ (hpZ + qwZ + qgZ, nodes of 2 at even world sizes) over a StagedComm trains like over a plain MpiComm: the
// path the engine's GPU cases take where ranks share the GPU and NCCL refuses that.
TEST(StagedEngineTest, ZeroPPTrainsBitForBitLikeAPlainMpiComm) {
  CommOptions co;
  co.timeout = std::chrono::milliseconds(20'000);
  co.ranks_per_node = WorldSize() % 2 == 0 ? 2 : 1;
  std::unique_ptr<Comm> inner, plain;
  ZERO_ASSERT_OK(Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), co, &inner));
  ZERO_ASSERT_OK(Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), co, &plain));
  StagedComm staged(std::move(inner), NewHostStaging());
  Options o = SmallToyOptions(Stage::kParameters);
  o.zeropp.hpz = true;
  o.zeropp.qwz = true;
  o.zeropp.qgz_bits = 8;
  auto run = [&](Comm* comm) {
    auto e = OpenToyEngine(o, comm);
    EXPECT_NE(e, nullptr);
    if (e == nullptr) return std::vector<std::vector<float>>{};
    for (int step = 0; step < 3; ++step) TrainToyStep(*e, *comm, step, 2, 24);
    ZERO_EXPECT_OK(e->healthy());
    return GatherToyParams(*e);
  };
  const auto staged_params = run(&staged);
  const auto plain_params = run(plain.get());
  ASSERT_FALSE(plain_params.empty());
  EXPECT_EQ(staged_params, plain_params);
}

}  // namespace
}  // namespace zero::testing

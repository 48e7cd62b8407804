// The host-only NCCL stand-in (nccl.h beside this file says which contracts it keeps): communicators over MPI
// communicators made at init and split, collectives as steps on the stand-in CUDA runtime's streams that exchange
// host copies of device buffers by non-blocking point-to-point messages, and NCCL's non-blocking mode through
// helper threads.
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_runtime.h"
#include "nccl.h"

namespace fake_nccl {

constexpr uint32_t kIdMagic = 0x2e0fa4ecu;

// The last error text (ncclGetLastError), process-wide like NCCL's.
std::mutex last_error_mu;
std::string last_error;
void SetLastError(const std::string& what) {
  std::lock_guard<std::mutex> lock(last_error_mu);
  last_error = what;
}
ncclResult_t Fail(ncclResult_t rc, const std::string& what) {
  SetLastError(what);
  return rc;
}

struct IdContents {
  uint32_t magic;
  int root_world_rank;  // the process that made the id: it collects the ranks at init
  uint64_t serial;
};

int TagUpperBound() {
  static const int ub = [] {
    void* value = nullptr;
    int flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &value, &flag);
    return flag != 0 ? *static_cast<int*>(value) : 32767;
  }();
  return ub;
}

struct CommState {
  ~CommState() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // An aborted communicator's MPI communicator is left alone: a peer may still send to it, and freeing is
    // collective in the standard.
    if (mpi != MPI_COMM_NULL && !aborted.load() && !finalized) MPI_Comm_free(&mpi);
  }
  std::mutex mu;  // orders a helper thread's last writes with ncclCommAbort
  MPI_Comm mpi = MPI_COMM_NULL;
  int rank = 0;
  int nranks = 1;
  int device = 0;
  bool blocking = true;
  std::atomic<int> async{ncclSuccess};
  std::atomic<bool> aborted{false};
  // Issue order, on the issuing thread: what matches an op with its peers' (a message tag).
  uint64_t collectives = 0;
  std::vector<uint64_t> sends, recvs;  // per peer
  // Steps of this communicator on streams that have not completed, per stream: what ncclCommFinalize waits for.
  std::mutex work_mu;
  std::vector<std::pair<cudaStream_t, int>> work;
  // Whether a call goes to a helper thread and answers ncclInProgress. NCCL's group end does that for every
  // non-blocking communicator with queued work: init, split, finalize and sends/receives (`job`) at any size; only
  // a collective of a one-rank communicator is a plain copy, issued at once (enqueue.cc, ncclLaunchOneRank).
  bool Async(bool job) const { return !blocking && (nranks > 1 || job); }
};

}  // namespace fake_nccl

struct FakeNcclComm {
  std::shared_ptr<fake_nccl::CommState> state;  // null once aborted or destroyed (the handle itself is kept)
};

namespace fake_nccl {
namespace {

std::mutex dead_mu;
std::vector<std::unique_ptr<FakeNcclComm>> dead;  // handles after abort/destroy: a later use is reported, not UB

void Retire(ncclComm_t comm) {
  comm->state.reset();
  std::lock_guard<std::mutex> lock(dead_mu);
  dead.emplace_back(comm);
}

size_t TypeSize(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
  }
  return 0;
}

float HalfToFloat(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int man = h & 0x3ff;
  float v = 0.0f;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man == 0 ? INFINITY : NAN;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400), exp - 25);
  }
  return (h & 0x8000) != 0 ? -v : v;
}

// Round to nearest even.
uint16_t FloatToHalf(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const float a = std::fabs(f);
  if (std::isnan(f)) return 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;  // rounds up past the largest half
  if (a < std::ldexp(1.0f, -14)) {          // subnormal (or zero): units of 2^-24; 0x400 is the smallest normal
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24)));
  }
  int e = std::ilogb(a);
  auto m = static_cast<int>(std::nearbyint(std::ldexp(a, 10 - e)));
  if (m == 2048) {
    m = 1024;
    ++e;
  }
  if (e > 15) return sign | 0x7c00;
  return sign | static_cast<uint16_t>(((e + 15) << 10) | (m - 1024));
}

float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t FloatToBf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

template <typename T>
T Apply(T a, T b, ncclRedOp_t op) {
  switch (op) {
    case ncclSum:
    case ncclAvg:
      return static_cast<T>(a + b);
    case ncclProd:
      return static_cast<T>(a * b);
    case ncclMax:
      return b > a ? b : a;
    case ncclMin:
      return b < a ? b : a;
  }
  return a;
}

template <typename T>
void CombineNative(void* acc, const void* x, size_t n, ncclRedOp_t op) {
  for (size_t i = 0; i < n; ++i) {
    T a, b;
    std::memcpy(&a, static_cast<char*>(acc) + i * sizeof(T), sizeof(T));
    std::memcpy(&b, static_cast<const char*>(x) + i * sizeof(T), sizeof(T));
    a = Apply(a, b, op);
    std::memcpy(static_cast<char*>(acc) + i * sizeof(T), &a, sizeof(T));
  }
}

template <float (*Load)(uint16_t), uint16_t (*Store)(float)>
void Combine16(void* acc, const void* x, size_t n, ncclRedOp_t op) {
  auto* a = static_cast<uint16_t*>(acc);
  const auto* b = static_cast<const uint16_t*>(x);
  for (size_t i = 0; i < n; ++i) a[i] = Store(Apply(Load(a[i]), Load(b[i]), op));
}

// acc = acc op x, elementwise.
void Combine(void* acc, const void* x, size_t n, ncclDataType_t t, ncclRedOp_t op) {
  switch (t) {
    case ncclInt8:
      CombineNative<int8_t>(acc, x, n, op);
      break;
    case ncclUint8:
      CombineNative<uint8_t>(acc, x, n, op);
      break;
    case ncclInt32:
      CombineNative<int32_t>(acc, x, n, op);
      break;
    case ncclUint32:
      CombineNative<uint32_t>(acc, x, n, op);
      break;
    case ncclInt64:
      CombineNative<int64_t>(acc, x, n, op);
      break;
    case ncclUint64:
      CombineNative<uint64_t>(acc, x, n, op);
      break;
    case ncclFloat32:
      CombineNative<float>(acc, x, n, op);
      break;
    case ncclFloat64:
      CombineNative<double>(acc, x, n, op);
      break;
    case ncclFloat16:
      Combine16<HalfToFloat, FloatToHalf>(acc, x, n, op);
      break;
    case ncclBfloat16:
      Combine16<Bf16ToFloat, FloatToBf16>(acc, x, n, op);
      break;
  }
}

template <typename T>
void DivideNative(void* acc, size_t n, int by) {
  for (size_t i = 0; i < n; ++i) {
    T a;
    std::memcpy(&a, static_cast<char*>(acc) + i * sizeof(T), sizeof(T));
    a = static_cast<T>(a / static_cast<T>(by));
    std::memcpy(static_cast<char*>(acc) + i * sizeof(T), &a, sizeof(T));
  }
}

// ncclAvg's last step: the sum divided by the rank count.
void Divide(void* acc, size_t n, ncclDataType_t t, int by) {
  switch (t) {
    case ncclInt8:
      DivideNative<int8_t>(acc, n, by);
      break;
    case ncclUint8:
      DivideNative<uint8_t>(acc, n, by);
      break;
    case ncclInt32:
      DivideNative<int32_t>(acc, n, by);
      break;
    case ncclUint32:
      DivideNative<uint32_t>(acc, n, by);
      break;
    case ncclInt64:
      DivideNative<int64_t>(acc, n, by);
      break;
    case ncclUint64:
      DivideNative<uint64_t>(acc, n, by);
      break;
    case ncclFloat32:
      DivideNative<float>(acc, n, by);
      break;
    case ncclFloat64:
      DivideNative<double>(acc, n, by);
      break;
    case ncclFloat16:
    case ncclBfloat16: {
      auto* a = static_cast<uint16_t*>(acc);
      const bool half = t == ncclFloat16;
      for (size_t i = 0; i < n; ++i) {
        const float v = (half ? HalfToFloat(a[i]) : Bf16ToFloat(a[i])) / static_cast<float>(by);
        a[i] = half ? FloatToHalf(v) : FloatToBf16(v);
      }
      break;
    }
  }
}

enum class Kind { kAllReduce, kReduceScatter, kAllGather, kBroadcast, kSend, kRecv };

// One op as issued, with what its step needs while it runs.
struct Op {
  Kind kind = Kind::kAllReduce;
  const void* send = nullptr;
  void* recv = nullptr;
  size_t count = 0;  // elements: per rank for reduce-scatter (received) and all-gather (sent)
  ncclDataType_t type = ncclFloat32;
  ncclRedOp_t op = ncclSum;
  int peer = 0;  // the root of a broadcast, the peer of a send or receive
  int tag = 0;
  std::shared_ptr<CommState> comm;
  cudaStream_t stream = nullptr;
  // Running state: own host copy of the send data, the peers' parts, the requests.
  std::vector<char> own;
  std::vector<std::vector<char>> parts;
  std::vector<MPI_Request> requests;
};

// A stream's share of a launch (one op, or a group's ops on that stream): one step.
struct Task {
  std::vector<Op> ops;
  bool started = false;
};

Op MakeOp(Kind kind, const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, int peer,
          cudaStream_t stream) {
  Op o;
  o.kind = kind;
  o.send = send;
  o.recv = recv;
  o.count = count;
  o.type = type;
  o.op = op;
  o.peer = peer;
  o.stream = stream;
  return o;
}

size_t Bytes(const Op& o) { return o.count * TypeSize(o.type); }

void Start(Op& o) {
  const int n = o.comm->nranks, r = o.comm->rank;
  const size_t bytes = Bytes(o);
  MPI_Comm mpi = o.comm->mpi;
  const int ib = static_cast<int>(bytes);
  o.parts.assign(static_cast<size_t>(n), {});
  const auto recv_from = [&](int p) {
    o.parts[p].resize(bytes);
    o.requests.emplace_back();
    MPI_Irecv(o.parts[p].data(), ib, MPI_BYTE, p, o.tag, mpi, &o.requests.back());
  };
  const auto send_to = [&](int p, const char* data) {
    o.requests.emplace_back();
    MPI_Isend(data, ib, MPI_BYTE, p, o.tag, mpi, &o.requests.back());
  };
  const auto* src = static_cast<const char*>(o.send);
  switch (o.kind) {
    case Kind::kAllReduce:
    case Kind::kAllGather:
      o.own.assign(src, src + bytes);
      for (int p = 0; p < n; ++p) {
        if (p == r) continue;
        recv_from(p);
        send_to(p, o.own.data());
      }
      break;
    case Kind::kReduceScatter:
      o.own.assign(src, src + bytes * n);
      for (int p = 0; p < n; ++p) {
        if (p == r) continue;
        recv_from(p);
        send_to(p, o.own.data() + bytes * p);
      }
      break;
    case Kind::kBroadcast:
      if (r == o.peer) {
        o.own.assign(src, src + bytes);
        for (int p = 0; p < n; ++p) {
          if (p != r) send_to(p, o.own.data());
        }
      } else {
        recv_from(o.peer);
      }
      break;
    case Kind::kSend:
      o.own.assign(src, src + bytes);
      send_to(o.peer, o.own.data());
      break;
    case Kind::kRecv:
      recv_from(o.peer);
      break;
  }
}

void Finish(Op& o) {
  const int n = o.comm->nranks, r = o.comm->rank;
  const size_t bytes = Bytes(o);
  auto* dst = static_cast<char*>(o.recv);
  const auto part = [&](int p, size_t offset) -> const char* {
    return p == r ? o.own.data() + offset : o.parts[p].data();
  };
  switch (o.kind) {
    case Kind::kAllReduce:
    case Kind::kReduceScatter: {
      const size_t mine = o.kind == Kind::kReduceScatter ? bytes * r : 0;
      std::vector<char> acc(part(0, mine), part(0, mine) + bytes);
      for (int p = 1; p < n; ++p) Combine(acc.data(), part(p, mine), o.count, o.type, o.op);
      if (o.op == ncclAvg) Divide(acc.data(), o.count, o.type, n);
      std::memcpy(dst, acc.data(), bytes);
      break;
    }
    case Kind::kAllGather:
      for (int p = 0; p < n; ++p) std::memmove(dst + bytes * p, part(p, 0), bytes);
      break;
    case Kind::kBroadcast:
      std::memmove(dst, r == o.peer ? o.own.data() : o.parts[o.peer].data(), bytes);
      break;
    case Kind::kSend:
      break;
    case Kind::kRecv:
      std::memcpy(dst, o.parts[o.peer].data(), bytes);
      break;
  }
}

// Stops an aborted op's messages: receives are cancelled, sends left to MPI.
void Cancel(Op& o) {
  for (MPI_Request& q : o.requests) {
    if (q == MPI_REQUEST_NULL) continue;
    int done = 0;
    MPI_Test(&q, &done, MPI_STATUS_IGNORE);
    if (done) continue;
    MPI_Cancel(&q);
    MPI_Request_free(&q);
  }
}

// The step on the stream (device memory accessible while it runs): posts the messages when the stream first gets
// here, then completes once all of them have (or at once when a communicator was aborted).
bool RunStep(Task& t) {
  for (const Op& o : t.ops) {
    if (o.comm->aborted.load()) {
      for (Op& c : t.ops) Cancel(c);
      return true;
    }
  }
  if (!t.started) {
    for (Op& o : t.ops) Start(o);
    t.started = true;
  }
  for (Op& o : t.ops) {
    int done = 1;
    if (!o.requests.empty()) {
      MPI_Testall(static_cast<int>(o.requests.size()), o.requests.data(), &done, MPI_STATUSES_IGNORE);
    }
    if (!done) return false;
  }
  for (Op& o : t.ops) Finish(o);
  return true;
}

// The communicators of a task's ops, each once.
std::vector<std::shared_ptr<CommState>> CommsOf(const Task& t) {
  std::vector<std::shared_ptr<CommState>> comms;
  for (const Op& o : t.ops) {
    bool seen = false;
    for (const auto& c : comms) seen = seen || c == o.comm;
    if (!seen) comms.push_back(o.comm);
  }
  return comms;
}

// Counts a step of `c` on `stream` that has not completed (+1) or has (-1).
void CountWork(CommState& c, cudaStream_t stream, int delta) {
  std::lock_guard<std::mutex> lock(c.work_mu);
  for (auto& w : c.work) {
    if (w.first == stream) {
      w.second += delta;
      return;
    }
  }
  c.work.emplace_back(stream, delta);
}

// ncclCommFinalize's work: NCCL's helper synchronizes the communicator's internal stream, which every launch makes
// wait for the user's stream after its kernels (enqueue.cc), so finalize completes only once every collective
// issued on the communicator has; until then the state reads ncclInProgress (forever for a collective stuck on a
// stalled peer, until ncclCommAbort). Here the helper drives the streams that still hold steps of this
// communicator (a GPU runs them by itself), polling.
ncclResult_t DrainWork(const std::shared_ptr<CommState>& c) {
  for (;;) {
    std::vector<cudaStream_t> streams;
    {
      std::lock_guard<std::mutex> lock(c->work_mu);
      for (const auto& w : c->work) {
        if (w.second > 0) streams.push_back(w.first);
      }
    }
    if (streams.empty() || c->aborted.load()) return ncclSuccess;
    int before = 0;
    cudaGetDevice(&before);
    cudaSetDevice(c->device);
    for (cudaStream_t st : streams) {
      // A destroyed stream was drained by cudaStreamDestroy (its steps counted themselves done).
      if (cudaStreamQuery(st) == cudaErrorInvalidResourceHandle) cudaGetLastError();
    }
    cudaSetDevice(before);
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// Puts each stream's ops on it as one step; from any thread (the stream's device is made current here).
ncclResult_t EnqueueTasks(std::vector<Op> ops) {
  std::vector<std::shared_ptr<Task>> tasks;
  for (Op& o : ops) {
    std::shared_ptr<Task> into;
    for (auto& t : tasks) {
      if (t->ops.front().stream == o.stream) into = t;
    }
    if (into == nullptr) into = tasks.emplace_back(std::make_shared<Task>());
    into->ops.push_back(std::move(o));
  }
  int before = 0;
  cudaGetDevice(&before);
  ncclResult_t rc = ncclSuccess;
  for (auto& t : tasks) {
    const cudaStream_t stream = t->ops.front().stream;
    const std::vector<std::shared_ptr<CommState>> comms = CommsOf(*t);
    for (const auto& c : comms) CountWork(*c, stream, +1);
    cudaError_t crc = cudaSetDevice(t->ops.front().comm->device);
    if (crc == cudaSuccess) {
      crc = fake_cuda::EnqueueStep(stream, [t, comms, stream] {
        if (!RunStep(*t)) return false;
        for (const auto& c : comms) CountWork(*c, stream, -1);
        return true;
      });
    }
    if (crc != cudaSuccess) {
      for (const auto& c : comms) CountWork(*c, stream, -1);
      cudaGetLastError();
      rc = Fail(ncclUnhandledCudaError, std::string("enqueue on the stream failed: ") + cudaGetErrorString(crc));
    }
  }
  cudaSetDevice(before);
  return rc;
}

// NCCL's helper threads take a little while: every other asynchronous call waits a millisecond before it
// finishes, so that a caller that does not settle before recording after it shows.
std::atomic<int64_t> helper_delay_ms{0};
void HelperDelay() {
  static std::atomic<uint64_t> calls{0};
  const int64_t set = helper_delay_ms.load();
  if (set > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(set));
  } else if (calls.fetch_add(1) % 2 == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// Runs `work` (which returns the outcome) now, or, for a non-blocking communicator of more than one rank, on a
// helper thread while `comms`' asynchronous states read ncclInProgress.
template <typename Work>
ncclResult_t Launch(const std::vector<std::shared_ptr<CommState>>& comms, bool job, Work work) {
  bool async = false;
  for (const auto& c : comms) async = async || c->Async(job);
  if (!async) return work();
  for (const auto& c : comms) c->async.store(ncclInProgress);
  std::thread([comms, work = std::move(work)]() mutable {
    HelperDelay();
    const ncclResult_t rc = work();
    for (const auto& c : comms) {
      std::lock_guard<std::mutex> lock(c->mu);
      if (!c->aborted.load()) c->async.store(rc);
    }
  }).detach();
  return ncclInProgress;
}

thread_local int group_depth = 0;
thread_local std::vector<Op> group_ops;

ncclResult_t Usable(ncclComm_t comm, const char* call) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, std::string(call) + ": null communicator");
  if (comm->state == nullptr) {
    return Fail(ncclInvalidUsage, std::string(call) + ": the communicator was already aborted or destroyed");
  }
  const int async = comm->state->async.load();
  if (async == ncclInProgress) {
    return Fail(ncclInvalidArgument, std::string(call) +
                                         ": the communicator's previous non-blocking call has not completed "
                                         "(ncclCommGetAsyncError still answers ncclInProgress)");
  }
  if (async != ncclSuccess) return static_cast<ncclResult_t>(async);
  return ncclSuccess;
}

ncclResult_t Issue(Op o, ncclComm_t comm, const char* call) {
  ncclResult_t rc = Usable(comm, call);
  if (rc != ncclSuccess) return rc;
  CommState& c = *comm->state;
  if (TypeSize(o.type) == 0) return Fail(ncclInvalidArgument, std::string(call) + ": unknown data type");
  if (o.op < ncclSum || o.op > ncclAvg) return Fail(ncclInvalidArgument, std::string(call) + ": unknown op");
  if ((o.kind == Kind::kBroadcast || o.kind == Kind::kSend || o.kind == Kind::kRecv) &&
      (o.peer < 0 || o.peer >= c.nranks)) {
    return Fail(ncclInvalidArgument, std::string(call) + ": rank " + std::to_string(o.peer) + " out of range");
  }
  if (!fake_cuda::IsValidStream(o.stream) || fake_cuda::StreamDevice(o.stream) != c.device) {
    return Fail(ncclInvalidArgument, std::string(call) +
                                         ": the stream is not a live stream of the communicator's "
                                         "device " +
                                         std::to_string(c.device));
  }
  if (o.count == 0) return ncclSuccess;
  const size_t bytes = o.count * TypeSize(o.type);
  if (bytes > static_cast<size_t>(INT32_MAX)) return Fail(ncclInvalidArgument, std::string(call) + ": too large");
  const size_t n = static_cast<size_t>(c.nranks);
  size_t send_bytes = bytes, recv_bytes = bytes;
  if (o.kind == Kind::kReduceScatter) send_bytes = bytes * n;
  if (o.kind == Kind::kAllGather) recv_bytes = bytes * n;
  const bool sends = o.kind != Kind::kRecv && (o.kind != Kind::kBroadcast || o.peer == c.rank);
  const bool receives = o.kind != Kind::kSend;
  if ((sends && !fake_cuda::IsDevice(o.send, send_bytes)) || (receives && !fake_cuda::IsDevice(o.recv, recv_bytes))) {
    return Fail(ncclInvalidArgument, std::string(call) + ": a buffer is not device memory of its full size");
  }
  const uint64_t modulus = static_cast<uint64_t>(TagUpperBound() / 2);
  uint64_t seq = 0;
  if (o.kind == Kind::kSend) {
    seq = c.sends[o.peer]++;
  } else if (o.kind == Kind::kRecv) {
    seq = c.recvs[o.peer]++;
  } else {
    seq = c.collectives++;
  }
  const bool p2p = o.kind == Kind::kSend || o.kind == Kind::kRecv;
  o.tag = static_cast<int>(2 * (seq % modulus) + (p2p ? 1 : 0));
  o.comm = comm->state;
  if (group_depth > 0) {
    group_ops.push_back(std::move(o));
    return ncclSuccess;
  }
  std::vector<Op> ops;
  ops.push_back(std::move(o));
  return Launch({comm->state}, p2p, [ops = std::move(ops)]() mutable { return EnqueueTasks(std::move(ops)); });
}

// Builds the MPI communicator of rank `rank` of `nranks` for `id` (blocking): the ranks report to the id's root
// over MPI_COMM_WORLD, which answers with every rank's place, and the group makes its communicator.
ncclResult_t Bootstrap(const IdContents& id, int nranks, int rank, MPI_Comm* out) {
  if (nranks == 1) return MPI_Comm_dup(MPI_COMM_SELF, out) == MPI_SUCCESS ? ncclSuccess : ncclSystemError;
  const int ub = TagUpperBound();
  const int tag =
      ub > 400000 ? ub - 1 - static_cast<int>(id.serial % 200000) : 20000 + static_cast<int>(id.serial % 10000);
  int me = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  std::vector<int> world_of(static_cast<size_t>(nranks), -1);
  if (me == id.root_world_rank) {
    world_of[rank] = me;
    for (int i = 1; i < nranks; ++i) {
      int their = -1;
      MPI_Status st;
      MPI_Recv(&their, 1, MPI_INT, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, &st);
      if (their < 0 || their >= nranks || world_of[their] != -1) {
        return Fail(ncclInvalidUsage, "init: rank " + std::to_string(their) + " claimed twice or out of range");
      }
      world_of[their] = st.MPI_SOURCE;
    }
    for (int p = 0; p < nranks; ++p) {
      if (p != rank) MPI_Send(world_of.data(), nranks, MPI_INT, world_of[p], tag, MPI_COMM_WORLD);
    }
  } else {
    MPI_Send(&rank, 1, MPI_INT, id.root_world_rank, tag, MPI_COMM_WORLD);
    MPI_Recv(world_of.data(), nranks, MPI_INT, id.root_world_rank, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
  }
  MPI_Group world_group, group;
  MPI_Comm_group(MPI_COMM_WORLD, &world_group);
  MPI_Group_incl(world_group, nranks, world_of.data(), &group);
  const int rc = MPI_Comm_create_group(MPI_COMM_WORLD, group, tag, out);
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  return rc == MPI_SUCCESS ? ncclSuccess : Fail(ncclSystemError, "init: MPI_Comm_create_group failed");
}

bool BlockingConfig(const ncclConfig_t* config, bool fallback) {
  if (config == nullptr || config->blocking == NCCL_CONFIG_UNDEF_INT) return fallback;
  return config->blocking != 0;
}

}  // namespace

void SetHelperDelay(std::chrono::milliseconds delay) { helper_delay_ms.store(delay.count()); }

}  // namespace fake_nccl

using fake_nccl::Fail;

ncclResult_t ncclGetVersion(int* version) {
  if (version == nullptr) return Fail(ncclInvalidArgument, "ncclGetVersion: null pointer");
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (id == nullptr) return Fail(ncclInvalidArgument, "ncclGetUniqueId: null pointer");
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return Fail(ncclInvalidUsage, "ncclGetUniqueId: the NCCL stand-in needs MPI initialized");
  static std::atomic<uint64_t> serial{0};
  fake_nccl::IdContents c{fake_nccl::kIdMagic, 0, serial.fetch_add(1)};
  MPI_Comm_rank(MPI_COMM_WORLD, &c.root_world_rank);
  std::memset(id->internal, 0, sizeof(id->internal));
  std::memcpy(id->internal, &c, sizeof(c));
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t* config) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommInitRank: null pointer");
  fake_nccl::IdContents c;
  std::memcpy(&c, id.internal, sizeof(c));
  if (c.magic != fake_nccl::kIdMagic) return Fail(ncclInvalidArgument, "ncclCommInitRank: not a unique id");
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    return Fail(ncclInvalidArgument,
                "ncclCommInitRank: rank " + std::to_string(rank) + " of " + std::to_string(nranks));
  }
  if (config != nullptr && config->magic != 0xcafebeef) {
    return Fail(ncclInvalidArgument, "ncclCommInitRank: the config was not set from NCCL_CONFIG_INITIALIZER");
  }
  auto state = std::make_shared<fake_nccl::CommState>();
  state->rank = rank;
  state->nranks = nranks;
  state->blocking = fake_nccl::BlockingConfig(config, true);
  state->sends.assign(static_cast<size_t>(nranks), 0);
  state->recvs.assign(static_cast<size_t>(nranks), 0);
  cudaGetDevice(&state->device);
  *comm = new FakeNcclComm{state};
  return fake_nccl::Launch({state}, /*job=*/true, [state, c, nranks, rank] {
    MPI_Comm mpi = MPI_COMM_NULL;
    const ncclResult_t rc = fake_nccl::Bootstrap(c, nranks, rank, &mpi);
    std::lock_guard<std::mutex> lock(state->mu);
    state->mpi = mpi;
    return rc;
  });
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  return ncclCommInitRankConfig(comm, nranks, id, rank, nullptr);
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* newcomm, ncclConfig_t* config) {
  ncclResult_t rc = fake_nccl::Usable(comm, "ncclCommSplit");
  if (rc != ncclSuccess) return rc;
  if (newcomm == nullptr) return Fail(ncclInvalidArgument, "ncclCommSplit: null pointer");
  auto parent = comm->state;
  const bool blocking = fake_nccl::BlockingConfig(config, parent->blocking);
  return fake_nccl::Launch({parent}, /*job=*/true, [parent, color, key, newcomm, blocking] {
    MPI_Comm mpi = MPI_COMM_NULL;
    if (MPI_Comm_split(parent->mpi, color == NCCL_SPLIT_NOCOLOR ? MPI_UNDEFINED : color, key, &mpi) != MPI_SUCCESS) {
      return Fail(ncclSystemError, "ncclCommSplit: MPI_Comm_split failed");
    }
    ncclComm_t child = nullptr;
    if (mpi != MPI_COMM_NULL) {
      auto state = std::make_shared<fake_nccl::CommState>();
      state->mpi = mpi;
      MPI_Comm_rank(mpi, &state->rank);
      MPI_Comm_size(mpi, &state->nranks);
      state->device = parent->device;
      state->blocking = blocking;
      state->sends.assign(static_cast<size_t>(state->nranks), 0);
      state->recvs.assign(static_cast<size_t>(state->nranks), 0);
      child = new FakeNcclComm{state};
    }
    // *newcomm is written at the end, as NCCL's helper does; not at all once the parent was aborted (the
    // caller's variable may be gone).
    std::lock_guard<std::mutex> lock(parent->mu);
    if (parent->aborted.load()) {
      if (child != nullptr) fake_nccl::Retire(child);
    } else {
      __atomic_store_n(newcomm, child, __ATOMIC_RELEASE);
    }
    return ncclSuccess;
  });
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
  if (comm == nullptr || async_error == nullptr) return Fail(ncclInvalidArgument, "ncclCommGetAsyncError: null");
  if (comm->state == nullptr) {
    return Fail(ncclInvalidUsage, "ncclCommGetAsyncError: the communicator was already aborted or destroyed");
  }
  *async_error = static_cast<ncclResult_t>(comm->state->async.load());
  return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  const ncclResult_t rc = fake_nccl::Usable(comm, "ncclCommFinalize");
  if (rc != ncclSuccess) return rc;
  auto state = comm->state;
  return fake_nccl::Launch({state}, /*job=*/true, [state] { return fake_nccl::DrainWork(state); });
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommDestroy: null communicator");
  if (comm->state == nullptr) return Fail(ncclInvalidUsage, "ncclCommDestroy: already aborted or destroyed");
  if (comm->state->async.load() == ncclInProgress) {
    return Fail(ncclInvalidArgument, "ncclCommDestroy: a non-blocking call is still in progress");
  }
  fake_nccl::Retire(comm);  // its MPI communicator goes with the last op that still holds it
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;  // NCCL accepts a null communicator here
  if (comm->state == nullptr) return Fail(ncclInvalidUsage, "ncclCommAbort: already aborted or destroyed");
  {
    std::lock_guard<std::mutex> lock(comm->state->mu);
    comm->state->aborted.store(true);
  }
  fake_nccl::Retire(comm);
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  if (comm == nullptr || comm->state == nullptr || count == nullptr) {
    return Fail(ncclInvalidArgument, "ncclCommCount: bad communicator");
  }
  *count = comm->state->nranks;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (comm == nullptr || comm->state == nullptr || rank == nullptr) {
    return Fail(ncclInvalidArgument, "ncclCommUserRank: bad communicator");
  }
  *rank = comm->state->rank;
  return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
  if (comm == nullptr || comm->state == nullptr || device == nullptr) {
    return Fail(ncclInvalidArgument, "ncclCommCuDevice: bad communicator");
  }
  *device = comm->state->device;
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError:
      return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError:
      return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument:
      return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage:
      return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
    case ncclNumResults:
      break;
  }
  return "unknown result code";
}

const char* ncclGetLastError(ncclComm_t) {
  thread_local std::string copy;
  std::lock_guard<std::mutex> lock(fake_nccl::last_error_mu);
  copy = fake_nccl::last_error;
  return copy.c_str();
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
  fake_nccl::Op o = fake_nccl::MakeOp(fake_nccl::Kind::kAllReduce, sendbuff, recvbuff, count, datatype, op, 0, stream);
  return fake_nccl::Issue(std::move(o), comm, "ncclAllReduce");
}

ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, ncclDataType_t datatype,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  fake_nccl::Op o =
      fake_nccl::MakeOp(fake_nccl::Kind::kReduceScatter, sendbuff, recvbuff, recvcount, datatype, op, 0, stream);
  return fake_nccl::Issue(std::move(o), comm, "ncclReduceScatter");
}

ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream) {
  fake_nccl::Op o =
      fake_nccl::MakeOp(fake_nccl::Kind::kAllGather, sendbuff, recvbuff, sendcount, datatype, ncclSum, 0, stream);
  return fake_nccl::Issue(std::move(o), comm, "ncclAllGather");
}

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream) {
  fake_nccl::Op o =
      fake_nccl::MakeOp(fake_nccl::Kind::kBroadcast, sendbuff, recvbuff, count, datatype, ncclSum, root, stream);
  return fake_nccl::Issue(std::move(o), comm, "ncclBroadcast");
}

ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  fake_nccl::Op o =
      fake_nccl::MakeOp(fake_nccl::Kind::kSend, sendbuff, nullptr, count, datatype, ncclSum, peer, stream);
  return fake_nccl::Issue(std::move(o), comm, "ncclSend");
}

ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  fake_nccl::Op o =
      fake_nccl::MakeOp(fake_nccl::Kind::kRecv, nullptr, recvbuff, count, datatype, ncclSum, peer, stream);
  return fake_nccl::Issue(std::move(o), comm, "ncclRecv");
}

ncclResult_t ncclGroupStart() {
  ++fake_nccl::group_depth;
  return ncclSuccess;
}

// The outermost end launches the group's ops: one step per stream, asynchronously when any of its communicators
// is non-blocking with more than one rank (then every one of them reads ncclInProgress until the ops are on their
// streams).
ncclResult_t ncclGroupEnd() {
  if (fake_nccl::group_depth <= 0) return Fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  if (--fake_nccl::group_depth > 0) return ncclSuccess;
  std::vector<fake_nccl::Op> ops = std::move(fake_nccl::group_ops);
  fake_nccl::group_ops.clear();
  if (ops.empty()) return ncclSuccess;
  std::vector<std::shared_ptr<fake_nccl::CommState>> comms;
  bool p2p = false;
  for (const auto& o : ops) {
    bool seen = false;
    for (const auto& c : comms) seen = seen || c == o.comm;
    if (!seen) comms.push_back(o.comm);
    p2p = p2p || o.kind == fake_nccl::Kind::kSend || o.kind == fake_nccl::Kind::kRecv;
  }
  return fake_nccl::Launch(comms, p2p,
                           [ops = std::move(ops)]() mutable { return fake_nccl::EnqueueTasks(std::move(ops)); });
}

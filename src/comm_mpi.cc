// MpiComm: zero::Comm over MPI point-to-point messages (Comm::OpenMpi, Comm::FromMpiComm).
//
// Why point-to-point: Open MPI 4.1 can neither time out nor cancel a blocking collective. Every collective here
// is a sequence of "waits": MPI_Isend/MPI_Irecv requests polled with MPI_Testall against CommOptions::timeout,
// so a stalled or diverged peer produces an error status instead of a hang.
//
// Algorithms (N ranks, r = this rank, next = r+1, prev = r-1, mod N):
//  * ReduceScatter (sum): a ring of N-1 steps. At step s rank r sends chunk (r-1-s) to next, receives chunk
//    (r-2-s) from prev and computes   partial = received + own   elementwise, in the element's dtype (no wider
//    accumulator). Chunk c's sum therefore starts at rank c+1 and ends at its owner c:
//        result[c] = (((x[c+1] + x[c+2]) + x[c+3]) + ... ) + x[c]          (rank indices mod N)
//    This order is FIXED and part of the contract: references reproduce it bitwise with RingSum() from
//    ring_order.h. Partials live in a reused scratch buffer (two halves, at most kScratchBytes in all), so a long
//    chunk runs the ring once per window of it; every window keeps the same order.
//  * AllReduce: the same ring reduction (sum, max or min) over `count` split into N near-equal chunks,
//    chunk c = [c*count/N, (c+1)*count/N) (RingChunkBegin), followed by a ring all-gather of the chunks.
//  * AllGather: a ring of N-1 steps; at step s rank r forwards block (r-s) to next and receives block (r-1-s)
//    straight into recv.
//  * Broadcast: the root sends to every peer. Barrier: dissemination rounds (distance 1, 2, 4...) of empty
//    messages.
//  A message holds at most CommOptions::TEST_max_message_elements elements (MPI counts are int) and one wait
//  covers at most kPiecesPerWait messages per peer, so request lists stay short.
//
// Matching: the messages of one call carry a tag hashed from (sequence number, kind, count, dtype, op, root).
// Ranks that disagree about the order, kind, count or dtype of their calls never match each other's messages
// and time out, instead of silently combining unrelated data (an all-gather of 7 elements on one rank would
// otherwise match the first piece of an all-gather of 8 on another, and return OK).
//
// Abort channel: a second duplicate of the communicator carries only abort notices (the reason's text, at most
// kMaxAbortBytes). The start of every call and every poll of every wait probe it (MPI_Improbe + MPI_Mrecv, safe
// against a concurrent health()). A rank breaks its Comm on a timeout, an MPI error, bad arguments or Abort(),
// and sends a notice to every peer without waiting for delivery; a peer that finds one breaks with
// Status::Aborted("rank K aborted the communicator: <reason>") from its current or next call. So a stalled
// rank fails as soon as it calls in, instead of waiting out its own timeout.
//
// Cancellation is best effort: Open MPI cancels unmatched receives but not sends. Requests still pending
// kCancelGrace after a failure are freed, and the scratch buffer they may target is leaked rather than reused.
//
// A broken Comm is never freed, only leaked (two MPI communicators): peers' notices and data may still be in
// flight to it, and Open MPI gives a freed communicator's context id to the next one, where such leftovers
// break matching (seen here: a stale notice on a reused id made the next communicator's real notice never
// match, and a peer waited out its timeout). The token is a second line of defence for notices that reach a
// communicator destroyed while it looked healthy.
//
// Threads: one thread issues a Comm's collectives; Abort() and health() may be called from any thread (this
// needs MPI_THREAD_MULTIPLE, which OpenMpi requests).
#include <mpi.h>

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ZERO_TSAN 1
#endif
#endif
#if !defined(ZERO_TSAN) && defined(__SANITIZE_THREAD__)
#define ZERO_TSAN 1
#endif
#if !defined(ZERO_TSAN)
#define ZERO_TSAN 0
#endif
#if ZERO_TSAN
// ThreadSanitizer's range annotations (compiler-rt's tsan_interface.h; not in the public sanitizer headers).
extern "C" void __tsan_read_range(void* addr, unsigned long size);   // NOLINT(runtime/int)
extern "C" void __tsan_write_range(void* addr, unsigned long size);  // NOLINT(runtime/int)
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "comm_mpi.h"

#include "comm_internal.h"
#include "kernels/cast.cuh"
#include "node_topology.h"
#include "ring_order.h"
#include "zero/comm.h"

namespace zero::internal {

std::string MpiErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, len);
}

namespace {

using Clock = std::chrono::steady_clock;

// Reductions receive into a reused scratch buffer of two halves: 4 MiB bounds the memory of a Comm, and windows
// of 2 MiB per message stream are large enough that per-wait latency is negligible.
constexpr size_t kScratchBytes = size_t{4} << 20;
constexpr int64_t kPiecesPerWait = 64;  // messages per peer per wait: bounds the request lists
// Polls before napping: short collectives finish without sleeping; after that, naps let oversubscribed ranks
// (more ranks than cores) run the peers this rank is waiting for.
constexpr int kSpinPolls = 200;
constexpr auto kNap = std::chrono::microseconds(20);
constexpr auto kCancelGrace = std::chrono::milliseconds(50);  // how long cancelled requests may take to finish
// How long a broken Comm's destructor progresses its own abort notices before leaving them to MPI.
constexpr auto kNoticeGrace = std::chrono::milliseconds(200);
constexpr size_t kMaxAbortBytes = 1024;                       // abort notices stay small (eager) messages
constexpr int kAbortTag = 1;                                  // the abort channel carries nothing else

MPI_Datatype MpiType(DType dtype) {
  switch (dtype) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kF64: return MPI_DOUBLE;
    case DType::kBF16:
    case DType::kF16: return MPI_UINT16_T;  // moved, never reduced
    case DType::kU8: return MPI_UINT8_T;
    case DType::kI64: return MPI_INT64_T;
  }
  return MPI_BYTE;
}

uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

int Mod(int a, int n) { return ((a % n) + n) % n; }

// The elements of chunk c (of `total` split into n ring chunks) inside window [w, w + window) of the chunk:
// {first element, length}; the length is 0 past the chunk's end.
std::pair<int64_t, int64_t> Slice(int64_t total, int n, int c, int64_t w, int64_t window) {
  const int64_t begin = RingChunkBegin(total, n, c);
  const int64_t len = RingChunkBegin(total, n, c + 1) - begin;
  return {begin + w, std::clamp<int64_t>(len - w, 0, window)};
}

// Reductions: the first operand is the partial received from prev, the second this rank's own value. Integer
// sums wrap (as two's complement) instead of overflowing.
struct Sum {
  template <class T>
  T operator()(T received, T own) const {
    if constexpr (std::is_integral_v<T>) {
      return static_cast<T>(static_cast<uint64_t>(received) + static_cast<uint64_t>(own));
    } else {
      return received + own;
    }
  }
};
struct Max {
  template <class T>
  T operator()(T received, T own) const { return received < own ? own : received; }
};
struct Min {
  template <class T>
  T operator()(T received, T own) const { return own < received ? own : received; }
};

// dst[i] = op(received[i], own[i]); dst may be own (in place: each element is read before it is written).
using CombineFn = void (*)(void* dst, const void* received, const void* own, int64_t n);
template <class T, class Op>
void Combine(void* dst, const void* received, const void* own, int64_t n) {
  T* d = static_cast<T*>(dst);
  const T* a = static_cast<const T*>(received);
  const T* b = static_cast<const T*>(own);
  for (int64_t i = 0; i < n; ++i) d[i] = Op()(a[i], b[i]);
}
template <class T>
CombineFn CombineFor(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return &Combine<T, Sum>;
    case ReduceOp::kMax: return &Combine<T, Max>;
    case ReduceOp::kMin: return &Combine<T, Min>;
  }
  return nullptr;
}
// bf16 / fp16 sums: each hop widens both operands exactly to fp32, adds, and rounds to nearest even (what NCCL
// does per hop), so the result is fixed by the ring order like the other types.
template <float (*Widen)(uint16_t), uint16_t (*Narrow)(float)>
void CombineHalf(void* dst, const void* received, const void* own, int64_t n) {
  auto* d = static_cast<uint16_t*>(dst);
  const auto* a = static_cast<const uint16_t*>(received);
  const auto* b = static_cast<const uint16_t*>(own);
  for (int64_t i = 0; i < n; ++i) d[i] = Narrow(Widen(a[i]) + Widen(b[i]));
}

CombineFn GetCombine(DType dtype, ReduceOp op) {  // dtype and op were validated (16-bit types: sums only)
  switch (dtype) {
    case DType::kF64: return CombineFor<double>(op);
    case DType::kI64: return CombineFor<int64_t>(op);
    case DType::kBF16: return &CombineHalf<kernels::Bf16ToFloat, kernels::FloatToBf16>;
    case DType::kF16: return &CombineHalf<kernels::F16ToFloat, kernels::FloatToF16>;
    default: return CombineFor<float>(op);
  }
}

}  // namespace

// MPI_Comm_idup of `parent` into *out, polled until `timeout`. A request that does not complete is left to MPI: it
// is erroneous to free or cancel a non-blocking collective's request, so it is kept (and the communicator leaks if
// it ever completes).
static Status IdupWithTimeout(MPI_Comm parent, std::chrono::milliseconds timeout, MPI_Comm* out) {
  MPI_Request req = MPI_REQUEST_NULL;
  int rc = MPI_Comm_idup(parent, out, &req);
  const auto deadline = Clock::now() + timeout;
  for (int polls = 0, done = 0; rc == MPI_SUCCESS && !done; ++polls) {
    rc = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS || done) break;
    if (Clock::now() >= deadline) {
      static std::mutex mu;
      static auto* abandoned = new std::vector<MPI_Request>();  // reachable: a leak checker says nothing
      {
        std::lock_guard<std::mutex> lock(mu);
        abandoned->push_back(req);
      }
      *out = MPI_COMM_NULL;
      int rank = 0, world = 1;
      MPI_Comm_rank(parent, &rank);
      MPI_Comm_size(parent, &world);
      return Status::Timeout("creating a communicator (MPI_Comm_idup) on rank " + std::to_string(rank) + " of " +
                             std::to_string(world) + " did not complete within " + std::to_string(timeout.count()) +
                             " ms: every rank must create it at the same point (Comm::OpenMpi, FromMpiComm, "
                             "Duplicate and Engine::Open are collective); a peer is stalled or skipped the call");
    }
    if (polls >= kSpinPolls) std::this_thread::sleep_for(kNap);
  }
  if (rc != MPI_SUCCESS) {
    *out = MPI_COMM_NULL;
    return Status::Internal("MPI_Comm_idup failed: " + MpiErrorString(rc));
  }
  return Status::Ok();
}

Status MpiComm::Create(MPI_Comm parent, const CommOptions& options, bool owns_mpi, std::unique_ptr<Comm>* out,
                       const NodeTopology* topology) {
  if (out == nullptr) return Status::InvalidArgument("Comm output pointer is null");
  if (options.timeout.count() <= 0) return Status::InvalidArgument("CommOptions::timeout must be positive");
  if (options.TEST_max_message_elements < 1) {
    return Status::InvalidArgument("CommOptions::TEST_max_message_elements must be >= 1");
  }
  if (options.ranks_per_node < 0) {
    return Status::InvalidArgument("CommOptions::ranks_per_node must be >= 0 (0: detect the nodes)");
  }
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    return Status::FailedPrecondition(
        "MPI is not initialized or already finalized: call MPI_Init_thread first, or use Comm::OpenMpi");
  }
  if (parent == MPI_COMM_NULL) return Status::InvalidArgument("the MPI communicator is MPI_COMM_NULL");
  // Non-blocking duplicates polled against the timeout: a peer that never calls (a rank that failed before
  // creating its Comm, or an Engine::Open that one rank skipped) makes this a Timeout, not a hang. One at a time:
  // several outstanding MPI_Comm_idup under MPI_THREAD_MULTIPLE have hung Open MPI before (open-mpi/ompi#2380),
  // and one did here, once in a TSan run.
  MPI_Comm data = MPI_COMM_NULL, abort = MPI_COMM_NULL;
  Status s = IdupWithTimeout(parent, options.timeout, &data);
  if (s.ok()) s = IdupWithTimeout(parent, options.timeout, &abort);
  if (!s.ok()) {
    if (data != MPI_COMM_NULL) MPI_Comm_free(&data);
    return s;
  }
  // Errors become Statuses (MPI's default handler would kill the job).
  MPI_Comm_set_errhandler(data, MPI_ERRORS_RETURN);
  MPI_Comm_set_errhandler(abort, MPI_ERRORS_RETURN);
  int rank = 0, world = 1, found = 0;
  MPI_Comm_rank(data, &rank);
  MPI_Comm_size(data, &world);
  uint64_t token = 0;
  if (rank == 0) {
    static std::atomic<uint64_t> created{0};
    token = (static_cast<uint64_t>(std::random_device{}()) << 32) ^
            static_cast<uint64_t>(Clock::now().time_since_epoch().count()) ^ (++created * 0x9e3779b97f4a7c15ull);
  }
  const int rc = MPI_Bcast(&token, 1, MPI_UINT64_T, 0, data);
  if (rc != MPI_SUCCESS) {
    MPI_Comm_free(&data);
    MPI_Comm_free(&abort);
    return Status::Internal("MPI_Bcast of the communicator's token failed: " + MpiErrorString(rc));
  }
  // Which node each rank is on: inherited (Duplicate, Split) or found now, every rank taking part.
  NodeTopology nodes;
  if (topology != nullptr) {
    nodes = *topology;
  } else {
    const Status found = DetectNodeTopology(data, options.ranks_per_node, &nodes);
    if (!found.ok()) {
      MPI_Comm_free(&data);
      MPI_Comm_free(&abort);
      return found;
    }
  }
  int* tag_ub = nullptr;
  MPI_Comm_get_attr(data, MPI_TAG_UB, &tag_ub, &found);
  const int ub = found && tag_ub != nullptr ? *tag_ub : 32767;  // 32767 is the standard's minimum
  int mask = 1;
  while (mask < (INT32_MAX >> 1) && ((mask << 1) | 1) <= ub) mask = (mask << 1) | 1;
  auto* comm = new MpiComm(data, abort, token, rank, world, mask, options, owns_mpi);
  comm->topology_ = std::move(nodes);
  out->reset(comm);
  return Status::Ok();
}

// Buffers that freed-but-pending MPI requests may still read or write are never freed or reused: they are kept
// here for the life of the process (reachable, so a leak checker does not report what is deliberate).
static void Quarantine(std::unique_ptr<char[]> buffer) {
  static std::mutex mu;
  static auto* kept = new std::vector<std::unique_ptr<char[]>>();
  std::lock_guard<std::mutex> lock(mu);
  kept->push_back(std::move(buffer));
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    // Reads notices that already arrived, so that a Comm whose peer broke it counts as broken below.
    const bool broken = !CheckBroken().ok();
    CancelPending();  // normally empty: every wait clears its requests
    // Abort notices are small (eager) and complete at once unless a peer's queue is full; give them a moment.
    std::lock_guard<std::mutex> lock(mu_);
    const auto give_up = Clock::now() + kNoticeGrace;
    int done = notice_sends_.empty();
    while (!done && Clock::now() < give_up) {
      MPI_Testall(static_cast<int>(notice_sends_.size()), notice_sends_.data(), &done, MPI_STATUSES_IGNORE);
      if (!done) std::this_thread::sleep_for(kNap);
    }
    if (!done) {
      for (MPI_Request& r : notice_sends_) {
        if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
      }
      Quarantine(std::move(notice_));  // MPI may still read it
    }
    if (!broken) {  // see "A broken Comm is never freed" at the top
      MPI_Comm_free(&data_);
      MPI_Comm_free(&abort_);
    }
    if (owns_mpi_) MPI_Finalize();
  }
  if (leaked_requests_) Quarantine(std::move(scratch_));  // MPI may still write into it
}

// Returns the breaking status, or validates, counts and tags a new call (a bad call breaks the Comm: the other
// ranks cannot know this rank skipped it, so they are told rather than left to time out).
Status MpiComm::Begin(const CallInfo& info, const CollectiveOptions& opts, const void* send, const void* recv,
                      Call* call) {
  call->info = info;
  call->type = MpiType(info.dtype);
  call->elem = std::max<size_t>(1, DTypeSize(info.dtype));
  call->control = opts.control;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_.ok()) return broken_;
  }
  // Arguments before the abort channel: a rank reports its own bad call even if a peer already failed the same.
  Status s = ValidateCall(info, send, recv, rank(), world_size());
  if (!s.ok()) return Break(s, s.ToString());
  ZERO_RETURN_IF_ERROR(CheckBroken());
  CountCall(&counters_, info, opts, world_size());
  uint64_t h = Mix(seq_++);
  h = Mix(h ^ (static_cast<uint64_t>(info.kind) | static_cast<uint64_t>(info.dtype) << 8 |
               static_cast<uint64_t>(info.op) << 16 | static_cast<uint64_t>(static_cast<uint32_t>(info.root)) << 24));
  h = Mix(h ^ static_cast<uint64_t>(info.count));
  call->tag = static_cast<int>(h & static_cast<uint64_t>(tag_mask_));
  return Status::Ok();
}

void MpiComm::PostOne(const Call& call, bool recv, const void* at, int count, int peer) {
  if (!post_error_.ok()) return;
  MPI_Request req = MPI_REQUEST_NULL;
  const int rc = recv ? MPI_Irecv(const_cast<void*>(at), count, call.type, peer, call.tag, data_, &req)
                      : MPI_Isend(at, count, call.type, peer, call.tag, data_, &req);
  if (rc != MPI_SUCCESS) {
    post_error_ = Status::Internal(Where(call) + ": " + (recv ? "MPI_Irecv from" : "MPI_Isend to") + " rank " +
                                   std::to_string(peer) + " failed: " + MpiErrorString(rc) +
                                   "; this communicator is now unusable");
    return;
  }
  reqs_.push_back(req);
  pending_.push_back({peer, recv, count, at});
  // Per link kind: what this rank sends, message by message (data collectives only, like the other counters).
  if (!recv && !call.control) CountSent(&counters_, topology_, peer, static_cast<int64_t>(count) * call.elem);
}

// Posts `count` elements as messages of at most max_message_ elements (nothing when count is 0).
void MpiComm::Post(const Call& call, bool recv, const void* buf, int64_t count, int peer) {
  const char* p = static_cast<const char*>(buf);
  for (int64_t done = 0; done < count;) {
    const int piece = static_cast<int>(std::min<int64_t>(count - done, max_message_));
    PostOne(call, recv, p + done * call.elem, piece, peer);
    done += piece;
  }
}

// Polls the posted requests until all complete, the deadline passes, MPI reports an error, or the Comm breaks
// (a peer's abort notice, or Abort() from another thread). Spins briefly, then naps between polls.
Status MpiComm::Wait(const Call& call) {
  if (!post_error_.ok()) {
    Status s = post_error_;
    post_error_ = Status::Ok();
    return Fail(s);
  }
  const auto deadline = Clock::now() + options_.timeout;
  statuses_.resize(reqs_.size());
  for (int polls = 0;; ++polls) {
    // The abort channel goes first, so that a notice already delivered wins over stale data messages.
    if (Status s = CheckBroken(); !s.ok()) {
      CancelPending();
      return s;
    }
    int done = 0;
    const int rc = MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &done, statuses_.data());
    if (rc != MPI_SUCCESS) return Fail(RequestError(call, rc));
    if (done) break;
    if (Clock::now() >= deadline) return Fail(TimeoutError(call));
    if (polls >= kSpinPolls) std::this_thread::sleep_for(kNap);
  }
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (!pending_[i].recv) continue;
    int got = -1;
    MPI_Get_count(&statuses_[i], call.type, &got);
    if (got != pending_[i].count) {
      return Fail(Status::Mismatch(Where(call) + ": received " + std::to_string(got) + " elements from rank " +
                                   std::to_string(pending_[i].peer) + ", expected " +
                                   std::to_string(pending_[i].count) +
                                   "; the ranks disagree about this call; this communicator is now unusable"));
    }
  }
  AnnotateCompleted(call);
  reqs_.clear();
  pending_.clear();
  return Status::Ok();
}

// Open MPI's shared-memory transport copies messages in code ThreadSanitizer does not instrument. Telling it,
// from the thread that completed the requests, what MPI read and wrote makes a missing wait between this thread
// and another (the engine's compute thread) a reported race instead of an invisible one.
void MpiComm::AnnotateCompleted(const Call& call) const {
#if ZERO_TSAN
  for (const Pending& p : pending_) {
    const auto bytes = static_cast<unsigned long>(p.count) * call.elem;  // NOLINT(runtime/int): TSan's signature
    if (p.recv) {
      __tsan_write_range(const_cast<void*>(p.at), bytes);
    } else {
      __tsan_read_range(const_cast<void*>(p.at), bytes);
    }
  }
#else
  (void)call;
#endif
}

std::string MpiComm::Where(const Call& call) const {
  return DescribeCall(call.info) + " on rank " + std::to_string(rank()) + " of " +
         std::to_string(world_size());
}

Status MpiComm::RequestError(const Call& call, int rc) const {
  int code = rc, peer = -1;
  bool recv = false;
  if (rc == MPI_ERR_IN_STATUS) {
    for (size_t i = 0; i < statuses_.size(); ++i) {
      const int e = statuses_[i].MPI_ERROR;
      if (e != MPI_SUCCESS && e != MPI_ERR_PENDING) {
        code = e;
        peer = pending_[i].peer;
        recv = pending_[i].recv;
        break;
      }
    }
  }
  int error_class = code;
  MPI_Error_class(code, &error_class);
  std::string msg = Where(call) + ": ";
  if (peer >= 0) msg += std::string(recv ? "receiving from" : "sending to") + " rank " + std::to_string(peer) + " ";
  msg += "failed: " + MpiErrorString(code) + "; this communicator is now unusable";
  // Truncation means a peer sent more than this rank expected: the ranks disagree about the call.
  return error_class == MPI_ERR_TRUNCATE ? Status::Mismatch(msg) : Status::Internal(msg);
}

// Names the peers whose messages are still outstanding (call before the requests are cancelled).
Status MpiComm::TimeoutError(const Call& call) const {
  std::vector<int> from, to;
  for (size_t i = 0; i < reqs_.size(); ++i) {
    int complete = 1;
    if (reqs_[i] != MPI_REQUEST_NULL) MPI_Request_get_status(reqs_[i], &complete, MPI_STATUS_IGNORE);
    std::vector<int>& peers = pending_[i].recv ? from : to;
    if (!complete && std::find(peers.begin(), peers.end(), pending_[i].peer) == peers.end()) {
      peers.push_back(pending_[i].peer);
    }
  }
  auto list = [](const std::vector<int>& peers) {
    std::string s;
    for (size_t i = 0; i < peers.size(); ++i) s += (i ? ", " : "") + std::to_string(peers[i]);
    return s;
  };
  std::string waiting;
  if (!from.empty()) waiting = "waiting to receive from rank " + list(from);
  if (!to.empty()) waiting += (waiting.empty() ? "" : " and ") + std::string("waiting for rank ") + list(to) +
                              " to receive this rank's data";
  return Status::Timeout(Where(call) + " did not complete within " + std::to_string(options_.timeout.count()) +
                         " ms, " + waiting +
                         ": a peer is stalled or the ranks issued collectives in different orders (or with "
                         "different counts or dtypes); this communicator is now unusable");
}

Status MpiComm::Fail(const Status& s) {
  CancelPending();
  return Break(s, s.ToString());
}

void MpiComm::CancelPending() {
  for (MPI_Request& r : reqs_) {
    if (r != MPI_REQUEST_NULL) MPI_Cancel(&r);
  }
  const auto give_up = Clock::now() + kCancelGrace;
  for (bool all_done = false; !all_done && Clock::now() < give_up;) {
    all_done = true;
    for (MPI_Request& r : reqs_) {
      int flag = 0;
      if (r != MPI_REQUEST_NULL && MPI_Test(&r, &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && !flag) all_done = false;
    }
    if (!all_done) std::this_thread::sleep_for(kNap);
  }
  for (MPI_Request& r : reqs_) {
    if (r == MPI_REQUEST_NULL) continue;
    MPI_Request_free(&r);  // an uncancellable send, or a receive already matched: let MPI finish it
    leaked_requests_ = true;
  }
  reqs_.clear();
  pending_.clear();
}

// The breaking status, else a peer's abort notice if one arrived (which then breaks this Comm), else OK.
Status MpiComm::CheckBroken() const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_.ok()) return broken_;
  }
  // Notices addressed to an earlier communicator with the same context id carry another token: drop them.
  for (;;) {
    int found = 0;
    MPI_Message message;
    MPI_Status status;
    int rc = MPI_Improbe(MPI_ANY_SOURCE, kAbortTag, abort_, &found, &message, &status);
    if (rc != MPI_SUCCESS) return Break(Status::Internal("MPI_Improbe failed: " + MpiErrorString(rc)), "");
    if (!found) return Status::Ok();
    int len = 0;
    MPI_Get_count(&status, MPI_CHAR, &len);
    std::string text(static_cast<size_t>(std::max(len, 0)), '\0');
    rc = MPI_Mrecv(text.data(), len, MPI_CHAR, &message, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return Break(AbortedBy(status.MPI_SOURCE, "(the reason was lost: " + MpiErrorString(rc) + ")"), "");
    uint64_t token = 0;
    if (text.size() < sizeof(token)) continue;
    std::memcpy(&token, text.data(), sizeof(token));
    if (token != token_) continue;
    return Break(AbortedBy(status.MPI_SOURCE, text.substr(sizeof(token))), "");
  }
}

// Breaks this Comm with `s` unless it is already broken (the first status wins), and sends `notice` (if not
// empty) to every peer. Returns the breaking status.
Status MpiComm::Break(const Status& s, std::string_view notice) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_.ok()) return broken_;
  broken_ = s;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (notice.empty() || world_size() == 1 || finalized) return s;
  const size_t text_len = std::min(notice.size(), kMaxAbortBytes);
  const size_t len = sizeof(token_) + text_len;
  notice_.reset(new char[len]);
  std::memcpy(notice_.get(), &token_, sizeof(token_));
  std::memcpy(notice_.get() + sizeof(token_), notice.data(), text_len);
  for (int peer = 0; peer < world_size(); ++peer) {
    if (peer == rank()) continue;
    MPI_Request req;
    if (MPI_Isend(notice_.get(), static_cast<int>(len), MPI_CHAR, peer, kAbortTag, abort_, &req) == MPI_SUCCESS) {
      notice_sends_.push_back(req);
    }
  }
  return s;
}

Status MpiComm::DoDuplicate(std::unique_ptr<Comm>* out) {
  // Without the call lock (comm.cc): MPI_Comm_idup is an MPI collective on data_, which MPI orders apart from
  // the point-to-point messages that another thread's collective may be exchanging on it meanwhile. Create
  // touches no member of this Comm.
  ZERO_RETURN_IF_ERROR(CheckBroken());
  Status s = Create(data_, options_, /*owns_mpi=*/false, out, &topology_);
  if (!s.ok()) return Break(s, s.ToString());  // peers may be waiting in theirs: tell them
  return s;
}

// Comm::Split has exchanged every rank's color under the call lock, so every rank is here: MPI_Comm_split (which
// cannot time out) then finds all of them. The new communicator is created from it like any other (its own
// duplicates for data and abort notices) and the split itself freed.
Status MpiComm::DoSplit(int color, int key, const std::vector<int>& members, const NodeTopology& topology,
                        std::unique_ptr<Comm>* out) {
  (void)members;
  MPI_Comm sub = MPI_COMM_NULL;
  int rc = MPI_Comm_split(data_, color, key, &sub);
  if (rc != MPI_SUCCESS) {
    Status s = Status::Internal("Comm::Split on rank " + std::to_string(rank()) + ": MPI_Comm_split failed: " +
                                MpiErrorString(rc));
    return Break(s, s.ToString());
  }
  Status s = Create(sub, options_, /*owns_mpi=*/false, out, &topology);
  MPI_Comm_free(&sub);
  if (!s.ok()) return Break(s, s.ToString());
  return s;
}

// Every block goes straight to its rank: one wait per window of the blocks, every peer's send and receive posted
// at once (the request list holds 2 * (world - 1) * kPiecesPerWait messages at most). This rank's own block is a
// copy.
Status MpiComm::DoAllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) {
  Call call;
  ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kAllToAll, opts.what, count, dtype}, opts, send, recv, &call));
  if (count == 0) return Status::Ok();
  const size_t es = call.elem;
  const auto* in = static_cast<const char*>(send);
  auto* out = static_cast<char*>(recv);
  const int n = world_size(), r = rank();
  std::memcpy(out + static_cast<size_t>(r) * count * es, in + static_cast<size_t>(r) * count * es, count * es);
  const int64_t window = WindowElements(es);
  for (int64_t w = 0; w < count; w += window) {
    const int64_t len = std::min(window, count - w);
    for (int k = 1; k < n; ++k) {  // peers in ring order from this rank, the same pattern on every rank
      const int to = Mod(r + k, n), from = Mod(r - k, n);
      Post(call, /*recv=*/false, in + (static_cast<size_t>(to) * count + w) * es, len, to);
      Post(call, /*recv=*/true, out + (static_cast<size_t>(from) * count + w) * es, len, from);
    }
    ZERO_RETURN_IF_ERROR(Wait(call));
  }
  return Status::Ok();
}

void MpiComm::Abort(const Status& reason) {
  const std::string text = AbortReasonText(reason);
  (void)Break(AbortedBy(rank(), text), text);
}

Status MpiComm::health() const {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) return CheckBroken();
  std::lock_guard<std::mutex> lock(mu_);
  return broken_;
}

char* MpiComm::Scratch(size_t bytes) {
  // Only reached on a healthy Comm, so no freed request can target the old buffer.
  if (bytes > scratch_bytes_) {
    scratch_.reset(new char[bytes]);
    scratch_bytes_ = bytes;
  }
  return scratch_.get();
}

// The ring reduction (see the file comment): leaves this rank's reduced chunk in own_out. Chunks are the ring
// chunks of `total` elements; partials travel in windows of the chunks through the two scratch halves.
Status MpiComm::RingReduce(const Call& call, const char* send, char* own_out, int64_t total) {
  const int n = world_size(), r = rank(), next = Mod(r + 1, n), prev = Mod(r - 1, n);
  const size_t es = call.elem;
  int64_t longest = 0;
  for (int c = 0; c < n; ++c) {
    longest = std::max(longest, RingChunkBegin(total, n, c + 1) - RingChunkBegin(total, n, c));
  }
  const int64_t window = std::min(WindowElements(es), longest);
  char* scratch = Scratch(2 * window * es);
  char* half[2] = {scratch, scratch + window * es};
  const CombineFn combine = GetCombine(call.info.dtype, call.info.op);
  for (int64_t w = 0; w < longest; w += window) {
    int cur = 0;  // half[cur] holds the partial this rank sends next (from step 1 on)
    for (int s = 0; s < n - 1; ++s) {
      const auto [send_begin, send_len] = Slice(total, n, Mod(r - 1 - s, n), w, window);
      const auto [recv_begin, recv_len] = Slice(total, n, Mod(r - 2 - s, n), w, window);
      Post(call, /*recv=*/false, s == 0 ? send + send_begin * es : half[cur], send_len, next);
      Post(call, /*recv=*/true, half[1 - cur], recv_len, prev);
      ZERO_RETURN_IF_ERROR(Wait(call));
      // At the last step the received chunk is this rank's own: its result goes straight to the output.
      char* dst = s == n - 2 ? own_out + w * es : half[1 - cur];
      combine(dst, half[1 - cur], send + recv_begin * es, recv_len);
      cur = 1 - cur;
    }
  }
  return Status::Ok();
}

// The ring all-gather of the ring chunks of `total` elements in buf; this rank's chunk is already in place.
Status MpiComm::RingGather(const Call& call, char* buf, int64_t total) {
  const int n = world_size(), r = rank(), next = Mod(r + 1, n), prev = Mod(r - 1, n);
  const size_t es = call.elem;
  const int64_t window = WindowElements(es);
  for (int s = 0; s < n - 1; ++s) {
    const int send_chunk = Mod(r - s, n), recv_chunk = Mod(r - 1 - s, n);
    const int64_t longest =
        std::max(RingChunkBegin(total, n, send_chunk + 1) - RingChunkBegin(total, n, send_chunk),
                 RingChunkBegin(total, n, recv_chunk + 1) - RingChunkBegin(total, n, recv_chunk));
    for (int64_t w = 0; w < longest; w += window) {
      const auto [send_begin, send_len] = Slice(total, n, send_chunk, w, window);
      const auto [recv_begin, recv_len] = Slice(total, n, recv_chunk, w, window);
      Post(call, /*recv=*/false, buf + send_begin * es, send_len, next);
      Post(call, /*recv=*/true, buf + recv_begin * es, recv_len, prev);
      ZERO_RETURN_IF_ERROR(Wait(call));
    }
  }
  return Status::Ok();
}

Status MpiComm::DoReduceScatter(const void* send, void* recv, int64_t count, DType dtype,
                              const CollectiveOptions& opts) {
  Call call;
  ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kReduceScatter, opts.what, count, dtype}, opts, send, recv, &call));
  if (count == 0) return Status::Ok();
  if (world_size() == 1) {
    CopyUnlessSame(recv, send, count * call.elem);
    return Status::Ok();
  }
  return RingReduce(call, static_cast<const char*>(send), static_cast<char*>(recv), count * world_size());
}

Status MpiComm::DoAllGather(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) {
  Call call;
  ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kAllGather, opts.what, count, dtype}, opts, send, recv, &call));
  if (count == 0) return Status::Ok();
  char* out = static_cast<char*>(recv);
  CopyUnlessSame(out + rank() * count * call.elem, send, count * call.elem);
  if (world_size() == 1) return Status::Ok();
  return RingGather(call, out, count * world_size());
}

Status MpiComm::DoAllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                          const CollectiveOptions& opts) {
  Call call;
  ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kAllReduce, opts.what, count, dtype, op}, opts, send, recv, &call));
  if (count == 0) return Status::Ok();
  if (world_size() == 1) {
    CopyUnlessSame(recv, send, count * call.elem);
    return Status::Ok();
  }
  char* out = static_cast<char*>(recv);
  char* own_out = out + RingChunkBegin(count, world_size(), rank()) * call.elem;
  ZERO_RETURN_IF_ERROR(RingReduce(call, static_cast<const char*>(send), own_out, count));
  return RingGather(call, out, count);
}

Status MpiComm::DoBroadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) {
  Call call;
  CallInfo info{CollectiveKind::kBroadcast, opts.what, count, dtype, ReduceOp::kSum, root};
  ZERO_RETURN_IF_ERROR(Begin(info, opts, nullptr, buffer, &call));
  char* buf = static_cast<char*>(buffer);
  const int64_t window = WindowElements(call.elem);
  for (int64_t w = 0; w < count; w += window) {
    const int64_t len = std::min(window, count - w);
    if (rank() == root) {
      for (int peer = 0; peer < world_size(); ++peer) {
        if (peer != root) Post(call, /*recv=*/false, buf + w * call.elem, len, peer);
      }
    } else {
      Post(call, /*recv=*/true, buf + w * call.elem, len, root);
    }
    ZERO_RETURN_IF_ERROR(Wait(call));
  }
  return Status::Ok();
}

Status MpiComm::DoBarrier(const CollectiveOptions& opts) {
  Call call;
  ZERO_RETURN_IF_ERROR(Begin({CollectiveKind::kBarrier, opts.what}, opts, nullptr, nullptr, &call));
  // Dissemination: after round k every rank has heard, directly or not, from the 2^(k+1) - 1 ranks before it.
  static char empty;
  const int n = world_size(), r = rank();
  for (int distance = 1; distance < n; distance *= 2) {
    PostOne(call, /*recv=*/false, &empty, 0, Mod(r + distance, n));
    PostOne(call, /*recv=*/true, &empty, 0, Mod(r - distance, n));
    ZERO_RETURN_IF_ERROR(Wait(call));
  }
  return Status::Ok();
}

int64_t MpiComm::WindowElements(size_t elem) const {
  return std::max<int64_t>(1, std::min<int64_t>(max_message_ * kPiecesPerWait, kScratchBytes / 2 / elem));
}

}  // namespace zero::internal

namespace zero {

using internal::MpiComm;

Status Comm::FromMpiComm(int64_t mpi_comm_fortran_handle, const CommOptions& options, std::unique_ptr<Comm>* comm) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    return Status::FailedPrecondition("Comm::FromMpiComm: MPI is not initialized; call MPI_Init_thread first");
  }
  return MpiComm::Create(MPI_Comm_f2c(static_cast<MPI_Fint>(mpi_comm_fortran_handle)), options,
                         /*owns_mpi=*/false, comm);
}

Status Comm::OpenMpi(const CommOptions& options, std::unique_ptr<Comm>* comm) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (finalized) return Status::FailedPrecondition("Comm::OpenMpi: MPI was already finalized");
  bool owns_mpi = false;
  if (!initialized) {
    int provided = 0;
    const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
    if (rc != MPI_SUCCESS) return Status::Unavailable("MPI_Init_thread failed: " + internal::MpiErrorString(rc));
    owns_mpi = true;
  }
  Status s = MpiComm::Create(MPI_COMM_WORLD, options, owns_mpi, comm);
  if (!s.ok() && owns_mpi) MPI_Finalize();
  return s;
}

}  // namespace zero

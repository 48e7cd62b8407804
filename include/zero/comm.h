// zero::Comm: collectives over flat buffers between the ranks of one data-parallel group.
//
// Contract (NCCL's, so that the CPU and GPU backends are interchangeable):
//  * Counts are in elements, never bytes. `count` is the per-rank element count of reduce-scatter and
//    all-gather, and the whole buffer's count for all-reduce and broadcast.
//  * ReduceScatter sums `world_size * count` elements of `send` across ranks and leaves rank r's slice
//    [r*count, (r+1)*count) in `recv`. It is in place when recv == send + rank * count.
//  * AllGather concatenates every rank's `count` elements in rank order into `recv` (world_size * count).
//    It is in place when send == recv + rank * count.
//  * All functions of a Comm must be called in the same order, with the same counts and dtypes, by every rank.
//    A rank that breaks this gets an error (a timeout, or the reason a peer aborted with), never a hang.
//  * Every wait polls against CommOptions::timeout. After a timeout or an Abort the Comm is broken: every later
//    call returns the status that broke it, naming the collective that failed.
//
// Threads: the collectives may be called from any thread. Calls on one Comm are serialized (one runs at a time,
// in the order they take its lock), so calls from several threads of a rank must still reach the Comm in the same
// order on every rank: the order is the program's to fix (for example, one thread issues them). A different order
// is caught like any other disagreement: kMismatch or kTimeout on every rank, never a hang. Abort and health may be
// called from any thread at any time.
//
// A trainer and its Engine share the Comm safely. Engine::Open takes a private Duplicate() of the Comm it is given
// and runs every collective of its own there, on its communication thread. The trainer's collectives on its Comm
// (loss averaging, metrics, agreeing on early stopping, a data loader's exchanges) therefore never interleave with
// the engine's queued reductions and gathers: they may be issued at any moment, between any two engine calls, in
// every stage, and (over MPI) from other threads while the engine works. They are not ordered after the engine's
// queued work (no wait for it either): data they read from the engine comes through Param/Grad views, which the
// engine orders itself (engine.h). Over NCCL the kernels of the Comm and its duplicates run in the order the host
// issued them (NCCL forbids two communicators' kernels at once unless every rank orders them alike), so there
// issue the trainer's collectives from the thread that calls the engine.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "zero/status.h"
#include "zero/types.h"

namespace zero {

enum class ReduceOp : uint8_t { kSum, kMax, kMin };

struct CommOptions {
  // How long any single wait may take before the Comm is marked broken. Default 300 s; a stalled peer costs
  // this much wall time before every rank gets an error.
  std::chrono::milliseconds timeout{300'000};
  // Test seam: largest element count of one point-to-point message (MPI counts are int). Default 2^30.
  int64_t TEST_max_message_elements = int64_t{1} << 30;
  // Which ranks share a node (Comm::topology). 0 (default): the ranks that share memory, as MPI's
  // MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) finds them (one node per host). k > 0: ranks [k*i, k*(i+1)) form
  // node i whatever the hardware, so that tests and benchmarks have several "nodes" on one machine. Every rank
  // must pass the same value (creating the Comm fails with kMismatch on every rank otherwise).
  int ranks_per_node = 0;
};

// Which node each rank of a Comm runs on. Nodes are numbered in the order of their lowest rank; a rank's local
// index is its position among its node's ranks in rank order. Identical on every rank of the Comm.
struct NodeTopology {
  std::vector<int> node_of;  // node of each rank (size world_size)
  int nodes = 1;
  int node = 0;         // this rank's node
  int local_rank = 0;   // this rank's index on its node
  int local_size = 1;   // ranks on this rank's node

  // Every node has the same number of ranks (what the hierarchical collectives of ZeRO++ need).
  bool uniform() const;
  // The ranks of `node`, ascending.
  std::vector<int> RanksOf(int node) const;
  // "4 ranks on 2 nodes of 2" or "5 ranks on 2 nodes (3, 2)", for messages.
  std::string ToString() const;
};

// Describes one call for counters and error messages.
struct CollectiveOptions {
  // Control traffic (agreement checks, norms) is counted apart from data traffic, so that the data counters
  // match the ZeRO communication formulas exactly.
  bool control = false;
  // What this collective is, for error messages ("bucket 3 of unit 2, step 7"). May be null.
  const char* what = nullptr;
  // NcclComm: a cudaStream_t whose earlier work the collective must follow (the engine's communication stream).
  // Null: no ordering beyond the call itself. Ignored by host-memory communicators.
  void* stream = nullptr;
};

// Elements moved per collective kind, as issued by this rank, data traffic only. Reduce-scatter and
// all-gather count the whole (world_size * count) buffer; all-reduce and broadcast count their buffer.
struct CommCounters {
  int64_t reduce_scatter = 0;
  int64_t all_gather = 0;
  int64_t all_reduce = 0;
  int64_t broadcast = 0;
  int64_t all_to_all = 0;        // the whole (world_size * count) send buffer
  int64_t control_calls = 0;     // number of control collectives
  int64_t control_elements = 0;  // elements of control collectives
  // Bytes of data collectives this rank sent to ranks on its own node and on other nodes (Comm::topology): what
  // each kind of link carried. MpiComm counts the messages it sends; NcclComm counts what a ring in rank order
  // sends (NCCL picks its own rings and trees); a Comm::Single sends nothing.
  int64_t intra_node_bytes = 0;
  int64_t inter_node_bytes = 0;
  // The ZeRO paper's volume: reduce-scatter + all-gather + all-to-all + 2 * all-reduce.
  int64_t Volume() const { return reduce_scatter + all_gather + all_to_all + 2 * all_reduce; }
  CommCounters& operator+=(const CommCounters& o);
};

class Comm {
 public:
  virtual ~Comm() = default;
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  // A communicator over MPI_COMM_WORLD. Initializes MPI (MPI_THREAD_MULTIPLE) if nobody has yet; in that case
  // the returned Comm finalizes MPI when it is destroyed.
  static Status OpenMpi(const CommOptions& options, std::unique_ptr<Comm>* comm);
  // A communicator over an existing MPI communicator (for example a data-parallel subgroup), given by its
  // Fortran handle (MPI_Comm_c2f(comm)) so that this header needs no mpi.h. The communicator is duplicated;
  // the caller keeps ownership of the original and of MPI itself.
  static Status FromMpiComm(int64_t mpi_comm_fortran_handle, const CommOptions& options,
                            std::unique_ptr<Comm>* comm);
  // A communicator over NCCL on CUDA devices, bootstrapped over the given MPI communicator (Fortran handle;
  // MPI must be initialized): each rank uses its visible device (node-local rank % visible devices), so a launcher
  // may give each rank all of the node's GPUs or its own (per-rank CUDA_VISIBLE_DEVICES). Two ranks of a node on
  // one GPU (by PCI bus id) are refused unless NCCL >= 2.30 runs with NCCL_MULTI_RANK_GPU_ENABLE=1. Buffers must be
  // device memory. Every rank returns Unavailable, saying why, when any rank has no usable GPU, ranks would share
  // one without that, or this build has no NCCL. Unlike OpenMpi's Comm, Abort must be called from the thread that
  // issues the collectives.
  static Status OpenNccl(int64_t mpi_comm_fortran_handle, const CommOptions& options, std::unique_ptr<Comm>* comm);
  // The same, bootstrapped over the MPI communicator of `mpi`, a Comm from OpenMpi or FromMpiComm (collective over
  // its ranks), for trainers that do not include mpi.h. `mpi` must outlive the NCCL Comm when it owns MPI (OpenMpi
  // initialized it); it stays usable, e.g. as the fallback with Backend::kCpu when this returns Unavailable.
  static Status OpenNccl(const Comm& mpi, const CommOptions& options, std::unique_ptr<Comm>* comm);
  // A world of one rank: every collective is a copy.
  static std::unique_ptr<Comm> Single();

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  // The CUDA device whose memory this Comm moves (OpenNccl), or -1 for host memory (OpenMpi, Single).
  virtual int cuda_device() const { return -1; }
  // CommOptions::timeout: how long one wait may take.
  std::chrono::milliseconds timeout() const { return timeout_; }

  // Sum only. f32, f64, bf16 and f16 (16-bit sums: each step adds in fp32 and rounds to nearest even).
  Status ReduceScatter(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts = {});
  // Any dtype.
  Status AllGather(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts = {});
  // f32, f64 and i64; bf16 and f16 with kSum. When count is a multiple of world_size, sums run in the same fixed
  // ring order as ReduceScatter, so results are bitwise reproducible.
  Status AllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                   const CollectiveOptions& opts = {});
  // Any dtype. In place on every rank.
  Status Broadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts = {});
  Status Barrier(const CollectiveOptions& opts = {});

  // Several all-gathers of one dtype that go together (a unit's buckets), issued as one group: NCCL launches them
  // as one (ncclGroupStart/End); host-memory communicators run them one after another. Each item is validated and
  // counted like a separate AllGather; every rank must pass the same items in the same order.
  struct GatherItem {
    const void* send;
    void* recv;
    int64_t count;
  };
  Status AllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts = {});
  // Any dtype. Rank r sends block j of `send` (world_size blocks of `count` elements) to rank j, and receives rank
  // j's block r into block j of `recv`. Not in place: send and recv must not overlap.
  Status AllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts = {});

  // A new Comm over the same ranks, in the same rank order, with the same options, whose collectives never
  // interleave with this one's (MPI_Comm_idup; an NCCL communicator split from this one). Its counters start at
  // zero; breaking one does not break the other. Collective: every rank calls it, and calls it in the same order
  // with respect to its other Duplicates. Over MPI it may overlap collectives that other threads run on this Comm;
  // over NCCL it waits for them (so with NCCL, create engines before other threads use the Comm). Engine::Open
  // calls it; over MPI a trainer may use it to give another thread collectives of its own, in an order independent
  // of its main thread's. Not over NCCL: there a Comm and its duplicates run their kernels in host issue order (the
  // file comment says why), so collectives on any of them must be issued in the same order on every rank, from one
  // thread in practice. The duplicate must be destroyed before this Comm.
  Status Duplicate(std::unique_ptr<Comm>* out);
  // A new Comm over the ranks of this one that pass the same `color` (>= 0), ordered by `key` (ties by rank), with
  // the same options; its topology is this one's restricted to its ranks and its counters start at zero.
  // Collective over every rank of this Comm, serialized with its collectives (a polled exchange of the colors
  // first, so a rank that never calls makes it time out rather than hang). Engine::Open splits its duplicate by
  // node for ZeRO++ (Options::zeropp). The new Comm must be destroyed before this one.
  Status Split(int color, int key, std::unique_ptr<Comm>* out);

  // Marks this Comm broken with `reason` and tells every peer, whose current or next wait then returns
  // Status::Aborted naming this rank and the reason. Use it when this rank can no longer follow the
  // collective order (so peers fail instead of hanging).
  virtual void Abort(const Status& reason) = 0;
  // OK, or the status that broke this Comm.
  virtual Status health() const = 0;

  const CommCounters& counters() const { return counters_; }
  void ResetCounters() { counters_ = CommCounters(); }
  // Which node each rank is on (CommOptions::ranks_per_node). A Comm::Single is one node.
  const NodeTopology& topology() const { return topology_; }

 protected:
  Comm(int rank, int world_size);
  // The backends' collectives, called with the call lock held (one at a time), arguments as above.
  virtual Status DoReduceScatter(const void* send, void* recv, int64_t count, DType dtype,
                                 const CollectiveOptions& opts) = 0;
  virtual Status DoAllGather(const void* send, void* recv, int64_t count, DType dtype,
                             const CollectiveOptions& opts) = 0;
  virtual Status DoAllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                             const CollectiveOptions& opts) = 0;
  virtual Status DoBroadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) = 0;
  virtual Status DoBarrier(const CollectiveOptions& opts) = 0;
  // Default: one DoAllGather per item.
  virtual Status DoAllGatherMany(std::span<const GatherItem> items, DType dtype, const CollectiveOptions& opts);
  virtual Status DoDuplicate(std::unique_ptr<Comm>* out) = 0;
  // Default: Unavailable, naming the call.
  virtual Status DoAllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts);
  // Called with the call lock held, after every rank's (color, key) is known: `members` are the new Comm's ranks
  // (ranks of this Comm, in the new order) and `topology` its topology. Default: Unavailable.
  virtual Status DoSplit(int color, int key, const std::vector<int>& members, const NodeTopology& topology,
                         std::unique_ptr<Comm>* out);

  // The lock the collectives hold; DoDuplicate runs without it (see Duplicate).
  std::mutex& call_mutex() { return call_mu_; }

  CommCounters counters_;
  std::chrono::milliseconds timeout_{300'000};
  NodeTopology topology_;  // backends set it at creation; the default is one node of every rank

 private:
  int rank_;
  int world_size_;
  std::mutex call_mu_;  // serializes the collectives (see "Threads" above)
  std::mutex dup_mu_;   // serializes Duplicate
};

}  // namespace zero

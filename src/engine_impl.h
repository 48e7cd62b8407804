// Engine::Impl: the engine's state, shared by engine.cc (open, checks, views), engine_units.cc (acquire,
// release, reductions, stage-3 gathers) and engine_step.cc (init, norms, optimizer, re-gather).
//
// Buffers (all allocated at Open; nothing is allocated on the step path except GatherFull scopes):
//
//   stage | params (kParams)                  | grads (kGrads)       | optimizer      | buffers (kBuffers)
//   ------+-----------------------------------+----------------------+----------------+---------------------------
//     0   | full trainable + full frozen      | full trainable       | full trainable | -
//     1   | full trainable + full frozen      | full trainable       | shard          | -
//     2   | full trainable + full frozen      | shard accumulator    | shard          | grad pool
//     3   | shards + full persistent units    | shard accumulator    | shard          | grad pool + gather slots
//
// "full trainable" is one flat buffer of every trainable bucket in plan order (PartitionPlan offsets), "shard"
// one flat buffer of this rank's shards. A unit's full layout (gather slots, pool buffers, persistent buffer)
// is its trainable buckets then its frozen buckets, contiguous (BucketInfo::unit_offset).
//
// Streams and events. The trainer's kernels run on the compute stream (on the CPU backend: the calling thread);
// every collective of the engine runs on one communication stream (on the CPU backend: one worker thread, so all
// of a communicator's collectives are issued by one thread, in the host's call order, which is the same on every
// rank). Each cross-stream dependency is an event; the table lists every edge:
//
//   edge                          recorded on / when                       waited on / by
//   ----------------------------  ---------------------------------------  -------------------------------------
//   compute -> reduce             compute, GradsReady(u): grads_done[u]    comm stream, before u's reductions
//   reduce -> pool                comm, after u's last reduction, its      compute, at BindPool, before the
//                                 accumulation and the buffer's zeroing    trainer adds into the buffer for its
//                                 (on the comm stream): pool_free[buffer]  next unit
//   reductions in flight          comm, after each reduction: in_flight[   the host, before issuing reduction k
//                                 k % reductions_in_flight]                (bounds queued work; never the
//                                                                          compute stream)
//   gather -> compute             comm, after a unit's gathers:            compute, in Acquire (after issuing
//                                 slot_ready[slot]                         the prefetches)
//   compute -> gather slot        compute, when a slot is dropped          comm stream, before a gather into it
//                                 (Release, Step, eviction): slot_free[s]
//   optimizer -> gathers          compute, after the optimizer:            comm stream, before the post-step
//                                 optimizer_done                           gathers (and so every later gather)
//   reduce/accumulate -> Step     every reduction precedes Step's          Step drains the comm stream before
//                                 agreement check on the comm stream       reading gradient shards
//   post-step gather -> Acquire   comm, after GatherAfterStep:             compute: Acquire and Param()
//                                 params_ready                             (WaitParams); GatherFull drains
//   control collectives           run on the comm stream and waited for    (agreement checks, norms) in order
//   offload: compute -> copies    compute, at Step: step_begin             copy stream, before any copy
//   offload: gradient D2H -> CPU  copy, after bucket k's shard is on the   host thread, before updating k
//                                 host: d2h_done[k % 2]
//   offload: staging reuse        copy, after bucket k's parameters went   host thread, before bucket k+2 writes
//                                 up: h2d_done[k % 2]                      the same staging buffer
//   offload: H2D -> gather        the same h2d_done[k % 2]                 comm stream, before k's all-gather
//   offload_params: H2D -> gather a stage-3 gather's task copies the host  (same stream: in order)
//                                 shard into its slot, then all-gathers
//
// One communication stream carries gathers and reductions alike, in the host's issue order: on the CPU a second
// worker would issue collectives on the same communicator from two threads, in an order that could differ
// between ranks. On CUDA, NcclComm enqueues each collective on the communication stream itself
// (CollectiveOptions::stream) and returns at once, with a watchdog that names a collective exceeding the
// timeout; control collectives on host memory are staged and waited for. Gathers and reductions share that
// stream in issue order (a second, high-priority gather stream would need a GPU to show it helps).
//
// Errors of work on the comm stream are sticky: the stream skips everything after a failed collective, and the
// next engine call that waits (or checks health) returns that status, which names the collective, bucket and
// step.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "buffer_plan.h"
#include "comm_hierarchical.h"
#include "device.h"
#include "nvme_tier.h"
#include "partition_plan.h"
#include "zero/engine.h"

namespace zero {

// Components of the cross-rank agreement vector (see Engine::Impl::Agree).
enum AgreeField : int {
  kAgreeKind = 0,    // which call (AgreeKind)
  kAgreeStep,        // optimizer step count
  kAgreeMicro,       // micro-step index argument
  kAgreeIsLast,      // is_last argument
  kAgreePlan,        // plan hash
  kAgreeTrace,       // hash of the units used since the step began
  kAgreeArg,         // call-specific argument (unit, unit-list hash)
  kAgreeLocalError,  // 1 when this rank found a local error it reports itself
  kAgreeAny,         // not compared: the maximum over ranks is returned (BeginMicroStep: some rank declared units)
  kAgreeFields
};

enum class AgreeKind : int {
  kBeginMicroStep = 1,
  kStep,
  kBeginEval,
  kEndEval,
  kAcquireRecord,
  kGatherFull,
  kReleaseFull,
  kInitParams,
  kSave,
  kLoad,
  kExport,
  kEvalAcquire,  // stage 3: one per Acquire in an eval pass, checked on the communication stream
  kTurn          // a micro-step with declared units: the forward -> backward turn (engine_dynamic.cc)
};

struct BucketInfo {
  int64_t unit_offset = 0;  // start within its unit's full layout
};

struct UnitState {
  int fwd_refs = 0;            // current forward acquisitions
  int bwd_refs = 0;            // current backward acquisitions
  bool grad_window = false;    // between the first Acquire(kBackward) and GradsReady in this micro-step
  bool grads_ready = false;    // GradsReady called in this micro-step
  int pool_slot = -1;          // stage 2-3: gradient pool buffer bound to the unit
  int gather_slot = -1;        // stage 3: slot holding its full parameters, -1 when not resident
  bool persistent = false;     // stage 3: gathered for the whole run
  bool keep_gathered = false;  // stage 3: stays gathered across the forward -> backward turn
  int64_t trainable_elems = 0; // padded elements of its trainable buckets
  int64_t full_elems = 0;      // padded elements of all its buckets
  int64_t persistent_offset = 0;  // stage 3, persistent units: start in the persistent buffer
  DeviceBuffer full_scope;     // stage 3: GatherFull scope copy
  // Micro-steps with declared units (engine_dynamic.cc):
  bool used = false;           // this rank acquired the unit in this micro-step
  bool used_forward = false;   // ... in its forward
  bool zero_ready = false;     // after the turn: this rank contributes zero gradients (it did not use the unit)
  bool skip_reduce = false;    // after the turn, stages 2-3: no rank used the unit, so its reduction is left out
};

// A micro-step whose ranks declared the units they may use (BeginMicroStep with units; README "Units that
// depend on the data"). The ranks agree the union once; stage 3 gathers it in one order on every rank, whatever
// each rank acquires, and the reductions take zeros from the ranks that did not use a unit.
struct DynamicMicroStep {
  bool on = false;                  // some rank declared units for this micro-step
  std::vector<char> may_use;        // this rank may acquire the unit (every unit when it declared nothing)
  std::vector<char> any_may_use;    // the union of the declarations
  std::vector<char> any_used;       // after the turn: some rank used the unit in forward
  bool turned = false;              // the forward -> backward turn ran
  // Stage 3, forward: the units to gather (ascending), each unit's position there (-1: none), and how many
  // entries were gathered so far (always a prefix).
  std::vector<int> schedule;
  std::vector<int> index;
  size_t issued = 0;
  // Stage 3, backward: one program of gathers (the units some rank used, descending) and reductions (each placed
  // after the gather of the next used unit below it), issued in order on every rank; each unit's gather position
  // in it (-1: none) and the next item to issue.
  struct Item {
    bool gather;
    int unit;
  };
  std::vector<Item> program;
  std::vector<int> gather_pos;
  size_t next = 0;
};

struct GatherSlot {
  int index = 0;
  int64_t capacity = 0;  // elements (BufferPlan::slot_elems): the large slots fit every unit
  DeviceBuffer buffer;
  int unit = -1;          // resident unit, or -1
  bool prefetched = false;  // gathered ahead of its Acquire and not yet acquired
};

// One entry of the stage-3 trace: an Acquire.
struct TraceEntry {
  int unit;
  Pass pass;
  bool operator==(const TraceEntry& o) const { return unit == o.unit && pass == o.pass; }
};

struct Trace {
  std::vector<TraceEntry> entries;
  bool recorded = false;  // complete and fixed
  bool recording = false;
  size_t pos = 0;         // next expected entry in the current pass
};

// The NVMe tier: transfers outstanding on one bounce buffer (a bucket's optimizer record and parameter record).
struct NvmeInFlight {
  uint64_t ticket[2] = {};
  int count = 0;
};

// A stage-3 gather with the parameter shards on the NVMe tier: the reads StartNvmeGather issued into a gather
// bounce buffer, and where each bucket's shard goes in the gathered layout once they are verified.
struct NvmeGather {
  int bounce = 0;
  std::vector<uint64_t> tickets;
  struct Piece {
    char* to;
    const char* from;
    int64_t bytes;
  };
  std::vector<Piece> pieces;
  Status error;  // StartNvmeGather's, reported by FinishNvmeGather on the communication stream
};

// Test-only hooks (tests/testing/engine_harness.h reaches them through EngineAccess). Never set in production.
struct EngineTestHooks {
  // Which wait to leave out, so that ThreadSanitizer must report the race it protects against.
  enum class SkipWait { kNone, kSlotReady, kPoolFree } skip_wait = SkipWait::kNone;
  // When set, every task on the communication stream first announces itself in `gate_waiting` and then spins
  // until *gate is true. Relaxed atomics only: they order nothing, so they cannot hide a race from TSan.
  std::atomic<bool>* gate = nullptr;
  std::atomic<bool>* gate_waiting = nullptr;
  // The first reduction on rank `stall_rank` sleeps this long before its collective (the timeout path).
  int stall_rank = -1;
  std::chrono::milliseconds stall{0};
  // Checkpoints: block size of the saved files (0: the format's default), and a disk fault on rank
  // `save_fail_rank` after `save_fail_after` bytes of its shard (an interrupted save).
  int64_t checkpoint_block_bytes = 0;
  // Record Engine::TEST_events() (what was issued, in order).
  bool log_events = false;
  int save_fail_rank = -1;
  int64_t save_fail_after = -1;
};

class Engine::Impl {
 public:
  Options options;
  // The engine's private duplicate of the trainer's Comm (Comm::Duplicate at Open): every collective of the
  // engine runs on it, so the trainer's own collectives on its Comm never interleave with these. Declared before
  // the streams, whose queued tasks use it, so that it is destroyed after them.
  std::unique_ptr<Comm> own_comm;
  Comm* comm = nullptr;  // own_comm.get()
  // ZeRO++ (Options::zeropp; engine_zeropp.cc): own_comm split by node, created at Open when any technique is on.
  // Declared after own_comm (its node Comms must go first) and before the streams whose queued tasks use it.
  std::unique_ptr<internal::HierarchicalComm> hier;
  std::vector<int64_t> hpz_offset;      // per bucket: start in hpz_secondary (elements), -1 none
  int hpz_ranks = 1;                    // ranks per node: a bucket's piece is padded / hpz_ranks elements
  std::vector<uint64_t> hpz_epoch;      // per unit: params_epoch when its piece was last written (0: never)
  uint64_t params_epoch = 1;            // bumped whenever the parameters change (InitParams, Step)
  CommCounters counter_sum;             // Engine::comm_counters(): own_comm's and the node Comms'
  int rank = 0;
  int world = 1;
  int threads = 1;
  std::vector<ParamSpec> specs;
  PartitionPlan plan;
  std::unique_ptr<Device> device;

  std::vector<BucketInfo> buckets;       // index: plan bucket
  std::vector<int> reduce_order;         // trainable buckets: units descending, buckets ascending
  std::vector<UnitState> units;

  // Parameters for compute, in param_dtype. Stages 0-2: full buffers; stage 3: shard buffers + persistent full
  // buffer. With a low-precision param_dtype the fp32 master is apart (`master`, kOptimizer, laid out like the
  // optimizer state: full in stage 0, this rank's shard otherwise).
  DType pdt = DType::kF32;
  int64_t pe = 4;        // bytes per compute-parameter element
  bool mixed = false;    // pdt != kF32
  bool offload = false;         // Options.offload_optimizer: master and optimizer state in pinned host memory
  bool offload_params = false;  // Options.offload_params: stage-3 parameter shards in pinned host memory
  bool sep_master = false;      // the fp32 master is apart from the compute parameters (mixed or offload)
  DeviceBuffer master;
  DeviceBuffer trainable_params, frozen_params;
  DType gdt = DType::kF32;  // grad_dtype: gradient buffers, the pool and the reductions
  int64_t ge = 4;           // bytes per gradient element
  DeviceBuffer persistent_params;
  // Gradients: stages 0-1 full trainable; stages 2-3 shard accumulator.
  DeviceBuffer grads;
  std::vector<DeviceBuffer> grad_pool;
  std::vector<int> pool_owner;  // unit bound to each pool buffer, or -1
  std::vector<int64_t> pool_elems;  // per pool buffer (BufferPlan: the large ones first)
  // Optimizer state: AdamW m and v, or SGD momentum in state0.
  DeviceBuffer state0, state1;
  // Stage 3 gather slots (the large ones first).
  std::vector<GatherSlot> slots;

  // Loss scaling (DeepSpeed's dynamic scaler when dynamic_scale; a fixed scale otherwise).
  bool dynamic_scale = false;
  float loss_scale = 1.0f;
  int scale_hysteresis = 0;       // overflows still tolerated before the scale halves
  int64_t scaler_iter = 0;        // steps seen by the scaler (taken or skipped)
  int64_t last_overflow_iter = -1;

  // Protocol state.
  int64_t step = 0;          // optimizer steps taken
  int micro = -1;            // current micro-step, -1 between steps
  bool micro_is_last = false;
  int micros_done = 0;       // micro-steps begun in this step
  bool in_eval = false;
  size_t next_reduce = 0;    // position in reduce_order for the current micro-step
  bool reduced_this_step = false;
  uint64_t trace_hash = 0;   // of the units used since the step began
  Trace train_trace;
  DynamicMicroStep dynamic;
  // Stage-3 eval passes follow no recorded order (generation, early exit, beam search): prefetch predicts from
  // the unit that followed each unit the last time (eval_next[u], -1 when unknown), learned over every eval
  // pass, and every eval Acquire is checked against the other ranks on the communication stream.
  std::vector<int> eval_next;
  int eval_last = -1;  // the unit of the previous eval Acquire
  Status poison;             // non-OK: the engine is unusable
  Status incomplete;         // non-OK: a Load failed after changing state; only Load or InitParams may follow
  bool sgd_first_step = true;
  std::vector<int> full_scope_units;  // units of the open GatherFull scope

  std::vector<Engine::Event> events;

  // Streams and events (the table at the top of this file).
  // (Declared before the streams, so that the streams, which may still run queued copies, are destroyed first.)
  DeviceBuffer host_grad[2], host_copy[2];  // offload: double-buffered staging (pinned host)
  // The NVMe tier (Options::nvme_path; engine_nvme.cc): what its files hold, the pinned bounce buffers every
  // transfer goes through, and the tier itself. Declared after the buffers its transfers use and before the
  // streams whose tasks use it: the streams go first, then the tier (waiting for its transfers), then the buffers.
  NvmeLayout nvme_layout;
  DeviceBuffer nvme_checksums;                   // the tier's block checksums (pageable host)
  std::vector<DeviceBuffer> nvme_bounce;         // nvme_buffers: a bucket's optimizer record, then its parameters
  std::vector<DeviceBuffer> nvme_gather_bounce;  // nvme_params: one unit's parameter records
  std::vector<NvmeInFlight> nvme_bounce_io, nvme_gather_io;  // the transfers outstanding on each
  std::unique_ptr<NvmeTier> nvme;
  MemoryUsage nvme_usage;    // the tier's files, for Memory()
  int nvme_gather_next = 0;  // the gather bounce buffer the next stage-3 gather takes
  int nvme_cached_opt = -1, nvme_cached_param = -1;  // Save/Export: the bucket whose records the bounces hold
  DeviceBuffer hpz_secondary;               // ZeRO++'s hpZ: this rank's piece of every non-persistent bucket
  DeviceBuffer qwz_staging, qgz_staging;    // ZeRO++'s quantized payloads (BufferPlan)
  std::unique_ptr<Stream> comm_stream;
  std::unique_ptr<Stream> copy_stream;  // offload: gradient shards to the host, parameters back
  std::unique_ptr<zero::Event> d2h_done[2], h2d_done[2], step_begin;
  std::vector<std::unique_ptr<zero::Event>> grads_done;  // per unit
  std::vector<std::unique_ptr<zero::Event>> pool_free;   // per pool buffer
  std::vector<std::unique_ptr<zero::Event>> in_flight;   // ring of reductions_in_flight
  std::vector<std::unique_ptr<zero::Event>> slot_ready;  // per gather slot
  std::vector<std::unique_ptr<zero::Event>> slot_free;   // per gather slot
  std::unique_ptr<zero::Event> params_ready;
  std::unique_ptr<zero::Event> optimizer_done;
  std::vector<std::unique_ptr<zero::Event>> nvme_gather_free;  // per gather bounce: the gather that used it has run
  DeviceBuffer norm_scratch;  // CUDA: the sum of squares' block partials (none on the CPU)
  bool params_pending = false;
  int64_t reductions_issued = 0;
  std::chrono::milliseconds wait_timeout{0};  // host waits: the comm timeout plus a margin
  EngineTestHooks test;
  std::string auto_choice;  // Stage::kAuto: what Open chose and why (AutoChoice::Explain)

  // --- engine.cc ---
  // The poison, the comm stream's error, or (unless allow_incomplete) the state left by a failed Load.
  Status CheckUsable(bool allow_incomplete = false) const;
  // Issues the agreement all-reduce. `local` is this rank's own error (reported to the caller as is); any
  // disagreement between ranks or any rank's local error yields an error on every rank.
  Status Agree(AgreeKind kind, int64_t arg, const Status& local, int64_t any = 0, int64_t* any_max = nullptr);
  // This rank's agreement vector (kAgreeFields values) for a call of `kind` with `arg`.
  void AgreeVector(AgreeKind kind, int64_t arg, const Status& local, double* v) const;
  // The message naming field `first` and every rank's value, from every rank's vector (`all`, rank-major), for a
  // call at `where` (Where() when it was issued). Static: the communication stream composes it too.
  static std::string DescribeDisagreement(int first, const std::vector<double>& all, int world,
                                          const std::string& where);
  // The event log is for tests only and off unless EngineTestHooks::log_events is set: always on, it grew a long
  // run by ~0.7 KB per step (the soak test found it).
  void Log(Engine::Event::Kind kind, int unit, int bucket) {
    if (test.log_events) events.push_back({kind, unit, bucket});
  }
  void HashEvent(int a, int b);
  std::string UnitName(int unit) const;
  std::string Where() const;  // "rank R, step S, micro M"
  Status ValidUnit(int unit, const char* call) const;
  // InvalidArgument naming `call` unless 0 <= param < the number of ParamSpecs.
  Status KnownParam(int param, const std::string& call) const;
  // The end of a micro-step (or eval pass): no unit acquired and, when `need_grads`, every unit with trainable
  // parameters got GradsReady. `call` names the caller in the message.
  Status CheckUnitsDone(const std::string& call, bool need_grads) const;

  // Pointer helpers over compute parameters (param_dtype elements; `pe` bytes each).
  char* FullParamBase(const Bucket& b);                    // stages 0-2: bucket start in the full buffer
  char* ShardParamBase(const Bucket& b);                   // stage 3: this rank's shard of the bucket
  char* UnitParamBase(int unit);                           // stage 3: unit's full layout, or null
  char* ParamPtr(int param);                               // current view pointer, or null
  // (A null base stays null: an empty buffer of a rank that owns nothing there; offsets into it are never used.)
  char* PAt(char* base, int64_t elems) const { return base == nullptr ? nullptr : base + elems * pe; }
  char* GAt(char* base, int64_t elems) const { return base == nullptr ? nullptr : base + elems * ge; }
  // The fp32 master of the trainable elements at `opos` (the optimizer state's layout): the compute
  // parameters themselves in fp32, the separate master otherwise.
  float* MasterAt(int64_t opos, int64_t full_pos, int64_t shard_pos);

  // Runs `task` on the communication stream (with the test hooks).
  void LaunchComm(std::function<Status(void* stream)> task);
  // Runs `task` on the communication stream and waits for it (and everything before it).
  Status RunComm(std::function<Status(void* stream)> task);
  // Waits for everything on the communication stream; poisons the engine with its first error.
  Status DrainComm();
  // The compute stream waits for `event`; a failure (or the comm stream's error) poisons the engine.
  Status WaitOnCompute(const zero::Event& event, const std::string& what);
  // The calling thread waits for `event` (bounds on queued work); a failure poisons the engine.
  Status WaitOnHost(const zero::Event& event, const std::string& what);
  // post-step gather -> the trainer's next use of parameters.
  Status WaitParams();
  // Appended to an out-of-memory status from Open: the memory table at the failure, what this configuration
  // needs (zero::Estimate), and the first configuration of Stage::kAuto's order that fits in `free_bytes` minus
  // reserved_bytes.
  std::string OutOfMemoryAdvice(int64_t free_bytes) const;

  // BeginMicroStep, with the units this rank declared (null: none declared, every unit).
  Status BeginMicroStepImpl(int micro, bool is_last, const std::vector<int>* declared);

  // --- engine_units.cc ---
  Status AcquireImpl(int unit, Pass pass);
  Status ReleaseImpl(int unit, Pass pass);
  Status GradsReadyImpl(int unit);
  // Binds a gradient pool buffer to `unit`; `for_trainer`: the trainer will add into it, so the compute stream
  // waits for the buffer's previous reduction (otherwise the buffer only feeds a reduction of zeros).
  Status BindPool(int unit, bool for_trainer);
  void ReleasePoolAfterReduction(int unit);
  Status IssueReadyReductions();
  // Issues every bucket reduction of `unit` (the next unit in reduction order after any that no rank used),
  // binding a pool buffer for a zero contribution, then frees its pool buffer.
  Status ReduceUnit(int unit);
  Status ReduceBucket(int bucket);
  // Launches the gathers of `unit` into dst (full unit layout) on the communication stream.
  void GatherUnit(int unit, char* dst);
  // Stage 3: makes the unit resident (issuing its gather into a slot if needed); *wait_slot is the slot to wait
  // for before the trainer uses it, or -1 (persistent units).
  Status EnsureResident(int unit, int* wait_slot);
  // Issues the gathers of `unit` into slot `s` (after the slot's compute -> gather edge) and binds them.
  void GatherInto(int unit, int s, bool prefetched);
  Status Prefetch();
  // A free slot that fits `unit`: the smallest such; -1 when none. (`prefetch` documents the caller: a prefetched
  // unit in a large slot is evicted, or passed, when a large unit is acquired.)
  int FreeSlotFor(int unit, bool prefetch) const;
  // Stage-3 eval: the predicted units after `unit` (eval_next chain, not resident, within prefetch_bytes).
  std::vector<int> EvalChain(int unit) const;
  // Stage-3 eval Acquire: check, drop stale prefetches, gather `unit` if needed, prefetch the prediction.
  Status AcquireEval(int unit, int* wait_slot);
  // Queues the cross-rank check of one eval Acquire (AgreeKind::kEvalAcquire) on the communication stream: a
  // rank that acquires another unit, or makes another engine call, fails the check on every rank.
  void LaunchEvalCheck(int unit);
  int FreeSlot(int unit);
  void DropSlot(GatherSlot& slot);
  // Frees every gather slot whose unit nobody holds (stale after Step, unused after a pass).
  void DropUnheldSlots();

  // --- engine_dynamic.cc ---
  // BeginMicroStep's part: validates this rank's declaration (empty `local`: OK) before the agreement.
  Status CheckDeclaration(const std::vector<int>* units) const;
  // After BeginMicroStep's agreement, when some rank declared: agrees the union and builds the forward schedule.
  Status StartDynamic(const std::vector<int>* units);
  // Before Step's or the next BeginMicroStep's agreement: the turn if it has not run, and the rest of the backward
  // schedule's gathers, so that every rank's collectives match.
  Status FinishDynamic();
  // The forward -> backward turn (the first backward call): the rest of the forward gathers, one agreement of the
  // units used in forward, the backward schedule, and this rank's zero contributions.
  Status Turn();
  // Stage 3 in a declared micro-step: makes `unit` resident for `pass` following the schedule.
  Status AcquireDynamic(int unit, Pass pass, int* wait_slot);
  // Gathers forward schedule entries [issued, end) into slots and drops them at once (this rank does not use them).
  Status PassThrough(size_t end);
  // Stage 3's backward in a declared micro-step: issues the program's items in order (gathers and reductions, see
  // engine_dynamic.cc) up to and including the gather of `demand` (-1: none), then prefetches; `drain`: every
  // remaining item, gathers passed through.
  Status AdvanceProgram(int demand, bool drain);
  void GatherPassedThrough(int unit);
  // 0/1 per unit from every rank combined by maximum (the union); a control collective, waited for.
  Status UnionOverRanks(const std::vector<char>& mine, const char* what, std::vector<char>* out);
  // Bytes of the prefetched (gathered, not yet acquired) units.
  int64_t PrefetchedBytes() const;
  // A unit is ready for its reduction: GradsReady, or (declared micro-steps) zeros / left out.
  bool ReadyToReduce(const UnitState& u) const { return u.grads_ready || u.zero_ready || u.skip_reduce; }

  // --- engine_step.cc ---
  Status InitParamsImpl(const FillFn& fill);
  Status StepImpl(const StepArgs& args, StepResult* result);
  void GatherAfterStep();
  // Stages 1-2: queues the all-gather of trainable bucket `bucket`'s updated shards.
  void GatherBucketAfterStep(const Bucket& b);
  // Stage 3: queues the gathers of the persistent units' trainable buckets.
  void GatherPersistentAfterStep();
  // The optimizer over this rank's owned state on the device (DeviceOptimizer) or, with offload, on the host,
  // bucket by bucket, pipelined with the copies and gathers (OffloadOptimizer).
  Status DeviceOptimizer(double grad_scale, double lr, int64_t t);
  Status OffloadOptimizer(double grad_scale, double lr, int64_t t);
  // Queues the gathers of a stage-3 unit's buckets `bucket_list` into `dst` (the unit's full layout) as one
  // task and one group of all-gathers.
  void LaunchGathers(const std::vector<int>& bucket_list, char* dst, const std::string& what);
  void ResetScaler();
  bool UpdateScaler(bool overflow);
  void ZeroGrads();

  // --- engine_nvme.cc: the NVMe tier ---
  Status OpenNvme();
  // A bounce buffer's optimizer record and (nvme_params) trainable parameter record.
  char* NvmeOpt(int slot) { return nvme_bounce[static_cast<size_t>(slot)].as<char>(); }
  char* NvmeParam(int slot) { return NvmeOpt(slot) + nvme_layout.bounce_opt_bytes; }
  // Waits for the transfers outstanding on one buffer (a read is verified): the first error.
  Status NvmeWaitIo(NvmeInFlight& io);
  Status NvmeWaitAllIo();
  // Queue a transfer of bucket `b`'s optimizer record or parameter record from / into buffer memory at `at`.
  Status NvmeReadOpt(const Bucket& b, char* at, NvmeInFlight& io);
  Status NvmeWriteOpt(const Bucket& b, const char* at, NvmeInFlight& io);
  Status NvmeReadParams(const Bucket& b, char* at, NvmeInFlight& io);
  Status NvmeWriteParams(const Bucket& b, const char* at, NvmeInFlight& io);
  // Zeroes what no fragment of this rank covers in a parameter record at `at` (padding is zero everywhere).
  void NvmeZeroParamPadding(const Bucket& b, char* at) const;
  // Save and Export: an owned fragment of 0 the parameters, 1 the fp32 master, 2/3 the optimizer state, when the
  // tier holds it (NvmeHolds), copied out through a bounce buffer that keeps the last record read.
  bool NvmeHolds(const Bucket& b, int which) const;
  Status NvmeReadOwned(const Bucket& b, const Fragment& f, int which, void* host_dst);
  // Stage-3 gathers with nvme_params: Start (the host, at LaunchGathers) takes a gather bounce buffer and queues the
  // reads of this rank's shards of `bucket_list` (one unit's); Finish (its task on the communication stream) waits
  // for them, verified, and copies each into its place in the gathered layout, or aborts the communicator.
  std::shared_ptr<NvmeGather> StartNvmeGather(const std::vector<int>& bucket_list, char* dst);
  Status FinishNvmeGather(const NvmeGather& g, void* stream);

  // --- engine_zeropp.cc ---
  // Open: splits the Comm by node (collective; hpz or qgz_bits) and lays out hpZ's pieces. Called on every rank,
  // whatever happened before, when any ZeRO++ technique is on.
  Status OpenZeroPlusPlus(const BufferPlan& bp);
  // A stage-3 Acquire's gather of `unit` into `dst` (its full layout): from the node's secondary pieces when they
  // hold the current parameters (hpZ), otherwise from the primary shards, quantized (qwZ) or not, refreshing this
  // rank's piece (hpZ). Without ZeRO++: GatherUnit.
  void GatherSlotUnit(int unit, char* dst);
  // qwZ's gathers of a unit's buckets from the primary shards (LaunchGathers' quantized twin).
  void LaunchQuantizedGathers(const std::vector<int>& bucket_list, char* dst, const std::string& what);
  // hpZ: copies this rank's piece of each bucket from the gathered unit in `dst` (on the comm stream).
  void RefreshSecondary(const std::vector<int>& bucket_list, const char* dst);
  // hpZ: the gathers of a unit's buckets from the node's pieces, over the node's Comm.
  void LaunchSecondaryGathers(const std::vector<int>& bucket_list, char* dst, const std::string& what);

  // --- engine_checkpoint.cc ---
  Status SaveImpl(const std::string& root, const std::string& tag, std::string_view metadata);
  Status LoadImpl(const std::string& root, const std::string& tag, std::string* metadata);
  Status ExportImpl(const std::string& path, const ExportOptions& options);
  // Exchanges every rank's status of a collective call (its message included): the first failing rank's
  // status on every rank, or OK. A failure of the exchange itself poisons the engine.
  Status ShareStatus(const Status& local, const std::string& call);
  Status CheckBetweenSteps(const std::string& call) const;
  // Copies an owned fragment of: 0 the compute parameters, 1 the fp32 master, 2/3 the optimizer state, to host.
  Status ReadOwned(const Bucket& b, const Fragment& f, int which, void* host_dst);
};

}  // namespace zero

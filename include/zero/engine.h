// zero::Engine: ZeRO-partitioned parameters, gradients and optimizer state for one trainer.
//
// The engine owns parameter and gradient storage in flat, padded buckets; the trainer sees plain views.
// Protocol per optimizer step (every rank, same order; see README "API contract"):
//
//   for micro in 0..M-1:
//     BeginMicroStep(micro, micro == M-1)            // cross-rank agreement check
//     loss *= LossScale()
//     for unit in forward order:  Acquire(u, kForward);  forward(u);  Release(u, kForward)
//     for unit in reverse order:  Acquire(u, kBackward); backward(u) /* += into Grad views */;
//                                 GradsReady(u);        Release(u, kBackward)
//   Step(args, &result)
//
// Views: Param(p) is valid while p's unit is acquired (always, in stages 0-2); Grad(p) from the first
// Acquire(u, kBackward) of a micro-step to GradsReady(u). The engine zeroes gradients; the trainer only adds.
// Gradients are averaged: the engine divides the sum over ranks and micro-steps by world_size * M.
//
// Errors: calls return Status. A protocol error detected before any collective (unknown unit, GradsReady twice)
// leaves the engine usable. A disagreement between ranks is reported on every rank (kMismatch) and poisons
// the engine: every later call returns that status (healthy() says so). Not thread-safe: one thread makes an
// engine's calls. The trainer's own collectives on the Comm it passed to Open may come at any moment and from any
// thread: the engine runs on a private duplicate of that Comm (comm.h, "A trainer and its Engine").
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "zero/comm.h"
#include "zero/options.h"
#include "zero/status.h"
#include "zero/types.h"

namespace zero {

enum class Pass : uint8_t { kForward, kBackward };

struct StepArgs {
  // Learning rate for this step; negative: the optimizer options' lr. Per-parameter lr_mult applies on top.
  double lr = -1.0;
};

struct StepResult {
  bool skipped = false;      // a gradient was not finite: nothing was updated
  double grad_norm = 0.0;    // global L2 norm of the averaged gradient, before clipping
  double clip_coef = 1.0;    // factor applied by clipping (1 when not clipping)
  float loss_scale = 1.0f;   // the loss scale used for this step
  double lr = 0.0;           // the base learning rate used
  int64_t step = 0;          // optimizer steps taken so far (skipped steps do not count)
};

// Bytes per category, current and peak, for one kind of memory.
struct MemoryUsage {
  int64_t current[kNumMemoryCategories] = {};  // index: MemoryCategory
  int64_t peak[kNumMemoryCategories] = {};     // per-category high-water marks
  int64_t peak_total = 0;                      // high-water mark of the sum over categories
  int64_t Total() const;
  int64_t Current(MemoryCategory c) const { return current[static_cast<int>(c)]; }
};

struct MemoryReport {
  MemoryUsage device;
  MemoryUsage host;  // pinned + pageable host memory the engine allocated
  MemoryUsage nvme;  // the NVMe tier's files (Options::nvme_path): sized at Open, never more
  // A table: one row per category and the total, columns device now / peak and host now / peak (and NVMe with a
  // tier).
  std::string Table() const;
};

// The NVMe tier's transfers since Open (Options::nvme_path; all zero without a tier). busy_seconds is the time
// with at least one transfer in flight: bytes over it is the throughput the disk gave while the tier used it.
struct NvmeStats {
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
  double busy_seconds = 0;
};

// Engine::Export: consolidated weights as one safetensors file, written in parallel (each rank writes the
// fragments it owns at their offsets; no rank holds the whole model).
struct ExportOptions {
  // Tensor name of every parameter, in spec order; empty: the specs' names.
  std::vector<std::string> names;
  // Only trainable parameters (e.g. LoRA adapters without their frozen base).
  bool trainable_only = false;
  // Stored dtype: kF32 (exact for every param_dtype), kBF16 or kF16 (rounded to nearest even). Trainable
  // parameters come from the fp32 master, frozen ones from their param_dtype values.
  DType dtype = DType::kF32;
  // The file's "__metadata__" (string -> string), e.g. {"format", "pt"}.
  std::vector<std::pair<std::string, std::string>> metadata;
};

// Fills one owned fragment at Engine::InitParams: write `count` fp32 values of parameter `param`, elements
// [param_off, param_off + count), to dst. Called only for what this rank owns: no rank holds the whole model.
using FillFn = std::function<void(int param, int64_t param_off, int64_t count, float* dst)>;

class Engine;

// RAII scope with full parameters of some units on every rank (merge, export, sampling). Collective: every
// rank opens and closes it in the same order. Param views obtained from the engine are valid inside it.
class FullParamsScope {
 public:
  FullParamsScope() = default;
  FullParamsScope(FullParamsScope&& other) noexcept;
  FullParamsScope& operator=(FullParamsScope&& other) noexcept;
  ~FullParamsScope();
  // Ends the scope early (collective in stage 3). Returns the release status.
  Status Close();

 private:
  friend class Engine;
  Engine* engine_ = nullptr;
  std::vector<int> units_;
};

class Engine {
 public:
  // Validates options and specs, checks that every rank passed the same ones (kMismatch naming the first
  // difference otherwise, on every rank), builds the partition plan and allocates every buffer the run needs.
  // `comm` must outlive the engine; Open takes a private Comm::Duplicate of it (collective on `comm`) for all of
  // the engine's collectives.
  static Status Open(const Options& options, Comm* comm, std::vector<ParamSpec> specs,
                     std::unique_ptr<Engine>* engine);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Sets every parameter from `fill`, called per owned fragment; then makes full copies where the stage
  // keeps them. Resets optimizer state and the step count. Collective.
  Status InitParams(const FillFn& fill);

  // Starts micro-step `micro` (0-based) of the current step; `is_last` marks the last one. Issues one small
  // all-reduce that checks every rank agrees on (step, micro, is_last, plan, units used so far).
  Status BeginMicroStep(int micro, bool is_last);
  // The same for a micro-step whose units depend on the data (the experts a mixture of experts routes to, the
  // blocks before an early exit, a branch): `units` are the ones this rank may use. When any rank declares units,
  // every rank follows these rules in this micro-step (a rank that called the two-argument form may use every
  // unit): a unit this rank does not acquire in forward contributes zero gradients and needs no GradsReady (calling
  // it is allowed and does nothing); GradsReady comes once for each unit it did acquire, in any order; in stage 3
  // the engine gathers the union of the declared units, in ascending order in forward and the units some rank used
  // in descending order in backward, on every rank, so each rank acquires its units in that order (each once per
  // pass; a tied unit used at both ends must be persistent), releases every unit before its first backward call,
  // and acquires for backward only units it used in forward. Costs two small all-reduces per micro-step (the union,
  // and the units used at the forward -> backward turn). README "Units that depend on the data".
  Status BeginMicroStep(int micro, bool is_last, std::span<const int> units);
  // The factor the trainer multiplies its loss by (1 in fp32).
  float LossScale() const;

  // Makes unit `unit`'s parameters available for `pass` (stage 3: gathers them, prefetching the next units of
  // the recorded order). A unit may be acquired several times per pass (tied weights); reference-counted.
  Status Acquire(int unit, Pass pass);
  // Ends one use of the unit (stage 3: frees its gathered copy when no use remains, unless kept).
  Status Release(int unit, Pass pass);
  // The unit's gradients for this micro-step are complete (call once, after its last backward use).
  // Stage 0-1: on the last micro-step, reduces its buckets; stage 2-3: reduce-scatters them every micro-step.
  Status GradsReady(int unit);

  // Reduces what remains, clips, applies the optimizer to owned state and re-gathers parameters. Collective.
  Status Step(const StepArgs& args, StepResult* result);

  // Forward-only passes (evaluation, generation) between steps: no gradient buffers, their own stage-3 trace.
  Status BeginEval();
  Status EndEval();

  // Full parameters of `units` on every rank until the scope closes. Collective.
  Status GatherFull(std::span<const int> units, FullParamsScope* scope);

  // Checkpoints (README "Checkpoints"); collective, between steps. Save writes ROOT/TAG/: one shard file per
  // rank with what it owns (parameters incl. frozen ones, fp32 master, optimizer state), written in parallel,
  // and an index with the step, the loss scaler, the options and `metadata` (the trainer's bytes: data position,
  // RNG state). It is written as ROOT/TAG.tmp/ and renamed when every rank's file is durable; then ROOT/latest
  // names it. An existing ROOT/TAG is an error (checkpoints are never overwritten in place). ROOT must be one
  // directory every rank sees (a shared file system across nodes).
  Status Save(const std::string& root, const std::string& tag, std::string_view metadata = {});
  // Loads ROOT/TAG (empty tag: the one ROOT/latest names), saved at any world size, stage, offload setting and
  // param_dtype: each rank reads exactly the ranges it owns under this engine's plan, verifying their checksums.
  // Everything checkable without the data is checked and agreed on every rank before any state changes. If
  // reading fails afterwards (a corrupt block), the engine needs a successful Load or InitParams and says so.
  Status Load(const std::string& root, const std::string& tag = {}, std::string* metadata = nullptr);
  // Writes `path` (a safetensors file) with every parameter (or only trainable ones). Collective.
  Status Export(const std::string& path, const ExportOptions& options = {});

  // Views of parameter / gradient `param` (spec index). Invalid (data == null) outside their validity window:
  // Param(p) while p's unit is acquired (stage 3), inside a GatherFull scope over it, or always (stages 0-2 and
  // stage-3 persistent units); Grad(p) of a trainable p from its unit's first Acquire(u, kBackward) of a micro-step
  // to GradsReady(u).
  TensorView Param(int param) const;
  TensorView Grad(int param) const;
  // The same views, checked: on success *view is valid; otherwise kInvalidArgument (unknown index) or
  // kFailedPrecondition naming the call, the parameter, its unit and its validity window, instead of a null
  // pointer for the trainer to dereference (or the status of a failed post-step gather). *view is left invalid.
  Status Param(int param, TensorView* view) const;
  Status Grad(int param, TensorView* view) const;

  const std::vector<ParamSpec>& specs() const;
  const Options& options() const;
  int num_units() const;
  int64_t step() const;
  // Current and peak bytes per category on the device and the host (MemoryReport::Table prints it). An
  // out-of-memory status from Open carries this table and a configuration that fits (zero/estimate.h).
  MemoryReport Memory() const;
  // The NVMe tier's bytes read and written and its busy time since Open (monitoring, benchmarks).
  NvmeStats nvme_stats() const;
  // Stage::kAuto: what Open chose and why (each earlier candidate's need against the budget); empty otherwise.
  const std::string& auto_choice() const;
  // The communicator's counters (elements and calls per collective). Waits for everything queued on the
  // communication stream first (the counters are updated there): calling it every step serializes the post-step
  // all-gathers with the trainer.
  const CommCounters& comm_counters() const;
  // OK, or the status that poisoned the engine.
  Status healthy() const;

  // Test seam: the engine's event log (what was issued, in order); empty unless a test turned it on through the
  // engine's test hooks (src/engine_impl.h), so that long runs do not grow.
  struct Event {
    enum Kind : uint8_t { kAcquire, kRelease, kGradsReady, kGather, kReduce, kStep } kind;
    int unit;
    int bucket;  // -1 when not about one bucket
  };
  const std::vector<Event>& TEST_events() const;

 private:
  friend class FullParamsScope;
  friend struct EngineTestPeer;  // tests only (tests/testing/engine_harness.h): reaches the test hooks
  class Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  Status ReleaseFull(const std::vector<int>& units);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zero

// The toy model (toy_model.h) as a trainer with kernels: its forward and backward run as work items
// (toy_math.cuh) on an executor, the CPU or CUDA (toy_kernels.h). On CUDA every op is a kernel on the workspace's
// stream, the engine's compute stream (by default the legacy default stream; ToyWorkspace::set_stream): kernels read Param views and add into Grad views while the
// engine's communication stream works, and the host never waits between Acquire and Release. Same protocol
// calls in the same order as ToyForwardBackward, and the same bits (toy_kernels_test checks both).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "testing/toy_kernels.h"
#include "testing/toy_model.h"
#include "zero/status.h"

namespace zero::testing {

// What the kernel trainer needs from whoever owns parameters (the engine, or plain arrays). Pointers are in the
// executor's memory.
class ToyKernelAccess {
 public:
  virtual ~ToyKernelAccess() = default;
  virtual void Acquire(int unit, bool backward) = 0;
  virtual void Release(int unit, bool backward) = 0;
  virtual void GradsReady(int unit) = 0;
  virtual ToyParam Param(int param) = 0;
  virtual float* Grad(int param) = 0;  // fp32; the model adds into it
};

// The kernel trainer's memory on one executor, one allocation: `max_batches` micro-batch slots (tokens and
// targets), the activations (shared by the slots: micro-batches run one after another on one stream), each
// slot's mean loss, an fp32 gradient accumulator per parameter (for 16-bit gradient views) and a scratch area.
// Move-only owner. Not thread-safe: one trainer thread uses it.
class ToyWorkspace {
 public:
  static constexpr int64_t kScratchFloats = 4096;  // larger than any toy parameter

  // Allocates and zero-fills (on CUDA a synchronous copy: create it before training, not between steps).
  static Status Create(ToyExec exec, int max_tokens, int max_batches, std::unique_ptr<ToyWorkspace>* out);
  ~ToyWorkspace();
  ToyWorkspace(const ToyWorkspace&) = delete;
  ToyWorkspace& operator=(const ToyWorkspace&) = delete;

  ToyExec exec() const { return exec_; }
  // The CUDA stream the ops run on (the trainer's: the engine's Options::cuda_stream); nullptr, the default: the
  // legacy default stream. Upload and Loss wait for it.
  void* stream() const { return stream_; }
  void set_stream(void* stream) { stream_ = stream; }
  int max_tokens() const { return max_tokens_; }
  int max_batches() const { return static_cast<int>(batch_n_.size()); }
  // Slot `b` gets ToyMicroBatch(step, micro, rank, world, global), made by the executor (on CUDA a kernel on the
  // legacy stream: nothing waits).
  Status Generate(int b, int step, int micro, int rank, int world, int global);
  // Slot `b` gets `batch` (on CUDA a synchronous copy; for tests with hand-made batches).
  Status Upload(int b, const ToyBatch& batch);
  // The mean loss of slot `b`'s last forward (CUDA: a synchronous copy, after the kernels that wrote it).
  Status Loss(int b, float* out) const;
  // fp32 gradient accumulator of `param` (ToySpecs()[param].numel() floats).
  float* GradAccumulator(int param) const;
  // kScratchFloats floats: stands in for an invalid view so that a failing run keeps issuing the same calls.
  float* Scratch() const;
  // ToyArgs for slot `b`: tokens, targets, activations and its loss; parameters and gradients unset.
  ToyArgs BatchArgs(int b) const;

 private:
  explicit ToyWorkspace(ToyExec exec) : exec_(exec) {}
  char* At(int64_t offset) const { return base_ + offset; }
  Status CheckSlot(int b, int n) const;

  ToyExec exec_;
  void* stream_ = nullptr;
  char* base_ = nullptr;      // the allocation (host memory or device memory)
  std::vector<double> host_;  // backs base_ on the CPU (double: 8-byte alignment for the fp64 loss parts)
  int max_tokens_ = 0;
  std::vector<int> batch_n_;                  // tokens in each slot
  int64_t tokens_off_ = 0, targets_off_ = 0;  // [max_batches, max_tokens] each
  int64_t acts_off_[10] = {};                 // x0, h1, x1, t2, x2, t3, x3, dl, dx, dh
  int64_t loss_parts_off_ = 0, loss_off_ = 0, scratch_off_ = 0;
  int64_t grad_off_[kToyParams] = {};
};

// The workspace of `exec` kept for the whole process (64 tokens, 8 micro-batches), created at first use. Engine
// tests train through it step after step: allocating and freeing per step would synchronise the device
// (cudaFree does) between steps and hide the ordering bugs this trainer is there to expose. Main thread only.
Status SharedToyWorkspace(ToyExec exec, ToyWorkspace** out);

// Forward and backward of slot `b` of `ws` through `access`: the calls of ToyForwardBackward in its order, every
// op enqueued on the executor (nothing waits on CUDA). `loss_scale` multiplies the loss before backward. Returns
// the first launch error; after one it launches nothing more but still makes every protocol call, so that all
// ranks keep issuing the same collectives.
Status ToyKernelForwardBackward(ToyWorkspace& ws, int b, ToyKernelAccess& access, float loss_scale = 1.0f);
// Forward only (acquires in forward order); the loss lands in ws.Loss(b).
Status ToyKernelForward(ToyWorkspace& ws, int b, ToyKernelAccess& access);

}  // namespace zero::testing

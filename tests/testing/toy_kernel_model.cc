// The kernel trainer's workspace and its forward/backward driver (toy_kernel_model.h).
#include "testing/toy_kernel_model.h"

#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "testing/device_copy.h"
#include "testing/device_memory.h"

namespace zero::testing {

namespace {

int64_t Align(int64_t x) { return (x + 63) / 64 * 64; }

}  // namespace

Status ToyWorkspace::Create(ToyExec exec, int max_tokens, int max_batches, std::unique_ptr<ToyWorkspace>* out) {
  out->reset();
  if (max_tokens < 1 || max_batches < 1) {
    return Status::InvalidArgument("ToyWorkspace: max_tokens and max_batches must be >= 1");
  }
  std::unique_ptr<ToyWorkspace> ws(new ToyWorkspace(exec));
  ws->max_tokens_ = max_tokens;
  ws->batch_n_.assign(static_cast<size_t>(max_batches), 0);
  int64_t size = 0;
  auto take = [&size](int64_t bytes) {
    const int64_t at = size;
    size += Align(bytes);
    return at;
  };
  const int64_t n = max_tokens, slots = int64_t{max_tokens} * max_batches;
  ws->tokens_off_ = take(slots * static_cast<int64_t>(sizeof(int)));
  ws->targets_off_ = take(slots * static_cast<int64_t>(sizeof(int)));
  const int64_t widths[10] = {kDim, kHidden, kDim, kDim, kDim, kDim, kDim, kVocab, kDim, kHidden};
  for (int k = 0; k < 10; ++k) ws->acts_off_[k] = take(n * widths[k] * static_cast<int64_t>(sizeof(float)));
  ws->loss_parts_off_ = take(n * static_cast<int64_t>(sizeof(double)));
  ws->loss_off_ = take(max_batches * static_cast<int64_t>(sizeof(float)));
  const std::vector<ParamSpec> specs = ToySpecs();
  for (int p = 0; p < kToyParams; ++p) {
    ws->grad_off_[p] = take(specs[static_cast<size_t>(p)].numel() * static_cast<int64_t>(sizeof(float)));
  }
  ws->scratch_off_ = take(kScratchFloats * static_cast<int64_t>(sizeof(float)));

  std::vector<double> zeros(static_cast<size_t>(size / 8));
  if (exec == ToyExec::kCpu) {
    ws->host_ = std::move(zeros);
    ws->base_ = reinterpret_cast<char*>(ws->host_.data());
  } else {
    void* p = nullptr;
    ZERO_RETURN_IF_ERROR(DeviceMalloc(size, &p));
    ws->base_ = static_cast<char*>(p);  // owned from here: the destructor frees it
    ZERO_RETURN_IF_ERROR(CopyToDevice(p, zeros.data(), size));
  }
  *out = std::move(ws);
  return Status::Ok();
}

ToyWorkspace::~ToyWorkspace() {
  if (exec_ == ToyExec::kCuda) DeviceFree(base_);
}

Status ToyWorkspace::CheckSlot(int b, int n) const {
  if (b < 0 || b >= max_batches() || n < 1 || n > max_tokens_) {
    return Status::InvalidArgument("ToyWorkspace: slot " + std::to_string(b) + " with " + std::to_string(n) +
                                   " tokens does not fit " + std::to_string(max_batches()) + " slots of " +
                                   std::to_string(max_tokens_));
  }
  return Status::Ok();
}

Status ToyWorkspace::Generate(int b, int step, int micro, int rank, int world, int global) {
  const int n = global / world;
  ZERO_RETURN_IF_ERROR(CheckSlot(b, n));
  batch_n_[static_cast<size_t>(b)] = n;
  ToyArgs a = BatchArgs(b);
  a.batch_step = step;
  a.batch_micro = micro;
  a.batch_rank = rank;
  a.batch_world = world;
  a.batch_global = global;
  return RunToyOp(exec_, ToyOp::kMakeBatch, a, stream_);
}

Status ToyWorkspace::Upload(int b, const ToyBatch& batch) {
  const int n = static_cast<int>(batch.tokens.size());
  ZERO_RETURN_IF_ERROR(CheckSlot(b, n));
  if (batch.targets.size() != batch.tokens.size()) {
    return Status::InvalidArgument("ToyWorkspace::Upload: as many targets as tokens");
  }
  batch_n_[static_cast<size_t>(b)] = n;
  const ToyArgs a = BatchArgs(b);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(int));
  if (exec_ == ToyExec::kCpu) {
    std::memcpy(a.tokens, batch.tokens.data(), static_cast<size_t>(bytes));
    std::memcpy(a.targets, batch.targets.data(), static_cast<size_t>(bytes));
    return Status::Ok();
  }
  if (stream_ != nullptr) ZERO_RETURN_IF_ERROR(StreamSynchronize(stream_));  // kernels may still read the slot
  ZERO_RETURN_IF_ERROR(CopyToDevice(a.tokens, batch.tokens.data(), bytes));
  return CopyToDevice(a.targets, batch.targets.data(), bytes);
}

Status ToyWorkspace::Loss(int b, float* out) const {
  const float* at = reinterpret_cast<const float*>(At(loss_off_)) + b;
  if (exec_ == ToyExec::kCpu) {
    *out = *at;
    return Status::Ok();
  }
  // The copy runs on the legacy stream, which waits for the work of another stream only if that one is blocking.
  if (stream_ != nullptr) ZERO_RETURN_IF_ERROR(StreamSynchronize(stream_));
  return CopyFromDevice(out, at, sizeof(float));
}

float* ToyWorkspace::GradAccumulator(int param) const { return reinterpret_cast<float*>(At(grad_off_[param])); }

float* ToyWorkspace::Scratch() const { return reinterpret_cast<float*>(At(scratch_off_)); }

ToyArgs ToyWorkspace::BatchArgs(int b) const {
  ToyArgs a;
  a.n = batch_n_[static_cast<size_t>(b)];
  a.tokens = reinterpret_cast<int*>(At(tokens_off_)) + int64_t{b} * max_tokens_;
  a.targets = reinterpret_cast<int*>(At(targets_off_)) + int64_t{b} * max_tokens_;
  float** acts[10] = {&a.acts.x0, &a.acts.h1, &a.acts.x1, &a.acts.t2, &a.acts.x2,
                      &a.acts.t3, &a.acts.x3, &a.acts.dl, &a.acts.dx, &a.acts.dh};
  for (int k = 0; k < 10; ++k) *acts[k] = reinterpret_cast<float*>(At(acts_off_[k]));
  a.acts.loss_parts = reinterpret_cast<double*>(At(loss_parts_off_));
  a.acts.loss = reinterpret_cast<float*>(At(loss_off_)) + b;
  return a;
}

Status SharedToyWorkspace(ToyExec exec, ToyWorkspace** out) {
  // Never destroyed: freeing device memory while the process exits races the CUDA runtime's own teardown.
  static auto* shared = new std::unique_ptr<ToyWorkspace>[2];
  std::unique_ptr<ToyWorkspace>& ws = shared[exec == ToyExec::kCpu ? 0 : 1];
  if (ws == nullptr) ZERO_RETURN_IF_ERROR(ToyWorkspace::Create(exec, 64, 8, &ws));
  *out = ws.get();
  return Status::Ok();
}

namespace {

// Runs ops while none has failed; remembers the first failure.
class Runner {
 public:
  Runner(ToyWorkspace& ws, int b, ToyKernelAccess& access) : ws_(ws), access_(access), args_(ws.BatchArgs(b)) {}
  void Params(std::initializer_list<int> params) {
    for (int p : params) args_.param[p] = access_.Param(p);
  }
  void Grads(std::initializer_list<int> params) {
    for (int p : params) args_.grad[p] = access_.Grad(p);
  }
  void Run(ToyOp op) {
    if (status_.ok()) status_ = RunToyOp(ws_.exec(), op, args_, ws_.stream());
  }
  ToyArgs& args() { return args_; }
  ToyKernelAccess& access() { return access_; }
  const Status& status() const { return status_; }

 private:
  ToyWorkspace& ws_;
  ToyKernelAccess& access_;
  ToyArgs args_;
  Status status_;
};

void Forward(Runner& r, float loss_scale) {
  ToyKernelAccess& m = r.access();
  m.Acquire(0, false);
  r.Params({kToyEmbed});
  r.Run(ToyOp::kEmbedForward);
  m.Release(0, false);
  m.Acquire(1, false);
  r.Params({kToyW1, kToyB1, kToyW2});
  r.Run(ToyOp::kBlock1Forward);
  m.Release(1, false);
  m.Acquire(2, false);
  r.Params({kToyFrozen});
  r.Run(ToyOp::kFrozenForward);
  m.Release(2, false);
  m.Acquire(3, false);
  r.Params({kToyW3, kToyGain});
  r.Run(ToyOp::kBlock2Forward);
  m.Release(3, false);
  m.Acquire(0, false);  // tied head
  r.Params({kToyEmbed});
  r.args().loss_scale = loss_scale;
  r.Run(ToyOp::kHeadForward);
  r.Run(ToyOp::kLossSum);
  m.Release(0, false);
}

}  // namespace

Status ToyKernelForwardBackward(ToyWorkspace& ws, int b, ToyKernelAccess& m, float loss_scale) {
  Runner r(ws, b, m);
  Forward(r, loss_scale);
  m.Acquire(0, true);  // tied head first
  r.Params({kToyEmbed});
  r.Grads({kToyEmbed});
  r.Run(ToyOp::kHeadBackwardDx);
  r.Run(ToyOp::kHeadBackwardGrad);
  m.Release(0, true);
  m.Acquire(3, true);
  r.Params({kToyW3, kToyGain});
  r.Grads({kToyW3, kToyGain});
  r.Run(ToyOp::kBlock2BackwardGrad);  // reads dx before the next op adds this block's input gradient to it
  r.Run(ToyOp::kBlock2BackwardDx);
  m.GradsReady(3);
  m.Release(3, true);
  m.Acquire(2, true);
  r.Params({kToyFrozen});
  r.Run(ToyOp::kFrozenBackwardDx);
  m.GradsReady(2);
  m.Release(2, true);
  m.Acquire(1, true);
  r.Params({kToyW1, kToyW2});
  r.Grads({kToyW1, kToyB1, kToyW2});
  r.Run(ToyOp::kBlock1BackwardDh);    // from dx before this block's input gradient is added
  r.Run(ToyOp::kBlock1BackwardGrad);  // reads that dx too
  r.Run(ToyOp::kBlock1BackwardDx);
  m.GradsReady(1);
  m.Release(1, true);
  m.Acquire(0, true);  // then the lookup
  r.Grads({kToyEmbed});
  r.Run(ToyOp::kEmbedBackward);
  m.GradsReady(0);
  m.Release(0, true);
  return r.status();
}

Status ToyKernelForward(ToyWorkspace& ws, int b, ToyKernelAccess& m) {
  Runner r(ws, b, m);
  Forward(r, 1.0f);
  return r.status();
}

}  // namespace zero::testing

// CpuStream / CpuEvent (see cpu_stream.h). The worker runs tasks in order; Record enqueues a task that fires
// the event; Wait enqueues a task that blocks the worker until the awaited Record has fired. The mutex hand-offs
// (queue push/pop, event fire/wait) are the happens-before edges that make data written by one stream's task
// visible to a task on another stream that waited on its event, exactly as on a GPU.
#include "cpu_stream.h"

#include <string>
#include <utility>

namespace zero {

CpuEvent::CpuEvent() : state_(std::make_shared<State>()) {}

bool CpuEvent::Query() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->fired >= state_->recorded;
}

Status CpuEvent::Synchronize(std::chrono::milliseconds timeout, const char* what) const {
  std::unique_lock<std::mutex> lock(state_->mu);
  const uint64_t target = state_->recorded;
  if (!state_->cv.wait_for(lock, timeout, [&] { return state_->fired >= target; })) {
    return Status::Timeout(std::string(what) + " did not complete within " + std::to_string(timeout.count()) +
                           " ms: the work recorded before it is stalled");
  }
  return Status::Ok();
}

CpuStream::CpuStream(const char* name) : name_(name), worker_([this] { Run(); }) {}

CpuStream::~CpuStream() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  worker_.join();
}

void CpuStream::Enqueue(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(fn));
  }
  cv_.notify_one();
}

void CpuStream::Record(CpuEvent* event) {
  std::shared_ptr<CpuEvent::State> state = event->state_;
  uint64_t seq;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    seq = ++state->recorded;
  }
  Enqueue([state, seq] {
    {
      std::lock_guard<std::mutex> lock(state->mu);
      // Records fire in order on one stream; a later Record on another stream may have fired first.
      if (state->fired < seq) state->fired = seq;
    }
    state->cv.notify_all();
  });
}

void CpuStream::Wait(const CpuEvent& event) {
  std::shared_ptr<CpuEvent::State> state = event.state_;
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    target = state->recorded;  // the most recent Record at the time of Wait, as cudaStreamWaitEvent
  }
  Enqueue([state, target] {
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->fired >= target; });
  });
}

Status CpuStream::Synchronize(std::chrono::milliseconds timeout) {
  CpuEvent done;
  Record(&done);
  return done.Synchronize(timeout, name_);
}

void CpuStream::Run() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything enqueued has run
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    fn();
  }
}

}  // namespace zero

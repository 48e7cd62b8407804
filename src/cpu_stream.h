// CpuStream and CpuEvent: CUDA's stream and event semantics on CPU threads, so that the engine's stream/event
// protocol runs for real on machines without a GPU and a missing wait is a genuine race (visible to
// ThreadSanitizer), not a silent no-op.
//
//   CUDA                                   here
//   kernel<<<..., stream>>>                stream.Enqueue(fn): fn runs on the stream's worker thread, in order
//   cudaEventRecord(event, stream)         stream.Record(&event): the event fires when everything enqueued on
//                                          the stream before this call has run
//   cudaStreamWaitEvent(stream, event)     stream.Wait(event): work enqueued on the stream after this call runs
//                                          only after the event's most recent Record (at the time of Wait) fired;
//                                          an event never recorded is already complete
//   cudaEventQuery / cudaEventSynchronize  event.Query() / event.Synchronize(timeout)
//   cudaStreamSynchronize                  stream.Synchronize(timeout)
//
// Enqueue, Record and Wait only enqueue: they never block the calling thread. Threads: one thread enqueues on a
// given stream; events may be queried or synchronized from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "zero/status.h"

namespace zero {

class CpuEvent {
 public:
  CpuEvent();
  // True when the most recent Record has fired (or there was none).
  bool Query() const;
  // Blocks until Query() is true; Timeout after `timeout`, naming `what`.
  Status Synchronize(std::chrono::milliseconds timeout, const char* what = "event") const;

 private:
  friend class CpuStream;
  struct State {
    mutable std::mutex mu;
    std::condition_variable cv;
    uint64_t recorded = 0;  // Records issued (host side)
    uint64_t fired = 0;     // Records whose work has run (worker side)
  };
  std::shared_ptr<State> state_;  // shared with pending stream tasks, so an event may die before they run
};

class CpuStream {
 public:
  explicit CpuStream(const char* name = "stream");
  ~CpuStream();  // runs what is enqueued, then joins the worker
  CpuStream(const CpuStream&) = delete;
  CpuStream& operator=(const CpuStream&) = delete;

  void Enqueue(std::function<void()> fn);
  void Record(CpuEvent* event);
  void Wait(const CpuEvent& event);
  // Blocks until everything enqueued so far has run.
  Status Synchronize(std::chrono::milliseconds timeout);

 private:
  void Run();

  const char* name_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace zero

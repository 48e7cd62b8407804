// IoQueue: asynchronous reads and writes of aligned buffers through one io_uring ring, driven by a thread of its
// own so that the disk stays busy while the caller computes (the NVMe tier's AdamW, a gather).
//
// A request (file descriptor, file offset, bytes, buffer, read or write) is cut into chunks of `chunk_bytes`; the
// chunks go to the kernel in request order with at most `queue_depth` in flight, whatever the caller is doing
// meanwhile: the queue depth is fio's iodepth, the chunk its block size. Submit only enqueues; Wait blocks until
// one request is complete. Why a thread: with the ring on the caller's thread, a queue refills only when the caller
// next looks, and a CPU AdamW of a few hundred milliseconds would leave the disk idle after its first few chunks.
//
// Fixed capacity: at most `max_requests` requests are outstanding (submitted, not yet waited for). Every structure
// is allocated at Create, so Submit and Wait never allocate (they run on the optimizer step's path).
//
// Results are raw (an errno, a short transfer): the caller names the file, what it holds and the fix.
// Thread-safety: Submit, Wait and SetFault may be called from any thread, concurrently.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "zero/status.h"

struct io_uring;

namespace zero {

// How one request ended.
struct IoResult {
  int error = 0;               // errno of the first chunk that failed (0: none)
  int64_t error_offset = -1;   // its file offset
  int64_t short_offset = -1;   // file offset of the first chunk that moved fewer bytes than asked (-1: none)
  int64_t short_done = 0;      // bytes that chunk moved
  int64_t short_wanted = 0;    // bytes it asked for
  bool ok() const { return error == 0 && short_offset < 0; }
};

// Test seam: one chunk completion reports a fault instead of what the kernel returned (the transfer itself
// happened). Used to provoke a full disk in the middle of a step, or a short read, without filling a disk.
struct IoFault {
  enum class Op : uint8_t { kNone, kRead, kWrite } op = Op::kNone;
  int fd = -1;                // only transfers of this descriptor (-1: any)
  int64_t skip = 0;           // let this many matching completions through first
  int error = 0;              // report this errno (ENOSPC, EIO) ...
  int64_t short_bytes = -1;   // ... or, with error 0 and short_bytes >= 0, this many bytes moved (a short transfer)
  int delay_ms = 0;           // ... or, with neither, complete it this much later (a stalled disk)
};

// What a queue has moved since Create. busy_seconds: time with at least one chunk in flight, so that bytes over
// it is the throughput while the disk works, whatever the caller did in between.
struct IoStats {
  int64_t bytes_read = 0, bytes_written = 0;
  double busy_seconds = 0;
};

class IoQueue {
 public:
  // Fails with Unavailable when the kernel refuses io_uring (too old, kernel.io_uring_disabled, a seccomp filter).
  static Status Create(int queue_depth, int64_t chunk_bytes, int max_requests, std::unique_ptr<IoQueue>* out);
  // Completes everything submitted (no request is abandoned while the kernel may still write its buffer), then
  // joins the thread.
  ~IoQueue();
  IoQueue(const IoQueue&) = delete;
  IoQueue& operator=(const IoQueue&) = delete;

  // Queues a transfer of `bytes` at `offset` of `fd` from (write) or into (read) `buf`, which must stay valid until
  // Wait returns for it. REQUIRES: bytes > 0; buf, offset and bytes aligned as the descriptor needs (O_DIRECT).
  // FailedPrecondition when max_requests are outstanding already.
  Status Submit(int fd, bool write, int64_t offset, int64_t bytes, void* buf, uint64_t* ticket);
  // Waits for a request and releases its ticket. Timeout (the request stays in flight, its ticket valid) or OK with
  // *result saying how the transfer went.
  Status Wait(uint64_t ticket, std::chrono::milliseconds timeout, IoResult* result);
  void SetFault(const IoFault& fault);
  IoStats stats();

  // The slot behind a ticket: in [0, max_requests), stable while the ticket is outstanding.
  static int SlotOf(uint64_t ticket) { return static_cast<int>(ticket & 0xffff); }
  int queue_depth() const { return queue_depth_; }
  int64_t chunk_bytes() const { return chunk_bytes_; }
  int max_requests() const { return static_cast<int>(requests_.size()); }

 private:
  enum class State : uint8_t { kFree, kQueued, kDone };
  struct Request {
    State state = State::kFree;
    uint32_t generation = 0;
    int fd = -1;
    bool write = false;
    int64_t offset = 0, bytes = 0;
    char* buf = nullptr;
    int64_t chunks = 0, submitted = 0, completed = 0;
    IoResult result;
  };
  struct Chunk {
    int request = -1;  // -1: free
    int64_t offset = 0, bytes = 0;
  };

  IoQueue(int queue_depth, int64_t chunk_bytes, int max_requests);
  void Run();
  void Complete(int chunk, int res);  // REQUIRES: mu_ held

  const int queue_depth_;
  const int64_t chunk_bytes_;
  std::unique_ptr<io_uring> ring_;

  std::mutex mu_;
  std::condition_variable work_;  // the thread: a request was queued, or stop
  std::condition_variable done_;  // waiters: a request completed
  std::vector<Request> requests_;
  std::vector<int> free_requests_;  // stack of free slots
  std::vector<int> fifo_;           // ring of queued slots whose chunks are not all submitted
  size_t fifo_head_ = 0, fifo_size_ = 0;
  std::vector<Chunk> chunks_;       // queue_depth entries: the chunks in flight
  std::vector<int> prepared_;       // queue_depth entries: the chunks of the submission being made (Run only)
  int in_flight_ = 0;
  IoFault fault_;
  int delayed_chunk_ = -1, delayed_res_ = 0, delay_ms_ = 0;  // a completion IoFault::delay_ms holds back
  IoStats stats_;
  std::chrono::steady_clock::time_point busy_since_;  // when in_flight_ last went from 0 to 1
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace zero

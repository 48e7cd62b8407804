// IoQueue: one io_uring ring and the thread that keeps it full (see io_uring_queue.h).
#include "io_uring_queue.h"

#include <liburing.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

namespace zero {

IoQueue::IoQueue(int queue_depth, int64_t chunk_bytes, int max_requests)
    : queue_depth_(queue_depth), chunk_bytes_(chunk_bytes), ring_(std::make_unique<io_uring>()) {
  requests_.resize(static_cast<size_t>(max_requests));
  free_requests_.reserve(static_cast<size_t>(max_requests));
  for (int i = max_requests - 1; i >= 0; --i) free_requests_.push_back(i);
  fifo_.assign(static_cast<size_t>(max_requests), -1);
  chunks_.resize(static_cast<size_t>(queue_depth));
  prepared_.resize(static_cast<size_t>(queue_depth));
}

Status IoQueue::Create(int queue_depth, int64_t chunk_bytes, int max_requests, std::unique_ptr<IoQueue>* out) {
  if (queue_depth < 1 || chunk_bytes < 1 || max_requests < 1 || max_requests > 0xffff) {
    return Status::InvalidArgument("IoQueue: queue_depth, chunk_bytes and max_requests (<= 65535) must be >= 1");
  }
  std::unique_ptr<IoQueue> q(new IoQueue(queue_depth, chunk_bytes, max_requests));
  // Never more than queue_depth chunks in flight, so a ring of that many entries (and twice as many completion
  // entries, liburing's default) can neither run out of submission entries nor overflow its completions.
  const int rc = io_uring_queue_init(static_cast<unsigned>(queue_depth), q->ring_.get(), 0);
  if (rc < 0) {
    q->ring_.reset();  // not initialized: the destructor must not exit it
    return Status::Unavailable(std::string("io_uring_queue_init failed: ") + std::strerror(-rc) +
                               ". The NVMe tier needs io_uring (Linux 5.6 or later, not disabled by "
                               "kernel.io_uring_disabled or a container's seccomp filter)");
  }
  q->thread_ = std::thread([p = q.get()] { p->Run(); });
  *out = std::move(q);
  return Status::Ok();
}

IoQueue::~IoQueue() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_.notify_all();
    thread_.join();
  }
  if (ring_) io_uring_queue_exit(ring_.get());
}

IoStats IoQueue::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  IoStats s = stats_;
  if (in_flight_ > 0) s.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - busy_since_).count();
  return s;
}

void IoQueue::SetFault(const IoFault& fault) {
  std::lock_guard<std::mutex> lock(mu_);
  fault_ = fault;
}

Status IoQueue::Submit(int fd, bool write, int64_t offset, int64_t bytes, void* buf, uint64_t* ticket) {
  if (bytes <= 0 || buf == nullptr) return Status::Internal("IoQueue::Submit: empty transfer");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_requests_.empty()) {
      return Status::FailedPrecondition("IoQueue: " + std::to_string(requests_.size()) +
                                        " transfers are outstanding already; wait for some first");
    }
    const int slot = free_requests_.back();
    free_requests_.pop_back();
    Request& r = requests_[static_cast<size_t>(slot)];
    r.state = State::kQueued;
    r.fd = fd;
    r.write = write;
    r.offset = offset;
    r.bytes = bytes;
    r.buf = static_cast<char*>(buf);
    r.chunks = (bytes + chunk_bytes_ - 1) / chunk_bytes_;
    r.submitted = r.completed = 0;
    r.result = IoResult();
    fifo_[(fifo_head_ + fifo_size_) % fifo_.size()] = slot;
    ++fifo_size_;
    *ticket = (static_cast<uint64_t>(r.generation) << 16) | static_cast<uint64_t>(slot);
  }
  work_.notify_one();
  return Status::Ok();
}

Status IoQueue::Wait(uint64_t ticket, std::chrono::milliseconds timeout, IoResult* result) {
  const size_t slot = static_cast<size_t>(SlotOf(ticket));
  std::unique_lock<std::mutex> lock(mu_);
  if (slot >= requests_.size() || requests_[slot].generation != static_cast<uint32_t>(ticket >> 16) ||
      requests_[slot].state == State::kFree) {
    return Status::Internal("IoQueue::Wait: unknown or already released ticket");
  }
  Request& r = requests_[slot];
  if (!done_.wait_for(lock, timeout, [&] { return r.state == State::kDone; })) {
    return Status::Timeout("did not complete within " + std::to_string(timeout.count()) + " ms");
  }
  *result = r.result;
  r.state = State::kFree;
  ++r.generation;
  free_requests_.push_back(static_cast<int>(slot));
  return Status::Ok();
}

// REQUIRES: mu_ held. `res` is the kernel's: bytes moved, or -errno.
void IoQueue::Complete(int chunk, int res) {
  if (chunk < 0 || chunk >= queue_depth_ || chunks_[static_cast<size_t>(chunk)].request < 0) return;
  Chunk& c = chunks_[static_cast<size_t>(chunk)];
  Request& r = requests_[static_cast<size_t>(c.request)];
  const IoFault::Op op = r.write ? IoFault::Op::kWrite : IoFault::Op::kRead;
  if (fault_.op == op && (fault_.fd < 0 || fault_.fd == r.fd)) {
    if (fault_.skip > 0) {
      --fault_.skip;
    } else {
      if (fault_.error != 0) {
        res = -fault_.error;
      } else if (fault_.short_bytes >= 0) {
        res = static_cast<int>(std::min<int64_t>(fault_.short_bytes, c.bytes));
      } else if (fault_.delay_ms > 0) {
        // Completed later by Run, after a sleep without the lock (waiters can time out meanwhile).
        delayed_chunk_ = chunk;
        delayed_res_ = res;
        delay_ms_ = fault_.delay_ms;
        fault_ = IoFault();
        return;
      }
      fault_ = IoFault();  // once
    }
  }
  if (res < 0) {
    if (r.result.error == 0) {
      r.result.error = -res;
      r.result.error_offset = c.offset;
    }
  } else {
    (r.write ? stats_.bytes_written : stats_.bytes_read) += res;
  }
  if (res >= 0 && res < c.bytes && r.result.short_offset < 0) {
    // O_DIRECT transfers within the file's size move whole chunks; fewer bytes means the file ended early (a read
    // of a truncated file) or the disk filled up in the middle of a write. Either way the data is incomplete.
    r.result.short_offset = c.offset;
    r.result.short_done = res;
    r.result.short_wanted = c.bytes;
  }
  c.request = -1;
  if (--in_flight_ == 0) {
    stats_.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - busy_since_).count();
  }
  if (++r.completed == r.chunks) {
    r.state = State::kDone;
    done_.notify_all();
  }
}

void IoQueue::Run() {
  io_uring* ring = ring_.get();
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // Fill the ring up to the queue depth, in request order.
    int prepared = 0;
    while (in_flight_ < queue_depth_ && fifo_size_ > 0) {
      Request& r = requests_[static_cast<size_t>(fifo_[fifo_head_])];
      int c = 0;
      while (chunks_[static_cast<size_t>(c)].request >= 0) ++c;  // in_flight_ < queue_depth_: one is free
      io_uring_sqe* sqe = io_uring_get_sqe(ring);  // the ring has queue_depth entries: never null here
      if (sqe == nullptr) break;
      Chunk& ch = chunks_[static_cast<size_t>(c)];
      ch.request = fifo_[fifo_head_];
      ch.offset = r.offset + r.submitted * chunk_bytes_;
      ch.bytes = std::min(chunk_bytes_, r.bytes - r.submitted * chunk_bytes_);
      char* buf = r.buf + r.submitted * chunk_bytes_;
      if (r.write) {
        io_uring_prep_write(sqe, r.fd, buf, static_cast<unsigned>(ch.bytes), static_cast<uint64_t>(ch.offset));
      } else {
        io_uring_prep_read(sqe, r.fd, buf, static_cast<unsigned>(ch.bytes), static_cast<uint64_t>(ch.offset));
      }
      io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(c));
      if (in_flight_++ == 0) busy_since_ = std::chrono::steady_clock::now();
      prepared_[static_cast<size_t>(prepared++)] = c;
      if (++r.submitted == r.chunks) {
        fifo_head_ = (fifo_head_ + 1) % fifo_.size();
        --fifo_size_;
      }
    }
    if (prepared > 0) {
      // Only this thread touches the ring, so the lock is not needed while the kernel takes the entries.
      lock.unlock();
      int rc;
      for (;;) {
        rc = io_uring_submit(ring);
        if (rc == -EINTR) continue;
        if (rc != -EAGAIN && rc != -EBUSY) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));  // the kernel is short of resources: retry
      }
      lock.lock();
      if (rc < 0) {
        // The kernel refused the entries: fail those chunks here. Should it still take them later, their
        // completions find the chunk slots free and are dropped (Complete ignores them).
        for (int k = 0; k < prepared; ++k) Complete(prepared_[static_cast<size_t>(k)], rc);
      }
    }
    if (in_flight_ == 0) {
      if (stop_ && fifo_size_ == 0) break;
      work_.wait(lock, [&] { return stop_ || fifo_size_ > 0; });
      continue;
    }
    // Something is in flight: sleep until the kernel completes a chunk. A request queued meanwhile waits for that
    // completion (at most one chunk's time) before its chunks go in.
    lock.unlock();
    io_uring_cqe* cqe = nullptr;
    int rc;
    do {
      rc = io_uring_wait_cqe(ring, &cqe);
    } while (rc == -EINTR);
    lock.lock();
    if (rc < 0) continue;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
      Complete(static_cast<int>(io_uring_cqe_get_data64(cqe)), cqe->res);
      ++seen;
    }
    io_uring_cq_advance(ring, seen);
    if (delayed_chunk_ >= 0) {  // IoFault::delay_ms: a stalled disk
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_));
      lock.lock();
      const int c = delayed_chunk_;
      delayed_chunk_ = -1;
      Complete(c, delayed_res_);
    }
  }
}

}  // namespace zero

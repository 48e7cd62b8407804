// Proof that the tsan phase can fail: a consumer stream reads what a producer stream wrote, without waiting on
// the producer's event. Built only with ZERO_SANITIZE=thread; ctest passes it only if ThreadSanitizer reports
// the data race (a run with the wait in place is cpu_stream_test's WaitMakesAnotherStreamsWritesVisible).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "cpu_stream.h"

int main() {
  zero::CpuStream producer("producer"), consumer("consumer");
  zero::CpuEvent written;
  std::vector<int> data(1000, 0);
  long long sum = 0;
  // Make the two accesses unordered by synchronization on every run, however the threads are scheduled:
  //  * the producer writes only after the consumer has read, told by a relaxed atomic, which orders them in time
  //    but (as TSan models relaxed atomics) not by synchronization;
  //  * the consumer task is enqueued only once the producer task is running, so the producer worker takes no
  //    queue mutex between the read and the write. Otherwise, under load, its first pop could come after the
  //    main thread (already synchronized with the read) pushed to its queue: a real happens-before edge.
  std::atomic<bool> started{false}, read_done{false};
  producer.Enqueue([&] {
    started.store(true, std::memory_order_relaxed);
    while (!read_done.load(std::memory_order_relaxed)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    for (int i = 0; i < 1000; ++i) data[i] = i;
  });
  producer.Record(&written);
  while (!started.load(std::memory_order_relaxed)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  // consumer.Wait(written);  <- the missing wait
  consumer.Enqueue([&] {
    for (int v : data) sum += v;
    read_done.store(true, std::memory_order_relaxed);
  });
  const auto timeout = std::chrono::milliseconds(10'000);
  if (!consumer.Synchronize(timeout).ok() || !producer.Synchronize(timeout).ok()) return 1;
  std::printf("sum %lld\n", sum);
  return 0;
}

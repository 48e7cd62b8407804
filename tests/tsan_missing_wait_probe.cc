// Proof that the tsan phase can fail: a consumer stream reads what a producer stream wrote, without waiting on
// the producer's event. Built only with ZERO_SANITIZE=thread; ctest passes it only if ThreadSanitizer reports
// the data race (a run with the wait in place is cpu_stream_test's WaitMakesAnotherStreamsWritesVisible).
#include <chrono>
#include <cstdio>
#include <vector>

#include "cpu_stream.h"

int main() {
  zero::CpuStream producer("producer"), consumer("consumer");
  zero::CpuEvent written;
  std::vector<int> data(1000, 0);
  long long sum = 0;
  producer.Enqueue([&] {
    for (int i = 0; i < 1000; ++i) data[i] = i;
  });
  producer.Record(&written);
  // consumer.Wait(written);  <- the missing wait
  consumer.Enqueue([&] {
    for (int v : data) sum += v;
  });
  const auto timeout = std::chrono::milliseconds(10'000);
  if (!consumer.Synchronize(timeout).ok() || !producer.Synchronize(timeout).ok()) return 1;
  std::printf("sum %lld\n", sum);
  return 0;
}

// CpuStream / CpuEvent: CUDA's stream and event semantics on threads (see src/cpu_stream.h).
#include "cpu_stream.h"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace zero {
namespace {

using std::chrono::milliseconds;
constexpr milliseconds kLong{10'000};

TEST(CpuStreamTest, RunsTasksInOrderOnOneThread) {
  CpuStream s;
  std::vector<int> seen;  // written only by the worker; read after Synchronize
  std::thread::id worker;
  for (int i = 0; i < 100; ++i) {
    s.Enqueue([&, i] {
      if (i == 0) worker = std::this_thread::get_id();
      EXPECT_EQ(std::this_thread::get_id(), worker);
      seen.push_back(i);
    });
  }
  ASSERT_TRUE(s.Synchronize(kLong).ok());
  ASSERT_EQ(seen.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(seen[i], i);
  EXPECT_NE(worker, std::this_thread::get_id()) << "Enqueue must not run the task on the caller";
}

TEST(CpuStreamTest, EnqueueRecordAndWaitDoNotBlockTheCaller) {
  CpuStream a, b;
  CpuEvent e;
  std::atomic<bool> release{false};
  a.Enqueue([&] {
    while (!release.load()) std::this_thread::sleep_for(milliseconds(1));
  });
  a.Record(&e);
  b.Wait(e);
  b.Enqueue([] {});
  EXPECT_FALSE(e.Query());  // the caller got here while a's task still blocks
  release = true;
  ASSERT_TRUE(b.Synchronize(kLong).ok());
  EXPECT_TRUE(e.Query());
}

TEST(CpuStreamTest, WaitMakesAnotherStreamsWritesVisible) {
  // The producer writes slowly; the consumer must see every write, because it waits on the event.
  CpuStream producer, consumer;
  CpuEvent written;
  std::vector<int> data(1000, 0);
  long long sum = -1;
  producer.Enqueue([&] {
    std::this_thread::sleep_for(milliseconds(50));
    for (int i = 0; i < 1000; ++i) data[i] = i;
  });
  producer.Record(&written);
  consumer.Wait(written);
  consumer.Enqueue([&] {
    long long s = 0;
    for (int v : data) s += v;
    sum = s;
  });
  ASSERT_TRUE(consumer.Synchronize(kLong).ok());
  EXPECT_EQ(sum, 999LL * 1000 / 2);
}

TEST(CpuStreamTest, WaitTargetsTheRecordCurrentAtWaitTime) {
  CpuStream a, b;
  CpuEvent e;
  std::atomic<int> stage{0};
  std::atomic<bool> release_first{false}, release_second{false};
  a.Enqueue([&] {
    while (!release_first.load()) std::this_thread::sleep_for(milliseconds(1));
    stage = 1;
  });
  a.Record(&e);
  b.Wait(e);  // waits for the first record only
  int seen_by_b = -1;
  b.Enqueue([&] { seen_by_b = stage.load(); });
  a.Enqueue([&] {
    while (!release_second.load()) std::this_thread::sleep_for(milliseconds(1));
    stage = 2;
  });
  a.Record(&e);  // a later record must not delay b
  release_first = true;
  ASSERT_TRUE(b.Synchronize(kLong).ok());
  EXPECT_EQ(seen_by_b, 1);
  EXPECT_FALSE(e.Query()) << "the event now stands for the second record, still pending";
  release_second = true;
  ASSERT_TRUE(e.Synchronize(kLong).ok());
}

TEST(CpuStreamTest, AnEventNeverRecordedIsComplete) {
  CpuStream s;
  CpuEvent e;
  EXPECT_TRUE(e.Query());
  s.Wait(e);
  bool ran = false;
  s.Enqueue([&] { ran = true; });
  ASSERT_TRUE(s.Synchronize(kLong).ok());
  EXPECT_TRUE(ran);
}

TEST(CpuStreamTest, SynchronizeTimesOutOnAStalledStream) {
  CpuStream s("stalled stream");
  std::atomic<bool> release{false};
  s.Enqueue([&] {
    while (!release.load()) std::this_thread::sleep_for(milliseconds(1));
  });
  const Status st = s.Synchronize(milliseconds(50));
  EXPECT_EQ(st.code(), StatusCode::kTimeout) << st.ToString();
  EXPECT_NE(st.message().find("stalled stream"), std::string::npos) << st.ToString();
  release = true;
  EXPECT_TRUE(s.Synchronize(kLong).ok());
}

TEST(CpuStreamTest, DestructionRunsWhatIsEnqueuedAndEventsMayDieFirst) {
  int runs = 0;
  {
    CpuStream s;
    for (int i = 0; i < 10; ++i) s.Enqueue([&] { ++runs; });
    {
      CpuEvent temporary;
      s.Record(&temporary);  // the pending fire task keeps the event's state alive
    }
  }
  EXPECT_EQ(runs, 10);
}

}  // namespace
}  // namespace zero

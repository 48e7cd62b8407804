// NcclComm. Here (no GPU) every rank must get Unavailable with the reason, without a hang, and MPI must stay
// usable; which GPU a rank may use (cuda_placement.h) is checked everywhere. On a machine with GPUs (ctest: 1 and
// 2 ranks; scripts/gpu/gpu_run.sh: also 4 ranks sharing one GPU through NCCL >= 2.30) the collectives run on
// device memory, waited for and asynchronously on the caller's stream back to back (the non-blocking
// communicator's ncclInProgress path, which only a world of two or more takes), on a Duplicate() too, and a
// stalled peer (or, with ZERO_NCCL_TEST_VICTIM=kill under mpiexec --enable-recovery, a killed one) ends in a
// Timeout on every other rank.
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "cuda_placement.h"
#include "testing/mpi_env.h"
#include "zero/comm.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace zero::testing {
namespace {

std::unique_ptr<Comm> OpenNcclWorld(Status* status,
                                    std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000)) {
  CommOptions options;
  options.timeout = timeout;
  std::unique_ptr<Comm> comm;
  *status = Comm::OpenNccl(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm);
  return comm;
}

// Before OpenNccl refused it, a node with more ranks than GPUs mapped ranks round-robin onto the GPUs and NCCL
// <= 2.29 failed every rank's init with "Duplicate GPU detected" and no hint (ctest nccl_comm_test.np2,
// lora_example_tiny and bench_quick on a one-GPU machine).
TEST(NcclPlacementTest, OneGpuPerRankUnlessTheNcclLetsRanksShare) {
  using internal::PlaceRankOnGpu;
  // Enough GPUs: the local rank's own, whatever the NCCL.
  EXPECT_EQ(PlaceRankOnGpu(0, 1, 1, 22809, nullptr).device, 0);
  EXPECT_EQ(PlaceRankOnGpu(3, 4, 8, 22809, nullptr).device, 3);
  EXPECT_TRUE(PlaceRankOnGpu(3, 4, 8, 22809, nullptr).refusal.empty());
  // More ranks than GPUs with NCCL 2.28: refused, saying why and what to do.
  const internal::GpuPlacement refused = PlaceRankOnGpu(1, 2, 1, 22809, nullptr);
  EXPECT_EQ(refused.device, -1);
  for (const char* part : {"2 ranks", "1 GPU", "NCCL 2.28.9", "NCCL_MULTI_RANK_GPU_ENABLE=1", "Comm::OpenMpi",
                           "at most 1 rank"}) {
    EXPECT_NE(refused.refusal.find(part), std::string::npos) << part << " not in: " << refused.refusal;
  }
  // The variable asks, but this NCCL cannot: still refused, and the message says the variable has no effect.
  const internal::GpuPlacement old = PlaceRankOnGpu(1, 2, 1, 22907, "1");
  EXPECT_EQ(old.device, -1);
  EXPECT_NE(old.refusal.find("older than 2.30"), std::string::npos) << old.refusal;
  // NCCL 2.30 with the variable: ranks share, round-robin.
  EXPECT_EQ(PlaceRankOnGpu(1, 2, 1, 23007, "1").device, 0);
  EXPECT_EQ(PlaceRankOnGpu(3, 4, 2, 23007, "1").device, 1);
  EXPECT_TRUE(PlaceRankOnGpu(3, 4, 2, 23007, "1").refusal.empty());
  // Without the variable (or with another value) 2.30 keeps one rank per GPU, as NCCL itself does.
  EXPECT_EQ(PlaceRankOnGpu(1, 2, 1, 23007, nullptr).device, -1);
  EXPECT_EQ(PlaceRankOnGpu(1, 2, 1, 23007, "0").device, -1);
  // NCCL reads the variable as an integer (strtoll, base 0) and enables sharing for any non-zero value: "2", "0x1"
  // and " 1" are asked too, and must not be refused where NCCL would accept them; an empty value and words are 0.
  for (const char* yes : {"2", "0x1", " 1", "01"}) {
    EXPECT_EQ(PlaceRankOnGpu(1, 2, 1, 23007, yes).device, 0) << "'" << yes << "'";
  }
  for (const char* no : {"", "00", "0x0", "yes", "true"}) {
    EXPECT_EQ(PlaceRankOnGpu(1, 2, 1, 23007, no).device, -1) << "'" << no << "'";
  }
  EXPECT_NE(PlaceRankOnGpu(1, 2, 1, 22907, "2").refusal.find("NCCL_MULTI_RANK_GPU_ENABLE=2 is set but has no effect"),
            std::string::npos)
      << PlaceRankOnGpu(1, 2, 1, 22907, "2").refusal;
  // No GPU at all.
  EXPECT_EQ(PlaceRankOnGpu(0, 1, 0, 23007, "1").refusal, "no CUDA device");
  EXPECT_EQ(internal::NcclVersionText(23007), "2.30.7");
}

// Ranks decide whether they share a GPU by the PCI bus ids of the GPUs they would use, not by counting devices: a
// launcher that gives each rank its own CUDA_VISIBLE_DEVICES makes every rank see one device on a node of many
// ranks, and counting called that sharing (refused with NCCL < 2.30: a valid cluster layout turned away).
TEST(NcclPlacementTest, SharingIsDecidedByBusIdsWhenTheyAreKnown) {
  using internal::BusiestGpu;
  using internal::PlaceRankOnGpu;
  const std::vector<std::string> own = {"0000:10:00.0", "0000:11:00.0", "0000:12:00.0", "0000:13:00.0"};
  EXPECT_EQ(BusiestGpu(own).second, 1);
  // 4 ranks, each seeing one GPU of its own: each takes its device 0, with any NCCL.
  const internal::GpuPlacement mine = PlaceRankOnGpu(2, 4, 1, 22809, nullptr, own);
  EXPECT_EQ(mine.device, 0);
  EXPECT_TRUE(mine.refusal.empty()) << mine.refusal;
  // Two of them given the same GPU: refused, naming the GPU and how ranks pick, with what to do.
  const std::vector<std::string> two = {"0000:10:00.0", "0000:11:00.0", "0000:10:00.0", "0000:13:00.0"};
  EXPECT_EQ(BusiestGpu(two), std::make_pair(std::string("0000:10:00.0"), 2));
  const internal::GpuPlacement refused = PlaceRankOnGpu(2, 4, 1, 22809, nullptr, two);
  EXPECT_EQ(refused.device, -1);
  for (const char* part : {"2 of this node's 4 ranks would run on GPU 0000:10:00.0", "local rank % its 1 visible",
                           "NCCL_MULTI_RANK_GPU_ENABLE=1", "each taking a different one", "Comm::OpenMpi"}) {
    EXPECT_NE(refused.refusal.find(part), std::string::npos) << part << " not in: " << refused.refusal;
  }
  // ... unless the NCCL lets them share.
  EXPECT_EQ(PlaceRankOnGpu(2, 4, 1, 23007, "1", two).device, 0);
  // The ids overrule the count both ways: 2 ranks seeing 2 GPUs in crossed orders ("1,0" and "0,1") both land on
  // GPU 1; by count (2 ranks, 2 devices) they would not share.
  EXPECT_EQ(PlaceRankOnGpu(1, 2, 2, 22809, nullptr, {"0000:11:00.0", "0000:11:00.0"}).device, -1);
  EXPECT_EQ(PlaceRankOnGpu(1, 2, 2, 22809, nullptr).device, 1);
}

// NCCL takes NCCL_MULTI_RANK_GPU_ENABLE from its configuration files too (the environment first, then the user's
// file, then /etc/nccl.conf): OpenNccl reads it the same way, or it would refuse a node NCCL accepts.
TEST(NcclPlacementTest, TheParameterComesFromTheEnvironmentThenTheConfigurationFiles) {
  // Files of this process's own: every rank of the suite runs this case at once.
  const std::string dir = ::testing::TempDir() + "/zero_nccl_conf_" + std::to_string(getpid());
  ASSERT_EQ(mkdir(dir.c_str(), 0700), 0) << dir;
  const std::string user = dir + "/user.conf", system = dir + "/system.conf";
  std::ofstream(user) << "# a comment\nNCCL_DEBUG=WARN\n  ZERO_TEST_NCCL_SPACED = 1\n";
  std::ofstream(system) << "NCCL_MULTI_RANK_GPU_ENABLE=0\nNCCL_SOCKET_IFNAME=eth0\n";
  const char* name = "ZERO_TEST_NCCL_PARAM";
  unsetenv(name);
  // Only in the files: the first file that sets it wins, and the value is kept as written (NCCL parses it later).
  std::ofstream(user, std::ios::app) << "ZERO_TEST_NCCL_PARAM= 0x1\n";
  std::ofstream(system, std::ios::app) << "ZERO_TEST_NCCL_PARAM=0\n";
  EXPECT_EQ(internal::NcclParamValue(name, {user, system}).value_or("unset"), " 0x1");
  EXPECT_EQ(internal::NcclParamValue(name, {system, user}).value_or("unset"), "0");
  EXPECT_EQ(internal::NcclParamValue(name, {dir + "/missing.conf", system}).value_or("unset"), "0");
  EXPECT_FALSE(internal::NcclParamValue(name, {dir + "/missing.conf"}).has_value());
  // Spaces around the name are ignored. (Names of this test's own: the GPU run sets NCCL_MULTI_RANK_GPU_ENABLE in
  // the environment, which wins over any file.)
  unsetenv("ZERO_TEST_NCCL_SPACED");
  EXPECT_EQ(internal::NcclParamValue("ZERO_TEST_NCCL_SPACED", {user}).value_or("unset"), " 1");
  // The environment wins over every file.
  setenv(name, "2", 1);
  EXPECT_EQ(internal::NcclParamValue(name, {user, system}).value_or("unset"), "2");
  unsetenv(name);
  // What placement makes of a value read from a file: " 0x1" lets ranks share on NCCL 2.30.
  EXPECT_EQ(internal::PlaceRankOnGpu(1, 2, 1, 23007, " 0x1").device, 0);
  // The list: $NCCL_CONF_FILE replaces the user's ~/.nccl.conf; /etc/nccl.conf always comes last.
  const char* conf = std::getenv("NCCL_CONF_FILE");  // restored below: later cases open real communicators
  const std::string saved_conf = conf == nullptr ? "" : conf;
  setenv("NCCL_CONF_FILE", user.c_str(), 1);
  EXPECT_EQ(internal::NcclConfFiles(), (std::vector<std::string>{user, "/etc/nccl.conf"}));
  unsetenv("NCCL_CONF_FILE");
  const std::vector<std::string> files = internal::NcclConfFiles();
  ASSERT_EQ(files.size(), 2u);
  EXPECT_NE(files[0].find("/.nccl.conf"), std::string::npos) << files[0];
  if (conf != nullptr) setenv("NCCL_CONF_FILE", saved_conf.c_str(), 1);
  std::remove(user.c_str());
  std::remove(system.c_str());
  rmdir(dir.c_str());
}

TEST(NcclCommTest, OpensOnEveryRankOrFailsOnEveryRankSayingWhy) {
  Status s;
  auto comm = OpenNcclWorld(&s);
  int opened = s.ok() ? 1 : 0, all = 0, any = 0;
  MPI_Allreduce(&opened, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&opened, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_EQ(all, any) << "ranks disagree on whether NCCL opened";
  if (!s.ok()) {
    if (WorldRank() == 0) std::printf("[ no device ] %s\n", s.ToString().c_str());
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    EXPECT_NE(s.message().find("OpenMpi"), std::string::npos) << s.ToString();
    EXPECT_EQ(comm, nullptr);
  } else {
    EXPECT_EQ(comm->world_size(), WorldSize());
    EXPECT_EQ(comm->rank(), WorldRank());
  }
  // MPI is still usable afterwards.
  auto mpi = WorldComm();
  double x = 1.0;
  ASSERT_TRUE(mpi->AllReduce(&x, &x, 1, DType::kF64, ReduceOp::kSum).ok());
  EXPECT_EQ(x, WorldSize());
}

// OpenNccl under any launch: the outcome this case predicts from the GPUs' PCI bus ids (each rank's candidate,
// local rank % its visible devices, gathered over the node) is the one OpenNccl reaches. Ranks on GPUs of their own
// open, each on its candidate; ranks on one GPU without NCCL_MULTI_RANK_GPU_ENABLE are refused naming that GPU. The
// emulated build runs it under per-rank visible devices too (ctest nccl_comm_test.visible_*: the stand-in's
// ZERO_FAKE_CUDA_VISIBLE_DEVICES, like a launcher's per-rank CUDA_VISIBLE_DEVICES); on the H200 at 2 ranks without
// the variable it expects the refusal, and without a GPU the "no device" one.
TEST(NcclCommTest, OpensExactlyWhenTheNodesRanksHaveGpusOfTheirOwn) {
  MPI_Comm local = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, WorldRank(), MPI_INFO_NULL, &local);
  int local_rank = 0, local_ranks = 1;
  MPI_Comm_rank(local, &local_rank);
  MPI_Comm_size(local, &local_ranks);
  int devices = 0;
  char id[32] = {};
#if defined(ZERO_WITH_CUDA)
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    devices = 0;
    (void)cudaGetLastError();
  }
  if (devices > 0) {
    EXPECT_EQ(cudaDeviceGetPCIBusId(id, sizeof(id), local_rank % devices), cudaSuccess);
  }
#endif
  std::vector<char> ids(static_cast<size_t>(local_ranks) * sizeof(id));
  MPI_Allgather(id, sizeof(id), MPI_CHAR, ids.data(), sizeof(id), MPI_CHAR, local);
  MPI_Comm_free(&local);
  std::vector<std::string> node;
  for (int r = 0; r < local_ranks; ++r) {
    const char* p = ids.data() + static_cast<size_t>(r) * sizeof(id);
    if (p[0] != '\0') node.emplace_back(p);
  }
  int have = node.size() == static_cast<size_t>(local_ranks) ? 1 : 0, all_have = 0;
  MPI_Allreduce(&have, &all_have, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  const int most = all_have ? internal::BusiestGpu(node).second : 0;
  const bool sharing_asked = std::getenv("NCCL_MULTI_RANK_GPU_ENABLE") != nullptr;

  Status s;
  auto comm = OpenNcclWorld(&s);
  if (!all_have) {
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << "a rank without a GPU: " << s.ToString();
  } else if (most == 1) {
    ASSERT_TRUE(s.ok()) << "every rank of the node has a GPU of its own (bus ids), yet: " << s.ToString();
    EXPECT_EQ(comm->cuda_device(), local_rank % devices);
  } else if (!sharing_asked) {
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    EXPECT_NE(s.message().find(std::to_string(most) + " of this node's " + std::to_string(local_ranks) +
                               " ranks would run on GPU"),
              std::string::npos)
        << s.ToString();
  }
  if (WorldRank() == 0) {
    std::printf("[ placement ] %d local rank(s), %d visible device(s) each on rank 0, at most %d on one GPU: %s\n",
                local_ranks, devices, most, s.ok() ? "opened" : s.message().c_str());
  }
}

// For trainers without mpi.h (the libtorch example): NCCL bootstrapped over a zero Comm's MPI communicator opens
// exactly when the handle form does, and then reduces on device memory; a Comm without one is refused, saying
// which Comms have one.
TEST(NcclCommTest, OpensOverTheCommunicatorOfAnMpiComm) {
  auto mpi = WorldComm();
  ASSERT_NE(mpi, nullptr);
  CommOptions options;
  options.timeout = std::chrono::milliseconds(20'000);
  std::unique_ptr<Comm> comm;
  const Status s = Comm::OpenNccl(*mpi, options, &comm);
  Status direct_status;
  auto direct = OpenNcclWorld(&direct_status);
  EXPECT_EQ(s.ok(), direct_status.ok()) << s.ToString() << " / " << direct_status.ToString();
  if (!s.ok()) {
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    EXPECT_EQ(comm, nullptr);
  } else {
    EXPECT_EQ(comm->rank(), mpi->rank());
    EXPECT_EQ(comm->world_size(), mpi->world_size());
#if defined(ZERO_WITH_CUDA)
    float* dev = nullptr;
    ASSERT_EQ(cudaMalloc(&dev, sizeof(float)), cudaSuccess);
    const float mine = static_cast<float>(comm->rank() + 1);
    ASSERT_EQ(cudaMemcpy(dev, &mine, sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // a pageable copy may land after it returns
    ASSERT_TRUE(comm->AllReduce(dev, dev, 1, DType::kF32, ReduceOp::kSum).ok());
    float sum = 0.0f;
    ASSERT_EQ(cudaMemcpy(&sum, dev, sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    const int n = comm->world_size();
    EXPECT_EQ(sum, static_cast<float>(n * (n + 1) / 2));
    cudaFree(dev);
#endif
  }
  const auto single = Comm::Single();
  std::unique_ptr<Comm> refused;
  const Status bad = Comm::OpenNccl(*single, options, &refused);
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument) << bad.ToString();
  EXPECT_NE(bad.message().find("Comm::OpenMpi"), std::string::npos) << bad.ToString();
  EXPECT_EQ(refused, nullptr);
}

// Two NCCL settings override the communicators' configuration and would break NcclComm's promises: blocking
// communicators (an init, split or finalize that waits for a dead peer with no timeout) and Duplicates sharing their
// parent's abort flag (an engine's timeout abort would silently end the trainer's collectives). Every rank refuses,
// naming the variable, before NCCL reads it.
TEST(NcclCommTest, SettingsThatDefeatTheTimeoutsAreRefusedByName) {
  for (const char* name : {"NCCL_COMM_BLOCKING", "NCCL_COMM_SPLIT_SHARE_RESOURCES"}) {
    const char* before = std::getenv(name);
    const std::string saved = before == nullptr ? "" : before;
    setenv(name, "1", 1);
    Status s;
    auto comm = OpenNcclWorld(&s);
    if (before != nullptr) {
      setenv(name, saved.c_str(), 1);
    } else {
      unsetenv(name);
    }
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    EXPECT_EQ(comm, nullptr);
    int devices = 0;
#if defined(ZERO_WITH_CUDA)
    if (cudaGetDeviceCount(&devices) != cudaSuccess) (void)cudaGetLastError();
#endif
    // Without a GPU the missing device is the news; with one, the setting.
    if (devices > 0) {
      EXPECT_NE(s.message().find(name), std::string::npos) << s.ToString();
    }
  }
  // (The next cases open again with the variables restored.)
}

#if defined(ZERO_FAKE_CUDA_RUNTIME)
// NCCL's init is collective. A rank whose device setup fails (here the last one: its stand-in device is full, so
// the scratch word's cudaMalloc fails) must not leave the others in the init's bootstrap: every rank returns
// Unavailable at once, the failing one naming its CUDA error. Before, the others waited out the whole timeout.
TEST(NcclCommTest, ADeviceSetupFailureOnOneRankFailsEveryRankAtOnce) {
  const int r = WorldRank(), n = WorldSize();
  if (r == n - 1) fake_cuda::SetCapacity(fake_cuda::LiveBytes());
  const auto start = std::chrono::steady_clock::now();
  Status s;
  auto comm = OpenNcclWorld(&s, std::chrono::milliseconds(20'000));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (r == n - 1) fake_cuda::SetCapacity(int64_t{16} << 30);  // the stand-in's default
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_EQ(comm, nullptr);
  // Far below the 20 s timeout (MPI start-up and a few agreements; 2 cores shared by 4 ranks).
  EXPECT_LT(secs, 10.0) << s.ToString();
  EXPECT_NE(s.message().find(r == n - 1 ? "CUDA device" : "another rank"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("Comm::OpenMpi"), std::string::npos) << s.ToString();
  // Nothing is left behind: the next open works on every rank.
  auto again = OpenNcclWorld(&s);
  EXPECT_TRUE(s.ok()) << s.ToString();
}
#endif

TEST(NcclCommTest, CollectivesOnDeviceMemory) {
  Status s;
  auto comm = OpenNcclWorld(&s);
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  const int n = comm->world_size(), r = comm->rank();
  const int64_t count = 1000;
  std::vector<float> host(static_cast<size_t>(count * n));
  for (int64_t i = 0; i < count * n; ++i) host[static_cast<size_t>(i)] = static_cast<float>(r + 1) * (i % 7);
  float* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, host.size() * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dev, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  // A copy from pageable memory may return before its device write (the runtime's synchronization notes); the
  // collective runs on a non-blocking stream, not ordered after it.
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_TRUE(comm->ReduceScatter(dev, dev + r * count, count, DType::kF32).ok());  // in place
  std::vector<float> out(static_cast<size_t>(count));
  ASSERT_EQ(cudaMemcpy(out.data(), dev + r * count, count * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  const float ranks_sum = static_cast<float>(n * (n + 1) / 2);
  for (int64_t i = 0; i < count; ++i) ASSERT_EQ(out[i], ranks_sum * ((r * count + i) % 7)) << i;
  ASSERT_TRUE(comm->AllGather(dev + r * count, dev, count, DType::kF32).ok());
  ASSERT_EQ(cudaMemcpy(host.data(), dev, host.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t i = 0; i < count * n; ++i) ASSERT_EQ(host[i], ranks_sum * (i % 7)) << i;
  EXPECT_EQ(comm->counters().reduce_scatter, count * n);
  EXPECT_EQ(comm->counters().all_gather, count * n);
  ASSERT_TRUE(comm->Barrier().ok());
  cudaFree(dev);
#endif
}

#if defined(ZERO_WITH_CUDA)
// Device memory of `n` floats filled from `host`, freed at scope exit.
class DeviceFloats {
 public:
  explicit DeviceFloats(const std::vector<float>& host) : n_(host.size()) {
    EXPECT_EQ(cudaMalloc(&p_, n_ * sizeof(float)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p_, host.data(), n_ * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    // Landed before any collective on a non-blocking stream reads it: a copy from pageable memory may return
    // before its device write, which the legacy stream does not order with such streams.
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  ~DeviceFloats() { cudaFree(p_); }
  DeviceFloats(const DeviceFloats&) = delete;
  DeviceFloats& operator=(const DeviceFloats&) = delete;
  float* get() const { return p_; }
  std::vector<float> Host() const {
    std::vector<float> out(n_);
    EXPECT_EQ(cudaMemcpy(out.data(), p_, n_ * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

 private:
  size_t n_;
  float* p_ = nullptr;
};
#endif

// The engine's way of using NcclComm: collectives on its own (non-blocking) stream, issued back to back without
// waiting, events recorded right after each. With two or more ranks NCCL answers each call with ncclInProgress
// and enqueues it from a helper thread; before NcclComm waited for that, the second call failed with "invalid
// argument" (the communicator was still busy) or the events fired before the collective ran.
TEST(NcclCommTest, AsynchronousCollectivesBackToBackOnTheCallersStream) {
  Status s;
  auto comm = OpenNcclWorld(&s);
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  const int n = comm->world_size(), r = comm->rank();
  const int64_t count = 4099;  // not a multiple of anything NCCL chunks by
  std::vector<float> host(static_cast<size_t>(count * n));
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>((r + 1) * static_cast<int>(i % 5));
  DeviceFloats a(host), b(host), c(std::vector<float>(static_cast<size_t>(count * n), 0.0f));
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  CollectiveOptions co;
  co.stream = stream;
  co.what = "async test";
  // Reduce-scatter in place, all-gather it back, a grouped all-gather of two items, an all-reduce: each one reads
  // what the one before wrote, so a collective that ran out of order shows in the values.
  ASSERT_TRUE(comm->ReduceScatter(a.get(), a.get() + r * count, count, DType::kF32, co).ok());
  ASSERT_TRUE(comm->AllGather(a.get() + r * count, a.get(), count, DType::kF32, co).ok());
  const Comm::GatherItem items[] = {{a.get() + r * count, c.get(), count / 2},
                                    {b.get() + r * count, b.get(), count}};
  ASSERT_TRUE(comm->AllGatherMany(items, DType::kF32, co).ok());
  ASSERT_TRUE(comm->AllReduce(c.get(), c.get(), count * n, DType::kF32, ReduceOp::kSum, co).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_TRUE(comm->health().ok()) << comm->health().ToString();
  const float ranks_sum = static_cast<float>(n * (n + 1) / 2);
  const std::vector<float> got_a = a.Host(), got_b = b.Host(), got_c = c.Host();
  // Small integers times small integers: every sum is exact in fp32.
  for (int64_t i = 0; i < count * n; ++i) ASSERT_EQ(got_a[i], ranks_sum * (i % 5)) << "a " << i;
  for (int q = 0; q < n; ++q) {
    for (int64_t i = 0; i < count; ++i) {
      // b's block q is rank q's own slice q of its input: (q + 1) * ((q * count + i) % 5).
      ASSERT_EQ(got_b[q * count + i], static_cast<float>((q + 1) * ((q * count + i) % 5))) << "b " << q << " " << i;
    }
  }
  for (int q = 0; q < n; ++q) {
    for (int64_t i = 0; i < count / 2; ++i) {
      // c's first items are every rank's first half of its reduced slice, summed n times by the all-reduce.
      ASSERT_EQ(got_c[q * (count / 2) + i], n * ranks_sum * ((q * count + i) % 5)) << "c " << q << " " << i;
    }
  }
  EXPECT_EQ(comm->counters().all_gather, count * n + (count / 2 + count) * n);
  cudaStreamDestroy(stream);
#endif
}

// Engine::Open runs the engine on a Duplicate() of the trainer's Comm (an ncclCommSplit). Both must be usable at
// once, right after the split: NCCL reports the split's progress in the parent's state, and a parent used before
// that state settles fails with "invalid argument".
TEST(NcclCommTest, DuplicateAndParentBothWorkRightAfterTheSplit) {
  Status s;
  auto comm = OpenNcclWorld(&s);
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  std::unique_ptr<Comm> dup;
  ASSERT_TRUE(comm->Duplicate(&dup).ok());
  ASSERT_NE(dup, nullptr);
  EXPECT_EQ(dup->rank(), comm->rank());
  EXPECT_EQ(dup->world_size(), comm->world_size());
  const int n = comm->world_size();
  DeviceFloats x(std::vector<float>(64, 1.0f)), y(std::vector<float>(64, 2.0f));
  ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 64, DType::kF32, ReduceOp::kSum).ok());
  ASSERT_TRUE(dup->AllReduce(y.get(), y.get(), 64, DType::kF32, ReduceOp::kSum).ok());
  ASSERT_TRUE(comm->Barrier().ok());
  EXPECT_EQ(x.Host()[63], static_cast<float>(n));
  EXPECT_EQ(y.Host()[63], 2.0f * n);
  EXPECT_EQ(dup->counters().all_reduce, 64);
  dup.reset();  // before its parent (comm.h)
  ASSERT_TRUE(comm->Barrier().ok());
#endif
}

// AllToAll is a group of ncclSend/ncclRecv to and from every rank, itself included; Split is an ncclCommSplit
// settled on the parent. Element i of the block rank r sends to rank p is 100 r + 10 p + i, so each received block
// says who sent it and for whom; the split by parity (keys reversed) sums its members' ranks.
TEST(NcclCommTest, AllToAllAndSplitOnDeviceMemory) {
  Status s;
  auto comm = OpenNcclWorld(&s);
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  const int n = comm->world_size(), r = comm->rank();
  const int64_t count = 3;
  std::vector<float> send(static_cast<size_t>(n * count));
  for (int p = 0; p < n; ++p) {
    for (int64_t i = 0; i < count; ++i) send[p * count + i] = static_cast<float>(100 * r + 10 * p + i);
  }
  DeviceFloats a(send), b(std::vector<float>(send.size(), -1.0f));
  ASSERT_TRUE(comm->AllToAll(a.get(), b.get(), count, DType::kF32).ok());
  const std::vector<float> got = b.Host();
  for (int p = 0; p < n; ++p) {
    for (int64_t i = 0; i < count; ++i) {
      EXPECT_EQ(got[p * count + i], static_cast<float>(100 * p + 10 * r + i)) << "block " << p << " element " << i;
    }
  }
  EXPECT_EQ(comm->counters().all_to_all, count * n);
  std::unique_ptr<Comm> half;
  ASSERT_TRUE(comm->Split(r % 2, n - r, &half).ok());
  const int members = (n - r % 2 + 1) / 2;  // the ranks of this parity
  EXPECT_EQ(half->world_size(), members);
  EXPECT_EQ(half->rank(), members - 1 - r / 2);  // the highest key last
  DeviceFloats x(std::vector<float>{static_cast<float>(r)});
  ASSERT_TRUE(half->AllReduce(x.get(), x.get(), 1, DType::kF32, ReduceOp::kSum).ok());
  int expected = 0;
  for (int q = r % 2; q < n; q += 2) expected += q;
  EXPECT_EQ(x.Host()[0], static_cast<float>(expected));
  half.reset();  // before its parent (comm.h)
  ASSERT_TRUE(comm->Barrier().ok());
#endif
}

// health() may be called from any thread (comm.h). A thread polling it while this one issues collectives, waited and
// asynchronous, sees OK throughout (during a call it reads the status the calls left instead of polling NCCL
// under the caller's feet), and the collectives give the right values; an Abort on the issuing thread then shows
// on the other thread.
TEST(NcclCommTest, HealthFromAnotherThreadDuringCollectives) {
  Status s;
  auto comm = OpenNcclWorld(&s);
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  std::atomic<bool> stop{false};
  std::atomic<int> polls{0}, bad{0};
  std::thread watcher([&] {
    while (!stop.load()) {
      if (!comm->health().ok()) bad.fetch_add(1);
      polls.fetch_add(1);
    }
  });
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  DeviceFloats x(std::vector<float>(4096, 1.0f)), y(std::vector<float>(4096, 2.0f));
  CollectiveOptions async;
  async.stream = stream;
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 4096, DType::kF32, ReduceOp::kMax).ok());
    ASSERT_TRUE(comm->AllReduce(y.get(), y.get(), 4096, DType::kF32, ReduceOp::kMax, async).ok());
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_TRUE(comm->Barrier().ok());
  while (polls.load() < 10) std::this_thread::yield();
  EXPECT_EQ(bad.load(), 0) << "health() on the other thread reported a broken Comm";
  EXPECT_EQ(x.Host()[4095], 1.0f);
  EXPECT_EQ(y.Host()[4095], 2.0f);
  EXPECT_EQ(comm->counters().all_reduce, 2 * 100 * 4096);
  // Every rank aborts its own Comm (so no peer waits for it), and the watcher sees it.
  comm->Abort(Status::Internal("test: done"));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  const int before = bad.load();
  while (bad.load() == before && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  stop = true;
  watcher.join();
  EXPECT_GT(bad.load(), before) << "the other thread never saw the abort";
  EXPECT_EQ(comm->health().code(), StatusCode::kAborted) << comm->health().ToString();
  cudaStreamDestroy(stream);
#endif
}

// Destroying a communicator whose collective is stuck on a stalled peer (nobody asked for its status yet) is
// bounded: NCCL's finalize waits for every collective issued on it, so NcclComm's destructor polls the finalize
// against the timeout and then aborts, which also takes the stuck collective off the caller's stream. The stalled
// (last) rank destroys its own idle communicator normally.
// (Named apart from *StalledPeer*: gpu_run.sh's killed-rank step selects the next case by that filter.)
TEST(NcclCommPeerTest, DestroyingWithACollectiveStuckInFlightIsBounded) {
  constexpr auto kTimeout = std::chrono::milliseconds(1'000);
  Status s;
  auto comm = OpenNcclWorld(&s, kTimeout * 3);  // the init of four ranks time-sharing two cores or one GPU
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  const int n = comm->world_size(), r = comm->rank();
  DeviceFloats x(std::vector<float>(512, 1.0f));
  // Connected first: NCCL connects at a communicator's first collective, with its peers.
  ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 512, DType::kF32, ReduceOp::kSum).ok());
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const bool stalled = n > 1 && r == n - 1;
  if (!stalled) {
    CollectiveOptions co;
    co.stream = stream;
    co.what = "the collective left in flight";
    ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 512, DType::kF32, ReduceOp::kSum, co).ok());
  }
  const auto start = std::chrono::steady_clock::now();
  comm.reset();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // The finalize's timeout plus the abort (a hang fails the suite's own time limit instead).
  EXPECT_LT(secs, 10.0);
  // Nothing of NCCL's is left on the stream (polled, so that a kernel that spins on fails instead of hanging).
  cudaError_t q = cudaStreamQuery(stream);
  for (int i = 0; q == cudaErrorNotReady && i < 2000; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    q = cudaStreamQuery(stream);
  }
  EXPECT_EQ(q, cudaSuccess) << "the stuck collective is still on the stream after 10 s";
  cudaStreamDestroy(stream);
  MPI_Barrier(MPI_COMM_WORLD);
#endif
}

// A communicator's teardown waits for its own work only: destroying a Duplicate while the parent's collective is
// stuck on a stalled peer returns without waiting for that peer. (NcclComm freed its buffers with cudaFree, which
// waits for the whole device: the teardown then waited for the peer, with no timeout.) The stalled (last) rank joins
// the parent's collective once every other rank has said its Duplicate is gone, or after 10 s: then the case fails
// on every rank instead of hanging.
TEST(NcclCommPeerTest, DestroyingADuplicateDoesNotWaitForTheParentsStuckCollective) {
  Status s;
  auto comm = OpenNcclWorld(&s);
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  const int n = comm->world_size(), r = comm->rank(), last = n - 1;
  std::unique_ptr<Comm> dup;
  ASSERT_TRUE(comm->Duplicate(&dup).ok());
  DeviceFloats x(std::vector<float>(256, 1.0f)), y(std::vector<float>(256, 1.0f));
  // Both connected first (NCCL connects at a communicator's first collective, with its peers).
  ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 256, DType::kF32, ReduceOp::kSum).ok());
  ASSERT_TRUE(dup->AllReduce(y.get(), y.get(), 256, DType::kF32, ReduceOp::kSum).ok());
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  constexpr int kTag = 7321;
  int notices_first = 1;  // the last rank's finding: every other rank's Duplicate was gone before it joined
  if (r != last) {
    CollectiveOptions co;
    co.stream = stream;
    co.what = "the parent's collective";
    ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 256, DType::kF32, ReduceOp::kSum, co).ok());  // waits for `last`
    dup.reset();
    const int gone = 1;
    MPI_Send(&gone, 1, MPI_INT, last, kTag, MPI_COMM_WORLD);
  } else {
    dup.reset();
    int got = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (got < n - 1 && std::chrono::steady_clock::now() < deadline) {
      int flag = 0;
      MPI_Iprobe(MPI_ANY_SOURCE, kTag, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
      if (flag) {
        int gone = 0;
        MPI_Recv(&gone, 1, MPI_INT, MPI_ANY_SOURCE, kTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        ++got;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    notices_first = got == n - 1 ? 1 : 0;
    ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 256, DType::kF32, ReduceOp::kSum).ok());  // the others' finish too
    for (; got < n - 1; ++got) {  // late notices (the failing case)
      int gone = 0;
      MPI_Recv(&gone, 1, MPI_INT, MPI_ANY_SOURCE, kTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);  // complete on every rank now
  MPI_Bcast(&notices_first, 1, MPI_INT, last, MPI_COMM_WORLD);
  EXPECT_EQ(notices_first, 1) << "destroying the Duplicate waited for the parent's collective stuck on rank " << last;
  EXPECT_EQ(x.Host()[255], static_cast<float>(n * n));  // the warm-up's n, summed over n ranks
  cudaStreamDestroy(stream);
#endif
}

// A peer that stops issuing collectives: every other rank gets a Timeout naming the collective within about the
// communication timeout (through the watchdog for a collective in flight on the caller's stream, through the wait
// for a waited one), NCCL's communicator is aborted (no kernel spins on), and MPI stays usable. The stalled rank
// itself fails afterwards instead of hanging: its peers are gone. With ZERO_NCCL_TEST_VICTIM=kill the last rank
// dies instead (SIGKILL); that needs mpiexec --enable-recovery, and the survivors then report on stdout
// ("[ killed peer ] ...") and leave with _exit, as a job with a dead rank cannot finalize MPI.
TEST(NcclCommPeerTest, StalledPeerEndsInTimeoutOnTheOthers) {
  // Bounds the warm-up (with NCCL's connection setup) too, four ranks time-sharing one GPU included.
  constexpr auto kTimeout = std::chrono::milliseconds(3'000);
  Status s;
  auto comm = OpenNcclWorld(&s, kTimeout);
  // An init that did not finish within kTimeout is this case's own doing, not a missing GPU: it fails, saying so.
  ASSERT_EQ(s.message().find("timed out"), std::string::npos)
      << "NCCL's init needed more than this case's " << kTimeout.count() << " ms (raise kTimeout): " << s.ToString();
  if (!s.ok()) GTEST_SKIP() << "no GPU: " << s.message();
#if defined(ZERO_WITH_CUDA)
  const char* victim_env = std::getenv("ZERO_NCCL_TEST_VICTIM");
  const bool kill = victim_env != nullptr && std::strcmp(victim_env, "kill") == 0;
  const int n = comm->world_size(), r = comm->rank(), victim = n - 1;
  DeviceFloats x(std::vector<float>(1024, 1.0f));
  // Connect first (NCCL connects lazily, at a communicator's first collective of each kind), so that the stall
  // hits a collective in flight rather than the connection setup.
  ASSERT_TRUE(comm->AllReduce(x.get(), x.get(), 1024, DType::kF32, ReduceOp::kSum).ok());
  const auto start = std::chrono::steady_clock::now();
  if (r == victim) {
    if (kill) raise(SIGKILL);
    std::this_thread::sleep_for(kTimeout * 3 / 2);
    // Its peers aborted: this collective can never complete. It must fail within its own timeout.
    const Status late = comm->AllReduce(x.get(), x.get(), 1024, DType::kF32, ReduceOp::kSum);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_FALSE(late.ok());
    EXPECT_LT(secs, 10.0) << late.ToString();
    std::printf("[ stalled  ] rank %d: %s after %.1f s\n", r, late.ToString().c_str(), secs);
  } else {
    Status got;
    if (r % 2 == 0) {
      // In flight on the caller's stream; the watchdog is a staged control call's wait (ranks 0, 4, ...) or
      // health() (ranks 2, 6, ...).
      cudaStream_t stream = nullptr;
      ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
      CollectiveOptions co;
      co.stream = stream;
      co.what = "bucket 7 of the stall test";
      got = comm->AllReduce(x.get(), x.get(), 1024, DType::kF32, ReduceOp::kSum, co);
      if (got.ok() && r % 4 == 0) {
        // A control collective on host memory ordered after the caller's stream (CollectiveOptions::stream): it
        // waits for that stream on the host with the watchdog running, so it ends in the Timeout naming the stalled
        // collective. Its pageable copy used to be issued behind a GPU-side wait for that stream, where the
        // runtime may block the host with no timeout.
        CollectiveOptions control;
        control.stream = stream;
        control.control = true;
        control.what = "agreement after the stall";
        double flag = 1.0;
        got = comm->AllReduce(&flag, &flag, 1, DType::kF64, ReduceOp::kSum, control);
      }
      while (got.ok() && std::chrono::steady_clock::now() - start < kTimeout * 5) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        got = comm->health();
      }
      // Aborted: NCCL's kernel leaves the stream (polled, so that a kernel that spins on fails this test instead
      // of hanging it).
      cudaError_t q = cudaStreamQuery(stream);
      for (int i = 0; q == cudaErrorNotReady && i < 2000; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        q = cudaStreamQuery(stream);
      }
      EXPECT_EQ(q, cudaSuccess) << "the aborted collective is still on the stream after 10 s";
      cudaStreamDestroy(stream);
      if (got.ok()) got = Status::Internal("the watchdog never fired");
      EXPECT_NE(got.message().find("bucket 7 of the stall test"), std::string::npos) << got.ToString();
    } else {
      got = comm->AllReduce(x.get(), x.get(), 1024, DType::kF32, ReduceOp::kSum);  // waited for
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(got.code(), StatusCode::kTimeout) << got.ToString();
    EXPECT_NE(got.message().find("aborted"), std::string::npos) << got.ToString();
    // The timeout plus polling and abort; well under the 5x limit of the loop above.
    EXPECT_LT(secs, 2.0 * kTimeout.count() / 1000.0) << got.ToString();
    // Every later call returns the status that broke the Comm.
    EXPECT_EQ(comm->Barrier().code(), StatusCode::kTimeout);
    if (kill) {
      std::printf("[ killed peer ] rank %d: %s after %.1f s: %s\n", r, StatusCodeName(got.code()), secs,
                  got.message().c_str());
      std::fflush(nullptr);
      _exit(::testing::Test::HasFailure() ? 1 : 0);
    }
  }
  comm.reset();
  // MPI is still usable.
  int one = 1, sum = 0;
  ASSERT_EQ(MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD), MPI_SUCCESS);
  EXPECT_EQ(sum, n);
#endif
}

}  // namespace
}  // namespace zero::testing

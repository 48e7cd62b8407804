// NcclComm. Here (no GPU) every rank must get Unavailable with the reason, without a hang, and MPI must stay
// usable. On a machine with GPUs the collectives run on device memory and are checked like MpiComm's.
#include <cstdio>
#include <vector>

#include <gtest/gtest.h>

#include "testing/mpi_env.h"
#include "zero/comm.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace zero::testing {
namespace {

std::unique_ptr<Comm> OpenNcclWorld(Status* status) {
  CommOptions options;
  options.timeout = std::chrono::milliseconds(20'000);
  std::unique_ptr<Comm> comm;
  *status = Comm::OpenNccl(MPI_Comm_c2f(MPI_COMM_WORLD), options, &comm);
  return comm;
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

}  // namespace
}  // namespace zero::testing

// zero_bench_collectives: reduce-scatter, all-gather and all-reduce through zero::Comm against the same
// collective issued raw, interleaved in one process under mpiexec: Comm over MPI (MpiComm) against raw MPI
// (MPI_Reduce_scatter_block, MPI_Allgather, MPI_Allreduce) on host buffers, and, in a CUDA build on a machine with
// GPUs, NcclComm against raw NCCL on device buffers. Without a GPU the NCCL half is skipped, saying why.
//
// Columns as nccl-tests reports them: `bytes` is the whole collective (world × count × 4 for reduce-scatter and
// all-gather, count × 4 for all-reduce; fp32 elements, out of place), algbw = bytes / time, busbw = algbw × (n−1)/n
// (reduce-scatter, all-gather) or × 2(n−1)/n (all-reduce). Every iteration times Comm and raw in turn (the order
// alternates), each the slowest rank's time; vs_raw is the median of the paired per-iteration ratios
// t(raw) / t(Comm) = busbw(Comm) / busbw(raw), so a noisy machine cannot fake it. #wrong counts elements that
// differ from the exact expected result after a run with crafted inputs (small integers: sums are exact in fp32),
// over all ranks, for Comm (`wrong`) and raw (`raw_wrong`).
//
// No pass/fail bound on the CPU: Open MPI's own reduce-scatter is a different algorithm from MpiComm's ring
// (DESIGN.md). On GPUs, NcclComm must be within 5% of raw NCCL at >= 64 MiB: `within_5pct` says whether it is.
//
// Flags (besides Google Benchmark's): --min_bytes=8 --max_bytes=268435456 (powers of 4 in between, and max),
// --budget_bytes=268435456 (iterations per size: budget / bytes, clamped to [--min_iterations=5, 50]).
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_mpi.h"
#include "zero/zero.h"

#if defined(ZERO_WITH_CUDA)
#include <cuda_runtime.h>
#include <nccl.h>
#endif

namespace zero::bench {
namespace {

enum class Op { kReduceScatter, kAllGather, kAllReduce };
const char* OpName(Op op) {
  return op == Op::kReduceScatter ? "reduce_scatter" : op == Op::kAllGather ? "all_gather" : "all_reduce";
}
// nccl-tests' bus bandwidth factors.
double BusFactor(Op op, int n) {
  return (op == Op::kAllReduce ? 2.0 : 1.0) * static_cast<double>(n - 1) / static_cast<double>(n);
}

// One pair of implementations: a zero::Comm and the raw library it wraps, over the same buffers.
class Pair {
 public:
  virtual ~Pair() = default;
  virtual const char* name() const = 0;
  virtual Status RunComm(Op op, int64_t count) = 0;
  virtual Status RunRaw(Op op, int64_t count) = 0;
  // Crafted inputs into the send buffer (host values; the pair copies them where they live) and the output back.
  virtual void Upload(const std::vector<float>& send) = 0;
  virtual void Download(std::vector<float>* recv, int64_t count) = 0;
};

class MpiPair : public Pair {
 public:
  MpiPair(Comm* comm, int64_t max_elements) : comm_(comm), send_(max_elements), recv_(max_elements) {
    MPI_Comm_dup(MPI_COMM_WORLD, &raw_);
  }
  ~MpiPair() override { MPI_Comm_free(&raw_); }
  const char* name() const override { return "mpi"; }
  Status RunComm(Op op, int64_t count) override {
    switch (op) {
      case Op::kReduceScatter: return comm_->ReduceScatter(send_.data(), recv_.data(), count, DType::kF32);
      case Op::kAllGather: return comm_->AllGather(send_.data(), recv_.data(), count, DType::kF32);
      case Op::kAllReduce: return comm_->AllReduce(send_.data(), recv_.data(), count, DType::kF32, ReduceOp::kSum);
    }
    return Status::InvalidArgument("op");
  }
  Status RunRaw(Op op, int64_t count) override {
    const int c = static_cast<int>(count);  // the sizes here stay below 2^31 elements
    int rc = MPI_SUCCESS;
    switch (op) {
      case Op::kReduceScatter:
        rc = MPI_Reduce_scatter_block(send_.data(), recv_.data(), c, MPI_FLOAT, MPI_SUM, raw_);
        break;
      case Op::kAllGather: rc = MPI_Allgather(send_.data(), c, MPI_FLOAT, recv_.data(), c, MPI_FLOAT, raw_); break;
      case Op::kAllReduce: rc = MPI_Allreduce(send_.data(), recv_.data(), c, MPI_FLOAT, MPI_SUM, raw_); break;
    }
    return rc == MPI_SUCCESS ? Status::Ok() : Status::Aborted("raw MPI collective failed");
  }
  void Upload(const std::vector<float>& send) override { std::memcpy(send_.data(), send.data(), send.size() * 4); }
  void Download(std::vector<float>* recv, int64_t count) override {
    recv->assign(recv_.begin(), recv_.begin() + count);
  }

 private:
  Comm* comm_;
  std::vector<float> send_, recv_;
  MPI_Comm raw_;
};

#if defined(ZERO_WITH_CUDA)
// NcclComm (Comm::OpenNccl) against a raw NCCL communicator on the same device and buffers. Raw calls go on
// their own stream and are waited for with cudaStreamSynchronize; NcclComm calls without a stream return when
// the collective has completed (comm_nccl.cc), so both times cover launch to completion.
class NcclPair : public Pair {
 public:
  static Status Open(int64_t max_elements, std::unique_ptr<Pair>* out) {
    std::unique_ptr<Comm> comm;
    Status s = Comm::OpenNccl(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &comm);
    if (!s.ok()) return s;
    auto pair = std::unique_ptr<NcclPair>(new NcclPair(std::move(comm)));
    if (cudaSetDevice(pair->comm_->cuda_device()) != cudaSuccess ||
        cudaMalloc(&pair->send_, static_cast<size_t>(max_elements) * 4) != cudaSuccess ||
        cudaMalloc(&pair->recv_, static_cast<size_t>(max_elements) * 4) != cudaSuccess ||
        cudaStreamCreateWithFlags(&pair->stream_, cudaStreamNonBlocking) != cudaSuccess) {
      return Status::Unavailable("NCCL benchmark: CUDA allocation failed");
    }
    ncclUniqueId id;
    if (WorldRank() == 0 && ncclGetUniqueId(&id) != ncclSuccess) std::memset(&id, 0, sizeof(id));
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    if (ncclCommInitRank(&pair->raw_, WorldSize(), id, WorldRank()) != ncclSuccess) {
      pair->raw_ = nullptr;
      return Status::Unavailable("NCCL benchmark: ncclCommInitRank failed for the raw communicator");
    }
    *out = std::move(pair);
    return Status::Ok();
  }
  ~NcclPair() override {
    if (raw_ != nullptr) ncclCommDestroy(raw_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (send_ != nullptr) cudaFree(send_);
    if (recv_ != nullptr) cudaFree(recv_);
  }
  const char* name() const override { return "nccl"; }
  Status RunComm(Op op, int64_t count) override {
    switch (op) {
      case Op::kReduceScatter: return comm_->ReduceScatter(send_, recv_, count, DType::kF32);
      case Op::kAllGather: return comm_->AllGather(send_, recv_, count, DType::kF32);
      case Op::kAllReduce: return comm_->AllReduce(send_, recv_, count, DType::kF32, ReduceOp::kSum);
    }
    return Status::InvalidArgument("op");
  }
  Status RunRaw(Op op, int64_t count) override {
    const size_t c = static_cast<size_t>(count);
    ncclResult_t rc = ncclSuccess;
    switch (op) {
      case Op::kReduceScatter: rc = ncclReduceScatter(send_, recv_, c, ncclFloat32, ncclSum, raw_, stream_); break;
      case Op::kAllGather: rc = ncclAllGather(send_, recv_, c, ncclFloat32, raw_, stream_); break;
      case Op::kAllReduce: rc = ncclAllReduce(send_, recv_, c, ncclFloat32, ncclSum, raw_, stream_); break;
    }
    if (rc != ncclSuccess) return Status::Aborted(std::string("raw NCCL: ") + ncclGetErrorString(rc));
    if (cudaStreamSynchronize(stream_) != cudaSuccess) return Status::Aborted("raw NCCL: stream failed");
    return Status::Ok();
  }
  void Upload(const std::vector<float>& send) override {
    if (cudaMemcpy(send_, send.data(), send.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess) {
      std::fprintf(stderr, "zero_bench_collectives: cudaMemcpy to the device failed\n");
    }
  }
  void Download(std::vector<float>* recv, int64_t count) override {
    recv->assign(static_cast<size_t>(count), 0.0f);
    if (cudaMemcpy(recv->data(), recv_, static_cast<size_t>(count) * 4, cudaMemcpyDeviceToHost) != cudaSuccess) {
      std::fprintf(stderr, "zero_bench_collectives: cudaMemcpy from the device failed\n");
    }
  }

 private:
  explicit NcclPair(std::unique_ptr<Comm> comm) : comm_(std::move(comm)) {}
  std::unique_ptr<Comm> comm_;
  void* send_ = nullptr;
  void* recv_ = nullptr;
  cudaStream_t stream_ = nullptr;
  ncclComm_t raw_ = nullptr;
};
#endif

struct Case {
  Pair* pair;
  Op op;
  int64_t count;  // per-rank count (reduce-scatter, all-gather) or buffer count (all-reduce)
  int iterations;
};

// Inputs whose sums are exact in fp32: reduce-scatter and all-reduce send (rank + 1) · (1 + i mod 13), so element i
// of the sum is n(n+1)/2 · (1 + i mod 13); all-gather sends rank · 1000 + i mod 997.
std::vector<float> CraftedSend(Op op, int64_t elements, int rank) {
  std::vector<float> v(static_cast<size_t>(elements));
  for (int64_t i = 0; i < elements; ++i) {
    v[static_cast<size_t>(i)] = op == Op::kAllGather ? static_cast<float>(rank * 1000 + i % 997)
                                                     : static_cast<float>((rank + 1) * (1 + i % 13));
  }
  return v;
}

// Elements of this rank's output that differ from the exact result.
int64_t Wrong(Op op, const std::vector<float>& recv, int64_t count, int rank, int n) {
  int64_t wrong = 0;
  const float tri = static_cast<float>(n * (n + 1) / 2);
  for (int64_t j = 0; j < static_cast<int64_t>(recv.size()); ++j) {
    float want = 0;
    if (op == Op::kAllGather) want = static_cast<float>((j / count) * 1000 + (j % count) % 997);
    else if (op == Op::kReduceScatter) want = tri * static_cast<float>(1 + (rank * count + j) % 13);
    else want = tri * static_cast<float>(1 + j % 13);
    wrong += recv[static_cast<size_t>(j)] != want;
  }
  return wrong;
}

void BM_Collective(benchmark::State& state, Case c) {
  const int n = WorldSize(), rank = WorldRank();
  const int64_t send_elements = c.op == Op::kAllGather ? c.count : c.op == Op::kReduceScatter ? c.count * n : c.count;
  const int64_t recv_elements = c.op == Op::kAllGather ? c.count * n : c.op == Op::kReduceScatter ? c.count : c.count;
  const int64_t bytes = 4 * (c.op == Op::kAllReduce ? c.count : c.count * n);
  c.pair->Upload(CraftedSend(c.op, send_elements, rank));
  Status s = c.pair->RunComm(c.op, c.count);  // warm: connections, pages
  if (s.ok()) s = c.pair->RunRaw(c.op, c.count);
  std::vector<double> t_comm, t_raw, ratio;
  int iteration = 0;
  for (auto _ : state) {
    if (!s.ok()) break;
    std::vector<double> t(2);
    for (int k = 0; k < 2; ++k) {
      const bool comm_now = (k == 0) == (iteration % 2 == 0);
      MPI_Barrier(MPI_COMM_WORLD);
      Status r;
      t[comm_now ? 0 : 1] = Seconds([&] {
        r = comm_now ? c.pair->RunComm(c.op, c.count) : c.pair->RunRaw(c.op, c.count);
      });
      if (s.ok()) s = r;
    }
    MaxOverRanks(&t);
    state.SetIterationTime(t[0]);
    t_comm.push_back(t[0]);
    t_raw.push_back(t[1]);
    ratio.push_back(t[1] / t[0]);
    ++iteration;
  }
  if (!s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  // Correctness of both after the timing (the timed runs used the same inputs, so nothing accumulated).
  std::vector<double> wrong(2);
  std::vector<float> out;
  for (int k = 0; k < 2; ++k) {
    s = k == 0 ? c.pair->RunComm(c.op, c.count) : c.pair->RunRaw(c.op, c.count);
    c.pair->Download(&out, recv_elements);
    wrong[static_cast<size_t>(k)] = s.ok() ? static_cast<double>(Wrong(c.op, out, c.count, rank, n)) : -1.0;
  }
  MPI_Allreduce(MPI_IN_PLACE, wrong.data(), 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  const double tc = Median(t_comm), tr = Median(t_raw), b = static_cast<double>(bytes);
  auto& k = state.counters;
  k["world"] = n;
  k["bytes"] = b;
  k["time_s"] = tc;
  k["algbw_GBps"] = b / tc * 1e-9;
  k["busbw_GBps"] = b / tc * 1e-9 * BusFactor(c.op, n);
  k["raw_time_s"] = tr;
  k["raw_algbw_GBps"] = b / tr * 1e-9;
  k["raw_busbw_GBps"] = b / tr * 1e-9 * BusFactor(c.op, n);
  k["vs_raw"] = Median(ratio);
  k["wrong"] = wrong[0];
  k["raw_wrong"] = wrong[1];
  if (bytes >= (int64_t{64} << 20)) k["within_5pct"] = Median(ratio) >= 0.95 ? 1.0 : 0.0;
  state.SetLabel(std::string(c.pair->name()) + " " + OpName(c.op));
}

void Register(Pair* pair, int64_t min_bytes, int64_t max_bytes, int64_t budget, int min_iterations) {
  const int n = WorldSize();
  std::vector<int64_t> sizes;
  for (int64_t b = min_bytes; b < max_bytes; b *= 4) sizes.push_back(b);
  sizes.push_back(max_bytes);
  for (const Op op : {Op::kReduceScatter, Op::kAllGather, Op::kAllReduce}) {
    for (const int64_t b : sizes) {
      const int64_t per = op == Op::kAllReduce ? 4 : 4 * n;  // bytes per unit of count
      const int64_t count = std::max<int64_t>(1, b / per);
      const int64_t actual = count * per;
      const int iterations = static_cast<int>(std::clamp<int64_t>(budget / actual, min_iterations, 50));
      const std::string name = std::string("Collectives/impl:") + pair->name() + "/op:" + OpName(op) +
                               "/bytes:" + std::to_string(actual) + "/world:" + std::to_string(n);
      benchmark::RegisterBenchmark(name.c_str(), BM_Collective, Case{pair, op, count, iterations})
          ->UseManualTime()
          ->Iterations(iterations)
          ->Unit(benchmark::kMicrosecond);
    }
  }
}

int Main(int argc, char** argv) {
  StripOutputFlagsOnPeers(&argc, argv);
  benchmark::Initialize(&argc, argv);
  std::string min_bytes = "8", max_bytes = "268435456", budget = "268435456", min_iterations = "5";
  if (!ParseFlags(argc, argv, {{"min_bytes", &min_bytes}, {"max_bytes", &max_bytes}, {"budget_bytes", &budget},
                               {"min_iterations", &min_iterations}})) {
    return 2;
  }
  const int64_t lo = std::max<int64_t>(4, std::atoll(min_bytes.c_str()));
  const int64_t hi = std::max<int64_t>(lo, std::atoll(max_bytes.c_str()));
  const int64_t max_elements = hi / 4 + 4 * WorldSize();
  const int min_iter = std::max(1, std::atoi(min_iterations.c_str()));
  std::unique_ptr<Comm> comm;
  if (Status s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &comm); !s.ok()) {
    std::fprintf(stderr, "zero_bench_collectives: %s\n", s.ToString().c_str());
    return 1;
  }
  std::vector<std::unique_ptr<Pair>> pairs;
  pairs.push_back(std::make_unique<MpiPair>(comm.get(), max_elements));
  std::string nccl_note;
#if defined(ZERO_WITH_CUDA)
  std::unique_ptr<Pair> nccl;
  if (Status s = NcclPair::Open(max_elements, &nccl); s.ok()) {
    pairs.push_back(std::move(nccl));
  } else {
    nccl_note = "NcclComm vs raw NCCL skipped: " + s.ToString();
  }
#else
  nccl_note = "NcclComm vs raw NCCL skipped: this build has no CUDA (ZERO_WITH_CUDA=OFF)";
#endif
  for (auto& p : pairs) Register(p.get(), lo, hi, std::atoll(budget.c_str()), min_iter);
  benchmark::AddCustomContext("nccl", nccl_note.empty() ? "NcclComm vs raw NCCL measured" : nccl_note);
  if (WorldRank() == 0) {
    std::printf("zero_bench_collectives: %d ranks, fp32, out of place\n", WorldSize());
    if (!nccl_note.empty()) std::printf("%s\n", nccl_note.c_str());
  }
  RunOnEveryRank();
  benchmark::Shutdown();
  pairs.clear();
  return 0;
}

}  // namespace
}  // namespace zero::bench

int main(int argc, char** argv) { return zero::bench::MpiMain(argc, argv, zero::bench::Main); }

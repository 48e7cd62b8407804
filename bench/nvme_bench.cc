// zero_bench_nvme: the NVMe tier (Options::nvme_path) against the disk's own speed, against the same step with the
// optimizer state in host memory, and as the model grows. Run under mpiexec (scripts/bench.sh: one rank); every
// rank's tier works in its own directory under --dir, on the same disk.
//
// Model: 2^(k-20) units of a 1024 x 1024 weight and a norm (k = --sizes: 22, 23, 24, 25 is 1x, 2x, 4x, 8x), stage 2
// with the optimizer offloaded, fp32, AdamW, one bucket per unit. Two engines side by side, the same options but
// for the tier: H keeps master, m and v in host memory, T on the tier. Every iteration, in turn and paired:
//   step_host_s    H's Step (the CPU AdamW and the offload copies, state in host memory)
//   step_tier_s    T's Step: the same, streamed through the tier's bounce buffers
//   io_alone_s     the tier's I/O for the same bytes without any compute: a second tier with T's records, read
//                  bucket k+S-2 / write bucket k through S bounce buffers, as the step does
//   adamw_s        the SIMD CPU AdamW alone over this rank's elements in host memory (kernels/cpu_adamw.h), the
//                  engine's thread count
//   fio            rank 0 runs fio in the same directory: O_DIRECT, io_uring, the tier's block size and queue depth,
//                  a 50/50 mix of reads and writes (what a step does), as many jobs as ranks, the state's bytes
// Counters (medians over iterations; times the slowest rank's):
//   step_vs_max      step_tier_s / max(io_alone_s, adamw_s), paired per iteration (goal <= 1.15)
//   step_vs_host     step_tier_s / step_host_s
//   tier_GBps        bytes the tier moved during the step / the time it had transfers in flight (Engine::nvme_stats)
//   fio_mixed_GBps   fio's read + write bytes / its run time; tier_vs_fio = tier_GBps / fio_mixed_GBps, paired
//                    (goal >= 0.85); fio_read_GBps, fio_write_GBps: fio reading, writing alone (once per size)
//   state_bytes      the optimizer state per rank (the tier's optimizer file)
//   host_budget      Options::host_budget_bytes given to T: the same at every size, the tier's host need at the
//                    largest size; host_peak_tier (T's host high-water mark), bounce_bytes (its bounce buffers),
//                    host_peak_host (H's), host_offload_fits (H opened with the same budget: 1 if it could),
//                    state_over_budget = state_bytes / host_budget
//   bitwise_equal    1 when every step's gradient norm and every final parameter of T equal H's bit for bit;
//                    wrong: the elements that differ
// Flags (besides Google Benchmark's): --sizes=22,23,24,25 --dir=DIR (default ./nvme_bench) --iterations=N
// --block=BYTES (1 MiB) --qd=N (8) --buffers=N (3) --fio=PROGRAM (fio; "" skips the fio columns).
#include <fcntl.h>
#include <mpi.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_mpi.h"
#include "kernels/cpu_adamw.h"
#include "nvme_tier.h"
#include "partition_plan.h"
#include "zero/zero.h"

extern char** environ;

namespace zero::bench {
namespace {

namespace fs = std::filesystem;

struct Settings {
  int iterations = 5;
  std::string dir;
  int64_t block = int64_t{1} << 20;
  int qd = 8;
  int buffers = 3;
  std::string fio = "fio";
  std::vector<int> sizes;
};
Settings g;

constexpr int64_t kUnit = int64_t{1} << 20;  // a unit's weight: 1024 x 1024

std::vector<ParamSpec> Model(int log2) {
  std::vector<ParamSpec> specs;
  const int units = 1 << std::max(0, log2 - 20);
  for (int u = 0; u < units; ++u) {
    const std::string id = std::to_string(u);  // (GCC 12 warns wrongly about "w" + std::to_string(u))
    specs.push_back(ParamSpec{std::string("w").append(id), {1024, 1024}, u});
    specs.push_back(ParamSpec{std::string("n").append(id), {1024}, u, true, 1.0f, 0.0f});
  }
  return specs;
}

Options BaseOptions() {
  Options o;
  o.stage = Stage::kGradients;
  o.offload_optimizer = true;
  o.bucket_elements = 2 * kUnit;  // one bucket per unit
  o.adamw.lr = 1e-3f;
  // Every core of this node's share (what the engine takes by default), given explicitly so that the AdamW alone
  // runs on as many threads.
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  o.cpu_threads = std::max(1, cores / WorldSize());
  return o;
}

Options TierOptions(int64_t budget) {
  Options o = BaseOptions();
  o.nvme_path = g.dir + "/tier";
  o.nvme_block_bytes = g.block;
  o.nvme_queue_depth = g.qd;
  o.nvme_buffers = g.buffers;
  o.host_budget_bytes = budget;
  return o;
}

// fio's read + write bytes per second (terse output, version 3: read KiB in field 6, its run time in ms in 9; write
// KiB in 47, run time in 50). 0 when fio is missing or fails.
double RunFio(const std::string& rw, int64_t bytes, int jobs) {
  if (g.fio.empty()) return 0;
  const std::string dir = g.dir + "/fio";
  fs::create_directories(dir);
  const std::string out = dir + "/out.txt";
  std::vector<std::string> args = {g.fio, "--name=zero-nvme-reference", "--directory=" + dir, "--rw=" + rw,
                                   "--rwmixread=50", "--bs=" + std::to_string(g.block),
                                   "--iodepth=" + std::to_string(g.qd), "--ioengine=io_uring", "--direct=1",
                                   "--size=" + std::to_string(bytes), "--numjobs=" + std::to_string(jobs),
                                   "--group_reporting", "--output-format=terse", "--terse-version=3",
                                   "--output=" + out};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawnp(&pid, g.fio.c_str(), nullptr, nullptr, argv.data(), environ) != 0) return 0;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 0;
  FILE* f = std::fopen(out.c_str(), "r");
  if (f == nullptr) return 0;
  char line[8192] = {};
  const bool got = std::fgets(line, sizeof(line), f) != nullptr;
  std::fclose(f);
  if (!got) return 0;
  std::vector<std::string> fields;
  for (char* p = std::strtok(line, ";"); p != nullptr; p = std::strtok(nullptr, ";")) fields.push_back(p);
  if (fields.size() < 50) return 0;
  const double kib = std::atof(fields[5].c_str()) + std::atof(fields[46].c_str());
  const double ms = std::max(std::atof(fields[8].c_str()), std::atof(fields[49].c_str()));
  return ms > 0 ? kib * 1024.0 / (ms / 1000.0) : 0;
}

std::string FioVersion() {
  if (g.fio.empty()) return "";
  std::string cmd = g.fio + " --version 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return "";
  char buf[128] = {};
  if (std::fgets(buf, sizeof(buf), p) == nullptr) buf[0] = 0;
  pclose(p);
  std::string v(buf);
  while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) v.pop_back();
  return v;
}

// One micro-step without a model: every unit acquired and released, gradients written as a fixed function of the
// step, the parameter and the element (the same on H and T).
Status WriteGradients(Engine& e, int units, int step) {
  ZERO_RETURN_IF_ERROR(e.BeginMicroStep(0, true));
  for (int u = 0; u < units; ++u) {
    ZERO_RETURN_IF_ERROR(e.Acquire(u, Pass::kForward));
    ZERO_RETURN_IF_ERROR(e.Release(u, Pass::kForward));
  }
  for (int u = units - 1; u >= 0; --u) {
    ZERO_RETURN_IF_ERROR(e.Acquire(u, Pass::kBackward));
    for (int p = 2 * u; p < 2 * u + 2; ++p) {
      TensorView v;
      ZERO_RETURN_IF_ERROR(e.Grad(p, &v));
      float* gr = v.as<float>();
      for (int64_t i = 0; i < v.numel; ++i) gr[i] = 1e-3f * static_cast<float>((i * 7 + step * 13 + p) % 31 - 15);
    }
    ZERO_RETURN_IF_ERROR(e.GradsReady(u));
    ZERO_RETURN_IF_ERROR(e.Release(u, Pass::kBackward));
  }
  return Status::Ok();
}

// The tier's I/O of one step without the step: T's optimizer records through S bounce buffers, bucket k+S-2 read
// while bucket k's read is waited for and written back.
struct IoAlone {
  std::vector<uint64_t> checksums;
  std::unique_ptr<NvmeTier> tier;
  std::vector<char*> bounce;
  int records = 0;
  ~IoAlone() {
    tier.reset();
    for (char* b : bounce) std::free(b);
  }
  Status Open(const std::vector<int64_t>& record_bytes) {
    records = static_cast<int>(record_bytes.size());
    int64_t blocks = 0, largest = 0;
    std::vector<int> buckets;
    for (int64_t r : record_bytes) {
      blocks += NvmeBlocks(r, g.block);
      largest = std::max(largest, r);
      buckets.push_back(static_cast<int>(buckets.size()));
    }
    checksums.assign(static_cast<size_t>(NvmeChecksumBytes(blocks) / 8), 0);
    NvmeTierOptions o;
    o.root = g.dir + "/io_alone";
    o.rank = WorldRank();
    o.block_bytes = g.block;
    o.queue_depth = g.qd;
    ZERO_RETURN_IF_ERROR(NvmeTier::Open(o, {{"optimizer.bin", "optimizer state", record_bytes, buckets}},
                                        checksums.data(), NvmeChecksumBytes(blocks), &tier));
    for (int i = 0; i < g.buffers; ++i) {
      bounce.push_back(static_cast<char*>(std::aligned_alloc(kNvmeAlign, static_cast<size_t>(largest))));
      std::memset(bounce.back(), i + 1, static_cast<size_t>(largest));
    }
    for (int r = 0; r < records; ++r) {  // every record written once, so that reads verify
      uint64_t t = 0;
      ZERO_RETURN_IF_ERROR(tier->Write(0, r, 1, bounce[0], &t));
      ZERO_RETURN_IF_ERROR(tier->Wait(t));
    }
    return Status::Ok();
  }
  Status Sweep() {
    const int s = g.buffers;
    std::vector<uint64_t> read(static_cast<size_t>(s)), write(static_cast<size_t>(s));
    std::vector<bool> writing(static_cast<size_t>(s), false);
    int next = 0;
    for (int k = 0; k < records; ++k) {
      for (; next < records && next <= k + s - 2; ++next) {
        const size_t b = static_cast<size_t>(next % s);
        if (writing[b]) ZERO_RETURN_IF_ERROR(tier->Wait(write[b]));
        writing[b] = false;
        ZERO_RETURN_IF_ERROR(tier->Read(0, next, 1, bounce[b], &read[b]));
      }
      const size_t b = static_cast<size_t>(k % s);
      ZERO_RETURN_IF_ERROR(tier->Wait(read[b]));
      ZERO_RETURN_IF_ERROR(tier->Write(0, k, 1, bounce[b], &write[b]));
      writing[b] = true;
    }
    return tier->WaitAll();
  }
};

struct Result {
  Status status;
  std::vector<double> step_tier, step_host, io_alone, adamw, tier_gbps, fio_mixed, vs_max, vs_host, vs_fio;
  double fio_read = 0, fio_write = 0;
  double state_bytes = 0, host_peak_tier = 0, host_peak_host = 0, bounce = 0, budget = 0, io_bytes = 0;
  double host_offload_fits = 0, bitwise = 0, wrong = 0, params = 0, units = 0;
};

// The tier's host need at the largest size: every size gets it as its budget.
int64_t Budget() {
  MemoryEstimate e;
  int largest = 0;
  for (int s : g.sizes) largest = std::max(largest, s);
  if (!Estimate(ModelDescription::FromSpecs(Model(largest)), WorldSize(), TierOptions(0), &e).ok()) return 0;
  return e.HostTotal();
}

Result Measure(int log2) {
  Result r;
  const std::vector<ParamSpec> specs = Model(log2);
  const int units = static_cast<int>(specs.size() / 2);
  r.units = units;
  r.params = static_cast<double>(units) * (kUnit + 1024);
  const int64_t budget = Budget();
  r.budget = static_cast<double>(budget);
  std::unique_ptr<Comm> ch, ct;
  std::unique_ptr<Engine> h, t;
  Status& s = r.status;
  s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &ch);
  if (s.ok()) s = Comm::FromMpiComm(MPI_Comm_c2f(MPI_COMM_WORLD), CommOptions(), &ct);
  // The host-memory offload under the same budget: refused (OutOfMemory) once its state exceeds it.
  {
    Options o = BaseOptions();
    o.host_budget_bytes = budget;
    std::unique_ptr<Engine> probe;
    const Status p = s.ok() ? Engine::Open(o, ch.get(), specs, &probe) : s;
    r.host_offload_fits = p.ok() ? 1 : 0;
  }
  if (s.ok()) s = Engine::Open(BaseOptions(), ch.get(), specs, &h);
  if (s.ok()) s = Engine::Open(TierOptions(budget), ct.get(), specs, &t);
  const FillFn fill = [](int p, int64_t off, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = 0.02f * static_cast<float>((off + i + 3 * p) % 19 - 9);
  };
  if (s.ok()) s = h->InitParams(fill);
  if (s.ok()) s = t->InitParams(fill);
  // The tier's records, as the engine lays them out (buffer_plan.h): master, m and v of each bucket's shard.
  PartitionPlan plan;
  if (s.ok()) s = PartitionPlan::Build(specs, WorldSize(), BaseOptions().bucket_elements, &plan);
  std::vector<int64_t> records;
  for (const Bucket& b : plan.buckets) records.push_back(NvmeAlign(12 * b.shard));
  MemoryEstimate est;
  if (s.ok()) s = Estimate(ModelDescription::FromSpecs(specs), WorldSize(), TierOptions(budget), &est);
  r.state_bytes = static_cast<double>(est.Nvme(MemoryCategory::kOptimizer));
  r.bounce = static_cast<double>(est.NvmeBounceBytes());
  IoAlone alone;
  if (s.ok()) s = alone.Open(records);
  // AdamW alone: this rank's elements (its shard of every bucket), in host memory, on the engine's threads.
  const int64_t n = plan.trainable_shard;
  std::vector<float> master(static_cast<size_t>(n), 0.5f), m(static_cast<size_t>(n), 0.0f),
      v(static_cast<size_t>(n), 0.0f), grad(static_cast<size_t>(n), 1e-3f), copy(static_cast<size_t>(n));
  const int threads = BaseOptions().cpu_threads;
  const auto coeffs = kernels::MakeAdamWCoeffs(1e-3, 0.9f, 0.999f, 1e-8f, 0.01f, 1, 1.0);
  std::vector<StepResult> rh, rt;
  for (int it = -1; it < g.iterations && s.ok(); ++it) {  // iteration -1 warms up
    std::vector<double> x(6, 0.0);  // host step, tier step, I/O alone, AdamW, tier bytes, tier busy
    StepResult a, b;
    s = WriteGradients(*h, units, it + 1);
    if (s.ok()) s = WriteGradients(*t, units, it + 1);
    MPI_Barrier(MPI_COMM_WORLD);
    if (s.ok()) x[0] = Seconds([&] { s = h->Step(StepArgs(), &a); });
    MPI_Barrier(MPI_COMM_WORLD);
    const NvmeStats before = t->nvme_stats();
    if (s.ok()) x[1] = Seconds([&] { s = t->Step(StepArgs(), &b); });
    const NvmeStats after = t->nvme_stats();
    x[4] = static_cast<double>(after.bytes_read - before.bytes_read + after.bytes_written - before.bytes_written);
    x[5] = after.busy_seconds - before.busy_seconds;
    MPI_Barrier(MPI_COMM_WORLD);
    if (s.ok()) x[2] = Seconds([&] { s = alone.Sweep(); });
    MPI_Barrier(MPI_COMM_WORLD);
    x[3] = Seconds([&] {
      kernels::AdamWStepCpu(coeffs, master.data(), m.data(), v.data(), grad.data(), DType::kF32, copy.data(),
                            DType::kF32, n, threads);
    });
    MPI_Barrier(MPI_COMM_WORLD);
    double fio = 0;
    if (WorldRank() == 0) fio = RunFio("rw", static_cast<int64_t>(r.state_bytes) * 2, WorldSize());
    MPI_Bcast(&fio, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    std::vector<double> times(x.begin(), x.begin() + 4);
    MaxOverRanks(&times);
    std::vector<double> io = {x[4], x[5]};  // bytes summed over ranks against the longest busy time
    MPI_Allreduce(MPI_IN_PLACE, &io[0], 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &io[1], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it < 0 || !s.ok()) continue;
    rh.push_back(a);
    rt.push_back(b);
    r.step_host.push_back(times[0]);
    r.step_tier.push_back(times[1]);
    r.io_alone.push_back(times[2]);
    r.adamw.push_back(times[3]);
    r.vs_max.push_back(times[1] / std::max(times[2], times[3]));
    r.vs_host.push_back(times[1] / times[0]);
    const double gbps = io[1] > 0 ? io[0] / io[1] : 0;
    r.io_bytes = io[0];
    r.tier_gbps.push_back(gbps);
    r.fio_mixed.push_back(fio);
    if (fio > 0) r.vs_fio.push_back(gbps / fio);
  }
  if (s.ok() && WorldRank() == 0) {
    r.fio_write = RunFio("write", static_cast<int64_t>(r.state_bytes), WorldSize());
    r.fio_read = RunFio("read", static_cast<int64_t>(r.state_bytes), WorldSize());
  }
  // Bitwise: every step's norm and every parameter.
  int64_t wrong = 0;
  if (s.ok()) {
    for (size_t i = 0; i < rh.size(); ++i) {
      wrong += rh[i].grad_norm != rt[i].grad_norm || rh[i].skipped != rt[i].skipped;
    }
    for (int p = 0; p < static_cast<int>(specs.size()); ++p) {
      const TensorView a = h->Param(p), b = t->Param(p);
      for (int64_t i = 0; i < a.numel; ++i) wrong += std::memcmp(a.as<float>() + i, b.as<float>() + i, 4) != 0;
    }
  }
  std::vector<double> tally = {static_cast<double>(wrong), 0, 0};
  if (s.ok()) {
    tally[1] = static_cast<double>(t->Memory().host.peak_total);
    tally[2] = static_cast<double>(h->Memory().host.peak_total);
  }
  MaxOverRanks(&tally);
  r.wrong = tally[0];
  r.bitwise = s.ok() && tally[0] == 0 ? 1 : 0;
  r.host_peak_tier = tally[1];
  r.host_peak_host = tally[2];
  t.reset();
  h.reset();
  return r;
}

void BM_Nvme(benchmark::State& state, int log2) {
  Result r = Measure(log2);
  if (!r.status.ok()) {
    state.SkipWithError(r.status.ToString().c_str());
    for (auto _ : state) state.SetIterationTime(1);
    return;
  }
  size_t i = 0;
  for (auto _ : state) state.SetIterationTime(r.step_tier[i++ % r.step_tier.size()]);
  auto& k = state.counters;
  k["world"] = WorldSize();
  k["log2_params"] = log2;
  k["params"] = r.params;
  k["units"] = r.units;
  k["block_bytes"] = static_cast<double>(g.block);
  k["queue_depth"] = g.qd;
  k["buffers"] = g.buffers;
  k["step_tier_s"] = Median(r.step_tier);
  k["step_host_s"] = Median(r.step_host);
  k["io_alone_s"] = Median(r.io_alone);
  k["adamw_s"] = Median(r.adamw);
  k["step_vs_max"] = Median(r.vs_max);
  k["step_vs_host"] = Median(r.vs_host);
  k["tier_GBps"] = Median(r.tier_gbps) / 1e9;
  k["fio_mixed_GBps"] = Median(r.fio_mixed) / 1e9;
  k["tier_vs_fio"] = Median(r.vs_fio);
  k["fio_read_GBps"] = r.fio_read / 1e9;
  k["fio_write_GBps"] = r.fio_write / 1e9;
  k["io_bytes_per_step"] = r.io_bytes;
  k["state_bytes"] = r.state_bytes;
  k["host_budget"] = r.budget;
  k["host_peak_tier"] = r.host_peak_tier;
  k["bounce_bytes"] = r.bounce;
  k["host_peak_host"] = r.host_peak_host;
  k["host_offload_fits"] = r.host_offload_fits;
  k["state_over_budget"] = r.budget > 0 ? r.state_bytes / r.budget : 0;
  k["bitwise_equal"] = r.bitwise;
  k["wrong"] = r.wrong;
}

int Main(int argc, char** argv) {
  StripOutputFlagsOnPeers(&argc, argv);
  benchmark::Initialize(&argc, argv);
  std::string sizes = "22,23,24,25", iterations = "5", block = std::to_string(g.block), qd = "8", buffers = "3";
  std::string dir = (fs::current_path() / "nvme_bench").string(), fio = "fio";
  if (!ParseFlags(argc, argv, {{"sizes", &sizes}, {"iterations", &iterations}, {"dir", &dir}, {"block", &block},
                               {"qd", &qd}, {"buffers", &buffers}, {"fio", &fio}})) {
    return 2;
  }
  g.sizes = ParseInts(sizes);
  g.iterations = std::max(1, std::atoi(iterations.c_str()));
  g.dir = dir;
  g.block = std::atoll(block.c_str());
  g.qd = std::atoi(qd.c_str());
  g.buffers = std::atoi(buffers.c_str());
  g.fio = fio;
  if (WorldRank() == 0) fs::create_directories(g.dir);
  MPI_Barrier(MPI_COMM_WORLD);
  for (int s : g.sizes) {
    const std::string name = "Nvme/params:2^" + std::to_string(s) + "/world:" + std::to_string(WorldSize());
    benchmark::RegisterBenchmark(name.c_str(), BM_Nvme, s)
        ->UseManualTime()
        ->Iterations(g.iterations)
        ->Unit(benchmark::kMillisecond);
  }
  const std::string fio_version = FioVersion();
  benchmark::AddCustomContext("fio", fio_version.empty() ? "not run" : fio_version);
  benchmark::AddCustomContext("nvme_dir", g.dir);
  benchmark::AddCustomContext("adamw_target", kernels::AdamWTargetName());
  if (WorldRank() == 0) {
    std::printf("zero_bench_nvme: %d ranks, tier in %s, block %lld B, queue depth %d, %d bounce buffers, %s\n",
                WorldSize(), g.dir.c_str(), static_cast<long long>(g.block), g.qd, g.buffers,
                fio_version.empty() ? "no fio" : fio_version.c_str());
  }
  RunOnEveryRank();
  benchmark::Shutdown();
  if (WorldRank() == 0) {
    std::error_code ec;
    fs::remove_all(g.dir + "/fio", ec);
  }
  return 0;
}

}  // namespace
}  // namespace zero::bench

int main(int argc, char** argv) { return zero::bench::MpiMain(argc, argv, zero::bench::Main); }

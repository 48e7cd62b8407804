// Which Comm the CUDA test cases get (backend_comm.h).
#include "testing/backend_comm.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <utility>

#include "testing/device_memory.h"
#include "testing/staged_comm.h"

namespace zero::testing {

namespace {

// Rank 0 says which Comm the CUDA cases use, once per distinct sentence.
void Announce(int rank, const std::string& what) {
  static std::set<std::string> said;
  if (rank != 0 || !said.insert(what).second) return;
  std::printf("[ cuda comm ] %s\n", what.c_str());
  std::fflush(stdout);
}

// What opening the CUDA cases' Comms cost this process, said by rank 0 when the process ends: on the GPU machine a
// phase's time budget is mostly communicator set-up (each case opens a Comm, and Engine::Open splits it once more),
// so the GPU run's summary shows the measured cost beside each suite's counts. The first open of the process also
// times one Duplicate, the ncclCommSplit every Engine::Open does, which the harness cannot see otherwise.
class OpenTimes {
 public:
  ~OpenTimes() {
    if (rank_ != 0 || opens_ == 0) return;
    std::printf("[ cuda comm ] opened %d %s in %.2f s (mean %.0f ms, slowest %.0f ms)%s\n", opens_, kind_.c_str(),
                total_s_, 1e3 * total_s_ / opens_, 1e3 * max_s_, duplicate_.c_str());
    std::fflush(stdout);
  }
  void Add(const std::string& kind, double seconds) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);  // world rank 0 speaks, whichever communicator it opened over
    kind_ = kind_.empty() || kind_ == kind ? kind : "Comms";
    ++opens_;
    total_s_ += seconds;
    if (seconds > max_s_) max_s_ = seconds;
  }
  bool duplicate_timed() const { return !duplicate_.empty(); }
  void SetDuplicate(const std::string& what) { duplicate_ = what; }

 private:
  int rank_ = -1, opens_ = 0;
  std::string kind_, duplicate_;
  double total_s_ = 0, max_s_ = 0;
};
OpenTimes& Times() {
  static OpenTimes times;
  return times;
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string EnvOr(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v == nullptr ? fallback : v;
}

std::unique_ptr<Comm> OpenStaged(MPI_Comm mpi_comm, int device, std::chrono::milliseconds timeout,
                                 int ranks_per_node) {
  CommOptions options;
  options.timeout = timeout;
  options.ranks_per_node = ranks_per_node;
  std::unique_ptr<Comm> inner;
  Status s = Comm::FromMpiComm(MPI_Comm_c2f(mpi_comm), options, &inner);
  std::unique_ptr<StagingMemory> memory;
  if (s.ok()) s = NewCudaStaging(device, &memory);
  if (!s.ok()) {
    std::fprintf(stderr, "OpenCudaTestComm: StagedComm: %s\n", s.ToString().c_str());
    return nullptr;
  }
  return std::make_unique<StagedComm>(std::move(inner), std::shared_ptr<StagingMemory>(std::move(memory)));
}

// One Duplicate of a fresh NcclComm, timed (collective: every rank of the Comm comes here for it, having agreed that
// none has timed one yet). A failure is said, not fatal: the case goes on with `comm`.
void TimeOneDuplicate(Comm& comm) {
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Comm> dup;
  const Status s = comm.Duplicate(&dup);
  const double seconds = SecondsSince(t0);
  dup.reset();
  char line[160];
  if (s.ok()) {
    std::snprintf(line, sizeof(line), "; one Duplicate (Engine::Open's ncclCommSplit) %.0f ms", 1e3 * seconds);
  } else {
    std::snprintf(line, sizeof(line), "; one Duplicate failed after %.0f ms", 1e3 * seconds);
    std::fprintf(stderr, "OpenCudaTestComm: timing a Duplicate: %s\n", s.ToString().c_str());
  }
  Times().SetDuplicate(line);
}

struct Placement {
  int local_rank = 0, local_size = 1, devices = 0;
};

// This rank's place on its node and the node's GPUs; false with *skip set when some rank has no GPU.
bool Place(MPI_Comm mpi_comm, Placement* p, std::string* skip) {
  int rank = 0;
  MPI_Comm_rank(mpi_comm, &rank);
  MPI_Comm local = MPI_COMM_NULL;
  MPI_Comm_split_type(mpi_comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &p->local_rank);
  MPI_Comm_size(local, &p->local_size);
  MPI_Comm_free(&local);
  // Every rank needs a GPU, or none goes on (a rank that skipped alone would leave the others waiting).
  const Status count = CudaDeviceCount(&p->devices);
  int ok = count.ok() ? 1 : 0, all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, mpi_comm);
  if (!all_ok) {
    *skip = "Backend::kCuda cannot run here: " +
            (count.ok() ? std::string("another rank has no usable CUDA device") : count.message());
  }
  return all_ok != 0;
}

}  // namespace

int LocalCudaDevice(MPI_Comm mpi_comm, std::string* skip) {
  Placement p;
  return Place(mpi_comm, &p, skip) ? p.local_rank % p.devices : -1;
}

std::unique_ptr<Comm> OpenCudaTestComm(MPI_Comm mpi_comm, std::chrono::milliseconds timeout, std::string* skip,
                                       int ranks_per_node) {
  int rank = 0, world = 1;
  MPI_Comm_rank(mpi_comm, &rank);
  MPI_Comm_size(mpi_comm, &world);
  Placement place;
  if (!Place(mpi_comm, &place, skip)) return nullptr;
  const int local_size = place.local_size, devices = place.devices;
  // Once NCCL refused shared GPUs in this process, later comms go straight to StagedComm. Agreed with the
  // ranks of `mpi_comm` like the rest: a rank that was not in the earlier communicator does not know.
  // The Duplicate is timed once, where no rank of `mpi_comm` has timed one yet (agreed, since it is collective).
  static bool nccl_refused_sharing = false;
  int mine[3] = {local_size > devices ? 1 : 0, nccl_refused_sharing ? 1 : 0, Times().duplicate_timed() ? 1 : 0};
  int any[3] = {0, 0, 0};
  MPI_Allreduce(mine, any, 3, MPI_INT, MPI_MAX, mpi_comm);
  const bool any_shared = any[0] != 0;
  const std::string forced = EnvOr("ZERO_TEST_STAGED_COMM", "");
  const bool multi_rank_nccl = EnvOr("NCCL_MULTI_RANK_GPU_ENABLE", "") == "1";
  const std::string ranks = std::to_string(world) + " rank" + (world == 1 ? "" : "s");
  const int device = place.local_rank % devices;

  bool staged = forced == "1";
  std::string why = "ZERO_TEST_STAGED_COMM=1";
  if (!staged && forced != "0" && any_shared) {
    if (!multi_rank_nccl) {
      staged = true;
      why = "ranks share a GPU and NCCL_MULTI_RANK_GPU_ENABLE is not 1 (NCCL < 2.30 refuses that)";
    } else if (any[1] != 0) {
      staged = true;
      why = "NCCL refused ranks that share a GPU earlier in this run";
    }
  }
  if (!staged) {
    CommOptions options;
    options.timeout = timeout;
    options.ranks_per_node = ranks_per_node;
    std::unique_ptr<Comm> comm;
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = Comm::OpenNccl(MPI_Comm_c2f(mpi_comm), options, &comm);
    if (s.ok()) {
      Times().Add("NcclComm", SecondsSince(t0));
      Announce(rank, "NcclComm, " + ranks + (any_shared ? " sharing GPUs (NCCL_MULTI_RANK_GPU_ENABLE=1)" : ""));
      if (any[2] == 0) TimeOneDuplicate(*comm);
      return comm;
    }
    // OpenNccl agrees on its outcome across ranks, so every rank takes the same branch here.
    if (s.code() != StatusCode::kUnavailable || !any_shared || forced == "0") {
      if (s.code() == StatusCode::kUnavailable) {
        *skip = "Backend::kCuda cannot run here: " + s.message();
      } else {
        std::fprintf(stderr, "OpenCudaTestComm: %s\n", s.ToString().c_str());
      }
      return nullptr;
    }
    nccl_refused_sharing = true;
    staged = true;
    why = "NCCL refused ranks that share a GPU: " + s.message();
  }
  Announce(rank, "StagedComm (device buffers through host memory and MPI), " + ranks + " on " +
                     std::to_string(devices) + " GPU" + (devices == 1 ? "" : "s") + ": " + why);
  const auto t0 = std::chrono::steady_clock::now();
  auto comm = OpenStaged(mpi_comm, device, timeout, ranks_per_node);
  if (comm != nullptr) Times().Add("StagedComm", SecondsSince(t0));
  return comm;
}

bool SumsInRingOrder(const Comm& comm) {
  return comm.world_size() == 1 || comm.cuda_device() < 0 || dynamic_cast<const StagedComm*>(&comm) != nullptr;
}

bool IsNcclComm(const Comm& comm) {
  return comm.cuda_device() >= 0 && dynamic_cast<const StagedComm*>(&comm) == nullptr;
}

}  // namespace zero::testing

// MpiComm: the MPI backend of zero::Comm (Comm::OpenMpi, Comm::FromMpiComm). Private to the library; the
// algorithms, the fixed summation order, message matching and the abort channel are described in comm_mpi.cc.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "comm_internal.h"
#include "zero/comm.h"

namespace zero::internal {

// MPI's text for an error code.
std::string MpiErrorString(int code);

class MpiComm final : public Comm {
 public:
  // `topology`: the new Comm's (Duplicate, Split); null detects it (DetectNodeTopology).
  static Status Create(MPI_Comm parent, const CommOptions& options, bool owns_mpi, std::unique_ptr<Comm>* out,
                       const NodeTopology* topology = nullptr);
  ~MpiComm() override;

  void Abort(const Status& reason) override;
  Status health() const override;
  // The MPI communicator this Comm's collectives use (Comm::OpenNccl bootstraps over it).
  MPI_Comm mpi_comm() const { return data_; }

 protected:
  Status DoReduceScatter(const void* send, void* recv, int64_t count, DType dtype,
                       const CollectiveOptions& opts) override;
  Status DoAllGather(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override;
  Status DoAllReduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                   const CollectiveOptions& opts) override;
  Status DoBroadcast(void* buffer, int64_t count, DType dtype, int root, const CollectiveOptions& opts) override;
  Status DoBarrier(const CollectiveOptions& opts) override;
  Status DoDuplicate(std::unique_ptr<Comm>* out) override;
  Status DoAllToAll(const void* send, void* recv, int64_t count, DType dtype, const CollectiveOptions& opts) override;
  Status DoSplit(int color, int key, const std::vector<int>& members, const NodeTopology& topology,
                 std::unique_ptr<Comm>* out) override;

 private:
  // One call in flight.
  struct Call {
    CallInfo info;
    MPI_Datatype type = MPI_BYTE;
    size_t elem = 1;  // bytes per element
    int tag = 0;
    bool control = false;  // CollectiveOptions::control: not counted per link kind
  };
  // One posted request of the current wait (parallel to reqs_).
  struct Pending {
    int peer;
    bool recv;
    int count;
    const void* at;  // the buffer (for ThreadSanitizer's view of what MPI read or wrote)
  };

  MpiComm(MPI_Comm data, MPI_Comm abort, uint64_t token, int rank, int world, int tag_mask,
          const CommOptions& options, bool owns_mpi)
      : Comm(rank, world),
        data_(data),
        abort_(abort),
        token_(token),
        options_(options),
        max_message_(static_cast<int>(std::min<int64_t>(options.TEST_max_message_elements, INT32_MAX))),
        tag_mask_(tag_mask),
        owns_mpi_(owns_mpi) {
    timeout_ = options.timeout;
  }

  Status Begin(const CallInfo& info, const CollectiveOptions& opts, const void* send, const void* recv,
               Call* call);
  void PostOne(const Call& call, bool recv, const void* at, int count, int peer);
  void Post(const Call& call, bool recv, const void* buf, int64_t count, int peer);
  Status Wait(const Call& call);
  void AnnotateCompleted(const Call& call) const;
  Status RingReduce(const Call& call, const char* send, char* own_out, int64_t total);
  Status RingGather(const Call& call, char* buf, int64_t total);

  // Elements per peer per wait: kPiecesPerWait messages, and at most half the scratch buffer.
  int64_t WindowElements(size_t elem) const;
  char* Scratch(size_t bytes);
  std::string Where(const Call& call) const;
  Status RequestError(const Call& call, int rc) const;
  Status TimeoutError(const Call& call) const;
  Status Fail(const Status& s);
  void CancelPending();
  Status CheckBroken() const;
  Status Break(const Status& s, std::string_view notice) const;

  MPI_Comm data_;   // collectives' messages
  MPI_Comm abort_;  // abort notices only
  // Chosen by rank 0 at creation and carried by every abort notice: MPI may give a later communicator the same
  // context id, and a notice that a peer sent to an earlier, freed one must not break the new one.
  const uint64_t token_;
  const CommOptions options_;
  const int max_message_;
  const int tag_mask_;
  const bool owns_mpi_;
  uint64_t seq_ = 0;  // calls issued, hashed into tags

  std::vector<MPI_Request> reqs_;  // the current wait's requests
  std::vector<Pending> pending_;
  std::vector<MPI_Status> statuses_;
  Status post_error_;  // first failed MPI_Isend/MPI_Irecv of the current wait
  std::unique_ptr<char[]> scratch_;
  size_t scratch_bytes_ = 0;
  bool leaked_requests_ = false;  // freed requests may still write into scratch_

  mutable std::mutex mu_;  // guards the members below (Abort and health may run on other threads)
  mutable Status broken_;
  mutable std::unique_ptr<char[]> notice_;  // this rank's abort notice; MPI reads it until the sends complete
  mutable std::vector<MPI_Request> notice_sends_;
};

}  // namespace zero::internal

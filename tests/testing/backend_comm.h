// The Comm the CUDA cases of the test suites run over (collective over an MPI communicator):
//  * NcclComm (Comm::OpenNccl) by default: one rank per GPU, and at one rank.
//  * StagedComm over MPI (staged_comm.h) when ranks share a GPU (more ranks on a node than visible GPUs) and NCCL
//    refuses that: always unless NCCL_MULTI_RANK_GPU_ENABLE=1 (NCCL >= 2.30 allows it then); with that variable
//    set OpenNccl is tried first and a failed initialization falls back to StagedComm.
//  * ZERO_TEST_STAGED_COMM=1 forces StagedComm (any world size, one rank per GPU too); =0 forces NcclComm.
// Rank 0 prints which one was chosen and why, once per choice, so that a GPU run's log says what it tested.
#pragma once

#include <mpi.h>

#include <chrono>
#include <memory>
#include <string>

#include "zero/comm.h"

namespace zero::testing {

// Returns null with *skip set to the reason when some rank has no usable GPU (every rank agrees). `ranks_per_node`
// is CommOptions::ranks_per_node of the Comm (0: the nodes MPI finds).
std::unique_ptr<Comm> OpenCudaTestComm(MPI_Comm mpi_comm, std::chrono::milliseconds timeout, std::string* skip,
                                       int ranks_per_node = 0);

// The GPU this rank uses (node-local rank % visible GPUs, as Comm::OpenNccl chooses), or -1 with *skip set to the
// reason when some rank of `mpi_comm` has none (every rank agrees). Collective.
int LocalCudaDevice(MPI_Comm mpi_comm, std::string* skip);

// True when the Comm's sums follow MpiComm's fixed ring order (host memory, a StagedComm, or a world of one), so
// that the mirrored reference (reference.h) is bitwise; NcclComm at several ranks sums in its own order.
bool SumsInRingOrder(const Comm& comm);

// True when the Comm is an NcclComm (a real one, or on the NCCL stand-in of the ZERO_CUDA_EMULATION build).
bool IsNcclComm(const Comm& comm);

}  // namespace zero::testing

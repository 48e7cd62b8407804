// Which GPU a rank of Comm::OpenNccl uses, or why it cannot have one: the node-local rank against the node's GPUs
// and what the loaded NCCL allows. Pure logic with no CUDA or NCCL headers, so that it is tested on machines
// without a GPU (tests/nccl_comm_test.cc) while OpenNccl feeds it cudaGetDeviceCount and ncclGetVersion.
//
// NCCL up to 2.29 refuses two ranks of one communicator on one GPU at init ("Duplicate GPU detected",
// ncclInvalidUsage). NCCL 2.30 allows it when NCCL_MULTI_RANK_GPU_ENABLE=1 (it then disables NVLS). Mapping
// local ranks onto GPUs round-robin without asking would turn a launch with more ranks than GPUs into an NCCL
// init failure with no hint; here it is refused up front, saying what to do instead.
#pragma once

#include <cerrno>
#include <cstdlib>
#include <string>

namespace zero::internal {

// NCCL_VERSION(2, 30, 0) as ncclGetVersion reports it (major * 10000 + minor * 100 + patch since NCCL 2.9).
inline constexpr int kNcclMultiRankGpuVersion = 23000;

// "2.28.9" from ncclGetVersion's integer.
inline std::string NcclVersionText(int code) {
  return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
}

// Whether NCCL reads `value` of a boolean parameter such as NCCL_MULTI_RANK_GPU_ENABLE as set: NCCL parses it with
// strtoll(value, nullptr, 0) and takes any non-zero integer ("1", "2", "0x1", " 1"); empty, "0" and words are 0.
// Comparing with "1" would refuse a launch that NCCL itself accepts.
inline bool NcclParamSet(const char* value) {
  if (value == nullptr || *value == '\0') return false;
  errno = 0;
  const long long v = std::strtoll(value, nullptr, 0);
  return errno == 0 && v != 0;
}

struct GpuPlacement {
  int device = -1;      // the CUDA ordinal this rank uses, when `refusal` is empty
  std::string refusal;  // why this rank gets no GPU (an Unavailable message's body), or empty
};

// local_rank of local_ranks ranks on this node, `gpus` visible CUDA devices, the loaded NCCL's version code and
// the value of NCCL_MULTI_RANK_GPU_ENABLE (null when unset).
inline GpuPlacement PlaceRankOnGpu(int local_rank, int local_ranks, int gpus, int nccl_version,
                                   const char* multi_rank_env) {
  GpuPlacement p;
  if (gpus <= 0) {
    p.refusal = "no CUDA device";
    return p;
  }
  if (local_ranks <= gpus) {
    p.device = local_rank;
    return p;
  }
  const bool asked = NcclParamSet(multi_rank_env);
  if (asked && nccl_version >= kNcclMultiRankGpuVersion) {
    p.device = local_rank % gpus;
    return p;
  }
  p.refusal = std::to_string(local_ranks) + " ranks on this node share its " + std::to_string(gpus) +
              (gpus == 1 ? " GPU" : " GPUs") + ", and NCCL " + NcclVersionText(nccl_version) +
              (asked ? std::string(" is older than 2.30, the first NCCL that lets ranks share a GPU "
                                   "(NCCL_MULTI_RANK_GPU_ENABLE=") +
                           multi_rank_env + " is set but has no effect)"
                     : " gives each rank a GPU of its own unless NCCL_MULTI_RANK_GPU_ENABLE=1 is set (NCCL >= 2.30)") +
              "; start at most " + std::to_string(gpus) + " rank(s) per node, or use Comm::OpenMpi with "
              "Backend::kCpu";
  return p;
}

}  // namespace zero::internal

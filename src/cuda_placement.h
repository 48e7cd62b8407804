// Which GPU a rank of Comm::OpenNccl uses, or why it cannot have one: the node-local rank against the node's GPUs
// and what the loaded NCCL allows. Pure logic with no CUDA or NCCL headers, so that it is tested on machines
// without a GPU (tests/nccl_comm_test.cc) while OpenNccl feeds it cudaGetDeviceCount and ncclGetVersion.
//
// NCCL up to 2.29 refuses two ranks of one communicator on one GPU at init ("Duplicate GPU detected",
// ncclInvalidUsage). NCCL 2.30 allows it when NCCL_MULTI_RANK_GPU_ENABLE=1 (it then disables NVLS). Mapping
// local ranks onto GPUs round-robin without asking would turn a launch with more ranks than GPUs into an NCCL
// init failure with no hint; here it is refused up front, saying what to do instead.
#pragma once

#include <pwd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

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

// NCCL also takes its parameters from files: at init it reads each "NAME=VALUE" line of the user's file
// ($NCCL_CONF_FILE if set, else ~/.nccl.conf), then /etc/nccl.conf, and sets each variable not set already (the
// environment wins, then the user's file, then the system's). Reading only the environment would refuse a node
// whose administrator enabled NCCL_MULTI_RANK_GPU_ENABLE in /etc/nccl.conf, where NCCL itself accepts it.
inline std::vector<std::string> NcclConfFiles() {
  std::vector<std::string> files;
  if (const char* conf = std::getenv("NCCL_CONF_FILE"); conf != nullptr && *conf != '\0') {
    files.emplace_back(conf);
  } else if (const passwd* pw = getpwuid(getuid()); pw != nullptr && pw->pw_dir != nullptr) {
    files.push_back(std::string(pw->pw_dir) + "/.nccl.conf");
  }
  files.emplace_back("/etc/nccl.conf");
  return files;
}

// The value NCCL sees for parameter `name`: the environment's, else the first of `files` (in order) with a
// "name=value" line ('#' starts a comment line; spaces around the name are ignored, the value is kept as written up
// to the end of the line, as NCCL keeps it). nullopt when none sets it.
inline std::optional<std::string> NcclParamValue(const std::string& name, const std::vector<std::string>& files) {
  if (const char* env = std::getenv(name.c_str()); env != nullptr) return std::string(env);
  for (const std::string& path : files) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      const size_t eq = line.find('=');
      if (line.empty() || line[0] == '#' || eq == std::string::npos) continue;
      std::string key = line.substr(0, eq);
      while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
      while (!key.empty() && (key.front() == ' ' || key.front() == '\t')) key.erase(0, 1);
      if (key == name) return line.substr(eq + 1);
    }
  }
  return std::nullopt;
}

struct GpuPlacement {
  int device = -1;      // the CUDA ordinal this rank uses, when `refusal` is empty
  std::string refusal;  // why this rank gets no GPU (an Unavailable message's body), or empty
};

// The physical GPU the most ranks of a node would run on, and how many: ids[r] names the GPU local rank r would use
// (its candidate, local_rank % its visible devices, by PCI bus id, which is what NCCL's own "Duplicate GPU" check
// compares). A count of 1 when every rank has a GPU of its own. Launchers that give each rank its own
// CUDA_VISIBLE_DEVICES (one GPU each, say) make every rank see fewer devices than the node has ranks: counting
// devices alone would call that sharing.
inline std::pair<std::string, int> BusiestGpu(const std::vector<std::string>& ids) {
  std::map<std::string, int> ranks;
  std::pair<std::string, int> busiest{"", 0};
  for (const std::string& id : ids) {
    if (const int n = ++ranks[id]; n > busiest.second) busiest = {id, n};
  }
  return busiest;
}

// local_rank of local_ranks ranks on this node, `gpus` visible CUDA devices, the loaded NCCL's version code, the
// value of NCCL_MULTI_RANK_GPU_ENABLE as NCCL sees it (NcclParamValue; null when unset), and each node-local rank's
// candidate GPU id (BusiestGpu's ids; empty when unknown: then more ranks than visible devices is sharing).
inline GpuPlacement PlaceRankOnGpu(int local_rank, int local_ranks, int gpus, int nccl_version,
                                   const char* multi_rank_env, const std::vector<std::string>& node_ids = {}) {
  GpuPlacement p;
  if (gpus <= 0) {
    p.refusal = "no CUDA device";
    return p;
  }
  const auto [collided, on_one_gpu] = BusiestGpu(node_ids);
  const bool shared = node_ids.empty() ? local_ranks > gpus : on_one_gpu > 1;
  if (!shared) {
    p.device = local_rank % gpus;
    return p;
  }
  const bool asked = NcclParamSet(multi_rank_env);
  if (asked && nccl_version >= kNcclMultiRankGpuVersion) {
    p.device = local_rank % gpus;
    return p;
  }
  // With the bus ids known, name the GPU the ranks collide on: the count alone cannot tell too many ranks from ranks
  // whose own CUDA_VISIBLE_DEVICES overlap.
  p.refusal = (node_ids.empty() ? std::to_string(local_ranks) + " ranks on this node share its " +
                                      std::to_string(gpus) + (gpus == 1 ? " GPU" : " GPUs")
                                : std::to_string(on_one_gpu) + " of this node's " + std::to_string(local_ranks) +
                                      " ranks would run on GPU " + collided + " (each rank takes its local rank % its " +
                                      std::to_string(gpus) + " visible device" + (gpus == 1 ? "" : "s") + ")") +
              ", and NCCL " + NcclVersionText(nccl_version) +
              (asked ? std::string(" is older than 2.30, the first NCCL that lets ranks share a GPU "
                                   "(NCCL_MULTI_RANK_GPU_ENABLE=") +
                           multi_rank_env + " is set but has no effect)"
                     : " gives each rank a GPU of its own unless NCCL_MULTI_RANK_GPU_ENABLE=1 is set (NCCL >= 2.30)") +
              "; start at most " + (node_ids.empty() ? std::to_string(gpus) + " rank(s) per node"
                                                     : std::string("as many ranks per node as it has GPUs, each "
                                                                   "taking a different one")) +
              ", or use Comm::OpenMpi with Backend::kCpu";
  return p;
}

}  // namespace zero::internal

// Element types, backends, memory categories and tensor views shared by the public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace zero {

enum class DType : uint8_t { kF32, kF64, kBF16, kF16, kU8, kI64 };
// Bytes per element.
size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);

enum class Backend : uint8_t {
  kCpu,   // host memory stands in for device memory, with its own accounting; Open MPI collectives
  kCuda,  // CUDA devices, NCCL collectives (bootstrapped over MPI)
};

// What an allocation holds. Every byte the engine allocates is tagged with one category so that reports, the
// estimator and the ZeRO formulas can be compared exactly.
enum class MemoryCategory : uint8_t {
  kParams,     // parameters (full copies, shards, persistent stage-3 units)
  kGrads,      // gradient buffers that persist across micro-steps (full in stages 0-1, shard accumulators in 2-3)
  kOptimizer,  // optimizer state (Adam m/v, momentum, fp32 master when parameters are low precision)
  kBuffers,    // working buffers: stage-2/3 gradient pool, stage-3 gather slots, GatherFull scopes
};
inline constexpr int kNumMemoryCategories = 4;
const char* MemoryCategoryName(MemoryCategory category);

// Where memory lives.
enum class MemoryKind : uint8_t {
  kDevice,        // GPU memory (CUDA) or the CPU backend's stand-in for it
  kPinnedHost,    // page-locked host memory (offload)
  kPageableHost,  // ordinary host memory
  kNvme,          // not memory: a file of the NVMe tier on a local disk (Options::nvme_path), counted apart
};

// A plain, non-owning record of a tensor inside one of the engine's flat buffers. Frameworks can wrap it
// without a copy (a libtorch tensor via from_blob, a cuBLAS call, a CPU loop).
struct TensorView {
  void* data = nullptr;           // null when the view is not valid (frozen param's gradient, unit not acquired)
  int64_t numel = 0;
  DType dtype = DType::kF32;
  Backend backend = Backend::kCpu;
  std::span<const int64_t> shape;  // points into the engine's copy of the ParamSpec

  bool valid() const { return data != nullptr || numel == 0; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

}  // namespace zero

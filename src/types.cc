// Names and sizes of the public enums.
#include "zero/options.h"
#include "zero/types.h"

namespace zero {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF64: return 8;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
    case DType::kU8: return 1;
    case DType::kI64: return 8;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF64: return "f64";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
    case DType::kU8: return "u8";
    case DType::kI64: return "i64";
  }
  return "?";
}

const char* MemoryCategoryName(MemoryCategory category) {
  switch (category) {
    case MemoryCategory::kParams: return "params";
    case MemoryCategory::kGrads: return "grads";
    case MemoryCategory::kOptimizer: return "optimizer";
    case MemoryCategory::kBuffers: return "buffers";
  }
  return "?";
}

const char* StageName(Stage stage) {
  switch (stage) {
    case Stage::kDataParallel: return "stage 0 (data parallel)";
    case Stage::kOptimizerStates: return "stage 1 (optimizer states)";
    case Stage::kGradients: return "stage 2 (gradients)";
    case Stage::kParameters: return "stage 3 (parameters)";
    case Stage::kAuto: return "stage auto (chosen at Engine::Open)";
  }
  return "?";
}

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace zero

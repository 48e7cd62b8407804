// model_cuda.h without CUDA built in (ZERO_WITH_CUDA off or no nvcc): the model reports itself unavailable, so
// callers and lora_cuda_model_test can say why instead of failing to link.
#include <cstdio>
#include <cstdlib>

#include "examples/lora_finetune/model_cuda.h"

namespace lora {
namespace {

[[noreturn]] void Unavailable() {
  std::fprintf(stderr, "lora cuda model: this build has no CUDA support (configure with -DZERO_WITH_CUDA=ON)\n");
  std::abort();
}

}  // namespace

bool CudaModelAvailable(std::string* why) {
  if (why != nullptr) *why = "built without CUDA (configure with -DZERO_WITH_CUDA=ON and nvcc on PATH)";
  return false;
}

std::unique_ptr<Workspace> NewCudaWorkspace() { Unavailable(); }

float ForwardCuda(const ModelConfig&, const LoraConfig&, CudaParamAccess&, const Batch&, bool, float, uint64_t,
                  const PassOptions&) {
  Unavailable();
}

void LogitsCuda(const ModelConfig&, const LoraConfig&, CudaParamAccess&, const Batch&, std::vector<float>*,
                Workspace*) {
  Unavailable();
}

}  // namespace lora

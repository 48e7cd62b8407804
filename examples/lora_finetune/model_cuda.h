// The LoRA example's model on a CUDA GPU: the same decoder, pass protocol and results as model.h's CPU model,
// with bf16 parameters and bf16 inputs to every matrix product (cuBLAS, fp32 accumulation) and the element- and
// row-wise math from model_kernels.cuh, the functors the CPU model runs (so their arithmetic is tested on the
// CPU; lora_kernels_test). The residual stream, normalisation statistics, softmax, losses and gradients stay
// fp32.
//
// Everything is enqueued on the calling thread's current device (zero's Comm::OpenNccl makes the rank's GPU
// current) and on the legacy default stream, zero's compute stream on the CUDA backend (the one its
// Acquire/GradsReady order against); Forward waits for it once, to read the loss. Activations live in a device
// Workspace (NewCudaWorkspace): one arena, sized by the first pass, then reused with no allocation. No machine
// that builds this project has a GPU: lora_cuda_model_test compares it with the CPU model where one exists.
//
// This header needs no CUDA header; without CUDA built in (model_cuda_stub.cc), CudaModelAvailable says so and
// the other calls abort.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "examples/lora_finetune/model.h"

namespace lora {

// True when this build has the CUDA model and a CUDA device is usable; otherwise false with the reason in *why.
bool CudaModelAvailable(std::string* why);

// ParamAccess for device memory: Param(p) is a device pointer to p's bf16 values (zero's view with
// param_dtype = kBF16), Grad(p) a device pointer to its fp32 gradient (grad_dtype = kF32), accumulated (+=).
class CudaParamAccess {
 public:
  virtual ~CudaParamAccess() = default;
  virtual void Acquire(int unit, bool backward) = 0;
  virtual void Release(int unit, bool backward) = 0;
  virtual void GradsReady(int unit) = 0;
  virtual const void* Param(int param) = 0;  // device, bf16, valid while its unit is acquired
  virtual float* Grad(int param) = 0;        // device, fp32; asked only for trainable parameters
};

// A workspace in device memory for the CUDA model (PassOptions::workspace), allocated and freed in order on the
// model's stream.
std::unique_ptr<Workspace> NewCudaWorkspace();

// model.h's Forward and Logits on the GPU: batch.tokens and batch.targets are host arrays; logits come back to
// the host. The access protocol is model.h's, call for call; options as model.h's (the workspace a device one).
float ForwardCuda(const ModelConfig&, const LoraConfig&, CudaParamAccess&, const Batch&, bool backward,
                  float loss_scale, uint64_t dropout_seed, const PassOptions& options = {});
void LogitsCuda(const ModelConfig&, const LoraConfig&, CudaParamAccess&, const Batch&, std::vector<float>* logits,
                Workspace* workspace = nullptr);

}  // namespace lora

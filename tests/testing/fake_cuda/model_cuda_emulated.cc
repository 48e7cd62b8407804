// The LoRA example's CUDA model (examples/lora_finetune/model_cuda.cu) compiled for the CPU: its host code against
// the CUDA runtime and cuBLAS stand-ins beside this file, its kernels through the launch emulation of
// testing/cuda_emulation.h (which must come first: it makes the kernel source host-compilable). What this build
// exercises and what it cannot show: testing/fake_cuda/cuda_runtime.h and testing/cuda_emulation.h.
#include "testing/cuda_emulation.h"
// (the emulation first, then the model)
#include "examples/lora_finetune/model_cuda.cu"

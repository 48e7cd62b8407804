// LaunchToyOpCuda (toy_kernels_cuda.h) for the ZERO_CUDA_EMULATION build, in place of toy_kernels.cu: the toy
// model's items (toy_math.cuh, the same functions the CUDA kernel runs per item) in a loop on the calling thread,
// while device memory is accessible, after checking what the real launch would meet: every pointer the op is given
// lies in device memory (a host pointer would be an illegal address on a GPU). What this tests is the kernel
// trainer's plumbing (toy_kernel_model.cc: buffers, views, the compute stream); toy_kernels.cu's own grid-stride
// loop is exercised separately (the kernel-launch emulator, testing/cuda_emulation.h) and on a GPU.
#include <cstdio>
#include <string>

#include "cuda_runtime.h"  // the stand-in (testing/fake_cuda)
#include "testing/toy_kernels_cuda.h"

namespace zero::testing {
namespace {

// The first non-null pointer of `args` that is not memory of the stream's device, or nullptr; *name says which.
const void* HostPointer(const ToyArgs& a, cudaStream_t stream, const char** name) {
  const int device = fake_cuda::StreamDevice(stream);  // the legacy stream's: the current device
  const auto bad = [&](const void* p, const char* what) {
    if (p == nullptr || fake_cuda::DeviceOf(p) == device) return false;
    *name = what;
    return true;
  };
  if (bad(a.tokens, "tokens")) return a.tokens;
  if (bad(a.targets, "targets")) return a.targets;
  for (int k = 0; k < kToyParams; ++k) {
    if (bad(a.param[k].data, "param[k].data")) return a.param[k].data;
    if (bad(a.grad[k], "grad[k]")) return a.grad[k];
  }
  const void* acts[] = {a.acts.x0, a.acts.h1, a.acts.x1, a.acts.t2,         a.acts.x2,  a.acts.t3,
                        a.acts.dl, a.acts.dx, a.acts.dh, a.acts.loss_parts, a.acts.loss};
  for (const void* p : acts) {
    if (bad(p, "an activation")) return p;
  }
  if (bad(a.src, "src")) return a.src;
  if (bad(a.dst, "dst")) return a.dst;
  return nullptr;
}

}  // namespace

std::string LaunchToyOpCuda(ToyOp op, const ToyArgs& args, void* stream) {
  const int64_t n = ToyOpCount(op, args);
  if (n == 0) return "";
  const auto s = static_cast<cudaStream_t>(stream);
  const char* name = "";
  if (!fake_cuda::IsValidStream(s)) {
    std::fprintf(stderr, "emulated toy op %d: launched on stream %p, which is not a live stream\n",
                 static_cast<int>(op), stream);
    fake_cuda::SetLastError(cudaErrorInvalidResourceHandle);
  } else if (const void* p = HostPointer(args, s, &name); p != nullptr) {
    std::fprintf(stderr, "emulated toy op %d: %s (%p) is not memory of the stream's device\n", static_cast<int>(op),
                 name, p);
    fake_cuda::SetLastError(cudaErrorIllegalAddress);
  } else {  // on the stream: now, or when it gets there in the fake runtime's deferred mode
    (void)fake_cuda::Enqueue(s, [op, args, n] {
      for (int64_t i = 0; i < n; ++i) RunToyOpItem(op, args, i);
    });
  }
  const cudaError_t rc = cudaGetLastError();  // as the real launcher: an earlier uncleared error shows here too
  return rc == cudaSuccess ? std::string() : std::string("toy op kernel launch: ") + cudaGetErrorString(rc);
}

}  // namespace zero::testing

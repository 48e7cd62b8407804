// The CUDA runtime calls the test helpers need beyond copies (device_copy.h): device count, allocations, a
// stream, a fill and synchronisation, as Status functions. Without CUDA in the build each returns Unavailable,
// so callers compile everywhere and skip (CUDA cases) or never get here (CPU cases).
#pragma once

#include <cstdint>

#include "zero/status.h"

namespace zero::testing {

// Visible CUDA devices; Unavailable saying why when there are none (no driver, no GPU, no CUDA in the build).
Status CudaDeviceCount(int* count);
// cudaSetDevice for the calling thread.
Status CudaSetDevice(int device);
// cudaMalloc / cudaFree on the current device. DeviceFree(nullptr) does nothing.
Status DeviceMalloc(int64_t bytes, void** out);
void DeviceFree(void* p);
// cudaDeviceSynchronize: every stream of the current device has finished its work.
Status DeviceSynchronize();
// A non-blocking stream (cudaStreamNonBlocking, like the engine's) and its destruction.
Status NewNonBlockingStream(void** stream);
void DestroyStream(void* stream);
// cudaMemsetAsync(p, byte, bytes, stream): enqueued, not waited for.
Status MemsetAsync(void* p, int byte, int64_t bytes, void* stream);
// cudaStreamSynchronize.
Status StreamSynchronize(void* stream);

}  // namespace zero::testing

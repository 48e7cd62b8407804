// A host-only stand-in for the subset of the CUDA runtime that zero's CUDA host code uses: the LoRA example's CUDA
// model (examples/lora_finetune/model_cuda.cu), and, in the ZERO_CUDA_EMULATION build, libzero's CUDA device
// (src/cuda_device.cc, cuda_errors.h, the pinned host memory it registers) and the tests' CUDA helpers, so that
// Backend::kCuda runs on a machine without a GPU and the engine suites' CUDA cases run in ctest. Put this
// directory first on the include path of such a target and never on one that uses the real runtime. One instance
// per process: it is the shared library zero_fake_cuda (testing/fake_cuda/CMakeLists.txt says why).
//
// What it checks that a plain "malloc" stand-in would not:
//   - device memory is a separate world: each allocation is its own mapping, inaccessible (PROT_NONE) except while
//     a runtime call, a cuBLAS call or an emulated kernel runs, so host code that reads or writes device memory
//     directly faults here as it would (or worse, silently misbehave) on a GPU;
//   - copies name their direction: a kind that does not match where the pointers are (host or device), or a range
//     outside its allocation, fails with cudaErrorInvalidValue, as does freeing what was not allocated;
//   - handles are checked: a stream or event that was never created or is already destroyed is
//     cudaErrorInvalidResourceHandle wherever it is passed (a GPU run would often go on silently or crash);
//   - host registration follows cudaHostRegister's rules (overlap, unregistering what was not registered), and
//     cudaPointerGetAttributes tells device, registered and unregistered memory apart;
//   - the last error is sticky until cudaGetLastError, and per host thread, like the runtime's;
//   - allocations beyond the device's capacity (SetCapacity; 16 GiB unless changed) fail with
//     cudaErrorMemoryAllocation, and fresh device memory reads as NaN, not zero;
//   - with several devices (SetDeviceCount, ZERO_FAKE_CUDA_DEVICES), the multi-device rules: memory, streams and
//     events belong to the thread's current device, a kernel launch on another device's stream fails, a kernel's
//     operands must be on its stream's device, an event is recorded only on a stream of its own device.
// Two modes of execution, both on the calling threads (which stay real and concurrent: on Backend::kCuda the engine
// calls the runtime from the thread that drives it, a trainer may call it from others; one lock serializes them):
//   - at issue (the default): every copy, memset and kernel is complete when its call returns, so every event is
//     complete once recorded, every stream idle, and cudaStreamWaitEvent orders nothing that is not already
//     ordered: no missing wait, no host read of pinned memory before its copy landed, can show;
//   - deferred (SetDeferred, ZERO_FAKE_CUDA_DEFERRED=1): work is queued per stream and runs only when something
//     waits for it (a stream or event synchronization or query, a wait another stream reaches, a call the runtime
//     documents as synchronous, cudaFree), as late as the runtime's documented synchronization allows. A missing
//     cudaStreamWaitEvent, a record on the wrong stream, a read of a pinned buffer before its copy's stream was
//     waited for, all show deterministically (stale bytes), and queries answer cudaErrorNotReady before work ran.
//     What it still cannot show: a true overlap (two streams' work interleaved, a kernel racing a copy), timing,
//     or the order a GPU picks among streams that are not ordered (here: the order in which they are waited for).
// Kernels are the CPU instantiations of the same math (testing/fake_cuda/emulated_kernels.cc), not the .cu sources.
//
// The names are CUDA's; the types are distinct (Fake* tags) and the functions have C++ linkage, so a program may
// link the real runtime as well without a clash. Error codes and enum values are the runtime's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

enum FakeCudaError : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorHostMemoryAlreadyRegistered = 712,
  cudaErrorHostMemoryNotRegistered = 713,
};
using cudaError_t = FakeCudaError;

enum FakeCudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
using cudaMemcpyKind = FakeCudaMemcpyKind;

// Streams: nullptr is the legacy default stream; others come from cudaStreamCreate*.
struct FakeCudaStream;
using cudaStream_t = FakeCudaStream*;
// The runtime's special handles (as its driver_types.h defines them): the legacy default stream by name, and the
// calling host thread's per-thread default stream. The stand-in takes neither as a stream to launch on: code that
// must handle them maps or refuses them first.
#define cudaStreamLegacy (reinterpret_cast<cudaStream_t>(0x1))
#define cudaStreamPerThread (reinterpret_cast<cudaStream_t>(0x2))
struct FakeCudaEvent;
using cudaEvent_t = FakeCudaEvent*;

// Flags, with the runtime's values.
inline constexpr unsigned int cudaStreamDefault = 0x0;
inline constexpr unsigned int cudaStreamNonBlocking = 0x1;
inline constexpr unsigned int cudaEventDefault = 0x0;
inline constexpr unsigned int cudaEventBlockingSync = 0x1;
inline constexpr unsigned int cudaEventDisableTiming = 0x2;
inline constexpr unsigned int cudaEventInterprocess = 0x4;
inline constexpr unsigned int cudaEventWaitDefault = 0x0;
inline constexpr unsigned int cudaEventWaitExternal = 0x1;
inline constexpr unsigned int cudaHostRegisterDefault = 0x0;
inline constexpr unsigned int cudaHostRegisterPortable = 0x1;
inline constexpr unsigned int cudaHostRegisterMapped = 0x2;
inline constexpr unsigned int cudaHostRegisterIoMemory = 0x4;
inline constexpr unsigned int cudaHostRegisterReadOnly = 0x8;

enum FakeCudaMemoryType : int {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};
using cudaMemoryType = FakeCudaMemoryType;

struct cudaPointerAttributes {
  cudaMemoryType type = cudaMemoryTypeUnregistered;
  int device = -1;
  void* devicePointer = nullptr;
  void* hostPointer = nullptr;
};

enum FakeCudaDataType : int {
  CUDA_R_32F = 0,
  CUDA_R_16BF = 14,
};
using cudaDataType = FakeCudaDataType;

cudaError_t cudaGetDeviceCount(int* count);
// "0000:BB:00.0", BB = 0x10 + the machine's GPU behind `device` (ZERO_FAKE_CUDA_VISIBLE_DEVICES, like
// CUDA_VISIBLE_DEVICES, lists them; by default ordinal d is GPU d).
cudaError_t cudaDeviceGetPCIBusId(char* id, int len, int device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);

cudaError_t cudaMalloc(void** p, size_t bytes);
// The runtime's C++ overload for typed pointers (cuda_runtime.h's template), which tests call with float**.
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
// Device attributes: only whether the device has stream-ordered memory pools (1; 0 under ZERO_FAKE_CUDA_NO_POOLS=1,
// like a virtualized GPU without them, where cudaMallocAsync then fails with cudaErrorNotSupported).
enum FakeCudaDeviceAttr : int { cudaDevAttrMemoryPoolsSupported = 115 };
using cudaDeviceAttr = FakeCudaDeviceAttr;
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream);
cudaError_t cudaHostRegister(void* p, size_t bytes, unsigned int flags);
cudaError_t cudaHostUnregister(void* p);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* p);

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);

cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags);
cudaError_t cudaStreamCreateWithPriority(cudaStream_t* stream, unsigned int flags, int priority);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags);
cudaError_t cudaDeviceSynchronize();

cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventSynchronize(cudaEvent_t event);

namespace fake_cuda {

// Device bytes allocated now and at most since the last ResetPeak (what a test compares with an estimate).
int64_t LiveBytes();
int64_t PeakBytes();
void ResetPeak();
// Live allocations, streams, events and host registrations (leak checks for tests).
int64_t LiveAllocations();
int64_t LiveStreams();
int64_t LiveEvents();
int64_t LiveRegistrations();
// The device's memory (cudaMemGetInfo's total; cudaMalloc refuses beyond it). 16 GiB unless set.
void SetCapacity(int64_t bytes);
// The priority a stream was created with, after clamping to the device's range (cudaStreamGetPriority's answer).
int StreamPriority(cudaStream_t stream);

// Makes device memory accessible for the lifetime of the object (kernels, cuBLAS, the runtime's own calls) and
// holds the runtime's lock: one call or kernel at a time in the process, as on one in-order queue. Nests; not for
// use by the code under test.
class DeviceAccess {
 public:
  DeviceAccess();
  ~DeviceAccess();
  DeviceAccess(const DeviceAccess&) = delete;
  DeviceAccess& operator=(const DeviceAccess&) = delete;
};

// Records a failure as the calling thread's sticky last error (a kernel launch that was refused).
void SetLastError(cudaError_t e);
// A kernel launch's configuration as the runtime checks it (kernels/launch.cuh's LaunchConfigValid, the limits of
// every GPU since sm_70): a block of at most 1024 threads, x and y at most 1024 and z at most 64; a grid of at most
// 2^31 - 1 blocks in x, 65535 in y and z; no dimension 0 (an empty grid is refused, not a no-op). Otherwise
// cudaErrorInvalidConfiguration, also as the thread's last error, as a <<<...>>> launch reports it. Emulated
// launches call it first, so that a configuration a GPU refuses fails on the CPU too.
cudaError_t CheckLaunch(unsigned int grid_x, unsigned int grid_y, unsigned int grid_z, unsigned int block_x,
                        unsigned int block_y, unsigned int block_z);
// Whether [p, p + bytes) lies inside one device allocation.
bool IsDevice(const void* p, size_t bytes);
// Whether `stream` may be launched on: the legacy stream (nullptr) or a live created stream.
bool IsValidStream(cudaStream_t stream);

// Deferred mode (on when the environment has ZERO_FAKE_CUDA_DEFERRED=1 at the first call, or after
// SetDeferred(true)): work is queued per stream and runs only when something waits for it, as late as the
// runtime's documented synchronization allows, so that a missing wait shows deterministically. Switching runs
// everything queued first.
void SetDeferred(bool deferred);
bool Deferred();
// Appends `work` (a kernel's body) to `stream`'s queue, or runs it now when not deferred; it runs with device
// memory accessible. cudaErrorInvalidResourceHandle (the thread's last error too) for a stream that is not live
// or not of the calling thread's current device (a kernel launch there fails).
cudaError_t Enqueue(cudaStream_t stream, std::function<void()> work);
// A unit of work that may take several runs to complete (the NCCL stand-in's collectives, which wait for their
// peers' messages): each run of the stream calls `step`, which returns whether it is complete; until it is, it
// stays at the head of the stream, later work waits behind it, queries answer cudaErrorNotReady, and
// synchronizations poll it (the runtime's lock held, as a synchronization blocks on a GPU). The first run is when
// the stream reaches it: at issue unless deferred or behind an incomplete step. Errors as Enqueue's.
cudaError_t EnqueueStep(cudaStream_t stream, std::function<bool()> step);

// Several devices (ZERO_FAKE_CUDA_DEVICES=N at the first call, or SetDeviceCount; 1 unless set), each with its
// legacy stream and capacity. Allocations, streams and events belong to the calling thread's current device
// (cudaSetDevice, per thread) when made; a kernel's operands must be on its stream's device (no peer access), an
// event is recorded only on a stream of its own device; copies and waits may cross devices.
void SetDeviceCount(int devices);
// The device of the allocation holding p (-1: not device memory), and of a stream (-1: not a live stream).
int DeviceOf(const void* p);
int StreamDevice(cudaStream_t stream);

}  // namespace fake_cuda

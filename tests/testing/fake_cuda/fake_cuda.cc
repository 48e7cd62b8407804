// The host-only CUDA runtime and cuBLAS stand-ins (cuda_runtime.h, cublas_v2.h beside this file): device memory as
// separate page mappings that are inaccessible outside runtime calls and kernels, checked copies, checked stream
// and event handles, host registration, a sticky per-thread last error, and cuBLAS's column-major GEMM contract
// computed directly. Work runs at issue, or in deferred mode (cuda_runtime.h) is queued per stream and runs only
// when something waits for it. Thread-safe: one lock serializes every call that touches the runtime's tables,
// queues or device memory.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "cublas_v2.h"
#include "cuda_runtime.h"
#include "kernels/cast.cuh"
#include "kernels/launch.cuh"  // the runtime's launch limits, as the CPU launch emulation checks them

namespace fake_cuda {
// A stream's work in issue order: operations numbered 1, 2, ... as enqueued; those up to `executed` have run.
// Shared, so that an event or a wait still refers to the work of a stream destroyed since.
struct Queue {
  // An operation returns whether it is complete: a step (EnqueueStep: a collective waiting for its peers) may need
  // several runs, and the queue stays at it until it says so.
  std::deque<std::pair<uint64_t, std::function<bool()>>> pending;
  uint64_t enqueued = 0;
  uint64_t executed = 0;
  bool running = false;   // an operation of this queue is running (a nested run of it must not overtake it)
  bool blocking = false;  // created without cudaStreamNonBlocking: ordered with the legacy stream both ways
};
}  // namespace fake_cuda

struct FakeCudaStream {
  unsigned int flags;
  int priority;
  int device;  // current when it was created
  std::shared_ptr<fake_cuda::Queue> queue;
};
struct FakeCudaEvent {
  unsigned int flags;
  int device;                               // current when it was created
  std::shared_ptr<fake_cuda::Queue> queue;  // of the stream of the last record; null: never recorded
  uint64_t position = 0;                    // the work recorded: that queue's operations up to here
};

namespace fake_cuda {
namespace {

constexpr int kMaxDevices = 8;
// cudaDeviceGetStreamPriorityRange on current GPUs: 0 is the least priority, -5 the greatest (lower is higher).
constexpr int kLeastPriority = 0;
constexpr int kGreatestPriority = -5;

struct Allocation {
  size_t bytes;   // what was asked for
  size_t mapped;  // whole pages
  int device;     // current when it was allocated
};

struct State {
  std::recursive_mutex mu;
  std::map<uintptr_t, Allocation> live;    // by start address
  std::map<uintptr_t, size_t> registered;  // cudaHostRegister ranges: start -> bytes
  std::set<const FakeCudaStream*> streams;
  std::set<const FakeCudaEvent*> events;
  int64_t live_bytes = 0;  // all devices
  int64_t peak_bytes = 0;
  int64_t capacity = int64_t{16} << 30;  // each device's
  int devices = 1;
  int physical[kMaxDevices] = {0, 1, 2, 3, 4, 5, 6, 7};  // the machine's GPU behind each visible ordinal
  int64_t device_bytes[kMaxDevices] = {};
  int access_depth = 0;                        // DeviceAccess nesting: > 0 while device memory is readable and writable
  std::shared_ptr<Queue> legacy[kMaxDevices];  // each device's legacy default stream (nullptr)
  bool deferred = false;
};

State& S() {
  static State* s = [] {  // never destroyed: thread_local cuBLAS handles may be released after main
    auto* state = new State;
    const char* env = std::getenv("ZERO_FAKE_CUDA_DEFERRED");
    state->deferred = env != nullptr && std::strcmp(env, "1") == 0;
    const char* devices = std::getenv("ZERO_FAKE_CUDA_DEVICES");
    if (devices != nullptr) state->devices = std::clamp(std::atoi(devices), 1, kMaxDevices);
    // As CUDA_VISIBLE_DEVICES: the machine's GPUs this process sees, in order (a launcher gives each rank its own);
    // it sets the device count, and cudaDeviceGetPCIBusId names the machine's GPU behind an ordinal.
    if (const char* visible = std::getenv("ZERO_FAKE_CUDA_VISIBLE_DEVICES"); visible != nullptr && *visible != '\0') {
      int n = 0;
      for (const char* c = visible; *c != '\0' && n < kMaxDevices;) {
        state->physical[n++] = std::clamp(std::atoi(c), 0, kMaxDevices - 1);
        const char* comma = std::strchr(c, ',');
        if (comma == nullptr) break;
        c = comma + 1;
      }
      state->devices = std::max(n, 1);
    }
    for (auto& q : state->legacy) q = std::make_shared<Queue>();
    return state;
  }();
  return *s;
}

// The runtime's last error and current device are per host thread.
thread_local cudaError_t last_error = cudaSuccess;
thread_local int current_device = 0;

size_t PageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

void Protect(uintptr_t start, const Allocation& a, bool accessible) {
  if (mprotect(reinterpret_cast<void*>(start), a.mapped, accessible ? PROT_READ | PROT_WRITE : PROT_NONE) != 0) {
    std::perror("fake_cuda: mprotect");
    std::abort();
  }
}

cudaError_t Fail(cudaError_t e) {
  last_error = e;
  return e;
}

// The allocation holding [p, p + bytes), or live.end().
std::map<uintptr_t, Allocation>::iterator Find(const void* p, size_t bytes) {
  auto& live = S().live;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = live.upper_bound(addr);
  if (it == live.begin()) return live.end();
  --it;
  if (addr + bytes > it->first + it->second.bytes) return live.end();
  return it;
}

// Whether p lies outside every device mapping.
bool IsHost(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto& live = S().live;
  auto it = live.upper_bound(addr);
  if (it == live.begin()) return true;
  --it;
  return addr >= it->first + it->second.mapped;
}

// Whether [p, p + bytes) overlaps any device mapping.
bool TouchesDevice(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto& live = S().live;
  auto it = live.lower_bound(a + bytes);  // first mapping starting at or after the end
  if (it == live.begin()) return false;
  --it;
  return it->first + it->second.mapped > a;
}

// The registered range holding p, or registered.end().
std::map<uintptr_t, size_t>::iterator FindRegistered(const void* p) {
  auto& reg = S().registered;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = reg.upper_bound(addr);
  if (it == reg.begin()) return reg.end();
  --it;
  return addr < it->first + it->second ? it : reg.end();
}

bool ValidStream(cudaStream_t s) { return s == nullptr || S().streams.count(s) != 0; }
bool ValidEvent(cudaEvent_t e) { return e != nullptr && S().events.count(e) != 0; }

// The lock is held by the callers of everything below.
const std::shared_ptr<Queue>& QueueOf(cudaStream_t s) { return s == nullptr ? S().legacy[current_device] : s->queue; }
// The device a stream belongs to: the current one for the legacy stream.
int DeviceOfStream(cudaStream_t s) { return s == nullptr ? current_device : s->device; }

// Runs q's operations up to `position` (all when it is q->enqueued), in order, on this thread, as far as they go:
// a step that is not complete (EnqueueStep) stops the queue there. Returns whether q got to `position`. An
// operation may run another queue's (a wait); a wait only ever names work enqueued before it, so this cannot cycle.
bool RunUpTo(const std::shared_ptr<Queue>& q, uint64_t position) {
  if (q->running) return q->executed >= position;
  while (q->executed < position && !q->pending.empty()) {
    auto op = std::move(q->pending.front());
    q->pending.pop_front();
    bool done = false;
    q->running = true;
    {
      DeviceAccess access;
      done = op.second();
    }
    q->running = false;
    if (!done) {
      q->pending.push_front(std::move(op));
      return false;
    }
    q->executed = op.first;
  }
  return q->executed >= position;
}
bool RunAll(const std::shared_ptr<Queue>& q) { return RunUpTo(q, q->enqueued); }

// The blocking forms (a synchronization): run until the work is complete, polling steps that wait for something
// outside this process (a peer's messages) with the runtime's lock held, as a synchronization blocks on a GPU.
void WaitUpTo(const std::shared_ptr<Queue>& q, uint64_t position) {
  while (!RunUpTo(q, position)) std::this_thread::sleep_for(std::chrono::microseconds(20));
}
void DrainAll(const std::shared_ptr<Queue>& q) { WaitUpTo(q, q->enqueued); }
void RunEverything() {
  for (;;) {
    bool done = true;
    for (const auto& q : S().legacy) done = RunAll(q) && done;
    for (const FakeCudaStream* st : S().streams) done = RunAll(st->queue) && done;
    if (done) return;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

// Appends `step` to q: runs it now (as far as q goes) unless deferred. The legacy stream and blocking streams wait
// for each other's earlier work (the runtime's implicit synchronization); non-blocking streams wait for nothing
// they are not told to. At issue, only a step that is not complete yet (EnqueueStep) leaves work queued.
void PushStep(const std::shared_ptr<Queue>& q, std::function<bool()> step) {
  State& s = S();
  const auto wait_for = [&](const std::shared_ptr<Queue>& other) {
    if (other->executed < other->enqueued) {
      q->pending.emplace_back(++q->enqueued, [other, at = other->enqueued] { return RunUpTo(other, at); });
    }
  };
  for (int d = 0; d < kMaxDevices; ++d) {  // a device's legacy stream and its blocking streams
    if (q == s.legacy[d]) {
      for (const FakeCudaStream* st : s.streams) {
        if (st->queue->blocking && st->device == d) wait_for(st->queue);
      }
    }
  }
  if (q->blocking) {
    for (const FakeCudaStream* st : s.streams) {
      if (st->queue == q) wait_for(s.legacy[st->device]);
    }
  }
  q->pending.emplace_back(++q->enqueued, std::move(step));
  if (!s.deferred) RunAll(q);
}
void Push(const std::shared_ptr<Queue>& q, std::function<void()> work) {
  PushStep(q, [work = std::move(work)] {
    work();
    return true;
  });
}

bool IsRegistered(const void* p) { return FindRegistered(p) != S().registered.end(); }

void FreeNow(void* p) {
  auto& s = S();
  auto it = s.live.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.live.end()) return;
  s.live_bytes -= static_cast<int64_t>(it->second.bytes);
  s.device_bytes[it->second.device] -= static_cast<int64_t>(it->second.bytes);
  munmap(p, it->second.mapped);
  s.live.erase(it);
}

}  // namespace

int64_t LiveBytes() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return S().live_bytes;
}
int64_t PeakBytes() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return S().peak_bytes;
}
void ResetPeak() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  S().peak_bytes = S().live_bytes;
}
int64_t LiveAllocations() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return static_cast<int64_t>(S().live.size());
}
int64_t LiveStreams() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return static_cast<int64_t>(S().streams.size());
}
int64_t LiveEvents() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return static_cast<int64_t>(S().events.size());
}
int64_t LiveRegistrations() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return static_cast<int64_t>(S().registered.size());
}
void SetCapacity(int64_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  S().capacity = bytes;
}
int StreamPriority(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return stream == nullptr || !ValidStream(stream) ? 0 : stream->priority;
}

DeviceAccess::DeviceAccess() {
  State& s = S();
  s.mu.lock();  // held for the object's lifetime: one runtime call or kernel at a time
  if (s.access_depth++ == 0) {
    for (const auto& [start, a] : s.live) Protect(start, a, true);
  }
}

DeviceAccess::~DeviceAccess() {
  State& s = S();
  if (--s.access_depth == 0) {
    for (const auto& [start, a] : s.live) Protect(start, a, false);
  }
  s.mu.unlock();
}

void SetLastError(cudaError_t e) { last_error = e; }

cudaError_t CheckLaunch(unsigned int grid_x, unsigned int grid_y, unsigned int grid_z, unsigned int block_x,
                        unsigned int block_y, unsigned int block_z) {
  const bool ok = zero::kernels::LaunchConfigValid(grid_x, grid_y, grid_z, block_x, block_y, block_z);
  return ok ? cudaSuccess : Fail(cudaErrorInvalidConfiguration);
}

bool IsDevice(const void* p, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return Find(p, bytes) != S().live.end();
}

bool IsValidStream(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return ValidStream(stream);
}

void SetDeferred(bool deferred) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  RunEverything();
  S().deferred = deferred;
}

bool Deferred() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return S().deferred;
}

int DeviceOf(const void* p) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  auto it = Find(p, 1);
  return it == S().live.end() ? -1 : it->second.device;
}

int StreamDevice(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  return ValidStream(stream) ? DeviceOfStream(stream) : -1;
}

void SetDeviceCount(int devices) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  RunEverything();
  S().devices = std::clamp(devices, 1, kMaxDevices);
  if (current_device >= S().devices) current_device = 0;
}

// A kernel launch "will fail if it is issued to a stream that is not associated to the current device".
cudaError_t Enqueue(cudaStream_t stream, std::function<void()> work) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (!ValidStream(stream) || DeviceOfStream(stream) != current_device) {
    return Fail(cudaErrorInvalidResourceHandle);
  }
  Push(QueueOf(stream), std::move(work));
  return cudaSuccess;
}

cudaError_t EnqueueStep(cudaStream_t stream, std::function<bool()> step) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (!ValidStream(stream) || DeviceOfStream(stream) != current_device) {
    return Fail(cudaErrorInvalidResourceHandle);
  }
  PushStep(QueueOf(stream), std::move(step));
  return cudaSuccess;
}

}  // namespace fake_cuda

using fake_cuda::DeviceAccess;
using fake_cuda::S;

// --- device, errors ----------------------------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return fake_cuda::Fail(cudaErrorInvalidValue);
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  *count = S().devices;
  return cudaSuccess;
}

// A bus id per machine GPU ("0000:1N:00.0" for GPU N), so that ranks that see one GPU under different ordinals
// name it alike, and different GPUs differently.
cudaError_t cudaDeviceGetPCIBusId(char* id, int len, int device) {
  if (id == nullptr || len < 13) return fake_cuda::Fail(cudaErrorInvalidValue);
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (device < 0 || device >= S().devices) return fake_cuda::Fail(cudaErrorInvalidDevice);
  std::snprintf(id, static_cast<size_t>(len), "0000:%02X:00.0", 0x10 + S().physical[device]);
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (device < 0 || device >= S().devices) return fake_cuda::Fail(cudaErrorInvalidDevice);
  fake_cuda::current_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return fake_cuda::Fail(cudaErrorInvalidValue);
  *device = fake_cuda::current_device;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  if (free_bytes == nullptr || total_bytes == nullptr) return fake_cuda::Fail(cudaErrorInvalidValue);
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  *total_bytes = static_cast<size_t>(S().capacity);
  *free_bytes = static_cast<size_t>(std::max<int64_t>(0, S().capacity - S().device_bytes[fake_cuda::current_device]));
  return cudaSuccess;
}

cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  // Either pointer may be null (the runtime fills what it is given).
  if (least != nullptr) *least = fake_cuda::kLeastPriority;
  if (greatest != nullptr) *greatest = fake_cuda::kGreatestPriority;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = fake_cuda::last_error;
  fake_cuda::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return fake_cuda::last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorHostMemoryAlreadyRegistered:
      return "part or all of the requested memory range is already mapped";
    case cudaErrorHostMemoryNotRegistered:
      return "pointer does not correspond to a registered memory region";
  }
  return "unrecognized error code";
}

// --- memory ------------------------------------------------------------------------------------------------------

cudaError_t cudaMalloc(void** p, size_t bytes) {
  DeviceAccess access;
  if (p == nullptr) return fake_cuda::Fail(cudaErrorInvalidValue);
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;  // the runtime returns success and a null pointer for zero bytes
  auto& s = S();
  const int device = fake_cuda::current_device;
  if (static_cast<int64_t>(bytes) < 0 || s.device_bytes[device] + static_cast<int64_t>(bytes) > s.capacity) {
    return fake_cuda::Fail(cudaErrorMemoryAllocation);
  }
  const size_t page = fake_cuda::PageSize();
  const size_t mapped = (bytes + page - 1) / page * page;
  void* m = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return fake_cuda::Fail(cudaErrorMemoryAllocation);
  // Fresh device memory is not zero on a GPU: fill it with a pattern that reads as NaN in fp32 and bf16, so that
  // a missing initialisation shows.
  std::memset(m, 0xff, mapped);
  s.live[reinterpret_cast<uintptr_t>(m)] = fake_cuda::Allocation{bytes, mapped, device};
  s.live_bytes += static_cast<int64_t>(bytes);
  s.device_bytes[device] += static_cast<int64_t>(bytes);
  if (s.live_bytes > s.peak_bytes) s.peak_bytes = s.live_bytes;
  *p = m;
  return cudaSuccess;  // left accessible until `access` ends, like every other allocation
}

// cudaFree synchronizes the device: all work issued before it has run when the memory goes.
cudaError_t cudaFree(void* p) {
  DeviceAccess access;
  if (p == nullptr) return cudaSuccess;
  auto& s = S();
  if (s.live.count(reinterpret_cast<uintptr_t>(p)) == 0) {
    return fake_cuda::Fail(cudaErrorInvalidValue);  // not the start of an allocation
  }
  fake_cuda::RunEverything();
  fake_cuda::FreeNow(p);
  return cudaSuccess;
}

namespace fake_cuda {
bool NoPools() {
  static const bool none = [] {
    const char* env = std::getenv("ZERO_FAKE_CUDA_NO_POOLS");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  return none;
}
}  // namespace fake_cuda

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr || attr != cudaDevAttrMemoryPoolsSupported) return fake_cuda::Fail(cudaErrorInvalidValue);
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (device < 0 || device >= S().devices) return fake_cuda::Fail(cudaErrorInvalidDevice);
  *value = fake_cuda::NoPools() ? 0 : 1;
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream) {
  if (fake_cuda::NoPools()) return fake_cuda::Fail(cudaErrorNotSupported);
  if (!fake_cuda::IsValidStream(stream)) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  return cudaMalloc(p, bytes);
}
// Stream-ordered: the memory goes once the stream's earlier work has run.
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream) {
  DeviceAccess access;
  if (!fake_cuda::ValidStream(stream)) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  if (p == nullptr) return cudaSuccess;
  if (S().live.count(reinterpret_cast<uintptr_t>(p)) == 0) return fake_cuda::Fail(cudaErrorInvalidValue);
  fake_cuda::Push(fake_cuda::QueueOf(stream), [p] { fake_cuda::FreeNow(p); });
  return cudaSuccess;
}

// The runtime's contract: the range must not overlap a registered one (cudaErrorHostMemoryAlreadyRegistered);
// a null pointer, zero bytes or an unknown flag is cudaErrorInvalidValue; so is device memory (not host memory).
cudaError_t cudaHostRegister(void* p, size_t bytes, unsigned int flags) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  constexpr unsigned int kKnown =
      cudaHostRegisterPortable | cudaHostRegisterMapped | cudaHostRegisterIoMemory | cudaHostRegisterReadOnly;
  if (p == nullptr || bytes == 0 || (flags & ~kKnown) != 0) return fake_cuda::Fail(cudaErrorInvalidValue);
  if (fake_cuda::TouchesDevice(p, bytes)) return fake_cuda::Fail(cudaErrorInvalidValue);
  auto& reg = S().registered;
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto next = reg.lower_bound(a);
  if (next != reg.end() && next->first < a + bytes) return fake_cuda::Fail(cudaErrorHostMemoryAlreadyRegistered);
  if (next != reg.begin() && std::prev(next)->first + std::prev(next)->second > a) {
    return fake_cuda::Fail(cudaErrorHostMemoryAlreadyRegistered);
  }
  reg[a] = bytes;
  return cudaSuccess;
}

// `p` must be the base address of a registered range.
cudaError_t cudaHostUnregister(void* p) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  fake_cuda::RunEverything();  // no queued copy may still read or write the range it pins
  auto it = S().registered.find(reinterpret_cast<uintptr_t>(p));
  if (it == S().registered.end()) return fake_cuda::Fail(cudaErrorHostMemoryNotRegistered);
  S().registered.erase(it);
  return cudaSuccess;
}

// Device memory: type Device on its device, no host alias. Registered host memory: type Host, the same address on
// both sides (unified addressing). Anything else: type Unregistered and success (CUDA 11 and later).
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* p) {
  if (attributes == nullptr) return fake_cuda::Fail(cudaErrorInvalidValue);
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  *attributes = cudaPointerAttributes{};
  void* q = const_cast<void*>(p);
  if (!fake_cuda::IsHost(p)) {
    attributes->type = cudaMemoryTypeDevice;
    auto it = fake_cuda::Find(p, 1);
    attributes->device = it == S().live.end() ? fake_cuda::current_device : it->second.device;
    attributes->devicePointer = q;
  } else if (fake_cuda::FindRegistered(p) != S().registered.end()) {
    attributes->type = cudaMemoryTypeHost;
    attributes->device = fake_cuda::current_device;
    attributes->devicePointer = q;
    attributes->hostPointer = q;
  } else {
    attributes->hostPointer = q;
  }
  return cudaSuccess;
}

namespace fake_cuda {
namespace {

// A copy on `stream` (the legacy stream for cudaMemcpy), validated at issue. When it runs follows the runtime's
// documented synchronization ("API synchronization behavior"); in deferred mode that is as late as allowed:
//   host to host: at once, after the stream's earlier work;
//   device to host: pageable destination, or cudaMemcpy: complete when the call returns; cudaMemcpyAsync into
//     pinned (registered) memory: queued, the host bytes written when the stream gets there;
//   host to device: pageable source: the bytes are staged at the call (the buffer may be reused at once), the
//     device written when the stream gets there, for cudaMemcpy too ("the DMA to final destination may not have
//     completed"); pinned source: cudaMemcpy complete on return, cudaMemcpyAsync reads it when the stream gets
//     there;
//   device to device: queued.
cudaError_t Copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream, bool async) {
  DeviceAccess access;
  if (!ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return Fail(cudaErrorInvalidValue);
  const bool dst_dev = Find(dst, bytes) != S().live.end();
  const bool src_dev = Find(src, bytes) != S().live.end();
  // A pointer into device memory whose range runs past its allocation is neither: refuse it.
  if ((!dst_dev && !IsHost(dst)) || (!src_dev && !IsHost(src))) return Fail(cudaErrorInvalidValue);
  bool ok = false;
  switch (kind) {
    case cudaMemcpyHostToHost:
      ok = !dst_dev && !src_dev;
      break;
    case cudaMemcpyHostToDevice:
      ok = dst_dev && !src_dev;
      break;
    case cudaMemcpyDeviceToHost:
      ok = !dst_dev && src_dev;
      break;
    case cudaMemcpyDeviceToDevice:
      ok = dst_dev && src_dev;
      break;
    case cudaMemcpyDefault:
      ok = true;
      break;
  }
  if (!ok) return Fail(cudaErrorInvalidValue);
  const std::shared_ptr<Queue>& q = QueueOf(stream);
  const auto move = [dst, src, bytes] { std::memmove(dst, src, bytes); };
  if (!dst_dev && !src_dev) {
    DrainAll(q);
    move();
  } else if (!dst_dev) {
    Push(q, move);
    if (!async || !IsRegistered(dst)) DrainAll(q);
  } else if (!src_dev && !IsRegistered(src)) {
    if (!async) DrainAll(q);  // "a stream sync is performed before the copy is initiated"
    auto staged =
        std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + bytes);
    Push(q, [dst, staged] { std::memcpy(dst, staged->data(), staged->size()); });
  } else if (!src_dev) {
    Push(q, move);
    if (!async) DrainAll(q);
  } else {
    Push(q, move);
  }
  return cudaSuccess;
}

// Memsets of device memory are asynchronous to the host, cudaMemset's too (on the legacy stream).
cudaError_t Set(void* p, int value, size_t bytes, cudaStream_t stream) {
  DeviceAccess access;
  if (!ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  if (bytes == 0) return cudaSuccess;
  if (Find(p, bytes) == S().live.end()) return Fail(cudaErrorInvalidValue);
  Push(QueueOf(stream), [p, value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}

}  // namespace
}  // namespace fake_cuda

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return fake_cuda::Copy(dst, src, bytes, kind, nullptr, false);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  return fake_cuda::Copy(dst, src, bytes, kind, stream, true);
}

cudaError_t cudaMemset(void* p, int value, size_t bytes) { return fake_cuda::Set(p, value, bytes, nullptr); }

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  return fake_cuda::Set(p, value, bytes, stream);
}

// --- streams and events ------------------------------------------------------------------------------------------
// A query of work that has not run yet answers cudaErrorNotReady and runs it (the next query succeeds): pollers
// see their loop taken, and nothing waits forever. cudaErrorNotReady is an answer, not a failure: it is not made
// the thread's last error.

cudaError_t cudaStreamCreateWithPriority(cudaStream_t* stream, unsigned int flags, int priority) {
  if (stream == nullptr || (flags & ~cudaStreamNonBlocking) != 0) return fake_cuda::Fail(cudaErrorInvalidValue);
  // "Priorities follow a convention where lower numbers imply greater priorities"; values outside the range the
  // device reports are clamped to it.
  priority = std::clamp(priority, fake_cuda::kGreatestPriority, fake_cuda::kLeastPriority);
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  auto queue = std::make_shared<fake_cuda::Queue>();
  queue->blocking = (flags & cudaStreamNonBlocking) == 0;
  *stream = new FakeCudaStream{flags, priority, fake_cuda::current_device, std::move(queue)};
  S().streams.insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  return cudaStreamCreateWithPriority(stream, flags, fake_cuda::kLeastPriority);
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

// Work still queued completes (the runtime releases the stream once it has); here before the call returns.
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  // The legacy stream cannot be destroyed; nor can a stream twice.
  if (stream == nullptr || S().streams.count(stream) == 0) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  fake_cuda::DrainAll(stream->queue);
  S().streams.erase(stream);
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (!fake_cuda::ValidStream(stream)) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  const auto& q = fake_cuda::QueueOf(stream);
  if (q->executed >= q->enqueued) return cudaSuccess;
  fake_cuda::RunAll(q);
  return cudaErrorNotReady;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (!fake_cuda::ValidStream(stream)) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  fake_cuda::DrainAll(fake_cuda::QueueOf(stream));
  return cudaSuccess;
}

// The stream's later work waits for the work the event's last record captured (recorded later: not waited for).
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (flags != cudaEventWaitDefault && flags != cudaEventWaitExternal) return fake_cuda::Fail(cudaErrorInvalidValue);
  if (!fake_cuda::ValidStream(stream) || !fake_cuda::ValidEvent(event)) {
    return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  }
  if (event->queue != nullptr && event->queue->executed < event->position) {
    fake_cuda::PushStep(fake_cuda::QueueOf(stream),
                        [q = event->queue, at = event->position] { return fake_cuda::RunUpTo(q, at); });
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  fake_cuda::RunEverything();
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  constexpr unsigned int kKnown = cudaEventBlockingSync | cudaEventDisableTiming | cudaEventInterprocess;
  if (event == nullptr || (flags & ~kKnown) != 0) return fake_cuda::Fail(cudaErrorInvalidValue);
  // An interprocess event must also disable timing (the runtime's documented rule).
  if ((flags & cudaEventInterprocess) != 0 && (flags & cudaEventDisableTiming) == 0) {
    return fake_cuda::Fail(cudaErrorInvalidValue);
  }
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  *event = new FakeCudaEvent{flags, fake_cuda::current_device, nullptr, 0};
  S().events.insert(*event);
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (event == nullptr || S().events.erase(event) == 0) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

// Captures the stream's work issued so far. "cudaEventRecord() will fail if the input event and input stream are
// associated to different devices" (waits, queries and synchronizations across devices succeed).
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (!fake_cuda::ValidEvent(event) || !fake_cuda::ValidStream(stream) ||
      event->device != fake_cuda::DeviceOfStream(stream)) {
    return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  }
  event->queue = fake_cuda::QueueOf(stream);
  event->position = event->queue->enqueued;
  return cudaSuccess;
}

// Complete when the recorded work has run, and when never recorded (the documented rule).
cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (!fake_cuda::ValidEvent(event)) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  if (event->queue == nullptr || event->queue->executed >= event->position) return cudaSuccess;
  fake_cuda::RunUpTo(event->queue, event->position);
  return cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  std::lock_guard<std::recursive_mutex> lock(S().mu);
  if (!fake_cuda::ValidEvent(event)) return fake_cuda::Fail(cudaErrorInvalidResourceHandle);
  if (event->queue != nullptr) fake_cuda::WaitUpTo(event->queue, event->position);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------------
// cuBLAS

// A handle belongs to the device current at cublasCreate (cuBLAS: "the device associated with a particular cuBLAS
// context is assumed to remain unchanged between the corresponding cublasCreate() and cublasDestroy() calls"; a
// thread that drives another device needs another handle).
struct FakeCublasContext {
  cudaStream_t stream = nullptr;
  int device = 0;
};

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new FakeCublasContext;
  (void)cudaGetDevice(&(*handle)->device);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

namespace {

// bf16 is kernels/cast.cuh's (round to nearest even, NaN kept), the rounding cuBLAS applies to a bf16 result.
float LoadElement(const void* base, cudaDataType type, int64_t i) {
  if (type == CUDA_R_32F) return static_cast<const float*>(base)[i];
  return zero::kernels::Bf16ToFloat(static_cast<const uint16_t*>(base)[i]);
}

void StoreElement(void* base, cudaDataType type, int64_t i, float v) {
  if (type == CUDA_R_32F) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = zero::kernels::FloatToBf16(v);
  }
}

size_t ElementBytes(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

// The bytes an operand spans: the last element of the last column plus one, at `ld` per column.
size_t Span(int rows, int cols, int ld, cudaDataType t) {
  if (rows == 0 || cols == 0) return 0;
  return (static_cast<size_t>(cols - 1) * static_cast<size_t>(ld) + static_cast<size_t>(rows)) * ElementBytes(t);
}

cublasStatus_t Gemm(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                    const void* alpha_p, const void* A, cudaDataType at, int lda, long long sa, const void* B,
                    cudaDataType bt, int ldb, long long sb, const void* beta_p, void* C, cudaDataType ct, int ldc,
                    long long sc, int batch, cublasComputeType_t compute) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (compute != CUBLAS_COMPUTE_32F || (at != CUDA_R_32F && at != CUDA_R_16BF) || bt != at ||
      (ct != CUDA_R_32F && ct != CUDA_R_16BF)) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
  const int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
  if (m < 0 || n < 0 || k < 0 || batch < 0 || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) ||
      ldc < std::max(1, m) || alpha_p == nullptr || beta_p == nullptr) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const float alpha = *static_cast<const float*>(alpha_p), beta = *static_cast<const float*>(beta_p);
  DeviceAccess access;
  // The handle drives the device it was created on: a call while another device is current, or on a stream or
  // with operands of another device, is a bug a GPU shows as a failed launch or garbage, never as a right answer.
  int current = 0;
  (void)cudaGetDevice(&current);
  if (current != handle->device || fake_cuda::StreamDevice(handle->stream) != handle->device) {
    std::fprintf(stderr, "fake cuBLAS: a handle of device %d used while device %d is current (stream of device %d)\n",
                 handle->device, current, fake_cuda::StreamDevice(handle->stream));
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const size_t c_span = Span(m, n, ldc, ct);
  const auto overlaps = [](const char* x, size_t nx, const char* y, size_t ny) {
    return nx > 0 && ny > 0 && x < y + ny && y < x + nx;
  };
  // Operands live in device memory of the handle's device, wholly inside their allocations (a GPU would read past
  // them silently). C overlaps neither A nor B, nor another batch's C: cuBLAS's result is then undefined (tiles
  // read what other tiles already wrote, batches race), while this loop would compute something plausible.
  for (int b = 0; b < batch; ++b) {
    const char* a = static_cast<const char*>(A) + b * sa * static_cast<long long>(ElementBytes(at));
    const char* bb = static_cast<const char*>(B) + b * sb * static_cast<long long>(ElementBytes(bt));
    char* c = static_cast<char*>(C) + b * sc * static_cast<long long>(ElementBytes(ct));
    const size_t a_span = k > 0 ? Span(a_rows, a_cols, lda, at) : 0, b_span = k > 0 ? Span(b_rows, b_cols, ldb, bt) : 0;
    if ((k > 0 && !fake_cuda::IsDevice(a, a_span)) || (k > 0 && !fake_cuda::IsDevice(bb, b_span)) ||
        !fake_cuda::IsDevice(c, c_span)) {
      std::fprintf(stderr, "fake cuBLAS: an operand of batch %d lies outside device memory\n", b);
      return CUBLAS_STATUS_INVALID_VALUE;
    }
    if ((k > 0 && (fake_cuda::DeviceOf(a) != handle->device || fake_cuda::DeviceOf(bb) != handle->device)) ||
        fake_cuda::DeviceOf(c) != handle->device) {
      std::fprintf(stderr, "fake cuBLAS: an operand of batch %d is not on the handle's device %d\n", b, handle->device);
      return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (overlaps(c, c_span, a, a_span) || overlaps(c, c_span, bb, b_span)) {
      std::fprintf(stderr, "fake cuBLAS: C of batch %d overlaps A or B (an in-place product is undefined)\n", b);
      return CUBLAS_STATUS_INVALID_VALUE;
    }
  }
  // Batches' C at a stride shorter than one C's span write the same elements from concurrent products.
  if (batch > 1 && c_span > 0 && static_cast<unsigned long long>(sc < 0 ? -sc : sc) * ElementBytes(ct) < c_span) {
    std::fprintf(stderr, "fake cuBLAS: batches' C overlap (stride %lld elements, one C spans %zu bytes)\n", sc, c_span);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  // alpha and beta are read at the call (host pointer mode); the product runs on the handle's stream.
  const cudaError_t queued = fake_cuda::Enqueue(handle->stream, [=] {
    for (int b = 0; b < batch; ++b) {
      const char* a = static_cast<const char*>(A) + b * sa * static_cast<long long>(ElementBytes(at));
      const char* bb = static_cast<const char*>(B) + b * sb * static_cast<long long>(ElementBytes(bt));
      char* c = static_cast<char*>(C) + b * sc * static_cast<long long>(ElementBytes(ct));
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
          float sum = 0.f;
          for (int l = 0; l < k; ++l) {
            const int64_t ai = ta == CUBLAS_OP_N ? i + int64_t{l} * lda : l + int64_t{i} * lda;
            const int64_t bi = tb == CUBLAS_OP_N ? l + int64_t{j} * ldb : j + int64_t{l} * ldb;
            sum += LoadElement(a, at, ai) * LoadElement(bb, bt, bi);
          }
          const int64_t ci = i + int64_t{j} * ldc;
          const float out = beta == 0.f ? alpha * sum : alpha * sum + beta * LoadElement(c, ct, ci);
          StoreElement(c, ct, ci, out);
        }
      }
    }
  });
  if (queued != cudaSuccess) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
  return Gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0, beta, C, Ctype, ldc, 0, 1,
              compute);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                          int lda, long long int strideA, const void* B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batch, cublasComputeType_t compute,
                                          cublasGemmAlgo_t) {
  return Gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype,
              ldc, strideC, batch, compute);
}

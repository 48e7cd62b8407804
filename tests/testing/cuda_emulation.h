// CUDA-on-CPU emulation for tests: runs a kernel's own source (kernels/*_kernels.cuh, the LoRA example's
// model_cuda_kernels.cuh) in a host (g++/clang) translation unit, so that its block-level structure (indexing,
// tiling, grid-stride loops, barrier placement, shared-memory tree reductions) is exercised where there is no GPU.
//
// Include it before any kernel header. It defines ZERO_CUDA_EMULATION (so kernels/device_code.cuh's
// ZERO_DEVICE_CODE is 1, as in nvcc's device pass), the execution-space keywords as host no-ops
// (__global__, __device__, __host__, __launch_bounds__(n); __forceinline__ is `inline`), `__shared__` as
// `static`, the thread-local builtins threadIdx / blockIdx / blockDim / gridDim, __syncthreads(), and
//
//   zero::testing::Emulate(grid, block, kernel, args...)
//
// which runs kernel<<<grid, block>>>(args...): the blocks one after another, each as blockDim real std::threads
// that meet at a barrier per __syncthreads(). A test picks the grid, so a small one makes grid-stride loops take
// several iterations. Parameters are converted to the kernel's parameter types once, then each thread gets its own
// copy (as each GPU thread reads the launch's parameters).
//
// A second mode runs a block's threads as fibers (ucontext) on the calling thread instead: each runs until it
// reaches a __syncthreads() or returns, in thread order, and the next phase starts when every live fiber has
// arrived. A missing barrier then gives a wrong result every time rather than when the scheduler interleaves
// (lower threads run first, so a read of a higher thread's shared-memory write sees the old value), and a phase
// costs microseconds instead of milliseconds (threads: ~3.7 ms a phase for 256 threads on two cores), which is
// what lets a whole model run (tests/lora_cuda_model_emulated_test). Races are not visible to ThreadSanitizer in
// this mode (one OS thread), and the sanitizer builds do not use it. EmulateFibers(...) always uses fibers;
// Emulate(...) uses them when the environment has ZERO_CUDA_EMULATION_MODE=fibers (ctest runs
// cuda_emulation_test both ways).
//
// What a pass shows: the kernel's indexing, bounds and per-thread arithmetic produce the expected bytes for the
// tested shapes, and every barrier phase is entered by every live thread of the block at the same __syncthreads()
// call site (a divergent barrier aborts, naming both sites). Threads are real threads, so a barrier that is missing
// between a shared-memory write and another thread's read is a data race: ThreadSanitizer reports it (the tsan build
// runs this), and without TSan it shows as a wrong result whenever the scheduler interleaves the threads (not
// always). AddressSanitizer sees out-of-bounds global and shared accesses (shared arrays are ordinary statics).
//
// Limits (what a pass does not show):
//   - blocks run sequentially, not concurrently: a race between blocks through global memory is not seen, and
//     `__shared__` as a function-local static is correct only because one block runs at a time (a new block finds
//     the previous block's values where a GPU leaves it undefined: a kernel that reads shared memory before writing
//     it may pass here);
//   - no warps: no warp-synchronous execution, shuffles, votes, warp-level or cooperative-group primitives (a kernel
//     relying on implicit warp lockstep fails here or races; none of zero's do), no atomics on device memory, no
//     dynamic shared memory, no streams, events or asynchronous copies; memory is host memory;
//   - device arithmetic is the host compiler's: same IEEE fp32/fp64 operations and rounding only where both
//     compilers contract nothing (the build passes -ffp-contract=off and nvcc --fmad=false) and the math library
//     calls agree (expf, logf, sqrtf may differ in the last bit between glibc and CUDA's libdevice);
//   - performance, occupancy, register or shared-memory limits, and __launch_bounds__ are not checked; an exited
//     thread leaves the block's barrier (as on current GPUs), so early returns are allowed, and a barrier that some
//     threads reach more often than others at one site is caught only when the others never arrive (it aborts
//     after 120 s) -- not when they exit first;
//   - one launch at a time per process (the statics standing for shared memory are per kernel, not per launch).
// Launch configurations are checked as the runtime checks them (kernels/launch.cuh's limits): an empty grid, grid.y
// or z beyond 65535, a block of more than 1024 threads (or z beyond 64) aborts, naming the configuration, where a GPU
// would fail the launch with cudaErrorInvalidConfiguration and run nothing (a plain loop would just run it).
// A block is blockDim.x * y * z threads created and joined per block: keep blocks few and sizes small.
#pragma once

#ifdef ZERO_DEVICE_CODE
#error "tests/testing/cuda_emulation.h must be included before any kernel header (kernels/device_code.cuh)"
#endif
#define ZERO_CUDA_EMULATION 1

#include <linux/futex.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/device_code.cuh"
#include "kernels/launch.cuh"  // the runtime's launch limits (host code only)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// CUDA's builtin vector types, as the kernels use them (unsigned components).
struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace zero::testing {
namespace emulation_detail {

// The barrier of one emulated block. A phase completes when every thread still running the kernel has arrived;
// a thread that returns from the kernel leaves (its absence no longer holds the others). Every arrival of a phase
// must come from one call site. Arrivals count under a mutex; waiters sleep on a futex on the phase number and
// read it with acquire order after the releasing thread's release store, so the happens-before edges (arrivals ->
// mutex -> release -> every waiter) are ones ThreadSanitizer models. Not a condition variable: its waiters would
// all re-take the mutex on wake-up, which serializes a 256-thread block on two cores (about 2 ms a phase).
// What __syncthreads() calls: the current block's barrier, in either mode.
class BlockSync {
 public:
  virtual void Arrive(int line, const char* file) = 0;

 protected:
  ~BlockSync() = default;
};

class BlockBarrier final : public BlockSync {
 public:
  explicit BlockBarrier(int threads) : live_(threads) {}

  void Arrive(int line, const char* file) override {
    uint32_t phase;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (arrived_ == 0) {
        line_ = line;
        file_ = file;
      } else if (line != line_ || std::strcmp(file, file_) != 0) {
        Die("divergent __syncthreads: threads of one block wait at %s:%d and at %s:%d", file_, line_, file, line);
      }
      phase = phase_.load(std::memory_order_relaxed);
      if (++arrived_ == live_) {
        ReleaseLocked();
        return;
      }
    }
    // A block whose threads never all arrive (one skipped this barrier and waits at a later one, or never returns)
    // would hang the test: fail with the site instead. Generous: TSan builds on shared cores are slow.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (phase_.load(std::memory_order_acquire) == phase) {
      timespec timeout{1, 0};
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&phase_), FUTEX_WAIT_PRIVATE, phase, &timeout, nullptr, 0);
      if (std::chrono::steady_clock::now() > deadline && phase_.load(std::memory_order_acquire) == phase) {
        Die("__syncthreads at %s:%d: not every thread of the block arrived in 120 s (a thread skipped this "
            "barrier or hangs)",
            file, line);
      }
    }
  }

  void Leave() {
    std::lock_guard<std::mutex> lock(mu_);
    --live_;
    if (arrived_ > 0 && arrived_ == live_) ReleaseLocked();
  }

 private:
  void ReleaseLocked() {
    arrived_ = 0;
    phase_.store(phase_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&phase_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }
  template <typename... A>
  [[noreturn]] static void Die(const char* format, A... args) {
    std::fprintf(stderr, "cuda emulation: ");
    std::fprintf(stderr, format, args...);
    std::fprintf(stderr, "\n");
    std::abort();
  }

  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) && std::atomic<uint32_t>::is_always_lock_free,
                "the futex word is the atomic's own storage");
  std::mutex mu_;
  int live_;                        // threads still running the kernel
  int arrived_ = 0;                 // arrivals in the current phase
  std::atomic<uint32_t> phase_{0};  // phases completed (the futex word)
  int line_ = 0;                    // the current phase's call site
  const char* file_ = "";
};

inline thread_local BlockSync* current_barrier = nullptr;

#if defined(__x86_64__)
// Saves the callee-saved registers (System V x86-64: rbp, rbx, r12-r15) on the current stack, stores the stack
// pointer in *save, switches to the stack pointer `load` and restores what was saved there. No signal mask, unlike
// swapcontext's system call per switch: that is what makes a 256-fiber phase cost microseconds.
__attribute__((naked, noinline)) inline void SwitchStack(void** /*save*/, void* /*load*/) {
  asm volatile(
      "pushq %rbp\n pushq %rbx\n pushq %r12\n pushq %r13\n pushq %r14\n pushq %r15\n"
      "movq %rsp, (%rdi)\n movq %rsi, %rsp\n"
      "popq %r15\n popq %r14\n popq %r13\n popq %r12\n popq %rbx\n popq %rbp\n ret\n");
}
#endif

// A block's threads as fibers on the calling thread (see the header comment). Run(threads, body, enter) runs
// body(t) for every t, phase by phase: each round resumes every live fiber in thread order until it arrives at a
// barrier or returns; all arrivals of a round must come from one call site. x86-64 switches with SwitchStack,
// other machines with ucontext.
class FiberBlock final : public BlockSync {
 public:
  static constexpr size_t kStackBytes = size_t{128} << 10;

  // Runs the block; `enter(t)` restores fiber t's builtins (threadIdx) before each resume.
  void Run(int threads, const std::function<void(int)>& body, const std::function<void(int)>& enter) {
    fibers_.resize(static_cast<size_t>(threads));
    body_ = &body;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers_[static_cast<size_t>(t)];
      if (f.stack == nullptr) f.stack.reset(new char[kStackBytes]);  // untouched until used
      f.done = false;
#if defined(__x86_64__)
      // A stack the first switch "returns" from into Entry, entered as if called (rsp = 8 mod 16 at its start).
      auto top = reinterpret_cast<uintptr_t>(f.stack.get() + kStackBytes) & ~uintptr_t{15};
      void** sp = reinterpret_cast<void**>(top);
      *--sp = nullptr;                                      // Entry's return address: it never returns
      *--sp = reinterpret_cast<void*>(&FiberBlock::Entry);  // popped by SwitchStack's ret
      for (int r = 0; r < 6; ++r) *--sp = nullptr;          // rbp, rbx, r12-r15
      f.sp = sp;
#else
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &FiberBlock::Entry, 0);
#endif
    }
    int live = threads;
    running_ = this;
    while (live > 0) {
      arrived_ = 0;
      for (int t = 0; t < threads; ++t) {
        Fiber& f = fibers_[static_cast<size_t>(t)];
        if (f.done) continue;
        enter(t);
        current_ = t;
        Resume(f);
        if (f.done) --live;
      }
    }
    running_ = nullptr;
  }

  void Arrive(int line, const char* file) override {
    if (arrived_++ == 0) {
      line_ = line;
      file_ = file;
    } else if (line != line_ || std::strcmp(file, file_) != 0) {
      std::fprintf(stderr, "cuda emulation: divergent __syncthreads: threads of one block wait at %s:%d and at %s:%d\n",
                   file_, line_, file, line);
      std::abort();
    }
    Yield(fibers_[static_cast<size_t>(current_)]);
  }

 private:
  struct Fiber {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t context;
#endif
    std::unique_ptr<char[]> stack;
    bool done = false;
  };

#if defined(__x86_64__)
  void Resume(Fiber& f) { SwitchStack(&scheduler_sp_, f.sp); }
  void Yield(Fiber& f) { SwitchStack(&f.sp, scheduler_sp_); }
#else
  void Resume(Fiber& f) { swapcontext(&scheduler_, &f.context); }
  void Yield(Fiber& f) { swapcontext(&f.context, &scheduler_); }
#endif

  // The fiber's entry (no arguments: the running block is a thread_local). It never returns: a finished fiber
  // yields for the last time and is never resumed.
  [[noreturn]] static void Entry() {
    FiberBlock* self = running_;
    const int t = self->current_;
    (*self->body_)(t);
    Fiber& f = self->fibers_[static_cast<size_t>(t)];
    f.done = true;
    self->Yield(f);
    __builtin_unreachable();
  }

  static inline thread_local FiberBlock* running_ = nullptr;
  std::vector<Fiber> fibers_;
#if defined(__x86_64__)
  void* scheduler_sp_ = nullptr;
#else
  ucontext_t scheduler_;
#endif
  const std::function<void(int)>* body_ = nullptr;
  int current_ = 0;
  int arrived_ = 0;
  int line_ = 0;
  const char* file_ = "";
};

// The calling thread's fiber block, kept from launch to launch (and shared by every kernel) so that its stacks are
// allocated once.
inline FiberBlock& ThreadFibers() {
  static thread_local FiberBlock fibers;
  return fibers;
}

// Why the runtime would refuse a launch of `grid` x `block` (cudaErrorInvalidConfiguration), or "" when it would not.
inline std::string LaunchRefusal(dim3 grid, dim3 block) {
  if (zero::kernels::LaunchConfigValid(grid.x, grid.y, grid.z, block.x, block.y, block.z)) return "";
  char text[320];
  std::snprintf(text, sizeof(text),
                "a launch of grid (%u, %u, %u) x block (%u, %u, %u) fails on a GPU with cudaErrorInvalidConfiguration "
                "(every grid dimension >= 1, grid.y and z <= 65535, 1 to 1024 threads a block, block.z <= 64)",
                grid.x, grid.y, grid.z, block.x, block.y, block.z);
  return text;
}

// Such a launch ends the test here, naming it: on a GPU the kernel would not run at all and, where the launch is
// not checked, leave its outputs as they were.
inline void CheckLaunch(dim3 grid, dim3 block) {
  const std::string refusal = LaunchRefusal(grid, block);
  if (refusal.empty()) return;
  std::fprintf(stderr, "cuda emulation: %s\n", refusal.c_str());
  std::abort();
}

inline bool FibersFromEnvironment() {
  const char* mode = std::getenv("ZERO_CUDA_EMULATION_MODE");
  return mode != nullptr && std::strcmp(mode, "fibers") == 0;
}

}  // namespace emulation_detail

// Runs kernel<<<grid, block>>>(args...) on the CPU with a block's threads as fibers; returns when every block has
// finished.
template <typename... Params, typename... Args>
void EmulateFibers(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a launch passes one argument per kernel parameter");
  emulation_detail::CheckLaunch(grid, block);
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  emulation_detail::FiberBlock& fibers = emulation_detail::ThreadFibers();
  const auto index = [&](int t) {
    return uint3{static_cast<unsigned int>(t) % block.x, static_cast<unsigned int>(t) / block.x % block.y,
                 static_cast<unsigned int>(t) / (block.x * block.y)};
  };
  const std::function<void(int)> body = [&](int) {
    std::tuple<std::decay_t<Params>...> own = params;
    std::apply(kernel, std::move(own));
  };
  const std::function<void(int)> enter = [&](int t) { threadIdx = index(t); };
  emulation_detail::BlockSync* const outer = emulation_detail::current_barrier;
  blockDim = block;
  gridDim = grid;
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        emulation_detail::current_barrier = &fibers;
        fibers.Run(threads, body, enter);
      }
    }
  }
  emulation_detail::current_barrier = outer;
}

// Runs kernel<<<grid, block>>>(args...) on the CPU; returns when every block has finished. Threads, or fibers when
// ZERO_CUDA_EMULATION_MODE=fibers.
template <typename... Params, typename... Args>
void Emulate(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a launch passes one argument per kernel parameter");
  emulation_detail::CheckLaunch(grid, block);
  if (emulation_detail::FibersFromEnvironment()) {
    EmulateFibers(grid, block, kernel, std::forward<Args>(args)...);
    return;
  }
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        emulation_detail::BlockBarrier barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(static_cast<size_t>(threads));
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = uint3{static_cast<unsigned int>(t) % block.x, static_cast<unsigned int>(t) / block.x % block.y,
                              static_cast<unsigned int>(t) / (block.x * block.y)};
            blockIdx = uint3{bx, by, bz};
            blockDim = block;
            gridDim = grid;
            emulation_detail::current_barrier = &barrier;
            std::tuple<std::decay_t<Params>...> own = params;
            std::apply(kernel, std::move(own));
            barrier.Leave();
            emulation_detail::current_barrier = nullptr;
          });
        }
        for (std::thread& th : pool) th.join();
      }
    }
  }
}

}  // namespace zero::testing

// The block barrier. The call site (builtins, as clang 14 has no std::source_location) identifies the barrier.
inline void __syncthreads(int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  zero::testing::emulation_detail::current_barrier->Arrive(line, file);
}

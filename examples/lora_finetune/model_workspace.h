// The LoRA example models' activation memory: one arena, handed out as a stack, and the count of what is live.
//
// Both models (model.cc on the CPU, model_cuda.cu on a GPU) take every activation, every backward temporary and
// the logits from a Workspace, never from the allocator: so what a pass holds is counted in one place (the peak is
// the measurement `lora_finetune` reports and tests compare with zero::EstimateActivations), and on a GPU nothing
// is allocated on the step path once the arena has its size.
//
// The arena is a stack. A pass frees its buffers in the reverse order of allocation (the models are written so),
// and then the arena's extent equals the live bytes' high-water mark, up to alignment. A buffer freed out of order
// is allowed: its space comes back when everything above it is freed (stack_peak_bytes() shows the difference).
// A buffer that does not fit in the arena is allocated on its own (counted in outside_allocations()), and the next
// BeginPass grows the arena to the largest extent any pass needed: so the arena is sized by the first pass of a
// given shape, once.
//
// Not thread-safe: one pass at a time per Workspace, allocating from the thread that runs the pass.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace lora {

// Where a Workspace's memory comes from: host memory (the CPU model) or device memory (the CUDA model, whose
// allocations and frees are ordered on its stream, so a buffer may be released while kernels that use it are queued).
class RawMemory {
 public:
  virtual ~RawMemory() = default;
  virtual void* Allocate(int64_t bytes) = 0;  // aborts on failure
  virtual void Free(void* p) = 0;
  virtual bool device() const = 0;
};

class Workspace {
 public:
  // Buffers start on this alignment (a cuBLAS operand's, and more than any element type needs).
  static constexpr int64_t kAlignment = 256;

  explicit Workspace(std::unique_ptr<RawMemory> memory);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // A workspace in host memory, for the CPU model.
  static std::unique_ptr<Workspace> Host();

  // At the start of a pass, with nothing allocated: grows the arena to the largest extent a pass has needed so
  // far (never shrinks it). Aborts when buffers are still live (a pass leaked one).
  void BeginPass();
  // Makes the arena at least `bytes` (with nothing allocated), so that the first pass already fits.
  void Reserve(int64_t bytes);

  // `bytes` of memory (bytes > 0) and a ticket that frees it.
  void* Allocate(int64_t bytes, int64_t* ticket);
  void Free(int64_t ticket);

  bool device() const { return memory_->device(); }
  int64_t live_bytes() const { return live_; }
  // The high-water mark of live_bytes() since construction or ResetPeak(): requested bytes, no alignment.
  int64_t peak_bytes() const { return peak_; }
  // The largest stack extent since construction or ResetPeak() (alignment and out-of-order frees included).
  int64_t stack_peak_bytes() const { return stack_peak_; }
  int64_t arena_bytes() const { return arena_bytes_; }
  // Buffers allocated outside the arena since construction (each one before the arena had grown to fit).
  int64_t outside_allocations() const { return outside_; }
  void ResetPeak();

 private:
  struct Entry {
    int64_t offset;  // in the arena's address space (beyond arena_bytes_: allocated outside it)
    int64_t bytes;
    void* outside;   // non-null when it did not fit in the arena
    bool live;
  };
  std::unique_ptr<RawMemory> memory_;
  void* arena_ = nullptr;
  int64_t arena_bytes_ = 0;
  std::vector<Entry> stack_;
  int64_t live_ = 0, peak_ = 0, stack_peak_ = 0, needed_ = 0, outside_ = 0;
};

// A typed, move-only buffer of n elements from a Workspace, freed when it goes out of scope (or Reset). Its
// contents start undefined.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Workspace* ws, int64_t n)
      : ws_(ws),
        p_(n > 0 ? static_cast<T*>(ws->Allocate(n * static_cast<int64_t>(sizeof(T)), &ticket_)) : nullptr),
        n_(n > 0 ? n : 0) {}
  ~Buffer() { Reset(); }
  Buffer(Buffer&& o) noexcept : ws_(o.ws_), ticket_(o.ticket_), p_(o.p_), n_(o.n_) { o.Forget(); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      Reset();
      ws_ = o.ws_;
      p_ = o.p_;
      n_ = o.n_;
      ticket_ = o.ticket_;
      o.Forget();
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* get() const { return p_; }
  T* data() const { return p_; }
  int64_t size() const { return n_; }
  int64_t bytes() const { return n_ * static_cast<int64_t>(sizeof(T)); }
  T& operator[](int64_t i) const { return p_[i]; }
  void Reset() {
    if (p_ != nullptr) ws_->Free(ticket_);
    p_ = nullptr;
    n_ = 0;
  }

 private:
  void Forget() {
    p_ = nullptr;
    n_ = 0;
    ticket_ = -1;
  }
  Workspace* ws_ = nullptr;
  int64_t ticket_ = -1;  // before p_: p_'s initializer sets it
  T* p_ = nullptr;
  int64_t n_ = 0;
};

}  // namespace lora

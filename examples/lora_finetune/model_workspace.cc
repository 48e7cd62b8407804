// The activation workspace of model_workspace.h: a stack over one arena, with live-byte accounting.
#include "examples/lora_finetune/model_workspace.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>

namespace lora {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "lora workspace: %s\n", what.c_str());
  std::abort();
}

int64_t AlignUp(int64_t x) { return (x + Workspace::kAlignment - 1) / Workspace::kAlignment * Workspace::kAlignment; }

class HostMemory : public RawMemory {
 public:
  void* Allocate(int64_t bytes) override {
    void* p = ::operator new(static_cast<size_t>(bytes), std::align_val_t(Workspace::kAlignment), std::nothrow);
    if (p == nullptr) Die("out of host memory allocating " + std::to_string(bytes) + " bytes of activations");
    return p;
  }
  void Free(void* p) override { ::operator delete(p, std::align_val_t(Workspace::kAlignment)); }
  bool device() const override { return false; }
};

}  // namespace

Workspace::Workspace(std::unique_ptr<RawMemory> memory) : memory_(std::move(memory)) {}

Workspace::~Workspace() {
  // Buffers outliving their workspace would be a bug in a model; their memory goes with the process.
  for (const Entry& e : stack_) {
    if (e.live && e.outside != nullptr) memory_->Free(e.outside);
  }
  if (arena_ != nullptr) memory_->Free(arena_);
}

std::unique_ptr<Workspace> Workspace::Host() { return std::make_unique<Workspace>(std::make_unique<HostMemory>()); }

void Workspace::Reserve(int64_t bytes) {
  if (!stack_.empty()) Die("Reserve with " + std::to_string(live_) + " bytes of buffers live");
  bytes = AlignUp(bytes);
  if (bytes <= arena_bytes_) return;
  if (arena_ != nullptr) memory_->Free(arena_);
  arena_ = memory_->Allocate(bytes);
  arena_bytes_ = bytes;
}

void Workspace::BeginPass() {
  if (!stack_.empty()) {
    Die("a pass began with " + std::to_string(live_) + " bytes of an earlier pass's buffers still live");
  }
  if (needed_ > arena_bytes_) Reserve(needed_);
}

void* Workspace::Allocate(int64_t bytes, int64_t* ticket) {
  if (bytes <= 0) Die("allocation of " + std::to_string(bytes) + " bytes");
  const int64_t offset = stack_.empty() ? 0 : AlignUp(stack_.back().offset + stack_.back().bytes);
  Entry e{offset, bytes, nullptr, true};
  void* p = nullptr;
  if (offset + bytes <= arena_bytes_) {
    p = static_cast<char*>(arena_) + offset;
  } else {
    e.outside = p = memory_->Allocate(bytes);
    ++outside_;
  }
  *ticket = static_cast<int64_t>(stack_.size());
  stack_.push_back(e);
  live_ += bytes;
  peak_ = std::max(peak_, live_);
  stack_peak_ = std::max(stack_peak_, offset + bytes);
  needed_ = std::max(needed_, offset + bytes);
  return p;
}

void Workspace::Free(int64_t ticket) {
  if (ticket < 0 || ticket >= static_cast<int64_t>(stack_.size()) || !stack_[static_cast<size_t>(ticket)].live) {
    Die("free of an unknown buffer (ticket " + std::to_string(ticket) + ")");
  }
  Entry& e = stack_[static_cast<size_t>(ticket)];
  e.live = false;
  live_ -= e.bytes;
  if (e.outside != nullptr) {
    memory_->Free(e.outside);
    e.outside = nullptr;
  }
  // The stack shrinks past every freed buffer on its top; one freed below a live one waits for it.
  while (!stack_.empty() && !stack_.back().live) stack_.pop_back();
}

void Workspace::ResetPeak() {
  peak_ = live_;
  stack_peak_ = stack_.empty() ? 0 : stack_.back().offset + stack_.back().bytes;
}

}  // namespace lora

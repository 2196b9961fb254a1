// A fiber: a stack and a saved context, switched explicitly: on x86-64 by a 20-instruction switch
// of the callee-saved registers (no system call; ucontext's swapcontext makes one per switch to
// save the signal mask, which made a 512-thread __syncthreads cost milliseconds), elsewhere by
// ucontext. Under ThreadSanitizer
// (built with -DSIMT_TSAN) every fiber is also a TSan fiber, and switches do not synchronise, so
// TSan sees the lanes of a block as the concurrent threads they are on a GPU.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstddef>
#include <memory>

namespace simt {

// Memory for many fiber stacks in one mapping (one mmap per block, not one per lane: the process
// map count is limited).
class StackArena {
 public:
  StackArena(size_t count, size_t stack_bytes);
  ~StackArena();
  StackArena(const StackArena&) = delete;
  StackArena& operator=(const StackArena&) = delete;
  void* stack(size_t index) const { return static_cast<char*>(base_) + index * stack_bytes_; }
  size_t stack_bytes() const { return stack_bytes_; }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  size_t stack_bytes_ = 0;
};

class Fiber {
 public:
  Fiber() = default;  // the OS thread's own context (the block's scheduler)
  Fiber(void* stack, size_t stack_bytes, void (*entry)());
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Saves the running context into `from` and resumes `to`. `synchronize` makes the switch a
  // happens-before edge for TSan (used once, when a lane first starts).
  static void switch_to(Fiber& from, Fiber& to, bool synchronize);
  // Makes this the OS thread's current TSan fiber record (scheduler side).
  void adopt_current();

 private:
#if defined(__x86_64__)
  void* stack_pointer_ = nullptr;  // saved rsp (callee-saved registers and mxcsr/x87 control word below it)
#else
  ucontext_t context_{};
#endif
  void* tsan_fiber_ = nullptr;
  bool owns_tsan_fiber_ = false;
};

// Happens-before annotations for the runtime's own synchronisation (barriers, warp collectives).
void tsan_release(const void* address);
void tsan_acquire(const void* address);

}  // namespace simt

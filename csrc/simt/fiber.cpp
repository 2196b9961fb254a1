#include "fiber.h"

#include <sys/mman.h>

#include <new>
#include <stdexcept>

#if defined(SIMT_TSAN)
extern "C" {
void* __tsan_get_current_fiber();
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* address);
void __tsan_release(void* address);
}
#endif

namespace simt {

StackArena::StackArena(size_t count, size_t stack_bytes) : stack_bytes_(stack_bytes) {
  bytes_ = count * stack_bytes;
  // MAP_NORESERVE: pages are touched only as deep as the lanes' stacks go.
  base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    throw std::bad_alloc();
  }
}

StackArena::~StackArena() {
  if (base_) munmap(base_, bytes_);
}

Fiber::Fiber(void* stack, size_t stack_bytes, void (*entry)()) {
  if (getcontext(&context_) != 0) throw std::runtime_error("simt: getcontext failed");
  context_.uc_stack.ss_sp = stack;
  context_.uc_stack.ss_size = stack_bytes;
  context_.uc_link = nullptr;
  makecontext(&context_, entry, 0);
#if defined(SIMT_TSAN)
  tsan_fiber_ = __tsan_create_fiber(0);
  owns_tsan_fiber_ = true;
#endif
}

Fiber::~Fiber() {
#if defined(SIMT_TSAN)
  if (owns_tsan_fiber_ && tsan_fiber_) __tsan_destroy_fiber(tsan_fiber_);
#endif
}

void Fiber::adopt_current() {
#if defined(SIMT_TSAN)
  tsan_fiber_ = __tsan_get_current_fiber();
  owns_tsan_fiber_ = false;
#endif
}

void Fiber::switch_to(Fiber& from, Fiber& to, bool synchronize) {
#if defined(SIMT_TSAN)
  constexpr unsigned kNoSync = 1;  // __tsan_switch_to_fiber_no_sync
  __tsan_switch_to_fiber(to.tsan_fiber_, synchronize ? 0 : kNoSync);
#else
  (void)synchronize;
#endif
  swapcontext(&from.context_, &to.context_);
}

void tsan_release(const void* address) {
#if defined(SIMT_TSAN)
  __tsan_release(const_cast<void*>(address));
#else
  (void)address;
#endif
}

void tsan_acquire(const void* address) {
#if defined(SIMT_TSAN)
  __tsan_acquire(const_cast<void*>(address));
#else
  (void)address;
#endif
}

}  // namespace simt

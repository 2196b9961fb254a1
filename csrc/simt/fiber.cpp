#include "fiber.h"

#include <sys/mman.h>

#include <cstdint>
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

#if defined(__x86_64__)
// simt_switch_stack(&from_sp, to_sp): saves the callee-saved registers, the SSE and x87 control
// words and rsp of the running context, then resumes the context saved at to_sp.
extern "C" void simt_switch_stack(void** from_sp, void* to_sp);
asm(R"(
.text
.globl simt_switch_stack
.type simt_switch_stack, @function
simt_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size simt_switch_stack, .-simt_switch_stack
.section .note.GNU-stack,"",@progbits
.text
)");
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
#if defined(__x86_64__)
  // The first switch "returns" into entry with rsp = 8 mod 16, as after a call; entry never returns.
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + stack_bytes) & ~uintptr_t{15});
  uint64_t* sp = top;
  *--sp = 0;                                     // entry's return address: none
  *--sp = reinterpret_cast<uint64_t>(entry);     // popped by simt_switch_stack's ret
  for (int i = 0; i < 6; ++i) *--sp = 0;         // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80ull | (0x037Full << 32);         // default mxcsr, x87 control word
  stack_pointer_ = sp;
#else
  if (getcontext(&context_) != 0) throw std::runtime_error("simt: getcontext failed");
  context_.uc_stack.ss_sp = stack;
  context_.uc_stack.ss_size = stack_bytes;
  context_.uc_link = nullptr;
  makecontext(&context_, entry, 0);
#endif
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
#if defined(__x86_64__)
  simt_switch_stack(&from.stack_pointer_, to.stack_pointer_);
#else
  swapcontext(&from.context_, &to.context_);
#endif
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

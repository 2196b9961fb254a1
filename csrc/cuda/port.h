// The port layer: everything the kernels need from their target, and nothing else. Under nvcc it
// maps onto CUDA (PTX for the memory-model operations); under a plain C++ compiler onto the SIMT
// runtime (csrc/simt), so the very same kernel source runs on the CPU, in CI and under TSan.
//
// Kernels use: these loads/stores and the timer; DISPATCH_SHARED* for block-shared memory;
// DISPATCH_LAUNCH instead of <<<>>>; full-mask warp intrinsics; atomicAdd/atomicCAS; fences.
// No other inline asm and no volatile flags.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/round16.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define DISPATCH_DEVICE __device__ __forceinline__
#define DISPATCH_SHARED(type, name) __shared__ type name
#define DISPATCH_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define DISPATCH_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define DISPATCH_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

#else
#include "../simt/simt.h"

#define DISPATCH_DEVICE inline
// A __shared__ variable is one per block: the runtime keys it by this declaration's own address.
#define DISPATCH_SHARED(type, name)        \
  static const char name##_shared_key = 0; \
  type& name = *static_cast<type*>(::simt::block_shared(&name##_shared_key, sizeof(type)))
#define DISPATCH_SHARED_ARRAY(type, name, count) \
  static const char name##_shared_key = 0;       \
  type* name = static_cast<type*>(::simt::block_shared(&name##_shared_key, sizeof(type) * (count)))
#define DISPATCH_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::simt::dynamic_shared())
#define DISPATCH_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::simt::launch_kernel((stream), dim3(grid), dim3(block), (smem), #kernel, kernel, ##__VA_ARGS__)
#endif

namespace dispatch::port {

// ---- memory model: system scope (peers are other GPUs, or the host) ---------------------------
#if defined(__CUDACC__)
DISPATCH_DEVICE uint64_t ld_acquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
DISPATCH_DEVICE uint64_t ld_relaxed(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
DISPATCH_DEVICE void st_release(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
DISPATCH_DEVICE void st_relaxed(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
DISPATCH_DEVICE void st_relaxed(int32_t* p, int32_t v) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
DISPATCH_DEVICE void st_release(int32_t* p, int32_t v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Block scope, any address space (the warps of one block taking turns through shared memory).
DISPATCH_DEVICE uint32_t ld_acquire_block(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.cta.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
DISPATCH_DEVICE void st_release_block(uint32_t* p, uint32_t v) {
  asm volatile("st.release.cta.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// A block-scope lock word (0 free, 1 held): one attempt, acquire on success; st_release_block(p, 0) frees it.
DISPATCH_DEVICE bool try_lock_block(uint32_t* p) {
  uint32_t old;
  asm volatile("atom.acquire.cta.cas.b32 %0, [%1], %2, %3;" : "=r"(old) : "l"(p), "r"(0u), "r"(1u) : "memory");
  return old == 0;
}
DISPATCH_DEVICE uint64_t global_timer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// The SM this block runs on (for the profiler, csrc/cuda/profile_record.h).
DISPATCH_DEVICE uint32_t sm_id() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
// A spin-wait iteration that saw nothing new: nothing to do on a GPU (other warps keep running).
DISPATCH_DEVICE void spin_pause() {}

DISPATCH_DEVICE float bits_as_float(uint32_t bits) { return __uint_as_float(bits); }
DISPATCH_DEVICE uint32_t float_as_bits(float value) { return __float_as_uint(value); }
DISPATCH_DEVICE float half_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
DISPATCH_DEVICE uint16_t float_to_half_bits(float value) {
  return canonical_fp16_bits(__half_as_ushort(__float2half_rn(value)));
}
#else
DISPATCH_DEVICE uint64_t ld_acquire(const uint64_t* p) {
  ::simt::maybe_yield();
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
DISPATCH_DEVICE uint64_t ld_relaxed(const uint64_t* p) {
  ::simt::maybe_yield();
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}
DISPATCH_DEVICE void st_release(uint64_t* p, uint64_t v) {
  ::simt::maybe_yield();
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
DISPATCH_DEVICE void st_relaxed(uint64_t* p, uint64_t v) {
  ::simt::maybe_yield();
  __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
DISPATCH_DEVICE void st_relaxed(int32_t* p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
DISPATCH_DEVICE void st_release(int32_t* p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
DISPATCH_DEVICE uint32_t ld_acquire_block(const uint32_t* p) {
  ::simt::maybe_yield();
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
DISPATCH_DEVICE void st_release_block(uint32_t* p, uint32_t v) {
  ::simt::maybe_yield();
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
DISPATCH_DEVICE bool try_lock_block(uint32_t* p) {
  ::simt::maybe_yield();
  uint32_t expected = 0;
  return __atomic_compare_exchange_n(p, &expected, 1u, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}
DISPATCH_DEVICE uint64_t global_timer() { return ::simt::global_timer_ns(); }
// The block's virtual SM: the resident slot it holds (docs/simt.md).
DISPATCH_DEVICE uint32_t sm_id() { return static_cast<uint32_t>(::simt::sm_id()); }
// The CPU has few cores: a spinning lane hands its turn to the other lanes and blocks.
DISPATCH_DEVICE void spin_pause() { ::simt::spin_yield(); }

DISPATCH_DEVICE float bits_as_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
DISPATCH_DEVICE uint32_t float_as_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
DISPATCH_DEVICE float half_bits_to_float(uint16_t bits) {
  _Float16 half;
  std::memcpy(&half, &bits, sizeof(half));
  return static_cast<float>(half);
}
DISPATCH_DEVICE uint16_t float_to_half_bits(float value) {
  const _Float16 half = static_cast<_Float16>(value);  // round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &half, sizeof(bits));
  return canonical_fp16_bits(bits);
}
#endif

DISPATCH_DEVICE float bf16_bits_to_float(uint16_t bits) { return bits_as_float(static_cast<uint32_t>(bits) << 16); }

DISPATCH_DEVICE uint16_t float_to_bf16_bits(float value) { return bf16_bits_from_float_bits(float_as_bits(value)); }

}  // namespace dispatch::port

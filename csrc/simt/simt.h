// SIMT runtime: the subset of CUDA that the library's kernels and their host code use, executed on
// the CPU. Every block of every launched grid runs on an OS thread of its own (so blocks of
// concurrently running grids, the virtual ranks' kernels, make progress together and may spin on
// each other); the threads of a block are fibers on that OS thread, switched only at barriers,
// warp collectives, spin-wait yields and (optionally) seeded random yields.
//
// Kernel code never includes this header directly: it includes csrc/cuda/port.h, which maps the
// port's names onto CUDA under nvcc and onto this runtime under a plain C++ compiler.
//
// What the CPU cannot show: the GPU's weak memory ordering beyond what ThreadSanitizer reports
// (x86 is TSO), occupancy limits (unless `max_resident_blocks` caps them), and speed.
#pragma once

#if defined(__CUDACC__)
#error "csrc/simt/simt.h is the CPU target; nvcc builds against CUDA itself"
#endif

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

namespace simt {

constexpr int kWarpSize = 32;

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT: as CUDA's dim3
  unsigned count() const { return x * y * z; }
};

// What kernel code reads about the running thread (threadIdx, blockIdx, ...).
struct LaneInfo {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  int lane_id = 0;  // threadIdx.x % 32 (blocks are 1-D)
  int warp_id = 0;
};

// ---- options ----------------------------------------------------------------------------------
struct Options {
  int max_resident_blocks = 0;  // 0: every block of every grid resident at once
  uint64_t yield_seed = 0;      // != 0: random yields at memory operations, seeded per lane
  int yield_per_mille = 125;    // probability of such a yield
  double watchdog_s = 600.0;    // a grid running longer is stopped and its stuck lanes reported
};
void configure(const Options& options);
Options options();

// ---- kernel-side primitives (out of line: one home, uninstrumented under TSan) -----------------
LaneInfo& this_lane();
void sync_block();                                      // __syncthreads
void sync_warp();                                       // __syncwarp
uint64_t warp_shuffle(uint64_t value, int src_lane);    // __shfl_sync
uint32_t warp_ballot(bool predicate);                   // __ballot_sync
void spin_yield();                                      // a spin-wait saw nothing new
void random_yield_slow();                               // see maybe_yield
void* block_shared(const void* key, size_t bytes);      // a __shared__ variable of this block
void* dynamic_shared();                                 // the block's extern __shared__ bytes
uint64_t global_timer_ns();
// The running block's virtual SM id: the lowest resident slot that was free when the block became
// resident (blocks resident at the same time hold different ids, as on a GPU with one block per SM).
int sm_id();

extern int g_random_yields;  // set by configure() before any launch
inline void maybe_yield() {
  if (g_random_yields) random_yield_slow();
}

// ---- launches ---------------------------------------------------------------------------------
using KernelBody = std::function<void()>;
// Queues the grid on `stream` (nullptr: the legacy default stream). Blocks run when the stream
// reaches the grid; the call returns at once, as a CUDA launch does.
void launch(void* stream, Dim3 grid, Dim3 block, size_t dynamic_shared_bytes, KernelBody body, const char* name);
// A kernel launch: the arguments are evaluated (copied) now, as <<<>>> does.
template <typename Kernel, typename... Args>
void launch_kernel(void* stream, Dim3 grid, Dim3 block, size_t dynamic_shared_bytes, const char* name, Kernel kernel,
                   Args... args) {
  launch(stream, grid, block, dynamic_shared_bytes, [=] { kernel(args...); }, name);
}
// Blocks that may be resident at once (options().max_resident_blocks, or a very large number).
int resident_block_limit();

}  // namespace simt

// ---- the CUDA names the kernels use ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::simt::this_lane().thread_idx)
#define blockIdx (::simt::this_lane().block_idx)
#define blockDim (::simt::this_lane().block_dim)
#define gridDim (::simt::this_lane().grid_dim)

using dim3 = simt::Dim3;

struct alignas(16) int4 {
  int x, y, z, w;
};

inline void __syncthreads() { ::simt::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::simt::sync_warp(); }

template <typename T>
inline T __shfl_sync(unsigned, T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "warp shuffle of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = ::simt::warp_shuffle(bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
inline unsigned __ballot_sync(unsigned, int predicate) { return ::simt::warp_ballot(predicate != 0); }
inline int __ffs(unsigned value) { return __builtin_ffs(static_cast<int>(value)); }
inline int __popc(unsigned value) { return __builtin_popcount(value); }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// CUDA's atomics are relaxed; so are these.
inline int atomicAdd(int* address, int value) {
  ::simt::maybe_yield();
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  ::simt::maybe_yield();
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
  ::simt::maybe_yield();
  unsigned long long old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value &&
         !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long expected,
                                    unsigned long long desired) {
  ::simt::maybe_yield();
  __atomic_compare_exchange_n(address, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}

// Cache-hint loads are plain loads on the CPU.
template <typename T>
inline T __ldcg(const T* address) {
  return *address;
}

#include "cuda_api.h"

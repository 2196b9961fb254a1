// Checks of the SIMT runtime itself, one per command-line case (tests/test_simt_runtime.py runs
// them): warp collectives and barriers compute what CUDA defines; blocks of concurrent grids make
// progress while spinning on each other; a barrier deadlock and a stuck spin-wait are reported
// naming the kernel, block and warp instead of hanging; the resident-block cap holds.
//
//   runtime_checks collectives | concurrent_grids | deadlock | watchdog | resident_cap | bench
// Prints "OK" (exit 0) when the case behaved; "FAIL: ..." (exit 1) otherwise. The deadlock and
// watchdog cases print the runtime's report.
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/port.h"

using namespace dispatch;

namespace {

int fail(const std::string& what) {
  std::printf("FAIL: %s\n", what.c_str());
  return 1;
}

// Each lane: shuffle from lane (lane + 5) % 32, ballot of odd lanes, a block-wide sum via shared memory.
__global__ void collectives_kernel(int* out) {
  DISPATCH_SHARED_ARRAY(int, partial, 8);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int from = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) * 10, (lane + 5) % 32);
  const unsigned odd = __ballot_sync(0xffffffffu, lane % 2);
  if (lane == 0) partial[warp] = 0;
  __syncthreads();
  atomicAdd(&partial[warp], static_cast<int>(threadIdx.x));
  __syncthreads();
  int total = 0;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
  out[3 * threadIdx.x + 0] = from;
  out[3 * threadIdx.x + 1] = static_cast<int>(odd);
  out[3 * threadIdx.x + 2] = total;
}

// Block b waits for block b+1's flag (the last block starts the chain): progress needs every
// block resident at once, as the virtual ranks' kernels do.
__global__ void chain_kernel(uint64_t* flags, int num_blocks) {
  if (threadIdx.x != 0) return;
  const int b = blockIdx.x;
  if (b + 1 < num_blocks) {
    while (port::ld_acquire(flags + b + 1) == 0) port::spin_pause();
  }
  port::st_release(flags + b, 1);
}

// Every block arrives, then waits for all: completes only if the whole grid is resident at once.
__global__ void grid_barrier_kernel(int* arrived, int num_blocks) {
  if (threadIdx.x != 0) return;
  atomicAdd(arrived, 1);
  while (__atomic_load_n(arrived, __ATOMIC_ACQUIRE) < num_blocks) port::spin_pause();
}

// Lane 0 waits at __syncthreads while its warp-mates wait for it at __syncwarp: a deadlock.
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) __syncthreads();
  else __syncwarp();
}

__global__ void spin_forever_kernel(const uint64_t* never) {
  while (port::ld_acquire(never) == 0) port::spin_pause();
}

__global__ void barrier_loop_kernel(int rounds) {
  for (int i = 0; i < rounds; ++i) __syncthreads();
}

__global__ void shuffle_loop_kernel(int rounds, int* sink) {
  int value = threadIdx.x;
  for (int i = 0; i < rounds; ++i) value = __shfl_sync(0xffffffffu, value, (threadIdx.x + 1) % 32);
  if (value < 0) *sink = value;
}

cudaStream_t new_stream() {
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  return stream;
}

int collectives() {
  simt::Options options = simt::options();
  options.yield_seed = 3;  // shake the order in which lanes reach each collective
  simt::configure(options);
  const int threads = 256;
  std::vector<int> out(3 * threads, -1);
  cudaStream_t stream = new_stream();
  DISPATCH_LAUNCH(collectives_kernel, 1, threads, 0, stream, out.data());
  if (cudaStreamSynchronize(stream) != cudaSuccess) return fail(cudaGetErrorString(cudaErrorLaunchFailure));
  unsigned odd = 0;
  for (int l = 1; l < 32; l += 2) odd |= 1u << l;
  for (int t = 0; t < threads; ++t) {
    const int warp_base = t / 32 * 32;
    if (out[3 * t] != (warp_base + (t % 32 + 5) % 32) * 10) return fail("shuffle of thread " + std::to_string(t));
    if (static_cast<unsigned>(out[3 * t + 1]) != odd) return fail("ballot of thread " + std::to_string(t));
    if (out[3 * t + 2] != threads * (threads - 1) / 2) return fail("block sum of thread " + std::to_string(t));
  }
  cudaStreamDestroy(stream);
  return 0;
}

int concurrent_grids() {
  // two grids on two streams, each block waiting on the next one of the *other* grid's flags
  const int blocks = 12;
  std::vector<uint64_t> flags(blocks, 0);
  cudaStream_t first = new_stream(), second = new_stream();
  DISPATCH_LAUNCH(chain_kernel, blocks / 2, 64, 0, first, flags.data(), blocks);
  DISPATCH_LAUNCH(chain_kernel, blocks / 2, 64, 0, second, flags.data() + blocks / 2, blocks / 2);
  if (cudaStreamSynchronize(first) != cudaSuccess || cudaStreamSynchronize(second) != cudaSuccess)
    return fail("a grid failed");
  for (int b = 0; b < blocks; ++b)
    if (flags[b] != 1) return fail("block " + std::to_string(b) + " did not finish");
  cudaStreamDestroy(first);
  cudaStreamDestroy(second);
  return 0;
}

int expect_failure(const char* what, void (*launch)(cudaStream_t), const char* must_mention) {
  cudaStream_t stream = new_stream();
  launch(stream);
  const cudaError_t status = cudaStreamSynchronize(stream);
  if (status != cudaErrorLaunchFailure) return fail(std::string(what) + " was not reported");
  const std::string message = cudaGetErrorString(status);
  std::printf("%s\n", message.c_str());
  if (message.find(must_mention) == std::string::npos) return fail("the report does not mention " + std::string(must_mention));
  return 0;
}

uint64_t g_never = 0;

int deadlock() {
  return expect_failure("the deadlock", [](cudaStream_t s) { DISPATCH_LAUNCH(deadlock_kernel, 2, 64, 0, s); },
                        "warp 0: 1 lanes at __syncthreads; 31 lanes at __syncwarp");
}

int watchdog() {
  simt::Options options = simt::options();
  options.watchdog_s = 1.0;
  simt::configure(options);
  return expect_failure("the stuck spin-wait", [](cudaStream_t s) { DISPATCH_LAUNCH(spin_forever_kernel, 1, 32, 0, s, &g_never); },
                        "32 lanes in a spin-wait");
}

int resident_cap() {
  // a grid barrier over 2 blocks passes; over 4 blocks, with 2 resident at most, it can only stall
  simt::Options options = simt::options();
  options.max_resident_blocks = 2;
  options.watchdog_s = 1.0;
  simt::configure(options);
  int arrived[2] = {0, 0};
  cudaStream_t stream = new_stream();
  DISPATCH_LAUNCH(grid_barrier_kernel, 2, 32, 0, stream, &arrived[0], 2);
  if (cudaStreamSynchronize(stream) != cudaSuccess) return fail("a 2-block grid barrier failed with 2 resident blocks");
  DISPATCH_LAUNCH(grid_barrier_kernel, 4, 32, 0, stream, &arrived[1], 4);
  if (cudaStreamSynchronize(stream) != cudaErrorLaunchFailure) return fail("a 4-block grid barrier passed with 2 resident blocks");
  if (simt::resident_block_limit() != 2) return fail("resident_block_limit() does not report the cap");
  return 0;
}

// Cost of the runtime's collectives (bench/simt_runtime.py prints these).
int bench() {
  cudaStream_t stream = new_stream();
  int sink = 0;
  auto time_us = [&](auto&& launch_once) {
    const uint64_t start = simt::global_timer_ns();
    launch_once();
    cudaStreamSynchronize(stream);
    return (simt::global_timer_ns() - start) / 1e3;
  };
  const int rounds = 200;
  const double empty_us = time_us([&] { DISPATCH_LAUNCH(barrier_loop_kernel, 1, 512, 0, stream, 0); });
  const double barrier_us = time_us([&] { DISPATCH_LAUNCH(barrier_loop_kernel, 1, 512, 0, stream, rounds); });
  const double shuffle_us = time_us([&] { DISPATCH_LAUNCH(shuffle_loop_kernel, 1, 32, 0, stream, rounds, &sink); });
  std::printf("launch_512_threads_us %.1f\n", empty_us);
  std::printf("syncthreads_512_threads_us %.2f\n", (barrier_us - empty_us) / rounds);
  std::printf("shfl_sync_32_threads_us %.2f\n", shuffle_us / rounds);
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "";
  int rc;
  if (which == "collectives") rc = collectives();
  else if (which == "concurrent_grids") rc = concurrent_grids();
  else if (which == "deadlock") rc = deadlock();
  else if (which == "watchdog") rc = watchdog();
  else if (which == "resident_cap") rc = resident_cap();
  else if (which == "bench") rc = bench();
  else {
    std::fprintf(stderr, "usage: %s collectives|concurrent_grids|deadlock|watchdog|resident_cap\n", argv[0]);
    return 2;
  }
  if (rc == 0) std::printf("OK\n");
  return rc;
}

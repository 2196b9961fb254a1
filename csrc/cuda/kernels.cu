// In-node CUDA executors: layout, channel counts, notify (barrier + count exchange), dispatch and
// combine over per-(channel, peer) rings in the peers' staging buffers.
//
// Staging buffer of every rank (kHeaderBytes of control, then rings):
//   barrier[kMaxPeers]  u64   barrier[p] = last barrier value rank p reached (written by p)
//   seq, abort          u64   this rank's call counter (device-resident: graph-capturable), abort flag
//   tails[C][kMaxPeers] u64   records peer p has written into my ring (c, p) (written by p)
//   heads[C][kMaxPeers] u64   records peer p has consumed of my stream to it on channel c (written by p)
//   notify[kMaxPeers]   slot  what source p told me in the last notify
//   rings               (c, p) ring of `ring_slots` records that peer p writes for me on channel c
// Counters restart at 0 every call: the notify kernel zeroes them between two barriers, after
// which no rank can still be reading or writing the previous call's rings.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../common/layout.h"
#include "../common/record.h"
#include "api.h"
#include "plan_view.h"

#define DISPATCH_CUDA_CHECK(expr)                                                                         \
  do {                                                                                                    \
    const cudaError_t status_ = (expr);                                                                   \
    if (status_ != cudaSuccess) {                                                                         \
      throw std::runtime_error(std::string("CUDA error at " __FILE__ ":") + std::to_string(__LINE__) +    \
                               ": " #expr ": " + cudaGetErrorString(status_));                            \
    }                                                                                                     \
  } while (0)

namespace dispatch::cuda {
namespace {

// ---- staging buffer map ------------------------------------------------------------------------
constexpr int64_t kBarrierOffset = 0;
constexpr int64_t kSeqOffset = 8 * kMaxPeers;
constexpr int64_t kAbortOffset = kSeqOffset + 8;
constexpr int64_t kTailsOffset = 1024;
constexpr int64_t kHeadsOffset = kTailsOffset + 8LL * kMaxChannels * kMaxPeers;
constexpr int64_t kNotifyOffset = 40960;
constexpr int kSlotInts = 2 + kMaxChannels + kMaxLocalExperts;  // count, num_tokens, chan[C], experts
constexpr int64_t kSlotBytes = ((4LL * kSlotInts + 255) / 256) * 256;
static_assert(kHeadsOffset + 8LL * kMaxChannels * kMaxPeers <= kNotifyOffset, "header overlap");
static_assert(kNotifyOffset + kSlotBytes * kMaxPeers <= kHeaderBytes, "header too small");

__device__ __forceinline__ uint64_t* barrier_of(uint64_t base) { return reinterpret_cast<uint64_t*>(base + kBarrierOffset); }
__device__ __forceinline__ uint64_t* seq_of(uint64_t base) { return reinterpret_cast<uint64_t*>(base + kSeqOffset); }
__device__ __forceinline__ uint64_t* abort_of(uint64_t base) { return reinterpret_cast<uint64_t*>(base + kAbortOffset); }
__device__ __forceinline__ uint64_t* tail_of(uint64_t base, int c, int p) {
  return reinterpret_cast<uint64_t*>(base + kTailsOffset) + c * kMaxPeers + p;
}
__device__ __forceinline__ uint64_t* head_of(uint64_t base, int c, int p) {
  return reinterpret_cast<uint64_t*>(base + kHeadsOffset) + c * kMaxPeers + p;
}
__device__ __forceinline__ int32_t* slot_of(uint64_t base, int p) {
  return reinterpret_cast<int32_t*>(base + kNotifyOffset + kSlotBytes * p);
}
__device__ __forceinline__ uint8_t* ring_of(uint64_t base, int c, int p, int L, int64_t slots, int64_t row_bytes) {
  return reinterpret_cast<uint8_t*>(base + kHeaderBytes) + (static_cast<int64_t>(c) * L + p) * slots * row_bytes;
}

// ---- memory-model helpers ----------------------------------------------------------------------
__device__ __forceinline__ uint64_t ld_acquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t global_timer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

struct Waiter {
  uint64_t own;  // this rank's staging buffer (abort flag)
  WaitArgs args;
  int rank_base;  // global rank of local index 0

  // Spins until *p >= target. On timeout reports (peer, channel, kind), raises the abort flag and
  // returns false; returns false at once when another block already aborted.
  __device__ bool until(const uint64_t* p, uint64_t target, int peer, int channel, int kind) const {
    if (ld_acquire(p) >= target) return true;
    const uint64_t start = global_timer();
    uint32_t spins = 0;
    while (ld_acquire(p) < target) {
      if ((++spins & 255u) == 0) {
        if (*reinterpret_cast<volatile uint64_t*>(abort_of(own)) != 0) return false;
        if (global_timer() - start > args.timeout_ns) {
          report(peer, channel, kind);
          return false;
        }
      }
    }
    return true;
  }

  __device__ void report(int peer, int channel, int kind) const {
    if (atomicCAS(reinterpret_cast<unsigned long long*>(abort_of(own)), 0ull, 1ull) == 0ull && args.error) {
      volatile int32_t* err = reinterpret_cast<volatile int32_t*>(args.error);
      err[1] = rank_base + peer;
      err[2] = channel;
      err[3] = kind;
      __threadfence_system();
      err[0] = 1;
      __threadfence_system();
    }
  }

  __device__ bool aborted() const { return *reinterpret_cast<volatile uint64_t*>(abort_of(own)) != 0; }
};

enum WaitKind { kBarrier = 1, kDispatchSpace = 2, kDispatchData = 3, kCombineSpace = 4, kCombineData = 5, kOverflow = 6 };

// Warp-cooperative byte copy; loads bypass L1 (ring data is written by other GPUs / other SMs).
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes)) & 15) == 0) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = lane; i < bytes / 16; i += 32) d[i] = __ldcg(s + i);
  } else if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes)) & 3) == 0) {
    const int* s = reinterpret_cast<const int*>(src);
    int* d = reinterpret_cast<int*>(dst);
    for (int64_t i = lane; i < bytes / 4; i += 32) d[i] = __ldcg(s + i);
  } else {
    for (int64_t i = lane; i < bytes; i += 32) dst[i] = static_cast<uint8_t>(__ldcg(reinterpret_cast<const char*>(src) + i));
  }
}

// ---- element conversions (round to nearest even, as the CPU backend) ---------------------------
template <typename AccT>
__device__ __forceinline__ AccT load_as(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case 0: return static_cast<AccT>(__ldcg(static_cast<const float*>(base) + i));
    case 1: {
      const unsigned short bits = __ldcg(static_cast<const unsigned short*>(base) + i);
      return static_cast<AccT>(__uint_as_float(static_cast<uint32_t>(bits) << 16));
    }
    case 2: {
      const unsigned short bits = __ldcg(static_cast<const unsigned short*>(base) + i);
      return static_cast<AccT>(__half2float(__ushort_as_half(bits)));
    }
    default: return static_cast<AccT>(__ldcg(static_cast<const double*>(base) + i));
  }
}

__device__ __forceinline__ uint16_t float_to_bf16_bits(float value) {
  const uint32_t bits = __float_as_uint(value);
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  const uint32_t result = (bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded;
  return static_cast<uint16_t>(result >> 16);
}

template <typename AccT>
__device__ __forceinline__ void store_as(void* base, int dtype, int64_t i, AccT value) {
  switch (dtype) {
    case 0: static_cast<float*>(base)[i] = static_cast<float>(value); break;
    case 1: static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(static_cast<float>(value)); break;
    case 2: static_cast<uint16_t*>(base)[i] = __half_as_ushort(__float2half_rn(static_cast<float>(value))); break;
    default: static_cast<double*>(base)[i] = static_cast<double>(value); break;
  }
}

__host__ __device__ __forceinline__ int dtype_bytes(int dtype) { return dtype == 3 ? 8 : (dtype == 0 ? 4 : 2); }

// The weights of a combine return row start right after the x row (ReturnRowLayout), which is
// only 2-byte aligned for 16-bit dtypes with an odd hidden size: float access byte by byte there.
__device__ __forceinline__ void store_f32(uint8_t* p, float value) {
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) {
    *reinterpret_cast<float*>(p) = value;
    return;
  }
  const uint32_t bits = __float_as_uint(value);
  for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(bits >> (8 * b));
}
__device__ __forceinline__ float load_f32_cg(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) return __ldcg(reinterpret_cast<const float*>(p));
  uint32_t bits = 0;
  for (int b = 0; b < 4; ++b) bits |= static_cast<uint32_t>(__ldcg(p + b)) << (8 * b);
  return __uint_as_float(bits);
}

// ---- layout -----------------------------------------------------------------------------------
// Same rules as compute_layout (layout.h): route_token per token, an expert repeated in a row
// counts once. Block-local counters in shared memory, then one atomicAdd per counter.
__global__ void layout_kernel(LayoutArgs a) {
  extern __shared__ int32_t counters[];  // [R] ranks, [N] nodes, [E] experts
  const Topology topo{a.num_ranks, a.num_ranks_per_node, a.num_experts};
  const int R = a.num_ranks, N = topo.num_nodes(), E = a.num_experts, L = a.num_ranks_per_node;
  int32_t* per_rank = counters;
  int32_t* per_node = counters + R;
  int32_t* per_expert = counters + R + N;
  for (int i = threadIdx.x; i < R + N + E; i += blockDim.x) counters[i] = 0;
  __syncthreads();
  const int64_t* idx = reinterpret_cast<const int64_t*>(a.topk_idx);
  bool* in_rank_all = reinterpret_cast<bool*>(a.in_rank);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < a.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t* row = idx + t * a.num_topk;
    bool* in_rank = in_rank_all + t * R;
    route_token(row, a.num_topk, topo, in_rank);
    for (int j = 0; j < a.num_topk; ++j) {
      const int64_t e = row[j];
      if (e < 0 || e >= E) continue;
      bool seen = false;
      for (int i = 0; i < j; ++i) seen = seen || row[i] == e;
      if (!seen) atomicAdd(per_expert + e, 1);
    }
    for (int m = 0; m < N; ++m) {
      bool any = false;
      for (int l = 0; l < L; ++l) {
        if (in_rank[m * L + l]) {
          atomicAdd(per_rank + m * L + l, 1);
          any = true;
        }
      }
      if (any) atomicAdd(per_node + m, 1);
    }
  }
  __syncthreads();
  int32_t* out_rank = reinterpret_cast<int32_t*>(a.per_rank);
  int32_t* out_node = reinterpret_cast<int32_t*>(a.per_node);
  int32_t* out_expert = reinterpret_cast<int32_t*>(a.per_expert);
  for (int i = threadIdx.x; i < R + N + E; i += blockDim.x) {
    const int32_t v = counters[i];
    if (v == 0) continue;
    if (i < R) atomicAdd(out_rank + i, v);
    else if (i < R + N) atomicAdd(out_node + (i - R), v);
    else atomicAdd(out_expert + (i - R - N), v);
  }
}

// ---- channel counts: my tokens per (destination, channel) --------------------------------------
__global__ void channel_counts_kernel(const bool* in_rank, int64_t num_tokens, int R, int C, int32_t* out) {
  __shared__ int32_t counts[kMaxPeers];
  const int c = blockIdx.x;
  for (int d = threadIdx.x; d < R; d += blockDim.x) counts[d] = 0;
  __syncthreads();
  const int64_t t0 = channel_begin(num_tokens, C, c), t1 = channel_begin(num_tokens, C, c + 1);
  for (int64_t i = t0 * R + threadIdx.x; i < t1 * R; i += blockDim.x)
    if (in_rank[i]) atomicAdd(counts + static_cast<int>(i % R), 1);
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += blockDim.x) out[d * C + c] = counts[d];
}

// ---- notify: barrier, reset counters, exchange counts, build the plan --------------------------
__device__ bool node_barrier(const NotifyArgs& a, const Waiter& w, uint64_t value) {
  __shared__ int ok;
  if (threadIdx.x == 0) ok = 1;
  __threadfence_system();
  __syncthreads();
  const int L = a.num_ranks;
  if (threadIdx.x < L) {
    st_release(barrier_of(a.peers.ptr[threadIdx.x]) + a.rank, value);
    if (!w.until(barrier_of(a.peers.ptr[a.rank]) + threadIdx.x, value, threadIdx.x, -1, kBarrier)) ok = 0;
  }
  __syncthreads();
  return ok != 0;
}

__global__ void __launch_bounds__(kThreads) notify_kernel(NotifyArgs a) {
  __shared__ uint64_t seq;
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const uint64_t own = a.peers.ptr[me];
  const Waiter w{own, a.wait, 0};
  if (w.aborted()) return;
  if (threadIdx.x == 0) {
    seq = *seq_of(own) + 1;
    *seq_of(own) = seq;
  }
  __syncthreads();
  if (!node_barrier(a, w, 2 * seq - 1)) return;
  // Nobody touches rings or counters between the two barriers: reset mine.
  for (int i = threadIdx.x; i < kMaxChannels * kMaxPeers; i += blockDim.x) {
    *tail_of(own, i / kMaxPeers, i % kMaxPeers) = 0;
    *head_of(own, i / kMaxPeers, i % kMaxPeers) = 0;
  }
  const int32_t* chan_counts = reinterpret_cast<const int32_t*>(a.chan_counts);
  const int32_t* per_expert = reinterpret_cast<const int32_t*>(a.per_expert);
  const int EPR = a.experts_per_rank;
  if (!a.barrier_only) {
    for (int d = 0; d < L; ++d) {
      int32_t* slot = slot_of(a.peers.ptr[d], me);
      for (int i = threadIdx.x; i < C; i += blockDim.x) slot[2 + i] = chan_counts[d * C + i];
      for (int e = threadIdx.x; e < EPR; e += blockDim.x) slot[2 + kMaxChannels + e] = per_expert ? per_expert[d * EPR + e] : 0;
      if (threadIdx.x == 0) {
        int32_t total = 0;
        for (int c = 0; c < C; ++c) total += chan_counts[d * C + c];
        slot[0] = total;
        slot[1] = static_cast<int32_t>(a.num_tokens);
      }
    }
  }
  if (!node_barrier(a, w, 2 * seq)) return;
  if (a.barrier_only) return;

  const PlanView pv{L, C, EPR};
  int32_t* plan = reinterpret_cast<int32_t*>(a.plan);
  int32_t* host = reinterpret_cast<int32_t*>(a.host_out);
  if (threadIdx.x == 0) {
    int32_t base = 0;
    for (int s = 0; s < L; ++s) {
      const int32_t count = slot_of(own, s)[0];
      plan[pv.recv_count(s)] = count;
      plan[pv.recv_base(s)] = base;
      plan[pv.src_num_tokens(s)] = slot_of(own, s)[1];
      if (host) host[1 + s] = count;
      base += count;
    }
    plan[pv.num_recv()] = base;
    if (host) host[0] = base;
  }
  if (threadIdx.x < L) {
    const int s = threadIdx.x;
    const int32_t* slot = slot_of(own, s);
    int32_t offset = 0;
    for (int c = 0; c < C; ++c) {
      plan[pv.recv_chan_count(s, c)] = slot[2 + c];
      plan[pv.send_chan_offset(s, c)] = offset;  // here s plays the destination
      offset += chan_counts[s * C + c];
    }
  }
  for (int e = threadIdx.x; e < EPR; e += blockDim.x) {
    int64_t sum = 0;
    for (int s = 0; s < L; ++s) sum += slot_of(own, s)[2 + kMaxChannels + e];
    const int32_t aligned = static_cast<int32_t>(align_up(sum, a.expert_alignment));
    plan[pv.expert_count(e)] = aligned;
    if (host) host[1 + L + e] = aligned;
  }
  __threadfence_system();
}

// ---- dispatch ----------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) dispatch_kernel(DispatchArgs a) {
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int c = blockIdx.x / 2;
  const bool sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= L) return;
  const uint64_t own = a.peers.ptr[me];
  const Waiter w{own, a.wait, 0};
  const RecordLayout rl{1, a.num_topk, a.hidden_bytes, a.scale_bytes};
  const int64_t rec_bytes = rl.bytes();
  const PlanView pv{L, C, 0};
  const int32_t* plan = reinterpret_cast<const int32_t*>(a.plan);
  const int64_t slots = a.ring_slots;
  const int k = a.num_topk;

  if (sender) {
    const int d = warp;
    const int64_t t0 = channel_begin(a.num_tokens, C, c), t1 = channel_begin(a.num_tokens, C, c + 1);
    uint8_t* ring = ring_of(a.peers.ptr[d], c, me, L, slots, rec_bytes);
    uint64_t* tail = tail_of(a.peers.ptr[d], c, me);
    const uint64_t* head = head_of(own, c, d);
    const int32_t offset = plan[pv.send_chan_offset(d, c)];
    const bool* in_rank = reinterpret_cast<const bool*>(a.in_rank);
    const uint8_t* x = reinterpret_cast<const uint8_t*>(a.x);
    const uint8_t* scales = reinterpret_cast<const uint8_t*>(a.scales);
    const int64_t* topk_idx = reinterpret_cast<const int64_t*>(a.topk_idx);
    const float* topk_weights = reinterpret_cast<const float*>(a.topk_weights);
    uint64_t i = 0;
    for (int64_t tb = t0; tb < t1; tb += 32) {
      const int64_t t = tb + lane;
      unsigned mask = __ballot_sync(0xffffffffu, t < t1 && in_rank[t * a.num_ranks + d]);
      while (mask) {
        const int b = __ffs(mask) - 1;
        mask &= mask - 1;
        const int64_t tok = tb + b;
        int ok = 1;
        if (lane == 0 && i + 1 > static_cast<uint64_t>(slots))
          ok = w.until(head, i + 1 - slots, d, c, kDispatchSpace);
        if (!__shfl_sync(0xffffffffu, ok, 0)) return;
        uint8_t* rec = ring + static_cast<int64_t>(i % slots) * rec_bytes;
        if (lane == 0) {
          reinterpret_cast<int32_t*>(rec + rl.dst_rows_offset())[0] = offset + static_cast<int32_t>(i);
          *reinterpret_cast<int32_t*>(rec + rl.src_token_offset()) = static_cast<int32_t>(tok);
          *reinterpret_cast<int32_t*>(rec + rl.src_rank_offset()) = me;
        }
        if (lane < k) {
          reinterpret_cast<int64_t*>(rec + rl.topk_idx_offset())[lane] = topk_idx[tok * k + lane];
          reinterpret_cast<float*>(rec + rl.topk_weights_offset())[lane] = topk_weights ? topk_weights[tok * k + lane] : 1.0f;
        }
        warp_copy(rec + rl.x_offset(), x + tok * a.hidden_bytes, a.hidden_bytes, lane);
        if (a.scale_bytes) warp_copy(rec + rl.scales_offset(), scales + tok * a.scale_bytes, a.scale_bytes, lane);
        __syncwarp();
        ++i;
        if (lane == 0) {
          __threadfence_system();
          st_release(tail, i);
        }
      }
    }
  } else {
    const int s = warp;
    const int64_t n = plan[pv.recv_chan_count(s, c)];
    const int32_t base = plan[pv.recv_base(s)];
    const uint8_t* ring = ring_of(own, c, s, L, slots, rec_bytes);
    const uint64_t* tail = tail_of(own, c, s);
    uint64_t* head = head_of(a.peers.ptr[s], c, me);
    uint8_t* recv_x = reinterpret_cast<uint8_t*>(a.recv_x);
    uint8_t* recv_scales = reinterpret_cast<uint8_t*>(a.recv_scales);
    int64_t* recv_idx = reinterpret_cast<int64_t*>(a.recv_topk_idx);
    float* recv_w = reinterpret_cast<float*>(a.recv_topk_weights);
    int32_t* src_rank = reinterpret_cast<int32_t*>(a.recv_src_rank);
    int32_t* src_token = reinterpret_cast<int32_t*>(a.recv_src_token);
    uint64_t seen = 0;
    for (uint64_t i = 0; i < static_cast<uint64_t>(n); ++i) {
      int ok = 1;
      if (lane == 0 && i >= seen) {
        ok = w.until(tail, i + 1, s, c, kDispatchData);
        seen = ld_acquire(tail);
      }
      if (!__shfl_sync(0xffffffffu, ok, 0)) return;
      __syncwarp();  // lane 0's acquire orders the whole warp's reads of the record
      const uint8_t* rec = ring + static_cast<int64_t>(i % slots) * rec_bytes;
      const int64_t row = base + __ldcg(reinterpret_cast<const int32_t*>(rec + rl.dst_rows_offset()));
      if (row >= a.max_rows) {  // num_worst_tokens below the received count
        if (lane == 0) w.report(s, c, kOverflow);
        return;
      }
      warp_copy(recv_x + row * a.hidden_bytes, rec + rl.x_offset(), a.hidden_bytes, lane);
      if (a.scale_bytes) warp_copy(recv_scales + row * a.scale_bytes, rec + rl.scales_offset(), a.scale_bytes, lane);
      if (lane < k && recv_idx) {
        const int64_t e = __ldcg(reinterpret_cast<const long long*>(rec + rl.topk_idx_offset()) + lane);
        const bool mine = e >= a.expert_begin && e < a.expert_begin + a.experts_per_rank;
        recv_idx[row * k + lane] = mine ? e - a.expert_begin : -1;
        if (recv_w) recv_w[row * k + lane] = mine ? __ldcg(reinterpret_cast<const float*>(rec + rl.topk_weights_offset()) + lane) : 0.0f;
      }
      if (lane == 0) {
        src_rank[row] = s;
        src_token[row] = __ldcg(reinterpret_cast<const int32_t*>(rec + rl.src_token_offset()));
      }
      __syncwarp();
      if (lane == 0) st_release(head, i + 1);
    }
  }
}

// ---- combine -----------------------------------------------------------------------------------
// Sender blocks stream the rows this rank received from source s (contiguous, sorted by source
// token) back to s; receiver blocks walk their own tokens in order and sum the rows of the ranks
// that received each token in ascending local rank, starting from 0 (the reference loop for N == 1).
template <typename AccT>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs a) {
  __shared__ uint64_t consumed[kMaxPeers];
  __shared__ int contrib[kMaxPeers];
  __shared__ int num_contrib;
  __shared__ int ok;
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int c = blockIdx.x / 2;
  const bool sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t own = a.peers.ptr[me];
  const Waiter w{own, a.wait, 0};
  const int k = a.num_topk;
  const int64_t x_bytes = a.hidden * dtype_bytes(a.dtype);
  const ReturnRowLayout rl{x_bytes, k};
  const int64_t row_bytes = rl.bytes();
  const int64_t slots = a.ring_slots;
  const PlanView pv{L, C, 0};
  const int32_t* plan = reinterpret_cast<const int32_t*>(a.plan);

  if (sender) {
    if (warp >= L) return;
    const int s = warp;
    const int64_t ts = plan[pv.src_num_tokens(s)];
    const int32_t t0 = static_cast<int32_t>(channel_begin(ts, C, c)), t1 = static_cast<int32_t>(channel_begin(ts, C, c + 1));
    const int32_t* src_token = reinterpret_cast<const int32_t*>(a.recv_src_token);
    int64_t lo = plan[pv.recv_base(s)], hi = lo + plan[pv.recv_count(s)];
    // rows of source s are sorted by source token: binary search the channel's token range
    int64_t begin = lo, end = hi;
    {
      int64_t l = lo, h = hi;
      while (l < h) { const int64_t m = (l + h) / 2; if (src_token[m] < t0) l = m + 1; else h = m; }
      begin = l;
      h = hi;
      while (l < h) { const int64_t m = (l + h) / 2; if (src_token[m] < t1) l = m + 1; else h = m; }
      end = l;
    }
    uint8_t* ring = ring_of(a.peers.ptr[s], c, me, L, slots, row_bytes);
    uint64_t* tail = tail_of(a.peers.ptr[s], c, me);
    const uint64_t* head = head_of(own, c, s);
    const uint8_t* x = reinterpret_cast<const uint8_t*>(a.x);
    const float* weights = reinterpret_cast<const float*>(a.topk_weights);
    uint64_t i = 0;
    for (int64_t row = begin; row < end; ++row, ++i) {
      int good = 1;
      if (lane == 0 && i + 1 > static_cast<uint64_t>(slots)) good = w.until(head, i + 1 - slots, s, c, kCombineSpace);
      if (!__shfl_sync(0xffffffffu, good, 0)) return;
      uint8_t* dst = ring + static_cast<int64_t>(i % slots) * row_bytes;
      warp_copy(dst, x + row * x_bytes, x_bytes, lane);
      if (lane < k) store_f32(dst + rl.weights_offset() + 4 * lane, weights[row * k + lane]);
      __syncwarp();
      if (lane == 0) {
        __threadfence_system();
        st_release(tail, i + 1);
      }
    }
    return;
  }

  const int64_t t0 = channel_begin(a.num_tokens, C, c), t1 = channel_begin(a.num_tokens, C, c + 1);
  const bool* in_rank = reinterpret_cast<const bool*>(a.in_rank);
  if (threadIdx.x < kMaxPeers) consumed[threadIdx.x] = 0;
  __syncthreads();
  for (int64_t t = t0; t < t1; ++t) {
    if (threadIdx.x == 0) {
      int n = 0, good = 1;
      for (int j = 0; j < L && good; ++j) {
        if (!in_rank[t * a.num_ranks + j]) continue;
        good = w.until(tail_of(own, c, j), consumed[j] + 1, j, c, kCombineData);
        contrib[n++] = j;
      }
      num_contrib = n;
      ok = good;
    }
    __syncthreads();
    if (!ok) return;
    const int n = num_contrib;
    for (int64_t col = threadIdx.x; col < a.hidden; col += blockDim.x) {
      AccT acc = 0;
      for (int q = 0; q < n; ++q) {
        const int j = contrib[q];
        const uint8_t* slot = ring_of(own, c, j, L, slots, row_bytes) + static_cast<int64_t>(consumed[j] % slots) * row_bytes;
        acc += load_as<AccT>(slot, a.dtype, col);
      }
      if (a.bias0) acc += load_as<AccT>(reinterpret_cast<const void*>(a.bias0), a.bias0_dtype, t * a.hidden + col);
      if (a.bias1) acc += load_as<AccT>(reinterpret_cast<const void*>(a.bias1), a.bias1_dtype, t * a.hidden + col);
      store_as<AccT>(reinterpret_cast<void*>(a.out), a.dtype, t * a.hidden + col, acc);
    }
    if (a.out_weights) {
      for (int col = threadIdx.x; col < k; col += blockDim.x) {
        float acc = 0.0f;
        for (int q = 0; q < n; ++q) {
          const int j = contrib[q];
          const uint8_t* slot = ring_of(own, c, j, L, slots, row_bytes) + static_cast<int64_t>(consumed[j] % slots) * row_bytes;
          acc += load_f32_cg(slot + rl.weights_offset() + 4 * col);
        }
        reinterpret_cast<float*>(a.out_weights)[t * k + col] = acc;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int q = 0; q < n; ++q) {
        const int j = contrib[q];
        ++consumed[j];
        st_release(head_of(a.peers.ptr[j], c, me), consumed[j]);
      }
    }
    __syncthreads();
  }
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check_node(int L, int C) {
  if (L < 1 || L > kMaxPeers) throw std::invalid_argument("the CUDA backend serves 1.." + std::to_string(kMaxPeers) + " ranks per node");
  if (C < 1 || C > kMaxChannels) throw std::invalid_argument("num_sms must give 1.." + std::to_string(kMaxChannels) + " channels");
}

}  // namespace

// ---- RAII resources ----------------------------------------------------------------------------
DeviceAllocation::DeviceAllocation(int64_t bytes) : bytes_(bytes) {
  DISPATCH_CUDA_CHECK(cudaMalloc(&ptr_, static_cast<size_t>(bytes)));
  // cudaMemset runs on the legacy stream, which the (non-blocking) streams of the kernels do not
  // wait for: finish it here so that the first notify reads zeroed counters.
  cudaError_t status = cudaMemset(ptr_, 0, static_cast<size_t>(bytes));
  if (status == cudaSuccess) status = cudaStreamSynchronize(0);
  if (status != cudaSuccess) {
    cudaFree(ptr_);
    DISPATCH_CUDA_CHECK(status);
  }
}
DeviceAllocation::~DeviceAllocation() {
  if (ptr_) cudaFree(ptr_);
}
std::string DeviceAllocation::ipc_handle() const {
  cudaIpcMemHandle_t handle;
  DISPATCH_CUDA_CHECK(cudaIpcGetMemHandle(&handle, ptr_));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

PeerMapping::PeerMapping(const std::string& handle) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) throw std::invalid_argument("bad CUDA IPC handle size");
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  DISPATCH_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr_, h, cudaIpcMemLazyEnablePeerAccess));
}
PeerMapping::~PeerMapping() {
  if (ptr_) cudaIpcCloseMemHandle(ptr_);
}

MappedHostMemory::MappedHostMemory(int64_t bytes) {
  DISPATCH_CUDA_CHECK(cudaHostAlloc(&host_, static_cast<size_t>(bytes), cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(host_, 0, static_cast<size_t>(bytes));
  const cudaError_t status = cudaHostGetDevicePointer(&device_, host_, 0);
  if (status != cudaSuccess) {
    cudaFreeHost(host_);
    DISPATCH_CUDA_CHECK(status);
  }
}
MappedHostMemory::~MappedHostMemory() {
  if (host_) cudaFreeHost(host_);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

// Loads every kernel now. Under lazy module loading (the CUDA default) a kernel's first launch
// waits for the device to drain while holding the context lock: a first launch while a peer's
// kernel spins waiting for this rank would stall both until the timeout.
void preload_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, layout_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, channel_counts_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, notify_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<float>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<double>));
}

// ---- launchers ---------------------------------------------------------------------------------
void launch_layout(const LayoutArgs& a, uintptr_t stream) {
  if (a.num_tokens == 0) return;
  const size_t smem = sizeof(int32_t) * (a.num_ranks + a.num_ranks / a.num_ranks_per_node + a.num_experts);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_blocks, (a.num_tokens + 255) / 256)));
  layout_kernel<<<blocks, 256, smem, as_stream(stream)>>>(a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void launch_channel_counts(uint64_t in_rank, int64_t num_tokens, int num_ranks, int num_channels, uint64_t chan_counts,
                           uintptr_t stream) {
  check_node(num_ranks, num_channels);
  channel_counts_kernel<<<num_channels, 256, 0, as_stream(stream)>>>(reinterpret_cast<const bool*>(in_rank), num_tokens,
                                                                   num_ranks, num_channels,
                                                                   reinterpret_cast<int32_t*>(chan_counts));
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void launch_notify(const NotifyArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  if (a.experts_per_rank > kMaxLocalExperts) throw std::invalid_argument("too many experts per rank");
  notify_kernel<<<1, kThreads, 0, as_stream(stream)>>>(a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void launch_dispatch(const DispatchArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  if (a.num_topk > 32) throw std::invalid_argument("num_topk must be <= 32");
  dispatch_kernel<<<2 * a.num_channels, kThreads, 0, as_stream(stream)>>>(a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void launch_combine(const CombineArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  if (a.num_topk > 32) throw std::invalid_argument("num_topk must be <= 32");
  if (a.dtype == 3) combine_kernel<double><<<2 * a.num_channels, kThreads, 0, as_stream(stream)>>>(a);
  else combine_kernel<float><<<2 * a.num_channels, kThreads, 0, as_stream(stream)>>>(a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dispatch::cuda

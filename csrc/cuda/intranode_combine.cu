// In-node combine. Block 2c returns channel c's rows to their sources, block 2c+1 sums the rows
// that come back for its own tokens of channel c; 512 threads = 16 warps.
//
// Warp roles. Return (sender) block: thread s finds the rows it received from source s in this
// channel (binary search: they are sorted by source token), waits for room in ring (c, me) at s
// and takes as many rows as fit; all 16 warps copy the round's rows (warp w: rows w, w+16, ...);
// after a __syncthreads thread s publishes the tail once per round. Reduce (receiver) block: a
// batch of up to 512 own tokens (thread p reads token p's is_token_in_rank row; batch.h gives
// each token's slot in every contributor's ring), thread j waits for contributor j's rows of the
// batch once, then warp w reduces tokens w, w+16, ...: for each 16-byte vector of the row, every
// lane loads it from up to 4 contributors before the adds; sums in ascending local rank from 0
// in fp32 (fp64 for float64) as the reference; no division and no dtype switch per element (the
// kernel is a template per dtype). After a __syncthreads thread j hands contributor j's slots back.
//
// Bytes in flight per SM, by construction: reduce: 16 warps x 32 lanes x 4 x 16 B = 32 KiB;
// return: the same as dispatch's copy (kLoadsInFlight = 4 vectors per lane): 32 KiB. At 0.5 us,
// 64 GB/s per SM.
// ptxas -v (CUDA 13.0, sm_90, 2026-12-03): float/bf16/fp16 kernels 92 registers (sm_80: 90), float64
// 100 (sm_80: 106), 0 bytes spill stores/loads, 22156 bytes static shared memory. The old
// kernel: 40 registers, 44 bytes of spill stores, one token per block at a time.
#include "../common/record.h"
#include "bad_variants.h"
#include "batch.h"
#include "element.h"
#include "kernels.h"
#include "plan_view.h"
#include "profile_record.h"
#include "staging.h"

namespace dispatch::cuda {
namespace {

// First row in [lo, hi) whose source token is >= token (rows of one source are sorted by token).
DISPATCH_DEVICE int64_t lower_bound_token(const int32_t* src_token, int64_t lo, int64_t hi, int32_t token) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (src_token[mid] < token) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

DISPATCH_DEVICE void return_channel(const CombineArgs& a, const Waiter& w, int c) {
  DISPATCH_SHARED_ARRAY(int64_t, first_row, kMaxPeers);   // rows [first_row, end_row) of source s
  DISPATCH_SHARED_ARRAY(int64_t, end_row, kMaxPeers);
  DISPATCH_SHARED_ARRAY(uint64_t, sent, kMaxPeers);
  DISPATCH_SHARED_ARRAY(int32_t, take, kMaxPeers);
  DISPATCH_SHARED(int, failed);
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int p = threadIdx.x, warp = p / kWarpSize, lane = p % kWarpSize;
  const uint64_t own = a.peers.ptr[me];
  const int k = a.num_topk;
  const int64_t x_bytes = a.hidden * dtype_bytes(a.dtype);
  const ReturnRowLayout rl{x_bytes, k};
  const int64_t row_bytes = rl.bytes();
  const uint64_t slots = static_cast<uint64_t>(a.ring_slots);
  const PlanView pv{L, C, 0};
  const int32_t* plan = reinterpret_cast<const int32_t*>(a.plan);
  if (p < L) {
    const int64_t ts = plan[pv.src_num_tokens(p)];
    const int32_t* src_token = reinterpret_cast<const int32_t*>(a.recv_src_token);
    const int64_t lo = plan[pv.recv_base(p)], hi = lo + plan[pv.recv_count(p)];
    first_row[p] = lower_bound_token(src_token, lo, hi, static_cast<int32_t>(channel_begin(ts, C, c)));
    end_row[p] = lower_bound_token(src_token, first_row[p], hi, static_cast<int32_t>(channel_begin(ts, C, c + 1)));
    sent[p] = 0;
  }
  if (p == 0) failed = 0;
  const uint8_t* x = reinterpret_cast<const uint8_t*>(a.x);
  const float* weights = reinterpret_cast<const float*>(a.topk_weights);
  __syncthreads();
  for (;;) {
    // Thread 0 polls every source and takes as many rows as fit in each ring: blocking on one
    // full ring while another has room would couple the rings into a cycle.
    if (p == 0) {
      auto poll = [&]() {
        bool any = false, pending = false;
        for (int s = 0; s < L; ++s) {
          const uint64_t left = static_cast<uint64_t>(end_row[s] - first_row[s]) - sent[s];
          int32_t got = 0;
          if (left > 0) {
            pending = true;
            const uint64_t in_ring = sent[s] - (sent[s] < slots ? 0 : port::ld_acquire(head_of(own, c, s)));
            const uint64_t room = in_ring < slots ? slots - in_ring : 0;
            got = static_cast<int32_t>(left < room ? left : room);
          }
          take[s] = got;
          any = any || got > 0;
        }
        return any || !pending;
      };
      auto first_full = [&]() {
        for (int s = 0; s < L; ++s) {
          if (static_cast<uint64_t>(end_row[s] - first_row[s]) > sent[s]) return s;
        }
        return 0;
      };
      if (!w.until_any(poll, first_full, c, kWaitCombineSpace)) failed = 1;
    }
    __syncthreads();  // thread 0's acquires of the heads order the overwrites of freed slots
    if (failed) return;
    int64_t total = 0;
    for (int s = 0; s < L; ++s) total += take[s];
    if (total == 0) return;
    for (int64_t q = warp; q < total; q += kWarps) {
      int64_t j = 0;
      const int s = peer_of_item(take, L, q, &j);
      const uint64_t i = sent[s] + static_cast<uint64_t>(j);
      const int64_t row = first_row[s] + static_cast<int64_t>(i);
      uint8_t* dst = ring_of(a.peers.ptr[s], c, me, L, a.ring_slots, row_bytes) + static_cast<int64_t>(i % slots) * row_bytes;
      warp_copy(dst, x + row * x_bytes, x_bytes, lane);
      if (lane < k) store_f32(dst + rl.weights_offset() + 4 * lane, weights[row * k + lane]);
    }
    __syncthreads();  // every row of the round is written before any tail moves
    if (p == 0) {
      __threadfence_system();
      for (int s = 0; s < L; ++s) {
        if (take[s] == 0) continue;
        sent[s] += static_cast<uint64_t>(take[s]);
        port::st_release(tail_of(a.peers.ptr[s], c, me), sent[s]);
      }
    }
  }
}

template <typename AccT, int N>
DISPATCH_DEVICE void add_bias(AccT (&acc)[N], const void* bias, int dtype, int64_t first) {
  if (bias == nullptr) return;
  // one switch per vector of N elements: the bias dtype may differ from x's
  switch (dtype) {
    case kDtypeFloat32:
      for (int e = 0; e < N; ++e) acc[e] += static_cast<AccT>(__ldcg(static_cast<const float*>(bias) + first + e));
      break;
    case kDtypeBFloat16:
      for (int e = 0; e < N; ++e) acc[e] += static_cast<AccT>(port::bf16_bits_to_float(__ldcg(static_cast<const uint16_t*>(bias) + first + e)));
      break;
    case kDtypeFloat16:
      for (int e = 0; e < N; ++e) acc[e] += static_cast<AccT>(port::half_bits_to_float(__ldcg(static_cast<const uint16_t*>(bias) + first + e)));
      break;
    default:
      for (int e = 0; e < N; ++e) acc[e] += static_cast<AccT>(__ldcg(static_cast<const double*>(bias) + first + e));
      break;
  }
}

// out[t] = bias-free sum of the n contributors' rows in order, then + bias0 + bias1, rounded once.
template <typename T>
DISPATCH_DEVICE void reduce_token(const CombineArgs& a, const uint8_t* const* contrib, int n, int64_t t, int lane,
                                  bool vectors_ok) {
  using E = Element<T>;
  using AccT = typename E::Acc;
  T* out = reinterpret_cast<T*>(a.out) + t * a.hidden;
  const void* bias0 = reinterpret_cast<const void*>(a.bias0);
  const void* bias1 = reinterpret_cast<const void*>(a.bias1);
  if (vectors_ok) {
    constexpr int kPer = Vec<T>::kCount;
    const int64_t vectors = a.hidden / kPer;
    for (int64_t v = lane; v < vectors; v += kWarpSize) {
      AccT acc[kPer] = {};
      for (int q0 = 0; q0 < n; q0 += kLoadsInFlight) {
        Vec<T> in[kLoadsInFlight];
DISPATCH_UNROLL
        for (int u = 0; u < kLoadsInFlight; ++u) {
          if (q0 + u < n) in[u] = load_vec_cg(reinterpret_cast<const T*>(contrib[q0 + u]) + v * kPer);
        }
DISPATCH_UNROLL
        for (int u = 0; u < kLoadsInFlight; ++u) {
          if (q0 + u < n) {
DISPATCH_UNROLL
            for (int e = 0; e < kPer; ++e) acc[e] += E::to_acc(in[u].at[e]);
          }
        }
      }
      add_bias(acc, bias0, a.bias0_dtype, t * a.hidden + v * kPer);
      add_bias(acc, bias1, a.bias1_dtype, t * a.hidden + v * kPer);
      Vec<T> result;
DISPATCH_UNROLL
      for (int e = 0; e < kPer; ++e) result.at[e] = E::from_acc(acc[e]);
      store_vec(out + v * kPer, result);
    }
    return;
  }
  for (int64_t col = lane; col < a.hidden; col += kWarpSize) {  // odd sizes: one element per lane
    AccT acc[1] = {};
    for (int q = 0; q < n; ++q) acc[0] += E::to_acc(E::load_cg(reinterpret_cast<const T*>(contrib[q]) + col));
    add_bias(acc, bias0, a.bias0_dtype, t * a.hidden + col);
    add_bias(acc, bias1, a.bias1_dtype, t * a.hidden + col);
    out[col] = E::from_acc(acc[0]);
  }
}

template <typename T>
DISPATCH_DEVICE void reduce_channel(const CombineArgs& a, const Waiter& w, int c) {
  DISPATCH_SHARED(BatchShared, batch);
  DISPATCH_SHARED_ARRAY(uint64_t, consumed, kMaxPeers);
  DISPATCH_SHARED_ARRAY(const uint8_t*, contrib, kWarps * kMaxPeers);  // per warp: its token's rows
  DISPATCH_SHARED(int, failed);
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int p = threadIdx.x, warp = p / kWarpSize, lane = p % kWarpSize;
  const uint64_t own = a.peers.ptr[me];
  const int k = a.num_topk;
  const int64_t x_bytes = a.hidden * static_cast<int64_t>(sizeof(T));
  const ReturnRowLayout rl{x_bytes, k};
  const int64_t row_bytes = rl.bytes(), slots = a.ring_slots;
  const bool vectors_ok = (x_bytes % kVecBytes) == 0 && aligned16(reinterpret_cast<const void*>(a.out));
  const bool* in_rank = reinterpret_cast<const bool*>(a.in_rank);
  float* out_weights = reinterpret_cast<float*>(a.out_weights);
  if (p < L) consumed[p] = 0;
  if (p == 0) failed = 0;
  const int64_t t0 = channel_begin(a.num_tokens, C, c), t1 = channel_begin(a.num_tokens, C, c + 1);
  const int64_t per_batch = batch_items(slots);
  for (int64_t tb = t0; tb < t1; tb += per_batch) {
    const int64_t tokens = (t1 - tb) < per_batch ? (t1 - tb) : per_batch;
    uint32_t my_mask = 0;
    if (p < tokens) {
      for (int j = 0; j < L; ++j) my_mask |= static_cast<uint32_t>(in_rank[(tb + p) * a.num_ranks + j]) << j;
    }
    scan_batch(batch, my_mask, L);
    if (p < L && batch.count[p] > 0) {
      if (!w.until(tail_of(own, c, p), consumed[p] + static_cast<uint64_t>(batch.count[p]), p, c, kWaitCombineData)) {
        atomicAdd(&failed, 1);
      }
    }
    __syncthreads();  // thread j's acquire orders every warp's reads of contributor j's rows
    if (failed) return;
    for (int64_t q = warp; q < tokens; q += kWarps) {
      const uint32_t mask = batch.mask[q];
      const uint8_t** rows = contrib + warp * kMaxPeers;
      if (lane < L && ((mask >> lane) & 1u)) {  // contributors in ascending local rank
        const uint64_t i = consumed[lane] + batch.rank_of[q][lane];
        rows[__popc(mask & ((1u << lane) - 1u))] =
            ring_of(own, c, lane, L, slots, row_bytes) + static_cast<int64_t>(i % static_cast<uint64_t>(slots)) * row_bytes;
      }
      __syncwarp();
      const int n = __popc(mask);
      reduce_token<T>(a, rows, n, tb + q, lane, vectors_ok);
      if (out_weights && lane < k) {
        float acc = 0.0f;
        for (int j = 0; j < n; ++j) acc += load_f32_cg(rows[j] + rl.weights_offset() + 4 * lane);
        out_weights[(tb + q) * k + lane] = acc;
      }
      __syncwarp();  // the warp's row table is rewritten for its next token
    }
#if DISPATCH_BAD_VARIANT != DISPATCH_BAD_NO_BARRIER_BEFORE_HEAD
    __syncthreads();  // every thread has read the slots before they are handed back
#endif
    if (p < L && batch.count[p] > 0) {
      consumed[p] += static_cast<uint64_t>(batch.count[p]);
      port::st_release(head_of(a.peers.ptr[p], c, me), consumed[p]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  const uint64_t own = a.peers.ptr[a.rank];
  if (call_is_void(own)) return;
  const Waiter w{own, a.wait, 0};
  const int c = blockIdx.x / 2;
  if (blockIdx.x % 2 == 0) return_channel(a, w, c);
  else reduce_channel<T>(a, w, c);
}

template <typename T>
void launch_typed(const CombineArgs& a, uintptr_t stream) {
  DISPATCH_LAUNCH(combine_kernel<T>, 2 * a.num_channels, kThreads, 0, as_stream(stream), a);
}

}  // namespace

void load_combine_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<float>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<double>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<Bf16Bits>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<F16Bits>));
}

void launch_combine(const CombineArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  DISPATCH_CHECK_ARG(a.num_topk <= 32, "num_topk must be <= 32");
  DISPATCH_CHECK_ARG(a.ring_slots >= 1, "ring_slots must be >= 1");
  switch (a.dtype) {
    case kDtypeFloat32: launch_typed<float>(a, stream); break;
    case kDtypeBFloat16: launch_typed<Bf16Bits>(a, stream); break;
    case kDtypeFloat16: launch_typed<F16Bits>(a, stream); break;
    case kDtypeFloat64: launch_typed<double>(a, stream); break;
    default: DISPATCH_CHECK_ARG(false, "combine dtype code " + std::to_string(a.dtype) + " is not a float type");
  }
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dispatch::cuda

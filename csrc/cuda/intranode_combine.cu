// In-node combine: sender blocks stream the rows this rank received from source s (contiguous,
// sorted by source token) back to s; receiver blocks walk their own tokens in order and sum the
// rows of the ranks that received each token in ascending local rank, starting from 0 (the
// reference loop for N == 1), in fp32 (fp64 for float64).
#include "../common/record.h"
#include "bad_variants.h"
#include "element.h"
#include "kernels.h"
#include "plan_view.h"
#include "profile_record.h"
#include "staging.h"

namespace dispatch::cuda {
namespace {

template <typename AccT>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  DISPATCH_SHARED_ARRAY(uint64_t, consumed, kMaxPeers);
  DISPATCH_SHARED_ARRAY(int, contrib, kMaxPeers);
  DISPATCH_SHARED(int, num_contrib);
  DISPATCH_SHARED(int, ok);
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int c = blockIdx.x / 2;
  const bool sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t own = a.peers.ptr[me];
  if (call_is_void(own)) return;
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
    const int64_t lo = plan[pv.recv_base(s)], hi = lo + plan[pv.recv_count(s)];
    // rows of source s are sorted by source token: binary search the channel's token range
    int64_t begin, end;
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
      if (lane == 0 && i + 1 > static_cast<uint64_t>(slots)) good = w.until(head, i + 1 - slots, s, c, kWaitCombineSpace);
      if (!__shfl_sync(0xffffffffu, good, 0)) return;
      uint8_t* dst = ring + static_cast<int64_t>(i % slots) * row_bytes;
      warp_copy(dst, x + row * x_bytes, x_bytes, lane);
      if (lane < k) store_f32(dst + rl.weights_offset() + 4 * lane, weights[row * k + lane]);
      __syncwarp();
      if (lane == 0) {
        __threadfence_system();
        port::st_release(tail, i + 1);
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
        good = w.until(tail_of(own, c, j), consumed[j] + 1, j, c, kWaitCombineData);
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
#if DISPATCH_BAD_VARIANT != DISPATCH_BAD_NO_BARRIER_BEFORE_HEAD
    __syncthreads();  // every thread has read the slots before they are handed back
#endif
    if (threadIdx.x == 0) {
      for (int q = 0; q < n; ++q) {
        const int j = contrib[q];
        ++consumed[j];
        port::st_release(head_of(a.peers.ptr[j], c, me), consumed[j]);
      }
    }
    __syncthreads();
  }
}

}  // namespace

void load_combine_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<float>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<double>));
}

void launch_combine(const CombineArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  DISPATCH_CHECK_ARG(a.num_topk <= 32, "num_topk must be <= 32");
  if (a.dtype == kDtypeFloat64) DISPATCH_LAUNCH(combine_kernel<double>, 2 * a.num_channels, kThreads, 0, as_stream(stream), a);
  else DISPATCH_LAUNCH(combine_kernel<float>, 2 * a.num_channels, kThreads, 0, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dispatch::cuda

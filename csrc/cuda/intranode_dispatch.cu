// In-node dispatch: block 2c sends channel c (warp d streams records to rank d's ring (c, me)),
// block 2c+1 receives it (warp s drains ring (c, s) into the rows the plan gives).
#include "../common/record.h"
#include "bad_variants.h"
#include "element.h"
#include "kernels.h"
#include "plan_view.h"
#include "profile_record.h"
#include "staging.h"

namespace dispatch::cuda {
namespace {

__global__ void __launch_bounds__(kThreads) dispatch_kernel(DispatchArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int c = blockIdx.x / 2;
  const bool sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= L) return;
  const uint64_t own = a.peers.ptr[me];
  if (call_is_void(own)) return;
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
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_RING_OVERRUN
    const uint64_t capacity = static_cast<uint64_t>(slots) + 1;
#else
    const uint64_t capacity = static_cast<uint64_t>(slots);
#endif
    uint64_t i = 0;
    for (int64_t tb = t0; tb < t1; tb += 32) {
      const int64_t t = tb + lane;
      unsigned mask = __ballot_sync(0xffffffffu, t < t1 && in_rank[t * a.num_ranks + d]);
      while (mask) {
        const int b = __ffs(mask) - 1;
        mask &= mask - 1;
        const int64_t tok = tb + b;
        int ok = 1;
        if (lane == 0 && i + 1 > capacity) ok = w.until(head, i + 1 - capacity, d, c, kWaitDispatchSpace);
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
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_PLAIN_TAIL_STORE
          *tail = i;
#else
          port::st_release(tail, i);
#endif
        }
      }
    }
  } else {
    const int s = warp;
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_WAIT_ONE_TOO_MANY
    const int64_t n = plan[pv.recv_chan_count(s, c)] + 1;
#else
    const int64_t n = plan[pv.recv_chan_count(s, c)];
#endif
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
        ok = w.until(tail, i + 1, s, c, kWaitDispatchData);
        seen = port::ld_acquire(tail);
      }
      if (!__shfl_sync(0xffffffffu, ok, 0)) return;
      __syncwarp();  // lane 0's acquire orders the whole warp's reads of the record
      const uint8_t* rec = ring + static_cast<int64_t>(i % slots) * rec_bytes;
      const int64_t row = base + __ldcg(reinterpret_cast<const int32_t*>(rec + rl.dst_rows_offset()));
      if (row < 0 || row >= a.max_rows) {  // num_worst_tokens below the received count
        if (lane == 0) w.report(s, c, kWaitOverflow);
        return;
      }
      warp_copy(recv_x + row * a.hidden_bytes, rec + rl.x_offset(), a.hidden_bytes, lane);
      if (a.scale_bytes) warp_copy(recv_scales + row * a.scale_bytes, rec + rl.scales_offset(), a.scale_bytes, lane);
      if (lane < k && recv_idx) {
        const int64_t e = __ldcg(reinterpret_cast<const int64_t*>(rec + rl.topk_idx_offset()) + lane);
        const bool mine = e >= a.expert_begin && e < a.expert_begin + a.experts_per_rank;
        recv_idx[row * k + lane] = mine ? e - a.expert_begin : -1;
        if (recv_w) recv_w[row * k + lane] = mine ? __ldcg(reinterpret_cast<const float*>(rec + rl.topk_weights_offset()) + lane) : 0.0f;
      }
      if (lane == 0) {
        src_rank[row] = s;
        src_token[row] = __ldcg(reinterpret_cast<const int32_t*>(rec + rl.src_token_offset()));
      }
      __syncwarp();
      if (lane == 0) port::st_release(head, i + 1);
    }
  }
}

}  // namespace

void load_dispatch_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_kernel));
}

void launch_dispatch(const DispatchArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  DISPATCH_CHECK_ARG(a.num_topk <= 32, "num_topk must be <= 32");
  DISPATCH_LAUNCH(dispatch_kernel, 2 * a.num_channels, kThreads, 0, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

int resident_block_limit(int threads_per_block) {
#if defined(__CUDACC__)
  int device = 0, sms = 0, per_sm = 0;
  DISPATCH_CUDA_CHECK(cudaGetDevice(&device));
  DISPATCH_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  DISPATCH_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dispatch_kernel, threads_per_block, 0));
  return sms * per_sm;
#else
  (void)threads_per_block;
  return simt::resident_block_limit();
#endif
}

}  // namespace dispatch::cuda

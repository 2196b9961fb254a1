// In-node dispatch. Block 2c sends channel c, block 2c+1 receives it; 512 threads = 16 warps.
//
// Warp roles. Sender: the block takes up to 512 of the channel's tokens at a time (a batch;
// thread p reads token p's is_token_in_rank row), learns each token's slot in every peer's ring
// (batch.h), checks each ring's space once per batch (thread d for peer d), then all 16 warps copy:
// warp w packs tokens w, w+16, ..., each loaded once and stored into the ring of every peer that
// needs it; after a __syncthreads thread d publishes peer d's tail once. Receiver: threads d < L
// poll the L tails (one per peer), the block takes everything that has arrived, all 16 warps
// place the records (warp w: records w, w+16, ... of the round), thread d publishes the head.
//
// Bytes in flight per SM, by construction: every lane issues kLoadsInFlight = 4 independent
// 16-byte loads before its stores: 16 warps x 32 lanes x 64 B = 32 KiB per block, one block per
// SM; Little's law at 0.5 us gives 64 GB/s per SM (goal 40 GB/s per SM) whatever L is.
// Flags: one space check, one release fence and one tail store per (batch, peer); one head store
// per (round, peer). Per token: one % per destination (slot index), none per element.
// ptxas -v (CUDA 13.0, `nvcc -std=c++17 -arch=sm_90 -Xptxas -v -c csrc/cuda/intranode_dispatch.cu`,
// 2026-12-03): 108 registers (sm_80: 106), 0 bytes spill stores/loads, 23248 bytes static shared
// memory; one 512-thread block per SM (108 x 512 registers of 64K). The old per-warp-per-peer
// kernel: 40 registers and 48 bytes of spill stores, 512 B in flight per working warp.
#include "../common/record.h"
#include "bad_variants.h"
#include "batch.h"
#include "element.h"
#include "kernels.h"
#include "place_record.h"
#include "plan_view.h"
#include "profile_record.h"
#include "staging.h"

namespace dispatch::cuda {
namespace {

// The metadata and payload of token `tok` into the record slot of every peer in `mask`
// (`record[d]`: that peer's slot, written by the warp's lanes < L).
DISPATCH_DEVICE void pack_token(const DispatchArgs& a, const RecordLayout& rl, uint32_t mask, uint8_t* const* record,
                                const int32_t* dst_row, int64_t tok, int lane) {
  const int k = a.num_topk;
  const int64_t* topk_idx = reinterpret_cast<const int64_t*>(a.topk_idx);
  const float* topk_weights = reinterpret_cast<const float*>(a.topk_weights);
  const int64_t idx = lane < k ? topk_idx[tok * k + lane] : 0;
  const float weight = lane < k ? (topk_weights ? topk_weights[tok * k + lane] : 1.0f) : 0.0f;
  for (uint32_t m = mask; m; m &= m - 1) {
    uint8_t* rec = record[__ffs(m) - 1];
    if (lane == 0) {
      reinterpret_cast<int32_t*>(rec + rl.dst_rows_offset())[0] = dst_row[__ffs(m) - 1];
      *reinterpret_cast<int32_t*>(rec + rl.src_token_offset()) = static_cast<int32_t>(tok);
      *reinterpret_cast<int32_t*>(rec + rl.src_rank_offset()) = a.rank;
    }
    if (lane < k) {
      reinterpret_cast<int64_t*>(rec + rl.topk_idx_offset())[lane] = idx;
      reinterpret_cast<float*>(rec + rl.topk_weights_offset())[lane] = weight;
    }
  }
  const uint8_t* x = reinterpret_cast<const uint8_t*>(a.x) + tok * a.hidden_bytes;
  if (aligned16(x) && (a.hidden_bytes & 15) == 0) {
    warp_copy_vectors(x, a.hidden_bytes, lane, [&](int64_t offset, const int4& v) {
      for (uint32_t m = mask; m; m &= m - 1) *reinterpret_cast<int4*>(record[__ffs(m) - 1] + rl.x_offset() + offset) = v;
    });
  } else {
    for (uint32_t m = mask; m; m &= m - 1) warp_copy_unaligned(record[__ffs(m) - 1] + rl.x_offset(), x, a.hidden_bytes, lane);
  }
  if (a.scale_bytes) {
    const uint8_t* scales = reinterpret_cast<const uint8_t*>(a.scales) + tok * a.scale_bytes;
    for (uint32_t m = mask; m; m &= m - 1) warp_copy(record[__ffs(m) - 1] + rl.scales_offset(), scales, a.scale_bytes, lane);
  }
}

DISPATCH_DEVICE void send_channel(const DispatchArgs& a, const Waiter& w, int c) {
  DISPATCH_SHARED(BatchShared, batch);
  DISPATCH_SHARED_ARRAY(uint64_t, sent, kMaxPeers);        // records written to peer d's ring
  DISPATCH_SHARED_ARRAY(uint8_t*, ring, kMaxPeers);        // my ring at peer d
  DISPATCH_SHARED_ARRAY(int32_t, row_offset, kMaxPeers);   // my first row at d for this channel
  DISPATCH_SHARED_ARRAY(uint8_t*, record, kWarps * kMaxPeers);  // per warp: the slot at each peer
  DISPATCH_SHARED_ARRAY(int32_t, dst_row, kWarps * kMaxPeers);
  DISPATCH_SHARED(int, failed);
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int p = threadIdx.x, warp = p / kWarpSize, lane = p % kWarpSize;
  const RecordLayout rl{1, a.num_topk, a.hidden_bytes, a.scale_bytes};
  const int64_t rec_bytes = rl.bytes(), slots = a.ring_slots;
  const PlanView pv{L, C, 0};
  const int32_t* plan = reinterpret_cast<const int32_t*>(a.plan);
  const bool* in_rank = reinterpret_cast<const bool*>(a.in_rank);
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_RING_OVERRUN
  const uint64_t capacity = static_cast<uint64_t>(slots) + 1;
#else
  const uint64_t capacity = static_cast<uint64_t>(slots);
#endif
  if (p < L) {
    sent[p] = 0;
    ring[p] = ring_of(a.peers.ptr[p], c, me, L, slots, rec_bytes);
    row_offset[p] = plan[pv.send_chan_offset(p, c)];
  }
  if (p == 0) failed = 0;
  const int64_t t0 = channel_begin(a.num_tokens, C, c), t1 = channel_begin(a.num_tokens, C, c + 1);
  const int64_t per_batch = batch_items(slots);
  for (int64_t tb = t0; tb < t1; tb += per_batch) {
    uint32_t my_mask = 0;
    if (p < per_batch && tb + p < t1) {
      for (int d = 0; d < L; ++d) my_mask |= static_cast<uint32_t>(in_rank[(tb + p) * a.num_ranks + d]) << d;
    }
    scan_batch(batch, my_mask, L);
    if (p < L && batch.count[p] > 0) {
      const uint64_t need = sent[p] + static_cast<uint64_t>(batch.count[p]);
      if (need > capacity && !w.until(head_of(a.peers.ptr[me], c, p), need - capacity, p, c, kWaitDispatchSpace)) {
        atomicAdd(&failed, 1);
      }
    }
    __syncthreads();
    if (failed) return;
    for (int64_t q = warp; q < per_batch; q += kWarps) {
      const uint32_t mask = batch.mask[q];
      if (mask == 0) continue;
      if (lane < L && ((mask >> lane) & 1u)) {
        const uint64_t i = sent[lane] + batch.rank_of[q][lane];
        record[warp * kMaxPeers + lane] = ring[lane] + static_cast<int64_t>(i % slots) * rec_bytes;
        dst_row[warp * kMaxPeers + lane] = row_offset[lane] + static_cast<int32_t>(i);
      }
      __syncwarp();
      pack_token(a, rl, mask, record + warp * kMaxPeers, dst_row + warp * kMaxPeers, tb + q, lane);
      __syncwarp();  // the warp's slot table is rewritten for its next token
    }
    __syncthreads();  // every record of the batch is written before any tail moves
    if (p < L && batch.count[p] > 0) {
      sent[p] += static_cast<uint64_t>(batch.count[p]);
      __threadfence_system();
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_PLAIN_TAIL_STORE
      *tail_of(a.peers.ptr[p], c, me) = sent[p];
#else
      port::st_release(tail_of(a.peers.ptr[p], c, me), sent[p]);
#endif
    }
  }
}

DISPATCH_DEVICE void receive_channel(const DispatchArgs& a, const Waiter& w, int c) {
  DISPATCH_SHARED_ARRAY(uint64_t, expected, kMaxPeers);  // records peer s sends on this channel
  DISPATCH_SHARED_ARRAY(uint64_t, consumed, kMaxPeers);  // records of peer s placed so far
  DISPATCH_SHARED_ARRAY(int32_t, take, kMaxPeers);       // records of peer s in this round
  // one flag per phase: each is written in one phase and read after its barrier only
  DISPATCH_SHARED(int, poll_failed);
  DISPATCH_SHARED(int, place_failed);
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const int p = threadIdx.x, warp = p / kWarpSize, lane = p % kWarpSize;
  const uint64_t own = a.peers.ptr[me];
  const RecordLayout rl{1, a.num_topk, a.hidden_bytes, a.scale_bytes};
  const int64_t rec_bytes = rl.bytes(), slots = a.ring_slots;
  const PlanView pv{L, C, 0};
  const int32_t* plan = reinterpret_cast<const int32_t*>(a.plan);
  if (p < L) {
    expected[p] = static_cast<uint64_t>(plan[pv.recv_chan_count(p, c)]);
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_WAIT_ONE_TOO_MANY
    expected[p] += 1;
#endif
    consumed[p] = 0;
  }
  if (p == 0) poll_failed = place_failed = 0;
  __syncthreads();
  for (;;) {
    // Thread 0 polls every peer and takes whatever has arrived: waiting on one peer while another
    // has records would couple the rings of different senders into a cycle.
    if (p == 0) {
      auto poll = [&]() {
        bool any = false, pending = false;
        for (int s = 0; s < L; ++s) {
          int32_t got = 0;
          if (consumed[s] < expected[s]) {
            pending = true;
            const uint64_t arrived = port::ld_acquire(tail_of(own, c, s));
            got = static_cast<int32_t>((arrived < expected[s] ? arrived : expected[s]) - consumed[s]);
          }
          take[s] = got;
          any = any || got > 0;
        }
        return any || !pending;
      };
      auto first_pending = [&]() {
        for (int s = 0; s < L; ++s) {
          if (consumed[s] < expected[s]) return s;
        }
        return 0;
      };
      if (!w.until_any(poll, first_pending, c, kWaitDispatchData)) poll_failed = 1;
    }
    __syncthreads();  // thread 0's acquires order every warp's reads of the round's records
    if (poll_failed) return;
    int64_t total = 0;
    for (int s = 0; s < L; ++s) total += take[s];
    if (total == 0) return;  // every peer's records of this channel are placed
    for (int64_t q = warp; q < total; q += kWarps) {
      int64_t j = 0;
      const int s = peer_of_item(take, L, q, &j);
      const uint8_t* rec = ring_of(own, c, s, L, slots, rec_bytes) + static_cast<int64_t>((consumed[s] + j) % slots) * rec_bytes;
      const int64_t row = plan[pv.recv_base(s)] + __ldcg(reinterpret_cast<const int32_t*>(rec + rl.dst_rows_offset()));
      if (row >= 0 && row < a.max_rows) {
        place_record(a, rl, rec, row, s, lane);
      } else if (lane == 0) {  // num_worst_tokens below what arrived
        w.report(s, c, kWaitOverflow);
        atomicAdd(&place_failed, 1);
      }
    }
    __syncthreads();  // every record of the round is read before its slot is handed back
    if (place_failed) return;
    if (p == 0) {
      for (int s = 0; s < L; ++s) {
        if (take[s] == 0) continue;
        consumed[s] += static_cast<uint64_t>(take[s]);
        port::st_release(head_of(a.peers.ptr[s], c, me), consumed[s]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) dispatch_kernel(DispatchArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  const uint64_t own = a.peers.ptr[a.rank];
  if (call_is_void(own)) return;
  const Waiter w{own, a.wait, 0};
  const int c = blockIdx.x / 2;
  if (blockIdx.x % 2 == 0) send_channel(a, w, c);
  else receive_channel(a, w, c);
}

}  // namespace

void load_dispatch_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_kernel));
}

void launch_dispatch(const DispatchArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  DISPATCH_CHECK_ARG(a.num_topk <= 32, "num_topk must be <= 32");
  DISPATCH_CHECK_ARG(a.ring_slots >= 1, "ring_slots must be >= 1");
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

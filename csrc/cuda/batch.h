// Batches of the in-node kernels: a block takes up to kThreads items (tokens) at a time, item p
// held by thread p with a mask of the peers it concerns, and learns for every peer d how many of
// the batch's items concern d and each item's rank among them. The flags of a ring are then
// checked and published once per batch, not per record, and every warp of the block works on the
// batch whatever the number of peers.
#pragma once

#include "api.h"
#include "element.h"
#include "port.h"

namespace dispatch::cuda {

constexpr int kWarps = kThreads / kWarpSize;
constexpr int kBatchItems = kThreads;

struct BatchShared {
  uint32_t mask[kBatchItems];                 // peers item p concerns (bit d)
  uint16_t rank_of[kBatchItems][kMaxPeers];   // item p's rank among the batch's items for peer d
  int32_t warp_base[kWarps][kMaxPeers];       // items of warps < w for peer d
  int32_t count[kMaxPeers];                   // the batch's items for peer d
};

// Items per batch: at most a ring's slots, so that one batch never needs more than a whole ring.
DISPATCH_HD int64_t batch_items(int64_t ring_slots) { return ring_slots < kBatchItems ? ring_slots : kBatchItems; }

// Every thread of the block calls it with its item's mask (0: no item). Two __syncthreads; the
// results are in `b` for every thread after the caller's next __syncthreads (rank_of) or at
// return (count, mask of the own item).
DISPATCH_DEVICE void scan_batch(BatchShared& b, uint32_t my_mask, int num_peers) {
  const int p = threadIdx.x, warp = p / kWarpSize, lane = p % kWarpSize;
  const uint32_t lanes_below = (1u << lane) - 1u;
  b.mask[p] = my_mask;
  for (int d = 0; d < num_peers; ++d) {
    const uint32_t bit = (my_mask >> d) & 1u;
    const uint32_t ballot = __ballot_sync(0xffffffffu, bit);
    if (bit) b.rank_of[p][d] = static_cast<uint16_t>(__popc(ballot & lanes_below));
    if (lane == 0) b.warp_base[warp][d] = __popc(ballot);
  }
  __syncthreads();
  if (p < num_peers) {  // exclusive scan over warps, one thread per peer
    int32_t run = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int32_t n = b.warp_base[w][p];
      b.warp_base[w][p] = run;
      run += n;
    }
    b.count[p] = run;
  }
  __syncthreads();
  for (uint32_t m = my_mask; m; m &= m - 1) {
    const int d = __ffs(m) - 1;
    b.rank_of[p][d] = static_cast<uint16_t>(b.rank_of[p][d] + b.warp_base[warp][d]);
  }
}

// Flattened work of a round over peers: peer s owns items [begin[s], begin[s] + take[s]).
// Computed by every warp for itself from the shared take[] (L <= 16: cheaper than a barrier).
DISPATCH_DEVICE int peer_of_item(const int32_t* take, int num_peers, int64_t item, int64_t* index_in_peer) {
  int64_t begin = 0;
  for (int s = 0; s < num_peers; ++s) {
    if (item < begin + take[s]) {
      *index_in_peer = item - begin;
      return s;
    }
    begin += take[s];
  }
  *index_in_peer = 0;
  return -1;
}

}  // namespace dispatch::cuda

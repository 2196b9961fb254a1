// The receiving end of dispatch, shared by the in-node and the two-hop kernels: one record into
// its row of the receive tensors (payload, FP8 scales, top-k with global expert ids made local,
// -1 and weight 0 for experts of other ranks, and where the row came from).
#pragma once

#include "../common/record.h"
#include "element.h"

namespace dispatch::cuda {

// `Args` has the receive fields of DispatchArgs (recv_*, hidden_bytes, scale_bytes, num_topk,
// expert_begin, experts_per_rank). The caller checked 0 <= row < max_rows. src_rank < 0: the
// record's own src_rank field (the two-hop path, where a ring carries several sources).
template <typename Args>
DISPATCH_DEVICE void place_record(const Args& a, const RecordLayout& rl, const uint8_t* rec, int64_t row,
                                  int32_t src_rank, int lane) {
  warp_copy(reinterpret_cast<uint8_t*>(a.recv_x) + row * a.hidden_bytes, rec + rl.x_offset(), a.hidden_bytes, lane);
  if (a.scale_bytes) {
    warp_copy(reinterpret_cast<uint8_t*>(a.recv_scales) + row * a.scale_bytes, rec + rl.scales_offset(), a.scale_bytes, lane);
  }
  const int k = a.num_topk;
  int64_t* recv_idx = reinterpret_cast<int64_t*>(a.recv_topk_idx);
  float* recv_w = reinterpret_cast<float*>(a.recv_topk_weights);
  if (lane < k && recv_idx) {
    const int64_t e = __ldcg(reinterpret_cast<const int64_t*>(rec + rl.topk_idx_offset()) + lane);
    const bool mine = e >= a.expert_begin && e < a.expert_begin + a.experts_per_rank;
    recv_idx[row * k + lane] = mine ? e - a.expert_begin : -1;
    if (recv_w) recv_w[row * k + lane] = mine ? __ldcg(reinterpret_cast<const float*>(rec + rl.topk_weights_offset()) + lane) : 0.0f;
  }
  if (lane == 0) {
    reinterpret_cast<int32_t*>(a.recv_src_rank)[row] =
        src_rank >= 0 ? src_rank : __ldcg(reinterpret_cast<const int32_t*>(rec + rl.src_rank_offset()));
    reinterpret_cast<int32_t*>(a.recv_src_token)[row] = __ldcg(reinterpret_cast<const int32_t*>(rec + rl.src_token_offset()));
  }
}

}  // namespace dispatch::cuda

// Per-dispatch plan of the in-node CUDA path: an int32 array on the device, written by the notify
// kernel, read by dispatch and combine. dispatch/cuda/backend.py mirrors these offsets.
//
//   [0]                      num_recv
//   recv_count[L]            rows this rank receives from each source
//   recv_base[L]             first row of each source (placement rule of plan.h: source order)
//   src_num_tokens[L]        tokens at each source (combine splits them into the same channels)
//   recv_chan_count[L][C]    rows from source s carried by channel c
//   send_chan_offset[L][C]   my tokens for destination d in channels < c (second term of the
//                            placement rule, computed per channel)
//   expert_counts[EPR]       received tokens per local expert, aligned
#pragma once

#include "../common/macros.h"

namespace dispatch::cuda {

struct PlanView {
  int L, C, experts_per_rank;

  DISPATCH_HD int num_recv() const { return 0; }
  DISPATCH_HD int recv_count(int s) const { return 1 + s; }
  DISPATCH_HD int recv_base(int s) const { return 1 + L + s; }
  DISPATCH_HD int src_num_tokens(int s) const { return 1 + 2 * L + s; }
  DISPATCH_HD int recv_chan_count(int s, int c) const { return 1 + 3 * L + s * C + c; }
  DISPATCH_HD int send_chan_offset(int d, int c) const { return 1 + 3 * L + L * C + d * C + c; }
  DISPATCH_HD int expert_count(int e) const { return 1 + 3 * L + 2 * L * C + e; }
  DISPATCH_HD int size() const { return 1 + 3 * L + 2 * L * C + experts_per_rank; }
};

// Tokens [begin, end) of channel c when T tokens are split into C channels.
DISPATCH_HD int64_t channel_begin(int64_t num_tokens, int num_channels, int c) {
  return num_tokens * c / num_channels;
}

}  // namespace dispatch::cuda

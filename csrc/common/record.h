// Message format: one dispatch record per (token, destination node), the same bytes on the
// rail and in a node outbox, so a rail chunk can be received straight into the outbox.
//
//   int32  dst_row[L]        row at each local rank of the destination node, -1 = not for it
//   int32  src_token         token index at the source rank
//   int32  src_rank
//   int64  topk_idx[k]       global expert ids (only when top-k travels)
//   float  topk_weights[k]
//   byte   x[hidden_bytes]   the token row, 16-byte aligned
//   byte   scales[scale_bytes]  FP8 scales
#pragma once

#include "macros.h"

namespace dispatch {

struct RecordLayout {
  int num_ranks_per_node;
  int num_topk;        // 0 when top-k does not travel
  int64_t hidden_bytes;
  int64_t scale_bytes;

  DISPATCH_HD int64_t dst_rows_offset() const { return 0; }
  DISPATCH_HD int64_t src_token_offset() const { return 4 * num_ranks_per_node; }
  DISPATCH_HD int64_t src_rank_offset() const { return src_token_offset() + 4; }
  DISPATCH_HD int64_t topk_idx_offset() const { return align_up(src_rank_offset() + 4, 8); }
  DISPATCH_HD int64_t topk_weights_offset() const { return topk_idx_offset() + 8 * num_topk; }
  DISPATCH_HD int64_t x_offset() const { return align_up(topk_weights_offset() + 4 * num_topk, 16); }
  DISPATCH_HD int64_t scales_offset() const { return x_offset() + hidden_bytes; }
  DISPATCH_HD int64_t bytes() const { return align_up(scales_offset() + scale_bytes, 16); }
};

// One row going back from a local rank to the reducer in combine: the x row then k weights.
struct ReturnRowLayout {
  int64_t hidden_bytes;
  int num_topk;  // 0 when weights are not combined

  DISPATCH_HD int64_t weights_offset() const { return hidden_bytes; }
  DISPATCH_HD int64_t bytes() const { return align_up(hidden_bytes + 4 * num_topk, 16); }
};

// One partial sum per (token, node) crossing the rail in combine: the row, then k float32
// weights. The row is in the accumulation type (exact), or rounded to a 16-bit type when the
// caller trades exactness for half the rail bytes (Config.round_rail_partials, as DeepEP does).
struct PartialRowLayout {
  int64_t hidden;
  int acc_elem_bytes;  // 4 (float32) or 8 (float64): the accumulation type
  int num_topk;
  int row_dtype = -1;  // -1: rows in the accumulation type; 1 bfloat16 / 2 float16: rounded rows

  DISPATCH_HD int row_elem_bytes() const { return row_dtype < 0 ? acc_elem_bytes : 2; }
  DISPATCH_HD int64_t weights_offset() const { return hidden * row_elem_bytes(); }
  DISPATCH_HD int64_t bytes() const { return align_up(weights_offset() + 4 * num_topk, 16); }
};

}  // namespace dispatch

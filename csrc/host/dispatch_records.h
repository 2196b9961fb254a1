// Dispatch executors on the CPU: pack token records into a chunk (rail or node outbox) and
// copy the records meant for this rank out of a node peer's outbox into the receive tensors.
#pragma once

#include <cstdint>

#include "../common/record.h"

namespace dispatch::host {

struct TokenSource {
  const uint8_t* x;            // [T, hidden_bytes]
  const uint8_t* scales;       // [T, scale_bytes] or null
  const int64_t* topk_idx;     // [T, k] or null
  const float* topk_weights;   // [T, k] or null
  int src_rank;
};

// Writes `num_records` records: token token_ids[i] with dst_rows[i * L ...] into out + i * bytes.
void pack_records(uint8_t* out, const RecordLayout& layout, const TokenSource& source, const int32_t* token_ids,
                  const int32_t* dst_rows, int64_t num_records, int num_threads);

struct ReceiveTarget {
  uint8_t* recv_x;            // [n, hidden_bytes]
  uint8_t* recv_scales;       // [n, scale_bytes] or null
  int64_t* recv_topk_idx;     // [n, k] or null: local expert id or -1
  float* recv_topk_weights;   // [n, k] or null
  int64_t expert_begin;       // first global expert of this rank
  int64_t experts_per_rank;
};

// Copies the records of `chunk` addressed to `local_rank` to their rows. Appends, in record
// order, each copy's row to rows_out, its source rank to src_ranks_out and its source token to
// src_tokens_out; returns how many. Also copies every record's dst_rows into dst_rows_out
// ([num_records, L]) when it is not null (the combine of this chunk's owner needs them).
int64_t unpack_records(const uint8_t* chunk, const RecordLayout& layout, int64_t num_records, int local_rank,
                       const ReceiveTarget& target, int32_t* rows_out, int32_t* src_ranks_out,
                       int32_t* src_tokens_out, int num_threads);

// dst_rows of every record of a chunk, [num_records, L].
void copy_dst_rows(const uint8_t* chunk, const RecordLayout& layout, int64_t num_records, int32_t* dst_rows_out);

}  // namespace dispatch::host

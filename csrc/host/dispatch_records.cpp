#include "dispatch_records.h"

#include <cstring>

#include "copy.h"
#include "parallel.h"

namespace dispatch::host {

namespace {
constexpr int64_t kRecordsPerThread = 16;
}

void pack_records(uint8_t* out, const RecordLayout& layout, const TokenSource& source, const int32_t* token_ids,
                  const int32_t* dst_rows, int64_t num_records, int num_threads) {
  const int L = layout.num_ranks_per_node;
  const int k = layout.num_topk;
  const int64_t record_bytes = layout.bytes();
  parallel_for(num_records, num_threads, kRecordsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint8_t* record = out + i * record_bytes;
      const int64_t t = token_ids[i];
      std::memcpy(record + layout.dst_rows_offset(), dst_rows + i * L, 4 * static_cast<size_t>(L));
      const int32_t src_token = static_cast<int32_t>(t);
      std::memcpy(record + layout.src_token_offset(), &src_token, 4);
      std::memcpy(record + layout.src_rank_offset(), &source.src_rank, 4);
      if (k > 0) {
        std::memcpy(record + layout.topk_idx_offset(), source.topk_idx + t * k, 8 * static_cast<size_t>(k));
        std::memcpy(record + layout.topk_weights_offset(), source.topk_weights + t * k, 4 * static_cast<size_t>(k));
      }
      std::memcpy(record + layout.x_offset(), source.x + t * layout.hidden_bytes,
                  static_cast<size_t>(layout.hidden_bytes));
      if (layout.scale_bytes > 0)
        std::memcpy(record + layout.scales_offset(), source.scales + t * layout.scale_bytes,
                    static_cast<size_t>(layout.scale_bytes));
    }
  });
}

int64_t unpack_records(const uint8_t* chunk, const RecordLayout& layout, int64_t num_records, int local_rank,
                       const ReceiveTarget& target, int32_t* rows_out, int32_t* src_ranks_out,
                       int32_t* src_tokens_out, int num_threads) {
  const int k = layout.num_topk;
  const int64_t record_bytes = layout.bytes();
  // First pass (cheap): the log of which records are ours, in record order.
  int64_t count = 0;
  for (int64_t i = 0; i < num_records; ++i) {
    const uint8_t* record = chunk + i * record_bytes;
    int32_t row;
    std::memcpy(&row, record + layout.dst_rows_offset() + 4 * local_rank, 4);
    if (row < 0) continue;
    rows_out[count] = row;
    std::memcpy(&src_ranks_out[count], record + layout.src_rank_offset(), 4);
    std::memcpy(&src_tokens_out[count], record + layout.src_token_offset(), 4);
    ++count;
  }
  // Second pass: the payload copies, in parallel ranges (each record names its own row).
  parallel_for(num_records, num_threads, kRecordsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* record = chunk + i * record_bytes;
      int32_t row;
      std::memcpy(&row, record + layout.dst_rows_offset() + 4 * local_rank, 4);
      if (row < 0) continue;
      copy_row_streaming(target.recv_x + row * layout.hidden_bytes, record + layout.x_offset(),
                         static_cast<size_t>(layout.hidden_bytes));
      if (layout.scale_bytes > 0 && target.recv_scales != nullptr)
        std::memcpy(target.recv_scales + row * layout.scale_bytes, record + layout.scales_offset(),
                    static_cast<size_t>(layout.scale_bytes));
      if (k > 0 && target.recv_topk_idx != nullptr) {
        const uint8_t* idx = record + layout.topk_idx_offset();
        const uint8_t* weights = record + layout.topk_weights_offset();
        for (int j = 0; j < k; ++j) {
          int64_t expert;
          float weight;
          std::memcpy(&expert, idx + 8 * j, 8);
          std::memcpy(&weight, weights + 4 * j, 4);
          const int64_t local_expert = expert - target.expert_begin;
          const bool mine = expert >= 0 && local_expert >= 0 && local_expert < target.experts_per_rank;
          target.recv_topk_idx[row * k + j] = mine ? local_expert : -1;
          target.recv_topk_weights[row * k + j] = mine ? weight : 0.0f;
        }
      }
    }
    streaming_fence();
  });
  return count;
}

void copy_dst_rows(const uint8_t* chunk, const RecordLayout& layout, int64_t num_records, int32_t* dst_rows_out) {
  const int L = layout.num_ranks_per_node;
  const int64_t record_bytes = layout.bytes();
  for (int64_t i = 0; i < num_records; ++i)
    std::memcpy(dst_rows_out + i * L, chunk + i * record_bytes + layout.dst_rows_offset(), 4 * static_cast<size_t>(L));
}

}  // namespace dispatch::host

// Arguments of the movers (reduce_chunk, pack_records, unpack_records, gather_return_rows) as the
// Python event loops pass them (addresses, 0 = absent), with the checks that make a wrong call a
// Python ValueError naming the field instead of a stray write.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../common/record.h"
#include "combine_reduce.h"
#include "dispatch_records.h"
#include "dtype.h"

namespace dispatch::host {

struct ReduceChunkArgs {
  uintptr_t dst_rows = 0;         // int32 [num_records, L]: row at each local rank, -1 = none
  int64_t num_records = 0;
  int num_ranks_per_node = 0;
  uintptr_t return_chunks = 0;    // uintptr_t [L]: each local rank's returned rows (0 = none)
  ReturnRowLayout return_layout{};
  int self_local_rank = -1;       // the reducer (-1: no rows of its own, as in bench.calibrate)
  uintptr_t self_x = 0;           // its own rows, [n, x_row_bytes]
  uintptr_t self_weights = 0;     // float32 [n, k] or 0
  uintptr_t self_rows = 0;        // int32: rows of self_x for this chunk, in record order
  int64_t x_row_bytes = 0;
  int dtype = -1;                 // DType of x
  uintptr_t partials = 0;         // rail partial rows, or 0 when writing to acc
  uintptr_t acc = 0;              // [T, hidden] accumulation type, or 0 when writing partials
  uintptr_t acc_weights = 0;      // float32 [T, k] or 0
  uintptr_t token_ids = 0;        // int32 [num_records]: acc rows, with acc
  PartialRowLayout partial_layout{};

  // Throws std::invalid_argument naming the first field that cannot be right.
  void check() const {
    auto fail = [](const std::string& what) { throw std::invalid_argument("reduce_chunk: " + what); };
    if (num_records < 0) fail("num_records < 0");
    if (num_ranks_per_node < 1 || num_ranks_per_node > 64) fail("num_ranks_per_node outside [1, 64]");
    if (self_local_rank < -1 || self_local_rank >= num_ranks_per_node) fail("self_local_rank outside [-1, L)");
    if (dtype < 0 || dtype > static_cast<int>(DType::kFloat64)) fail("dtype is not a float type code");
    if (self_local_rank >= 0 && x_row_bytes != return_layout.hidden_bytes)
      fail("x_row_bytes differs from return_layout.hidden_bytes");
    if (return_layout.hidden_bytes != partial_layout.hidden * dtype_bytes(static_cast<DType>(dtype)))
      fail("partial_layout.hidden does not match return_layout's row");
    if ((partials == 0) == (acc == 0)) fail("exactly one of partials and acc must be given");
    if (acc != 0 && token_ids == 0) fail("acc needs token_ids");
    if (acc == 0 && acc_weights != 0) fail("acc_weights without acc");
    if (return_layout.num_topk != partial_layout.num_topk) fail("return and partial layouts differ in num_topk");
    // self_x / self_rows / self_weights may be null: a reducer may hold no rows of its own.
    if (num_records > 0 && (dst_rows == 0 || return_chunks == 0)) fail("dst_rows or return_chunks is null");
  }
};

// Runs reduce_chunk on checked arguments.
inline void reduce_chunk(const ReduceChunkArgs& a, int num_threads) {
  a.check();
  const auto* chunks = reinterpret_cast<const uintptr_t*>(a.return_chunks);
  const SelfRows self{a.self_local_rank, reinterpret_cast<const uint8_t*>(a.self_x),
                      reinterpret_cast<const float*>(a.self_weights), reinterpret_cast<const int32_t*>(a.self_rows),
                      a.x_row_bytes};
  const ReduceTarget target{reinterpret_cast<uint8_t*>(a.partials), reinterpret_cast<uint8_t*>(a.acc),
                            reinterpret_cast<float*>(a.acc_weights), reinterpret_cast<const int32_t*>(a.token_ids)};
  reduce_chunk(reinterpret_cast<const int32_t*>(a.dst_rows), a.num_records, a.num_ranks_per_node, chunks,
               a.return_layout, self, static_cast<DType>(a.dtype), target, a.partial_layout, num_threads);
}

}  // namespace dispatch::host

namespace dispatch::host {

namespace detail {
[[noreturn]] inline void fail(const char* mover, const std::string& what) {
  throw std::invalid_argument(std::string(mover) + ": " + what);
}

// Every index in [0, bound): the callers' index tensors are what a stray write would follow.
inline void check_indices(const char* mover, const char* field, const int32_t* values, int64_t n, int64_t bound) {
  for (int64_t i = 0; i < n; ++i)
    if (values[i] < 0 || values[i] >= bound)
      fail(mover, std::string(field) + "[" + std::to_string(i) + "] = " + std::to_string(values[i]) +
                      " outside [0, " + std::to_string(bound) + ")");
}

// out_bytes covers count rows of row_bytes (count_name: the field that holds count).
inline void check_room(const char* mover, int64_t out_bytes, const char* count_name, int64_t count, int64_t row_bytes) {
  if (out_bytes < count * row_bytes)
    fail(mover, "out_bytes " + std::to_string(out_bytes) + " < " + count_name + " * layout.bytes = " +
                    std::to_string(count * row_bytes));
}

inline void check_record_layout(const char* mover, const RecordLayout& l) {
  if (l.num_ranks_per_node < 1 || l.num_ranks_per_node > 64) fail(mover, "layout.num_ranks_per_node outside [1, 64]");
  if (l.num_topk < 0) fail(mover, "layout.num_topk < 0");
  if (l.hidden_bytes < 0 || l.scale_bytes < 0) fail(mover, "layout.hidden_bytes or layout.scale_bytes < 0");
}
}  // namespace detail

// Arguments of pack_records: num_records records, token token_ids[i] of x, into out.
struct PackRecordsArgs {
  uintptr_t out = 0;             // records, [num_records, layout.bytes]
  int64_t out_bytes = 0;         // room at out
  RecordLayout layout{};
  uintptr_t x = 0;               // [num_tokens, layout.hidden_bytes]
  int64_t num_tokens = 0;        // rows of x (bounds of token_ids)
  uintptr_t scales = 0;          // [num_tokens, layout.scale_bytes], needed when scale_bytes > 0
  uintptr_t topk_idx = 0;        // int64 [num_tokens, k], needed when k > 0
  uintptr_t topk_weights = 0;    // float32 [num_tokens, k], needed when k > 0
  int src_rank = -1;
  uintptr_t token_ids = 0;       // int32 [num_records]
  uintptr_t dst_rows = 0;        // int32 [num_records, L]
  int64_t num_records = 0;

  void check() const {
    constexpr const char* m = "pack_records";
    if (num_records < 0) detail::fail(m, "num_records < 0");
    detail::check_record_layout(m, layout);
    if (src_rank < 0) detail::fail(m, "src_rank < 0");
    if (num_tokens < 0) detail::fail(m, "num_tokens < 0");
    if (num_records == 0) return;
    if (out == 0) detail::fail(m, "out is null");
    detail::check_room(m, out_bytes, "num_records", num_records, layout.bytes());
    if (x == 0) detail::fail(m, "x is null");
    if (layout.scale_bytes > 0 && scales == 0) detail::fail(m, "scales is null with layout.scale_bytes > 0");
    if (layout.num_topk > 0 && topk_idx == 0) detail::fail(m, "topk_idx is null with layout.num_topk > 0");
    if (layout.num_topk > 0 && topk_weights == 0) detail::fail(m, "topk_weights is null with layout.num_topk > 0");
    if (token_ids == 0) detail::fail(m, "token_ids is null");
    if (dst_rows == 0) detail::fail(m, "dst_rows is null");
    detail::check_indices(m, "token_ids", reinterpret_cast<const int32_t*>(token_ids), num_records, num_tokens);
  }
};

inline void pack_records(const PackRecordsArgs& a, int num_threads) {
  a.check();
  const TokenSource source{reinterpret_cast<const uint8_t*>(a.x), reinterpret_cast<const uint8_t*>(a.scales),
                           reinterpret_cast<const int64_t*>(a.topk_idx), reinterpret_cast<const float*>(a.topk_weights),
                           a.src_rank};
  pack_records(reinterpret_cast<uint8_t*>(a.out), a.layout, source, reinterpret_cast<const int32_t*>(a.token_ids),
               reinterpret_cast<const int32_t*>(a.dst_rows), a.num_records, num_threads);
}

// Arguments of unpack_records: the records of chunk addressed to local_rank, into the receive rows.
struct UnpackRecordsArgs {
  uintptr_t chunk = 0;              // records, [num_records, layout.bytes]
  RecordLayout layout{};
  int64_t num_records = 0;
  int local_rank = -1;              // in [0, layout.num_ranks_per_node)
  uintptr_t recv_x = 0;             // [num_recv_rows, layout.hidden_bytes]
  int64_t num_recv_rows = 0;        // rows of the receive tensors (bounds of the records' rows)
  uintptr_t recv_scales = 0;        // [num_recv_rows, scale_bytes] or 0 (scales not kept)
  uintptr_t recv_topk_idx = 0;      // int64 [num_recv_rows, k] or 0; with recv_topk_weights
  uintptr_t recv_topk_weights = 0;  // float32 [num_recv_rows, k] or 0
  int64_t expert_begin = 0;
  int64_t experts_per_rank = 1;
  uintptr_t rows_out = 0;           // int32 [log_capacity] each: the log of the copies
  uintptr_t src_ranks_out = 0;
  uintptr_t src_tokens_out = 0;
  int64_t log_capacity = 0;

  void check() const {
    constexpr const char* m = "unpack_records";
    if (num_records < 0) detail::fail(m, "num_records < 0");
    detail::check_record_layout(m, layout);
    if (local_rank < 0 || local_rank >= layout.num_ranks_per_node)
      detail::fail(m, "local_rank outside [0, layout.num_ranks_per_node)");
    if (num_recv_rows < 0) detail::fail(m, "num_recv_rows < 0");
    if (experts_per_rank < 1) detail::fail(m, "experts_per_rank < 1");
    if ((recv_topk_idx == 0) != (recv_topk_weights == 0))
      detail::fail(m, "recv_topk_idx and recv_topk_weights must be given together");
    if (num_records == 0) return;
    if (chunk == 0) detail::fail(m, "chunk is null");
    // The rows the records name for this rank: a cheap pass over 4 bytes a record.
    const auto* base = reinterpret_cast<const uint8_t*>(chunk);
    int64_t count = 0;
    for (int64_t i = 0; i < num_records; ++i) {
      int32_t row;
      std::memcpy(&row, base + i * layout.bytes() + layout.dst_rows_offset() + 4 * local_rank, 4);
      if (row < 0) continue;
      if (row >= num_recv_rows)
        detail::fail(m, "record " + std::to_string(i) + " names row " + std::to_string(row) +
                            " outside num_recv_rows " + std::to_string(num_recv_rows));
      ++count;
    }
    if (count == 0) return;  // nothing for this rank: its receive tensors may be empty
    if (recv_x == 0) detail::fail(m, "recv_x is null");
    if (rows_out == 0 || src_ranks_out == 0 || src_tokens_out == 0)
      detail::fail(m, "rows_out, src_ranks_out or src_tokens_out is null");
    if (count > log_capacity)
      detail::fail(m, "log_capacity " + std::to_string(log_capacity) + " < " + std::to_string(count) + " copies");
  }
};

inline int64_t unpack_records(const UnpackRecordsArgs& a, int num_threads) {
  a.check();
  const ReceiveTarget target{reinterpret_cast<uint8_t*>(a.recv_x), reinterpret_cast<uint8_t*>(a.recv_scales),
                             reinterpret_cast<int64_t*>(a.recv_topk_idx), reinterpret_cast<float*>(a.recv_topk_weights),
                             a.expert_begin, a.experts_per_rank};
  return unpack_records(reinterpret_cast<const uint8_t*>(a.chunk), a.layout, a.num_records, a.local_rank, target,
                        reinterpret_cast<int32_t*>(a.rows_out), reinterpret_cast<int32_t*>(a.src_ranks_out),
                        reinterpret_cast<int32_t*>(a.src_tokens_out), num_threads);
}

// Arguments of gather_return_rows: out[i] = (x[rows[i]], weights[rows[i]]).
struct GatherReturnRowsArgs {
  uintptr_t out = 0;        // [num_rows, layout.bytes]
  int64_t out_bytes = 0;    // room at out
  ReturnRowLayout layout{};
  uintptr_t x = 0;          // [num_x_rows, layout.hidden_bytes]
  int64_t num_x_rows = 0;   // bounds of rows
  uintptr_t weights = 0;    // float32 [num_x_rows, k], needed when layout.num_topk > 0
  uintptr_t rows = 0;       // int32 [num_rows]
  int64_t num_rows = 0;

  void check() const {
    constexpr const char* m = "gather_return_rows";
    if (num_rows < 0) detail::fail(m, "num_rows < 0");
    if (layout.hidden_bytes < 0 || layout.num_topk < 0) detail::fail(m, "layout.hidden_bytes or layout.num_topk < 0");
    if (num_x_rows < 0) detail::fail(m, "num_x_rows < 0");
    if (num_rows == 0) return;
    if (out == 0) detail::fail(m, "out is null");
    detail::check_room(m, out_bytes, "num_rows", num_rows, layout.bytes());
    if (x == 0) detail::fail(m, "x is null");
    if (layout.num_topk > 0 && weights == 0) detail::fail(m, "weights is null with layout.num_topk > 0");
    if (rows == 0) detail::fail(m, "rows is null");
    detail::check_indices(m, "rows", reinterpret_cast<const int32_t*>(rows), num_rows, num_x_rows);
  }
};

inline void gather_return_rows(const GatherReturnRowsArgs& a, int num_threads) {
  a.check();
  gather_return_rows(reinterpret_cast<uint8_t*>(a.out), a.layout, reinterpret_cast<const uint8_t*>(a.x),
                     reinterpret_cast<const float*>(a.weights), reinterpret_cast<const int32_t*>(a.rows), a.num_rows,
                     num_threads);
}

}  // namespace dispatch::host

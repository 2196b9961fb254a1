// Arguments of reduce_chunk as the Python event loop passes them (addresses, 0 = absent), with
// the checks that make a wrong call a Python ValueError instead of a stray write.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/record.h"
#include "combine_reduce.h"
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

// Combine executors on the CPU: gather the rows a local rank returns to a reducer, reduce one
// chunk in the fixed order (local rank ascending), accumulate node partials at the source
// (own node first, then the others ascending) and write the result with bias.
#pragma once

#include <cstdint>

#include "../common/record.h"
#include "dtype.h"

namespace dispatch::host {

// out[i] = (x[rows[i]], weights[rows[i]]) in ReturnRowLayout.
void gather_return_rows(uint8_t* out, const ReturnRowLayout& layout, const uint8_t* x, const float* weights,
                        const int32_t* rows, int64_t num_rows, int num_threads);

// Where reduce_chunk writes: either packed partial rows (PartialRowLayout, for the rail) or,
// with token_ids, straight into the source's accumulator rows acc[token_ids[i]] (own tokens:
// the first term of the sum is 0 + partial, which equals partial exactly since a partial that
// starts from +0 is never -0).
struct ReduceTarget {
  uint8_t* partials;       // packed rows, or null
  uint8_t* acc;            // [T, hidden] accumulation type, or null
  float* acc_weights;      // [T, k], or null
  const int32_t* token_ids;
};

// The reducer's own rows need no trip through shared memory: it reads them from its x.
struct SelfRows {
  int local_rank;             // -1: none
  const uint8_t* x;           // [n, x_row_bytes]
  const float* weights;       // [n, k] or null
  const int32_t* rows;        // rows of x for this chunk, in record order
  int64_t x_row_bytes;
};

// For every record i of a reducer's chunk: partial[i] = 0 + row(j0) + row(j1) + ... over the
// local ranks j (ascending) with dst_rows[i * L + j] >= 0, read from return_chunks[j] (rows of
// rank j for this chunk, in record order; for j == self_rows.local_rank, from self_rows).
// Accumulates in float (acc_elem_bytes 4) or double.
void reduce_chunk(const int32_t* dst_rows, int64_t num_records, int num_ranks_per_node,
                  const uintptr_t* return_chunks, const ReturnRowLayout& return_layout, const SelfRows& self_rows,
                  DType dtype, const ReduceTarget& target, const PartialRowLayout& partial_layout, int num_threads);

// The combine output and its bias; rows are written as cast(acc + bias0 + bias1).
struct CombineOutput {
  uint8_t* out;
  DType out_dtype;
  const uint8_t* bias0;  // [T, hidden] or null
  DType bias0_dtype;
  const uint8_t* bias1;
  DType bias1_dtype;
};

// acc[token_ids[i]] += partial[i]; acc_weights likewise (float32). Where last_term[i] is set
// (this partial is the token's last), the sum goes straight to the output row instead, saving
// a later pass over acc.
void accumulate_partials(uint8_t* acc, float* acc_weights, const uint8_t* partials,
                         const PartialRowLayout& partial_layout, const int32_t* token_ids, int64_t num_rows,
                         const uint8_t* last_term, const CombineOutput& output, int num_threads);

// out[t] = cast(acc[t] + bias0[t] + bias1[t]) for t in token_ids (all T rows when null).
void finalize_combine(const uint8_t* acc, int acc_elem_bytes, int64_t hidden, const int32_t* token_ids,
                      int64_t num_rows, const CombineOutput& output, int num_threads);

}  // namespace dispatch::host

#include "combine_reduce.h"

#include <cstring>
#include <vector>

#include "parallel.h"

namespace dispatch::host {

namespace {
constexpr int64_t kRowsPerThread = 16;

template <typename AccT>
void reduce_records(const int32_t* dst_rows, int64_t begin, int64_t end, int L, const std::vector<int64_t>& cursors,
                    const uintptr_t* return_chunks, const ReturnRowLayout& rl, const SelfRows& self_rows, DType dtype,
                    const ReduceTarget& target, const PartialRowLayout& pl) {
  const int64_t hidden = pl.hidden;
  const int k = pl.num_topk;
  // Rounded rail rows are summed in the accumulation type here, then stored rounded.
  const bool rounded = target.token_ids == nullptr && pl.row_dtype >= 0;
  std::vector<AccT> scratch(rounded ? static_cast<size_t>(hidden) : 0);
  for (int64_t i = begin; i < end; ++i) {
    AccT* part;
    float* part_weights;
    if (target.token_ids != nullptr) {
      const int64_t t = target.token_ids[i];
      part = reinterpret_cast<AccT*>(target.acc) + t * hidden;
      part_weights = target.acc_weights != nullptr ? target.acc_weights + t * k : nullptr;
    } else {
      part = rounded ? scratch.data() : reinterpret_cast<AccT*>(target.partials + i * pl.bytes());
      part_weights = reinterpret_cast<float*>(target.partials + i * pl.bytes() + pl.weights_offset());
    }
    bool first = true;
    for (int l = 0; l < L; ++l) {
      if (dst_rows[i * L + l] < 0) continue;
      const uint8_t* row;
      const uint8_t* row_weights;
      if (l == self_rows.local_rank) {
        const int64_t x_row = self_rows.rows[cursors[i * L + l]];
        row = self_rows.x + x_row * self_rows.x_row_bytes;
        row_weights = self_rows.weights != nullptr ? reinterpret_cast<const uint8_t*>(self_rows.weights + x_row * k) : nullptr;
      } else {
        row = reinterpret_cast<const uint8_t*>(return_chunks[l]) + cursors[i * L + l] * rl.bytes();
        row_weights = row + rl.weights_offset();
      }
      const bool with_weights = k > 0 && part_weights != nullptr && row_weights != nullptr;
      if (first) {
        start_row(part, row, dtype, hidden);
        if (with_weights) start_row(part_weights, row_weights, DType::kFloat32, k);
      } else {
        add_row(part, row, dtype, hidden);
        if (with_weights) add_row(part_weights, row_weights, DType::kFloat32, k);
      }
      first = false;
    }
    if (first) {  // no local rank holds the token (cannot happen for a record; kept total)
      for (int64_t h = 0; h < hidden; ++h) part[h] = AccT(0);
      if (part_weights != nullptr)
        for (int j = 0; j < k; ++j) part_weights[j] = 0.0f;
    }
    if (rounded) store_row(target.partials + i * pl.bytes(), part, static_cast<DType>(pl.row_dtype), hidden);
  }
}

template <typename AccT>
void finish_row(AccT* row, int64_t t, int64_t hidden, const CombineOutput& output) {
  if (output.bias0 != nullptr)
    add_row(row, output.bias0 + t * hidden * dtype_bytes(output.bias0_dtype), output.bias0_dtype, hidden);
  if (output.bias1 != nullptr)
    add_row(row, output.bias1 + t * hidden * dtype_bytes(output.bias1_dtype), output.bias1_dtype, hidden);
  store_row(output.out + t * hidden * dtype_bytes(output.out_dtype), row, output.out_dtype, hidden);
}

template <typename AccT>
void accumulate_rows(uint8_t* acc, float* acc_weights, const uint8_t* partials, const PartialRowLayout& pl,
                     const int32_t* token_ids, int64_t begin, int64_t end, const uint8_t* last_term,
                     const CombineOutput& output) {
  const int64_t hidden = pl.hidden;
  const int k = pl.num_topk;
  std::vector<AccT> scratch(static_cast<size_t>(hidden));
  const bool rounded = pl.row_dtype >= 0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = token_ids[i];
    AccT* dst = reinterpret_cast<AccT*>(acc) + t * hidden;
    const uint8_t* row = partials + i * pl.bytes();
    const bool last = last_term != nullptr && last_term[i];
    if (rounded) {  // widen the rounded partial exactly, then add in the accumulation type
      AccT* sum = last ? scratch.data() : dst;
      if (last) std::memcpy(sum, dst, static_cast<size_t>(hidden) * sizeof(AccT));
      add_row(sum, row, static_cast<DType>(pl.row_dtype), hidden);
      if (last) finish_row(sum, t, hidden, output);
    } else if (last) {
      const AccT* src = reinterpret_cast<const AccT*>(row);
      for (int64_t h = 0; h < hidden; ++h) scratch[h] = dst[h] + src[h];
      finish_row(scratch.data(), t, hidden, output);
    } else {
      const AccT* src = reinterpret_cast<const AccT*>(row);
      for (int64_t h = 0; h < hidden; ++h) dst[h] += src[h];
    }
    if (k > 0) {
      const float* src_weights = reinterpret_cast<const float*>(partials + i * pl.bytes() + pl.weights_offset());
      for (int j = 0; j < k; ++j) acc_weights[t * k + j] += src_weights[j];
    }
  }
}

template <typename AccT>
void finalize_rows(const uint8_t* acc, int64_t hidden, const int32_t* token_ids, int64_t begin, int64_t end,
                   const CombineOutput& output) {
  std::vector<AccT> row(static_cast<size_t>(hidden));
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = token_ids != nullptr ? token_ids[i] : i;
    std::memcpy(row.data(), acc + t * hidden * sizeof(AccT), hidden * sizeof(AccT));
    finish_row(row.data(), t, hidden, output);
  }
}
}  // namespace

void gather_return_rows(uint8_t* out, const ReturnRowLayout& layout, const uint8_t* x, const float* weights,
                        const int32_t* rows, int64_t num_rows, int num_threads) {
  parallel_for(num_rows, num_threads, kRowsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint8_t* dst = out + i * layout.bytes();
      const int64_t row = rows[i];
      std::memcpy(dst, x + row * layout.hidden_bytes, static_cast<size_t>(layout.hidden_bytes));
      if (layout.num_topk > 0)
        std::memcpy(dst + layout.weights_offset(), weights + row * layout.num_topk, 4 * static_cast<size_t>(layout.num_topk));
    }
  });
}

void reduce_chunk(const int32_t* dst_rows, int64_t num_records, int num_ranks_per_node,
                  const uintptr_t* return_chunks, const ReturnRowLayout& return_layout, const SelfRows& self_rows,
                  DType dtype, const ReduceTarget& target, const PartialRowLayout& partial_layout, int num_threads) {
  const int L = num_ranks_per_node;
  // Position of each record's row inside each local rank's return chunk (a prefix count).
  std::vector<int64_t> cursors(static_cast<size_t>(num_records * L));
  std::vector<int64_t> next(static_cast<size_t>(L), 0);
  for (int64_t i = 0; i < num_records; ++i)
    for (int l = 0; l < L; ++l)
      cursors[i * L + l] = dst_rows[i * L + l] >= 0 ? next[l]++ : -1;
  parallel_for(num_records, num_threads, kRowsPerThread, [&](int64_t begin, int64_t end) {
    if (partial_layout.acc_elem_bytes == 8)
      reduce_records<double>(dst_rows, begin, end, L, cursors, return_chunks, return_layout, self_rows, dtype, target, partial_layout);
    else
      reduce_records<float>(dst_rows, begin, end, L, cursors, return_chunks, return_layout, self_rows, dtype, target, partial_layout);
  });
}

void accumulate_partials(uint8_t* acc, float* acc_weights, const uint8_t* partials,
                         const PartialRowLayout& partial_layout, const int32_t* token_ids, int64_t num_rows,
                         const uint8_t* last_term, const CombineOutput& output, int num_threads) {
  // Token ids within one call are distinct, so ranges never write the same row.
  parallel_for(num_rows, num_threads, kRowsPerThread, [&](int64_t begin, int64_t end) {
    if (partial_layout.acc_elem_bytes == 8)
      accumulate_rows<double>(acc, acc_weights, partials, partial_layout, token_ids, begin, end, last_term, output);
    else
      accumulate_rows<float>(acc, acc_weights, partials, partial_layout, token_ids, begin, end, last_term, output);
  });
}

void finalize_combine(const uint8_t* acc, int acc_elem_bytes, int64_t hidden, const int32_t* token_ids,
                      int64_t num_rows, const CombineOutput& output, int num_threads) {
  parallel_for(num_rows, num_threads, kRowsPerThread, [&](int64_t begin, int64_t end) {
    if (acc_elem_bytes == 8)
      finalize_rows<double>(acc, hidden, token_ids, begin, end, output);
    else
      finalize_rows<float>(acc, hidden, token_ids, begin, end, output);
  });
}

}  // namespace dispatch::host

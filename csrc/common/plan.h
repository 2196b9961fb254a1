// Dispatch plan on the sending rank: for every destination node, which tokens cross to it and
// at which row each copy lands at every rank of that node.
//
// Placement rule: at receiver d, the copy of token t from source s lands at
//   row = sum_{s' < s} count[s'][d] + #{t' < t : token t' of s goes to d}
// so rows are ordered by source rank, then source token, whatever order bytes arrive in.
#pragma once

#include "layout.h"

namespace dispatch {

// `recv_row_base[d]` = sum_{s' < me} count[s'][d] (this rank's first row at each receiver).
// `node_token_begin[m]` = prefix sum of num_tokens_per_node (size N + 1).
// Outputs, per node m, in token order at positions [node_token_begin[m], node_token_begin[m+1]):
// node_tokens (token index) and node_dst_rows[pos * L + j] (row at rank (m, j), or -1).
inline void plan_dispatch_sends(const bool* is_token_in_rank, int64_t num_tokens, const Topology& topo,
                                const int64_t* recv_row_base, const int64_t* node_token_begin,
                                int32_t* node_tokens, int32_t* node_dst_rows, int64_t* rank_cursor_scratch,
                                int64_t* node_cursor_scratch) {
  const int L = topo.num_ranks_per_node;
  const int N = topo.num_nodes();
  for (int r = 0; r < topo.num_ranks; ++r) rank_cursor_scratch[r] = recv_row_base[r];
  for (int m = 0; m < N; ++m) node_cursor_scratch[m] = node_token_begin[m];
  for (int64_t t = 0; t < num_tokens; ++t) {
    const bool* in_rank = is_token_in_rank + t * topo.num_ranks;
    for (int m = 0; m < N; ++m) {
      bool any = false;
      for (int j = 0; j < L; ++j) any = any || in_rank[m * L + j];
      if (!any) continue;
      const int64_t pos = node_cursor_scratch[m]++;
      node_tokens[pos] = static_cast<int32_t>(t);
      for (int j = 0; j < L; ++j) {
        const int r = m * L + j;
        node_dst_rows[pos * L + j] = in_rank[r] ? static_cast<int32_t>(rank_cursor_scratch[r]++) : -1;
      }
    }
  }
}

}  // namespace dispatch

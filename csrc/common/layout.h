// Layout planner: which ranks, nodes and experts every token goes to.
// Plain C++ usable from host and device code; the CPU backend and the tests call it on the host.
#pragma once

#include "macros.h"

namespace dispatch {

struct Topology {
  int num_ranks;
  int num_ranks_per_node;
  int num_experts;

  DISPATCH_HD int num_nodes() const { return num_ranks / num_ranks_per_node; }
  DISPATCH_HD int experts_per_rank() const { return num_experts / num_ranks; }
  DISPATCH_HD int rank_of_expert(int64_t expert) const { return static_cast<int>(expert / experts_per_rank()); }
  DISPATCH_HD int node_of_rank(int rank) const { return rank / num_ranks_per_node; }
};

// One token's routing: fills is_token_in_rank_row[R] and returns nothing else; the caller
// accumulates counts. `topk_row` holds k expert ids, -1 meaning none.
template <typename IndexT>
DISPATCH_HD void route_token(const IndexT* topk_row, int num_topk, const Topology& topo,
                             bool* is_token_in_rank_row) {
  for (int r = 0; r < topo.num_ranks; ++r) is_token_in_rank_row[r] = false;
  for (int j = 0; j < num_topk; ++j) {
    const int64_t expert = static_cast<int64_t>(topk_row[j]);
    if (expert >= 0) is_token_in_rank_row[topo.rank_of_expert(expert)] = true;
  }
}

// Whole-batch layout on the host: counts per rank, per node and per expert, and the
// [T, R] membership matrix. Outputs must be zeroed by the caller except is_token_in_rank.
// An expert repeated within one row counts once.
template <typename IndexT>
inline void compute_layout(const IndexT* topk_idx, int64_t num_tokens, int num_topk, const Topology& topo,
                           int32_t* num_tokens_per_rank, int32_t* num_tokens_per_node,
                           int32_t* num_tokens_per_expert, bool* is_token_in_rank) {
  const int num_nodes = topo.num_nodes();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const IndexT* row = topk_idx + t * num_topk;
    bool* in_rank = is_token_in_rank + t * topo.num_ranks;
    route_token(row, num_topk, topo, in_rank);
    for (int j = 0; j < num_topk; ++j) {
      const int64_t expert = static_cast<int64_t>(row[j]);
      if (expert < 0) continue;
      bool seen = false;
      for (int i = 0; i < j; ++i) seen = seen || static_cast<int64_t>(row[i]) == expert;
      if (!seen) ++num_tokens_per_expert[expert];
    }
    for (int m = 0; m < num_nodes; ++m) {
      bool any = false;
      for (int l = 0; l < topo.num_ranks_per_node; ++l) {
        const int r = m * topo.num_ranks_per_node + l;
        if (in_rank[r]) {
          ++num_tokens_per_rank[r];
          any = true;
        }
      }
      if (any) ++num_tokens_per_node[m];
    }
  }
}

}  // namespace dispatch

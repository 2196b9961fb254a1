// Host-side interface of the two-hop (multi-node) path of the CUDA backend: the rail sender, the
// forwarder and receivers of dispatch, the reducer and final sum of combine, and the loopback
// rail's copy. Like api.h: no CUDA or torch types, every address an integer.
//
// Regions (per-call device tensors, addresses from the backend):
//   send region      RecordLayout records of my tokens, node-major: node m's at node_begin[m]
//   rail recv region per remote source node m: the records my rail peer there sent me
//   routes           int32 [records forwarded, L]: dst_row of every record I forwarded (combine)
//   partial regions  per source node m, PartialRowLayout rows, one per record forwarded from m
//                    (rows rounded to x's 16-bit dtype for remote m with round_rail_partials)
// Grids under Config.num_sms (RailGrid): the forward and reduce kernels take S = min(num_sms / 2, N)
// block pairs; pair s (blocks 2s, 2s + 1) serves source nodes s, s + S, s + 2S, ... Block 2s
// forwards (returns) those nodes' records, block 2s + 1 receives (reduces) them. The ring
// (channel m, peer p) of the node's staging carries forwarder p's records for source node m.
#pragma once

#include <cstdint>

#include "../common/macros.h"
#include "api.h"

namespace dispatch::cuda {

constexpr int kMaxNodes = 64;
constexpr int kMaxRailPairs = kMaxNodes * kMaxPeers;  // (source node, local rank) pairs of one block

// Which source nodes each block pair of the forward and reduce kernels serves (see above).
struct RailGrid {
  int slots;      // S: block pairs
  int num_nodes;  // N
  DISPATCH_HD static RailGrid of(int num_sms, int num_nodes) {
    const int half = num_sms / 2;
    return RailGrid{half < num_nodes ? half : num_nodes, num_nodes};
  }
  DISPATCH_HD int nodes_of(int s) const { return (num_nodes - s + slots - 1) / slots; }
  DISPATCH_HD int node(int s, int t) const { return s + t * slots; }  // t-th source node of pair s
};

struct RailDispatchArgs {
  Peers peers{};                 // staging of the node's ranks, by local index
  int rank = 0, num_ranks = 0;   // local index, L
  int node = 0, num_nodes = 0;   // n, N
  int num_topk = 0;
  int64_t num_tokens = 0, hidden_bytes = 0, scale_bytes = 0, ring_slots = 0, max_rows = 0, chunk_records = 1;
  // rail sender
  uint64_t x = 0, scales = 0, topk_idx = 0, topk_weights = 0;
  uint64_t node_tokens = 0;    // int32 [send records]: token of each record, node-major
  uint64_t node_dst_rows = 0;  // int32 [send records, L]
  int64_t num_send_records = 0;
  uint64_t send_region = 0;
  // forwarder
  uint64_t fwd_regions = 0;    // uint64 [N]: where the records of source node m are read
  uint64_t fwd_begin = 0;      // int64 [N + 1]: first forwarded record of source node m
  uint64_t arrival = 0;        // uint64 [N]: arrival counters (chunks of node m landed)
  uint64_t routes = 0;         // int32 [forwarded records, L] out (0 in a cached dispatch)
  // receivers
  uint64_t recv_counts = 0;    // int32 [N, L]: rows I receive from (source node m, forwarder j)
  uint64_t recv_x = 0, recv_scales = 0, recv_topk_idx = 0, recv_topk_weights = 0;
  uint64_t recv_src_rank = 0, recv_src_token = 0;
  int64_t expert_begin = 0, experts_per_rank = 1;
  int num_sms = 2;        // Config.num_sms: every kernel's grid is at most this (even, >= 2)
  uint64_t profile = 0;   // device address of a zeroed uint64 [blocks][3] (profile_record.h), or 0: off
  WaitArgs wait{};
};

struct RailCombineArgs {
  Peers peers{};
  int rank = 0, num_ranks = 0, node = 0, num_nodes = 0, num_topk = 0;
  int dtype = 0;           // x's dtype code
  int partial_dtype = -1;  // -1: partials in the accumulation type; else x's 16-bit type (remote nodes only)
  int64_t hidden = 0, ring_slots = 0, num_tokens = 0, chunk_records = 1;
  // return senders: rows I received from source (m, j) are recv rows [recv_base, +recv_counts)
  uint64_t x = 0, topk_weights = 0;
  uint64_t recv_base = 0, recv_counts = 0;  // int32 [N, L] each
  // reducer
  uint64_t fwd_begin = 0, routes = 0;       // as in RailDispatchArgs
  uint64_t partials = 0;  // uint64 [N]: where the partials of source node m's records go (row i: record i)
  // final sum at the source
  uint64_t positions = 0;                    // int32 [T, N]: record index of token t in node m's stream, -1
  uint64_t partial_regions = 0;              // uint64 [N]: own node: my partial region + fwd_begin[n]; else rail recv
  uint64_t arrival = 0;                      // uint64 [N]
  uint64_t num_chunks = 0;                   // int64 [N]: chunks expected from node m
  uint64_t out = 0, out_weights = 0, bias0 = 0, bias1 = 0;
  int bias0_dtype = 0, bias1_dtype = 0;
  int num_sms = 2;        // Config.num_sms: every kernel's grid is at most this (even, >= 2)
  uint64_t profile = 0;   // device address of a zeroed uint64 [blocks][3] (profile_record.h), or 0: off
  WaitArgs wait{};
};

void launch_rail_pack(const RailDispatchArgs& args, uintptr_t stream);
void launch_rail_forward(const RailDispatchArgs& args, uintptr_t stream);
void launch_rail_reduce(const RailCombineArgs& args, uintptr_t stream);
void launch_rail_final(const RailCombineArgs& args, uintptr_t stream);
// The loopback rail, in `stream` order: a kernel that spins `min_duration_ns` (the chunk's time on
// a capped link, 0 = uncapped), the copy of `bytes` device to device, then `value` stored into the
// receiver's arrival counter with release semantics (counter 0: none).
void rail_loopback_copy(uint64_t dst, uint64_t src, int64_t bytes, uint64_t counter, uint64_t value,
                        uint64_t min_duration_ns, uintptr_t stream);
void load_rail_kernels();
void load_rail_combine_kernels();

}  // namespace dispatch::cuda

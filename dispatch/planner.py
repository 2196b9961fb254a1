"""The planner's Python side shared by every backend that crosses nodes (the CPU backend,
``dispatch/host``, and the CUDA two-hop path, ``dispatch/cuda/two_hop.py``): pure functions of the
count matrices every rank holds after the handshake, so all ranks derive the same plan without
talking. The per-token placement itself is C++ (``csrc/common/plan.h``, bound in ``dispatch._C``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from . import _C
from .topology import Topology


def stream_chunks(num_records: int, chunk_records: int) -> List[int]:
    """Record counts of the chunks a stream of ``num_records`` is cut into."""
    full, rest = divmod(num_records, chunk_records)
    return [chunk_records] * full + ([rest] if rest else [])


@dataclass
class SendPlan:
    """This rank's tokens per destination node, in token order, with their rows there.

    Attributes:
        node_token_begin: ``N + 1`` offsets into ``node_tokens``.
        node_tokens: int32 token indices, grouped by node.
        node_dst_rows: int32 ``[len(node_tokens), L]`` row at each rank of that node, -1 = none.
    """

    node_token_begin: List[int]
    node_tokens: torch.Tensor
    node_dst_rows: torch.Tensor

    def tokens(self, node: int) -> torch.Tensor:
        return self.node_tokens[self.node_token_begin[node]:self.node_token_begin[node + 1]]

    def dst_rows(self, node: int) -> torch.Tensor:
        return self.node_dst_rows[self.node_token_begin[node]:self.node_token_begin[node + 1]]


def plan_sends(topo: Topology, is_token_in_rank: torch.Tensor, rank_counts: torch.Tensor) -> SendPlan:
    """Runs the C++ planner for this rank.

    Args:
        is_token_in_rank: ``[T, R]`` bool.
        rank_counts: ``[R, R]`` tokens of each source for each destination (all ranks').
    """
    R, L, me = topo.num_ranks, topo.num_ranks_per_node, topo.rank
    recv_row_base = rank_counts[:me].sum(dim=0).to(torch.int64).contiguous()
    node_counts = is_token_in_rank.view(-1, topo.num_nodes, L).any(dim=2).sum(dim=0)
    begin = [0] + torch.cumsum(node_counts, 0).tolist()
    begin_t = torch.tensor(begin, dtype=torch.int64)
    total = begin[-1]
    node_tokens = torch.empty(total, dtype=torch.int32)
    node_dst_rows = torch.empty((total, L), dtype=torch.int32)
    rank_scratch = torch.empty(R, dtype=torch.int64)
    node_scratch = torch.empty(topo.num_nodes, dtype=torch.int64)
    membership = is_token_in_rank.contiguous()
    _C.plan_dispatch_sends(membership.data_ptr(), membership.shape[0], R, L, recv_row_base.data_ptr(),
                           begin_t.data_ptr(), node_tokens.data_ptr(), node_dst_rows.data_ptr(),
                           rank_scratch.data_ptr(), node_scratch.data_ptr())
    return SendPlan(begin, node_tokens, node_dst_rows)

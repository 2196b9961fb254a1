"""Python side of the planner: chunk schedules and the per-call plan the executors follow.

Everything here is a pure function of the count matrices every rank holds after notify, so
all ranks of a node derive the same schedules without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import _C
from ..backend import HandleOrigin
from ..compat import DeepEPHandleView
from ..topology import Topology

# One outbox chunk: (source rank, chunk index within that source's stream, records).
Chunk = Tuple[int, int, int]


def stream_chunks(num_records: int, chunk_records: int) -> List[int]:
    """Record counts of the chunks a stream of ``num_records`` is cut into."""
    full, rest = divmod(num_records, chunk_records)
    return [chunk_records] * full + ([rest] if rest else [])


def outbox_schedule(topo: Topology, producer: int, node_counts: torch.Tensor, chunk_records: int) -> List[Chunk]:
    """Chunk order of ``producer``'s outbox: its own tokens for its node first (ready at once),
    then the chunks its rail peers send it, round-robin over nodes ascending so every rail
    stream keeps moving.

    Args:
        producer: global rank owning the outbox.
        node_counts: ``[R, N]`` tokens of each rank bound for each node.
        chunk_records: records per chunk.
    """
    node = topo.node_of(producer)
    local = topo.local_of(producer)
    schedule: List[Chunk] = [(producer, c, n) for c, n in enumerate(
        stream_chunks(int(node_counts[producer, node]), chunk_records))]
    remote = [topo.rank_of(m, local) for m in range(topo.num_nodes) if m != node]
    streams = {src: stream_chunks(int(node_counts[src, node]), chunk_records) for src in remote}
    longest = max((len(chunks) for chunks in streams.values()), default=0)
    for c in range(longest):
        for src in remote:
            if c < len(streams[src]):
                schedule.append((src, c, streams[src][c]))
    return schedule


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


@dataclass(eq=False)
class HostHandle(DeepEPHandleView):
    """What a CPU-backend dispatch recorded, so that combine and cached dispatch need no new
    layout exchange. Indexable like DeepEP's handle for the shared entries (``DeepEPHandleView``).

    Attributes:
        num_tokens: tokens at this rank (rows of the combine output).
        num_recv_tokens: valid received rows.
        num_worst_tokens: rows of the receive tensors (0 = exactly ``num_recv_tokens``).
        hidden: hidden size of the dispatch.
        chunk_records: records per chunk on both links.
        node_counts: ``[R, N]`` tokens of every rank for every node.
        rank_counts: ``[R, R]`` tokens of every rank for every rank.
        send_plan: this rank's tokens per node and their destination rows.
        schedules: outbox schedule of every local rank (index = local rank).
        outbox_dst_rows: ``[records, L]`` dst rows of every record of this rank's outbox.
        recv_rows_by_producer: per local producer, per chunk of its schedule, the rows of this
            rank that chunk filled (int32), in record order.
        recv_src_rank / recv_src_token: source of every received row.
        rank: this rank; num_ranks_per_node: ``L``.
        is_token_in_rank: the dispatch's bool ``[T, R]`` membership.
        origin: the buffer that made it (set by ``Buffer``, which refuses another buffer's handle).
    """

    num_tokens: int
    num_recv_tokens: int
    num_worst_tokens: int
    hidden: int
    chunk_records: int
    node_counts: torch.Tensor
    rank_counts: torch.Tensor
    send_plan: SendPlan
    schedules: List[List[Chunk]]
    outbox_dst_rows: torch.Tensor
    recv_rows_by_producer: List[List[torch.Tensor]]
    recv_src_rank: torch.Tensor
    recv_src_token: torch.Tensor
    rank: int
    num_ranks_per_node: int
    is_token_in_rank: torch.Tensor
    origin: Optional[HandleOrigin] = None

    @property
    def num_recv_rows(self) -> int:
        """Rows of the tensors dispatch returned."""
        return self.num_worst_tokens if self.num_worst_tokens > 0 else self.num_recv_tokens

    # --- DeepEP's handle entries (DeepEPHandleView) --------------------------------------------
    def _deepep_num_nodes(self) -> int:
        return self.node_counts.shape[1]

    def _deepep_entry(self, name: str) -> Optional[torch.Tensor]:
        if name == "rank_prefix_matrix":
            return self.rank_counts.cumsum(dim=0).to(torch.int32)
        if name == "recv_gbl_rank_prefix_sum":
            return self.rank_counts[:, self.rank].cumsum(dim=0).to(torch.int32)
        if name == "recv_rdma_rank_prefix_sum":
            # My rail peer on node m is rank m * L + my local index; it sends me its tokens for my node.
            L = self.num_ranks_per_node
            node, local = divmod(self.rank, L)
            peers = torch.arange(self._deepep_num_nodes()) * L + local
            return self.node_counts[peers, node].cumsum(dim=0).to(torch.int32)
        return super()._deepep_entry(name)

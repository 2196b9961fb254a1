"""The CPU backend's side of the planner: outbox chunk schedules and the handle the executors
follow (the plan shared with the CUDA two-hop path is in ``dispatch/planner.py``).

Everything here is a pure function of the count matrices every rank holds after notify, so
all ranks of a node derive the same schedules without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..backend import HandleOrigin
from ..compat import CountedHandleView
from ..planner import SendPlan, plan_sends, stream_chunks  # noqa: F401 (re-exported)
from ..topology import Topology

# One outbox chunk: (source rank, chunk index within that source's stream, records).
Chunk = Tuple[int, int, int]


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


@dataclass(eq=False)
class HostHandle(CountedHandleView):
    """What a CPU-backend dispatch recorded, so that combine and cached dispatch need no new
    layout exchange. Indexable like DeepEP's handle for the shared entries (``CountedHandleView``).

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

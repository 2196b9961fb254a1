"""The dispatch event loop of the CPU backend.

One pass of the loop does whatever is ready, never blocks, and sleeps only when nothing was:
- rail hop: pack this rank's tokens for each remote node into chunks and send them to the
  rail peer there (two staging slots per peer);
- node outbox: fill this rank's outbox slots in schedule order, packing its own tokens for
  its node, or receiving a rail peer's chunk straight into the slot; publish in order;
- placement: copy the records addressed to this rank out of every local outbox into the
  receive tensors (rows fixed by the planner, not by arrival order).
Because no step waits on another, no cycle of ranks can deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import _C
from ..topology import Topology
from .node_link import OUTBOX_SLOTS, NodeLink
from .plan import Chunk, SendPlan, stream_chunks
from .movers import ptr, timed
from .rail_link import RailLink


@dataclass
class DispatchPayload:
    """The bytes one dispatch moves, as uint8 views.

    Attributes:
        x: ``[T, hidden_bytes]``.
        scales: ``[T, scale_bytes]`` or None.
        topk_idx: int64 ``[T, k]`` or None (then no top-k travels).
        topk_weights: float32 ``[T, k]`` or None.
    """

    x: torch.Tensor
    scales: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]


@dataclass
class ReceiveTensors:
    """Receive-side tensors the records are placed into (uint8 views for the rows)."""

    x: torch.Tensor
    scales: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]
    expert_begin: int
    experts_per_rank: int


class _RailSender:
    """This rank's chunk stream to one remote node, through two staging slots."""

    def __init__(self, peer: int, tokens: torch.Tensor, dst_rows: torch.Tensor, chunk_records: int,
                 staging: List[torch.Tensor]) -> None:
        self.peer = peer
        self.tokens = tokens
        self.dst_rows = dst_rows
        self.chunk_records = chunk_records
        self.chunks = stream_chunks(tokens.numel(), chunk_records)
        self.staging = staging
        self.works: List[Optional[object]] = [None] * len(staging)
        self.next_chunk = 0

    def pump(self, rail: RailLink, record: "_C.RecordLayout", payload: DispatchPayload, src_rank: int,
             num_threads: int) -> bool:
        progressed = False
        for slot, work in enumerate(self.works):
            if work is not None and RailLink.done(work, self.peer):
                self.works[slot] = None
                progressed = True
        while self.next_chunk < len(self.chunks):
            slot = self.next_chunk % len(self.staging)
            if self.works[slot] is not None:
                break
            begin = self.next_chunk * self.chunk_records
            count = self.chunks[self.next_chunk]
            buffer = self.staging[slot]
            timed("dispatch.pack_rail", count * record.bytes, _C.pack_records, buffer.data_ptr(), record,
                   payload.x.data_ptr(), ptr(payload.scales), ptr(payload.topk_idx), ptr(payload.topk_weights),
                   src_rank, self.tokens[begin:].data_ptr(), self.dst_rows[begin:].data_ptr(), count, num_threads)
            self.works[slot] = rail.isend(buffer[:count * record.bytes], self.peer, self.next_chunk)
            self.next_chunk += 1
            progressed = True
        return progressed

    @property
    def finished(self) -> bool:
        return self.next_chunk == len(self.chunks) and all(work is None for work in self.works)


def run_dispatch(topo: Topology, node: NodeLink, rail: RailLink, payload: DispatchPayload, recv: ReceiveTensors,
                 plan: SendPlan, schedules: List[List[Chunk]], chunk_records: int, rail_staging: List[torch.Tensor],
                 record: "_C.RecordLayout", num_threads: int, timeout_s: float,
                 log: Optional[Dict[str, object]] = None) -> None:
    """Moves one dispatch. With ``log``, records what combine will need:
    ``log["outbox_dst_rows"]`` (``[records, L]``) and ``log["recv_rows_by_producer"]``, plus
    ``log["recv_src_rank"]``/``log["recv_src_token"]`` filled per received row.
    """
    L, me, local = topo.num_ranks_per_node, topo.rank, topo.local_rank
    rb = record.bytes

    # Rail hop senders, two staging slots per remote peer.
    senders: List[_RailSender] = []
    for i, m in enumerate(m for m in range(topo.num_nodes) if m != topo.node):
        tokens = plan.tokens(m)
        if tokens.numel():
            senders.append(_RailSender(topo.rail_peer(m), tokens, plan.dst_rows(m), chunk_records,
                                       rail_staging[2 * i:2 * i + 2]))

    # This rank's outbox, filled in schedule order.
    schedule = schedules[local]
    record_begin = [0]
    for _, _, count in schedule:
        record_begin.append(record_begin[-1] + count)
    outbox_dst_rows = torch.empty((record_begin[-1], L), dtype=torch.int32) if log is not None else None
    own_tokens, own_dst_rows = plan.tokens(topo.node), plan.dst_rows(topo.node)
    base_published = node.load(node.outbox_published(local))
    filled = 0
    published = 0
    receiving: Dict[int, object] = {}  # schedule index -> rail work
    ready = [False] * len(schedule)

    # Readers of every local outbox (this rank's own included).
    read_base = [node.load(node.outbox_acked(j, local)) for j in range(L)]
    read_next = [0] * L
    rows_by_producer: List[List[torch.Tensor]] = [[] for _ in range(L)]
    max_records = max((c for s in schedules for _, _, c in s), default=0)
    rows_buf = torch.empty(max(1, max_records), dtype=torch.int32)
    src_rank_buf = torch.empty_like(rows_buf)
    src_token_buf = torch.empty_like(rows_buf)

    def blocker() -> Optional[int]:
        for index in sorted(receiving):
            return schedule[index][0]
        for j in range(L):
            if read_next[j] < len(schedules[j]):
                return topo.rank_of(topo.node, j)
        for sender in senders:
            if not sender.finished:
                return sender.peer
        return None

    progress = node.progress(timeout_s, "dispatch", blocker)
    while True:
        progressed = False
        for sender in senders:
            progressed |= sender.pump(rail, record, payload, me, num_threads)

        # Fill free outbox slots.
        if filled < len(schedule):
            oldest_ack = min(node.load(node.outbox_acked(local, i)) for i in range(L))
            while filled < len(schedule) and base_published + filled - oldest_ack < OUTBOX_SLOTS:
                src, chunk, count = schedule[filled]
                address = node.outbox_slot(local, base_published + filled)
                if src == me:
                    begin = chunk * chunk_records
                    timed("dispatch.pack_node", count * rb, _C.pack_records, address, record, payload.x.data_ptr(),
                           ptr(payload.scales), ptr(payload.topk_idx), ptr(payload.topk_weights), me,
                           own_tokens[begin:].data_ptr(), own_dst_rows[begin:].data_ptr(), count, num_threads)
                    if outbox_dst_rows is not None:
                        outbox_dst_rows[record_begin[filled]:record_begin[filled + 1]] = \
                            own_dst_rows[begin:begin + count]
                    ready[filled] = True
                else:
                    receiving[filled] = rail.irecv(node.view(address, count * rb), src, chunk)
                filled += 1
                progressed = True
        for index in list(receiving):
            if RailLink.done(receiving[index], schedule[index][0]):
                del receiving[index]
                if outbox_dst_rows is not None:
                    _C.copy_dst_rows(node.outbox_slot(local, base_published + index), record, schedule[index][2],
                                     outbox_dst_rows[record_begin[index]:].data_ptr())
                ready[index] = True
                progressed = True
        if published < filled and ready[published]:
            while published < filled and ready[published]:
                published += 1
            node.store(node.outbox_published(local), base_published + published)
            node.ring_node()
            progressed = True

        # Place the records addressed to this rank.
        for j in range(L):
            producer_schedule = schedules[j]
            if read_next[j] == len(producer_schedule):
                continue
            available = node.load(node.outbox_published(j)) - read_base[j]
            while read_next[j] < min(available, len(producer_schedule)):
                _, _, count = producer_schedule[read_next[j]]
                position = read_base[j] + read_next[j]
                received = timed("dispatch.node_copy", lambda n: n * rb, _C.unpack_records,
                                 node.outbox_slot(j, position), record, count, local, recv.x.data_ptr(),
                                 ptr(recv.scales), ptr(recv.topk_idx), ptr(recv.topk_weights),
                                 recv.expert_begin, recv.experts_per_rank, rows_buf.data_ptr(),
                                 src_rank_buf.data_ptr(), src_token_buf.data_ptr(), num_threads)
                node.store(node.outbox_acked(j, local), position + 1)
                node.ring(j)
                read_next[j] += 1
                progressed = True
                if log is not None:
                    rows = rows_buf[:received].clone()
                    rows_by_producer[j].append(rows)
                    index = rows.long()
                    log["recv_src_rank"][index] = src_rank_buf[:received]
                    log["recv_src_token"][index] = src_token_buf[:received]

        if (published == len(schedule) and all(s.finished for s in senders)
                and all(read_next[j] == len(schedules[j]) for j in range(L))):
            break
        progress.step(progressed)

    if log is not None:
        log["outbox_dst_rows"] = outbox_dst_rows
        log["recv_rows_by_producer"] = rows_by_producer

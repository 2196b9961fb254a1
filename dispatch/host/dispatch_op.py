"""The dispatch event loop of the CPU backend: three roles, each a small object that makes
progress when it can (``progress.drive`` steps them in turn and sleeps when none could):

- ``RailSender`` (one per remote node): packs this rank's tokens for that node into chunks and
  sends them to the rail peer there, through two staging slots;
- ``OutboxFiller``: fills this rank's outbox slots in schedule order, packing its own tokens for
  its node or receiving a rail peer's chunk straight into the slot, and publishes them in order;
- ``Placer``: copies the records addressed to this rank out of every outbox of the node into
  the receive tensors (rows fixed by the planner, not by arrival order).

No role waits on another, so no cycle of ranks can deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .. import _C
from ..topology import Topology
from .movers import mover_args, ptr, timed
from .node_link import OUTBOX_SLOTS, NodeLink
from .plan import Chunk, SendPlan, stream_chunks
from .progress import drive, first_behind, first_waited
from .rail_link import Pending, RailLink
from .rail_staging import RailStaging


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


@dataclass
class DispatchRoutes:
    """Where one dispatch's rows went, as combine needs it (kept in the handle).

    Attributes:
        outbox_dst_rows: ``[records, L]`` destination row at each local rank of every record of
            this rank's outbox, -1 = none.
        recv_rows_by_producer: per local producer, per chunk of its schedule, the rows of this
            rank that chunk filled (int32), in record order.
        recv_src_rank / recv_src_token: source of every received row (-1 for padding).
    """

    outbox_dst_rows: torch.Tensor
    recv_rows_by_producer: List[List[torch.Tensor]]
    recv_src_rank: torch.Tensor
    recv_src_token: torch.Tensor


@dataclass
class _Mover:
    """What every role of one dispatch moves with."""

    topo: Topology
    node: NodeLink
    rail: RailLink
    record: "_C.RecordLayout"
    payload: DispatchPayload
    chunk_records: int
    num_threads: int


def _pack_args(m: _Mover) -> "_C.PackRecordsArgs":
    """The fields of pack_records that stay the same for every chunk of one dispatch."""
    p = m.payload
    return mover_args(_C.PackRecordsArgs, layout=m.record, x=p.x.data_ptr(), num_tokens=p.x.shape[0],
                      scales=ptr(p.scales), topk_idx=ptr(p.topk_idx), topk_weights=ptr(p.topk_weights),
                      src_rank=m.topo.rank)


def _pack(m: _Mover, args: "_C.PackRecordsArgs", kernel: str, out: int, out_bytes: int, tokens: torch.Tensor,
          dst_rows: torch.Tensor, count: int) -> None:
    """Packs ``count`` records (tokens, dst_rows: this chunk's slices) into ``out``."""
    args.out, args.out_bytes, args.num_records = out, out_bytes, count
    args.token_ids, args.dst_rows = tokens.data_ptr(), dst_rows.data_ptr()
    timed(kernel, count * m.record.bytes, _C.pack_records, args, m.num_threads)


class RailSender:
    """This rank's chunk stream to one remote node, through its send slots of the rail staging."""

    def __init__(self, mover: _Mover, peer: int, tokens: torch.Tensor, dst_rows: torch.Tensor,
                 staging: List[torch.Tensor]) -> None:
        self.mover = mover
        self.peer = peer
        self.tokens = tokens
        self.dst_rows = dst_rows
        self.chunks = stream_chunks(tokens.numel(), mover.chunk_records)
        self.pack_args = _pack_args(mover)
        self.staging = staging
        self.works: List[Optional[Pending]] = [None] * len(staging)
        self.next_chunk = 0

    def step(self) -> bool:
        m = self.mover
        progressed = False
        for slot, work in enumerate(self.works):
            if work is not None and RailLink.done(work, self.peer):
                self.works[slot] = None
                progressed = True
        while self.next_chunk < len(self.chunks):
            slot = self.next_chunk % len(self.staging)
            if self.works[slot] is not None:
                break
            begin = self.next_chunk * m.chunk_records
            count = self.chunks[self.next_chunk]
            buffer = self.staging[slot]
            _pack(m, self.pack_args, "dispatch.pack_rail", buffer.data_ptr(), buffer.numel(), self.tokens[begin:],
                  self.dst_rows[begin:], count)
            self.works[slot] = m.rail.isend(buffer[:count * m.record.bytes], self.peer, self.next_chunk)
            self.next_chunk += 1
            progressed = True
        return progressed

    @property
    def done(self) -> bool:
        return self.next_chunk == len(self.chunks) and all(work is None for work in self.works)

    def waiting_on(self) -> Optional[int]:
        return None if self.done else self.peer


class OutboxFiller:
    """Fills this rank's outbox in its schedule's order and publishes the filled prefix."""

    def __init__(self, mover: _Mover, schedule: List[Chunk], own_tokens: torch.Tensor, own_dst_rows: torch.Tensor,
                 record_routes: bool) -> None:
        self.mover = mover
        self.schedule = schedule
        self.own_tokens = own_tokens
        self.own_dst_rows = own_dst_rows
        self.pack_args = _pack_args(mover)
        self.record_begin = [0]
        for _, _, count in schedule:
            self.record_begin.append(self.record_begin[-1] + count)
        L = mover.topo.num_ranks_per_node
        self.outbox_dst_rows = (torch.empty((self.record_begin[-1], L), dtype=torch.int32) if record_routes
                                else None)
        self.base_published = mover.node.load(mover.node.outbox_published(mover.topo.local_rank))
        self.filled = 0
        self.published = 0
        self.receiving: Dict[int, Pending] = {}  # schedule index -> rail receive
        self.ready = [False] * len(schedule)

    def step(self) -> bool:
        m, node, local = self.mover, self.mover.node, self.mover.topo.local_rank
        schedule = self.schedule
        progressed = False
        if self.filled < len(schedule):
            oldest_ack = min(node.load(node.outbox_acked(local, i)) for i in range(m.topo.num_ranks_per_node))
            while self.filled < len(schedule) and self.base_published + self.filled - oldest_ack < OUTBOX_SLOTS:
                progressed = True
                self._fill(self.filled)
                self.filled += 1
        for index in list(self.receiving):
            if RailLink.done(self.receiving[index], schedule[index][0]):
                del self.receiving[index]
                if self.outbox_dst_rows is not None:
                    _C.copy_dst_rows(node.outbox_slot(local, self.base_published + index), m.record,
                                     schedule[index][2], self.outbox_dst_rows[self.record_begin[index]:].data_ptr())
                self.ready[index] = True
                progressed = True
        if self.published < self.filled and self.ready[self.published]:
            while self.published < self.filled and self.ready[self.published]:
                self.published += 1
            node.store(node.outbox_published(local), self.base_published + self.published)
            node.ring_node()
            progressed = True
        return progressed

    def _fill(self, index: int) -> None:
        """Packs this rank's own chunk into slot ``index``, or posts the rail receive into it."""
        m = self.mover
        src, chunk, count = self.schedule[index]
        address = m.node.outbox_slot(m.topo.local_rank, self.base_published + index)
        if src != m.topo.rank:
            self.receiving[index] = m.rail.irecv(m.node.view(address, count * m.record.bytes), src, chunk)
            return
        begin = chunk * m.chunk_records
        _pack(m, self.pack_args, "dispatch.pack_node", address, m.node.slot_bytes, self.own_tokens[begin:],
              self.own_dst_rows[begin:], count)
        if self.outbox_dst_rows is not None:
            self.outbox_dst_rows[self.record_begin[index]:self.record_begin[index + 1]] = \
                self.own_dst_rows[begin:begin + count]
        self.ready[index] = True

    @property
    def done(self) -> bool:
        return self.published == len(self.schedule)

    def waiting_on(self) -> Optional[int]:
        return self.schedule[min(self.receiving)][0] if self.receiving else None


class Placer:
    """Copies the records addressed to this rank out of every outbox of the node (its own
    included) into the receive tensors, and acknowledges each chunk."""

    def __init__(self, mover: _Mover, recv: ReceiveTensors, schedules: List[List[Chunk]],
                 num_recv_rows: Optional[int]) -> None:
        self.mover = mover
        self.recv = recv
        self.schedules = schedules
        node, local, L = mover.node, mover.topo.local_rank, mover.topo.num_ranks_per_node
        self.read_base = [node.load(node.outbox_acked(j, local)) for j in range(L)]
        self.read_next = [0] * L
        max_records = max((c for s in schedules for _, _, c in s), default=0)
        self.rows_buf = torch.empty(max(1, max_records), dtype=torch.int32)
        self.src_rank_buf = torch.empty_like(self.rows_buf)
        self.src_token_buf = torch.empty_like(self.rows_buf)
        self.unpack_args = mover_args(
            _C.UnpackRecordsArgs, layout=mover.record, local_rank=local, recv_x=recv.x.data_ptr(),
            num_recv_rows=recv.x.shape[0], recv_scales=ptr(recv.scales), recv_topk_idx=ptr(recv.topk_idx),
            recv_topk_weights=ptr(recv.topk_weights), expert_begin=recv.expert_begin,
            experts_per_rank=recv.experts_per_rank, rows_out=self.rows_buf.data_ptr(),
            src_ranks_out=self.src_rank_buf.data_ptr(), src_tokens_out=self.src_token_buf.data_ptr(),
            log_capacity=self.rows_buf.numel())
        self.routes: Optional[DispatchRoutes] = None
        if num_recv_rows is not None:
            self.routes = DispatchRoutes(torch.empty(0, L, dtype=torch.int32), [[] for _ in range(L)],
                                         torch.full((num_recv_rows,), -1, dtype=torch.int32),
                                         torch.full((num_recv_rows,), -1, dtype=torch.int32))

    def step(self) -> bool:
        m, node, local = self.mover, self.mover.node, self.mover.topo.local_rank
        rb = self.mover.record.bytes
        progressed = False
        for j, producer_schedule in enumerate(self.schedules):
            if self.read_next[j] == len(producer_schedule):
                continue
            available = node.load(node.outbox_published(j)) - self.read_base[j]
            while self.read_next[j] < min(available, len(producer_schedule)):
                _, _, count = producer_schedule[self.read_next[j]]
                position = self.read_base[j] + self.read_next[j]
                args = self.unpack_args
                args.chunk, args.num_records = node.outbox_slot(j, position), count
                received = timed("dispatch.node_copy", lambda n: n * rb, _C.unpack_records, args, m.num_threads)
                node.store(node.outbox_acked(j, local), position + 1)
                node.ring(j)
                self.read_next[j] += 1
                progressed = True
                if self.routes is not None:
                    rows = self.rows_buf[:received].clone()
                    self.routes.recv_rows_by_producer[j].append(rows)
                    index = rows.long()
                    self.routes.recv_src_rank[index] = self.src_rank_buf[:received]
                    self.routes.recv_src_token[index] = self.src_token_buf[:received]
        return progressed

    @property
    def done(self) -> bool:
        return first_behind(self.read_next, self.schedules) is None

    def waiting_on(self) -> Optional[int]:
        j = first_behind(self.read_next, self.schedules)
        return None if j is None else self.mover.topo.rank_of(self.mover.topo.node, j)


def run_dispatch(topo: Topology, node: NodeLink, rail: RailLink, payload: DispatchPayload, recv: ReceiveTensors,
                 plan: SendPlan, schedules: List[List[Chunk]], chunk_records: int, staging: RailStaging,
                 record: "_C.RecordLayout", num_threads: int, timeout_s: float,
                 num_recv_rows: Optional[int] = None) -> Optional[DispatchRoutes]:
    """Moves one dispatch. With ``num_recv_rows`` (the rows of the receive tensors), returns the
    routes combine needs; a cached dispatch passes None and gets None."""
    mover = _Mover(topo, node, rail, record, payload, chunk_records, num_threads)
    remote = [m for m in range(topo.num_nodes) if m != topo.node]
    senders = [RailSender(mover, topo.rail_peer(m), plan.tokens(m), plan.dst_rows(m), staging.send_slots(i))
               for i, m in enumerate(remote) if plan.tokens(m).numel()]
    filler = OutboxFiller(mover, schedules[topo.local_rank], plan.tokens(topo.node), plan.dst_rows(topo.node),
                          num_recv_rows is not None)
    placer = Placer(mover, recv, schedules, num_recv_rows)
    roles: Sequence = [*senders, filler, placer]
    blame_order: Sequence = [filler, placer, *senders]
    drive(roles, node.progress(timeout_s, "dispatch", lambda: first_waited(blame_order)))
    if placer.routes is None:
        return None
    placer.routes.outbox_dst_rows = filler.outbox_dst_rows
    return placer.routes

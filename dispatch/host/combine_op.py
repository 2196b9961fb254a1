"""The combine event loop of the CPU backend: dispatch run backwards, adding up on the way.
Three roles, each a small object that makes progress when it can (``progress.drive`` steps
them in turn and sleeps when none could):

- ``Returner``: for every local reducer q, copies this rank's rows of each chunk of q's outbox
  into the return ring (this rank -> q);
- ``Reducer`` (the rail hop of combine): for each chunk of its own outbox, adds the returned
  rows of every local rank in local-rank order (fp32/fp64), then keeps the partials (its own
  tokens) or sends them over the rail to the tokens' source;
- ``Accumulator``: at the source, adds its own node's partials first, then each remote node's
  partial stream in ascending node order, and writes the result with the bias.

The fixed order makes combine bit-reproducible. No cycle of ranks can deadlock: a reducer waits
on a source only for a node phase that source reaches after the phases fed by lower nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _C
from ..topology import Topology
from .movers import mover_args, ptr, timed
from .node_link import RETURN_SLOTS, NodeLink
from .plan import HostHandle, stream_chunks
from .progress import drive, first_behind, first_waited
from .rail_link import Pending, RailLink
from .rail_staging import RailStaging


@dataclass
class CombineInput:
    """What one combine reads and where it writes.

    Attributes:
        x: uint8 ``[n, row_bytes]`` view of the rows to combine.
        x_dtype_code: ``x``'s dtype code (backend.DTYPE_CODES).
        weights: float32 ``[n, k]`` or None.
        acc: scratch ``[T, H]`` in the accumulation type; acc_weights: float32 ``[T, k]`` or None.
        return_layout / partial_layout: the row formats of the return ring and the rail.
        output: the C++ output descriptor (out tensor, dtype, biases).
    """

    x: torch.Tensor
    x_dtype_code: int
    weights: Optional[torch.Tensor]
    acc: torch.Tensor
    acc_weights: Optional[torch.Tensor]
    return_layout: "_C.ReturnRowLayout"
    partial_layout: "_C.PartialRowLayout"
    output: "_C.CombineOutput"


@dataclass
class _Mover:
    """What every role of one combine moves with."""

    topo: Topology
    node: NodeLink
    rail: RailLink
    handle: HostHandle
    data: CombineInput
    num_threads: int


class Returner:
    """Sends this rank's received rows back to the owner of the outbox they came from."""

    def __init__(self, mover: _Mover) -> None:
        self.mover = mover
        topo, node, local = mover.topo, mover.node, mover.topo.local_rank
        L = topo.num_ranks_per_node
        # Per reducer q, the chunks of q's outbox in which this rank has rows. Nothing goes to
        # itself: as reducer it reads its own rows from x directly.
        self.returns: List[List[torch.Tensor]] = [
            [] if q == local else [rows for rows in mover.handle.recv_rows_by_producer[q] if rows.numel()]
            for q in range(L)]
        self.base = [node.load(node.return_published(local, q)) for q in range(L)]
        self.next = [0] * L
        d = mover.data
        self.gather_args = mover_args(_C.GatherReturnRowsArgs, out_bytes=node.slot_bytes, layout=d.return_layout,
                                      x=d.x.data_ptr(), num_x_rows=d.x.shape[0], weights=ptr(d.weights))

    def step(self) -> bool:
        m, node, local = self.mover, self.mover.node, self.mover.topo.local_rank
        d = m.data
        progressed = False
        for q, chunks in enumerate(self.returns):
            while self.next[q] < len(chunks):
                position = self.base[q] + self.next[q]
                if position - node.load(node.return_consumed(local, q)) >= RETURN_SLOTS:
                    break
                rows = chunks[self.next[q]]
                args = self.gather_args
                args.out, args.rows, args.num_rows = node.return_slot(local, q, position), rows.data_ptr(), rows.numel()
                timed("combine.node_copy", rows.numel() * d.return_layout.bytes, _C.gather_return_rows, args,
                      m.num_threads)
                node.store(node.return_published(local, q), position + 1)
                node.ring(q)
                self.next[q] += 1
                progressed = True
        return progressed

    @property
    def done(self) -> bool:
        return first_behind(self.next, self.returns) is None

    def waiting_on(self) -> Optional[int]:
        q = first_behind(self.next, self.returns)
        return None if q is None else self.mover.topo.rank_of(self.mover.topo.node, q)


class Reducer:
    """The rail hop of combine: adds the node's rows of each chunk of this rank's outbox, in
    local-rank order, and sends remote sources their partials through the rail staging."""

    def __init__(self, mover: _Mover, staging: RailStaging) -> None:
        self.mover = mover
        topo, node, handle, local = mover.topo, mover.node, mover.handle, mover.topo.local_rank
        L = topo.num_ranks_per_node
        self.schedule = handle.schedules[local]
        self.record_begin = [0]
        for _, _, count in self.schedule:
            self.record_begin.append(self.record_begin[-1] + count)
        self.consumed_base = [node.load(node.return_consumed(j, local)) for j in range(L)]
        self.consumed_next = [0] * L
        self.next = 0
        self.own_chunks = sum(1 for src, _, _ in self.schedule if src == topo.rank)
        self.own_tokens = handle.send_plan.tokens(topo.node)
        self.own_rows = handle.recv_rows_by_producer[local]
        remote_sources = [topo.rail_peer(m) for m in range(topo.num_nodes) if m != topo.node]
        self.send_slots = {src: staging.send_slots(i) for i, src in enumerate(remote_sources)}
        self.send_works: Dict[int, List[Optional[Pending]]] = {src: [None] * len(self.send_slots[src])
                                                               for src in remote_sources}
        self.send_count = {src: 0 for src in remote_sources}
        # For each local rank j: the chunks of this rank's outbox in which j has rows.
        self.expected: List[List[int]] = [[] for _ in range(L)]
        for index in range(len(self.schedule)):
            rows = handle.outbox_dst_rows[self.record_begin[index]:self.record_begin[index + 1]]
            for j in (rows >= 0).any(dim=0).nonzero().flatten().tolist():
                if j != local:
                    self.expected[j].append(index)
        self.chunk_pointers = torch.zeros(L, dtype=torch.int64)
        # The mover's arguments: the fixed ones once, the per-chunk ones in _reduce.
        d = mover.data
        self.args = _C.ReduceChunkArgs()
        self.args.num_ranks_per_node = L
        self.args.return_chunks = self.chunk_pointers.data_ptr()
        self.args.return_layout = d.return_layout
        self.args.self_local_rank = local
        self.args.self_x = d.x.data_ptr()
        self.args.self_weights = ptr(d.weights)
        self.args.x_row_bytes = d.x.shape[1]
        self.args.dtype = d.x_dtype_code
        self.args.partial_layout = d.partial_layout

    @property
    def own_tokens_reduced(self) -> bool:
        """Every partial of this rank's own tokens is in ``acc`` (own chunks come first)."""
        return self.next >= self.own_chunks

    def step(self) -> bool:
        progressed = False
        for src, works in self.send_works.items():
            for slot, work in enumerate(works):
                if work is not None and RailLink.done(work, src):
                    works[slot] = None
                    progressed = True
        while self.next < len(self.schedule) and self._reduce(self.next):
            self.next += 1
            progressed = True
        return progressed

    def _reduce(self, index: int) -> bool:
        """Reduces outbox chunk ``index`` if its rows and a send slot are ready."""
        m, node, local = self.mover, self.mover.node, self.mover.topo.local_rank
        d, C = m.data, m.handle.chunk_records
        src, chunk, count = self.schedule[index]
        involved = self._involved(index)
        if self._rows_missing(involved) is not None or self._send_slot_busy(src):
            return False
        out = None
        if src != m.topo.rank:
            slot = self.send_count[src] % len(self.send_slots[src])
            out = self.send_slots[src][slot]
        self.chunk_pointers.zero_()
        for j in involved:
            self.chunk_pointers[j] = node.return_slot(j, local, self.consumed_base[j] + self.consumed_next[j])
        args = self.args
        args.dst_rows = m.handle.outbox_dst_rows[self.record_begin[index]:].data_ptr()
        args.num_records = count
        args.self_rows = self.own_rows[index].data_ptr()
        args.partials = ptr(out)
        args.acc = d.acc.data_ptr() if out is None else 0
        args.acc_weights = ptr(d.acc_weights) if out is None else 0
        args.token_ids = self.own_tokens[chunk * C:].data_ptr() if out is None else 0
        timed("combine.reduce", count * d.partial_layout.bytes, _C.reduce_chunk, args, m.num_threads)
        for j in involved:
            self.consumed_next[j] += 1
            node.store(node.return_consumed(j, local), self.consumed_base[j] + self.consumed_next[j])
            node.ring(j)
        if out is not None:
            self.send_works[src][slot] = m.rail.isend(out[:count * d.partial_layout.bytes], src, chunk)
            self.send_count[src] += 1
        return True

    @property
    def done(self) -> bool:
        return (self.next == len(self.schedule)
                and all(w is None for works in self.send_works.values() for w in works))

    def _involved(self, index: int) -> List[int]:
        """The local ranks whose returned rows outbox chunk ``index`` needs next."""
        L = self.mover.topo.num_ranks_per_node
        return [j for j in range(L) if self.consumed_next[j] < len(self.expected[j])
                and self.expected[j][self.consumed_next[j]] == index]

    def _rows_missing(self, involved: List[int]) -> Optional[int]:
        """The first of ``involved`` that has not returned its rows of the next chunk yet."""
        node, local = self.mover.node, self.mover.topo.local_rank
        for j in involved:
            if node.load(node.return_published(j, local)) <= self.consumed_base[j] + self.consumed_next[j]:
                return j
        return None

    def _send_slot_busy(self, src: int) -> bool:
        """A remote source's next send slot still holds a partial on its way over the rail."""
        if src == self.mover.topo.rank:
            return False
        return self.send_works[src][self.send_count[src] % len(self.send_slots[src])] is not None

    def waiting_on(self) -> Optional[int]:
        """What the next chunk waits on: a node-mate's rows, or the rail (a send slot still in
        flight to its source); once every chunk is reduced, the rail sends still in flight.
        Exact, so that node-mates stalled behind a cut rail do not blame each other."""
        topo = self.mover.topo
        if self.next < len(self.schedule):
            src = self.schedule[self.next][0]
            j = self._rows_missing(self._involved(self.next))
            if j is not None:
                return topo.rank_of(topo.node, j)
            return src if self._send_slot_busy(src) else None
        for src, works in self.send_works.items():
            if any(work is not None for work in works):
                return src
        return None


class Accumulator:
    """Adds, at the source, each remote node's partials after its own node's, in ascending node
    order; a token's last term writes its output row."""

    def __init__(self, mover: _Mover, staging: RailStaging, reducer: Reducer) -> None:
        self.mover = mover
        self.reducer = reducer
        topo, handle, d = mover.topo, mover.handle, mover.data
        C = handle.chunk_records
        # Own tokens' partials go straight into acc; rows no own-node partial writes start at 0.
        untouched = torch.ones(handle.num_tokens, dtype=torch.bool)
        untouched[handle.send_plan.tokens(topo.node).long()] = False
        untouched_rows = untouched.nonzero().flatten()
        # index_fill_, not a boolean-mask assignment: the latter costs ~14 ms on [4096, 2048].
        d.acc.index_fill_(0, untouched_rows, 0)
        if d.acc_weights is not None:
            d.acc_weights.index_fill_(0, untouched_rows, 0)
        remote = [m for m in range(topo.num_nodes) if m != topo.node]
        self.phases: List[Tuple[int, List[int]]] = [
            (m, stream_chunks(handle.send_plan.tokens(m).numel(), C)) for m in remote
            if handle.send_plan.tokens(m).numel()]
        self.recv_slots = {m: staging.recv_slots(i) for i, m in enumerate(remote)}
        # A token's last remote phase writes its output row directly (no second pass over acc).
        self.final_phase = torch.full((handle.num_tokens,), -1, dtype=torch.int32)
        for p, (m, _) in enumerate(self.phases):
            self.final_phase[handle.send_plan.tokens(m).long()] = p
        self.last_term = [(self.final_phase[handle.send_plan.tokens(m).long()] == p).to(torch.uint8)
                          for p, (m, _) in enumerate(self.phases)]
        self.posted = {m: 0 for m, _ in self.phases}
        self.receiving: Dict[int, Dict[int, Pending]] = {m: {} for m, _ in self.phases}
        self.phase = 0
        self.phase_chunk = 0

    def step(self) -> bool:
        m_, topo, d = self.mover, self.mover.topo, self.mover.data
        C, pb = m_.handle.chunk_records, d.partial_layout.bytes
        progressed = False
        for m, chunks in self.phases:  # keep every remote stream's receives posted
            slots = self.recv_slots[m]
            while self.posted[m] < len(chunks) and len(self.receiving[m]) < len(slots):
                c = self.posted[m]
                self.receiving[m][c] = m_.rail.irecv(slots[c % len(slots)][:chunks[c] * pb], topo.rail_peer(m), c)
                self.posted[m] += 1
                progressed = True
        while self.reducer.own_tokens_reduced and self.phase < len(self.phases):
            m, chunks = self.phases[self.phase]
            work = self.receiving[m].get(self.phase_chunk)
            if work is None or not RailLink.done(work, topo.rail_peer(m)):
                break
            count = chunks[self.phase_chunk]
            tokens = m_.handle.send_plan.tokens(m)[self.phase_chunk * C:self.phase_chunk * C + count]
            slots = self.recv_slots[m]
            timed("combine.accumulate", count * pb, _C.accumulate_partials, d.acc.data_ptr(), ptr(d.acc_weights),
                  slots[self.phase_chunk % len(slots)].data_ptr(), d.partial_layout, tokens.data_ptr(), count,
                  self.last_term[self.phase][self.phase_chunk * C:].data_ptr(), d.output, m_.num_threads)
            del self.receiving[m][self.phase_chunk]
            self.phase_chunk += 1
            if self.phase_chunk == len(chunks):
                self.phase += 1
                self.phase_chunk = 0
            progressed = True
        return progressed

    @property
    def done(self) -> bool:
        return self.reducer.own_tokens_reduced and self.phase == len(self.phases)

    def waiting_on(self) -> Optional[int]:
        # Before its own tokens are reduced it waits on its reducer, which names what it waits on.
        if self.reducer.own_tokens_reduced and self.phase < len(self.phases):
            return self.mover.topo.rail_peer(self.phases[self.phase][0])
        return None

    def finish(self) -> None:
        """Writes the output rows no remote partial finished (tokens of this node only, or none)."""
        d = self.mover.data
        rest = (self.final_phase == -1).nonzero().flatten().to(torch.int32)
        _C.finalize_combine(d.acc.data_ptr(), d.acc.element_size(), d.acc.shape[1], rest.data_ptr(), rest.numel(),
                            d.output, self.mover.num_threads)


def run_combine(topo: Topology, node: NodeLink, rail: RailLink, handle: HostHandle, data: CombineInput,
                staging: RailStaging, num_threads: int, timeout_s: float) -> None:
    """Moves one combine: writes ``data.output`` (ordered sums plus bias, cast) and
    ``data.acc_weights``."""
    mover = _Mover(topo, node, rail, handle, data, num_threads)
    returner = Returner(mover)
    reducer = Reducer(mover, staging)
    accumulator = Accumulator(mover, staging, reducer)
    roles: Sequence = [returner, reducer, accumulator]
    blame_order: Sequence = [reducer, accumulator, returner]
    drive(roles, node.progress(timeout_s, "combine", lambda: first_waited(blame_order)))
    accumulator.finish()

"""The in-node link of the CPU backend: one POSIX shared-memory segment per node.

Each local rank owns an *area* of the segment, laid out as::

    control block (pid, doorbell, counters, each on its own cache line; two notify rows;
                   what this rank waits on when stalled: see wait_board.py;
                   in local rank 0's area, the node's failure word: see failure.py)
    outbox slots   [OUTBOX_SLOTS]        dispatch records this rank exposes to its node
    return slots   [L][RETURN_SLOTS]     combine rows this rank returns to each local reducer

All counters grow monotonically across calls (slot = counter % slots), so no reset or barrier
is needed between calls. Whoever moves a counter another rank waits on rings that rank's
doorbell (a futex), so an idle rank sleeps until there is something to do instead of polling. The name is unlinked as soon as every local rank has mapped the
segment, so nothing is left in /dev/shm even if a process dies.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _C
from ..topology import Topology
from .failure import FailureBoard
from .progress import Progress
from .wait_board import WaitBoard

OUTBOX_SLOTS = 4
RETURN_SLOTS = 2
_LINE = 64
_MIN_SLOT_BYTES = 4096


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class NodeLink:
    """Shared-memory segment of this rank's node and the ring counters inside it.

    Args:
        group: the buffer's process group (collective: every rank constructs it).
        topo: this rank's topology.
        num_nvl_bytes: staging budget per rank in bytes.
        notify_words: int64 words of one notify row.
    """

    def __init__(self, group: dist.ProcessGroup, topo: Topology, num_nvl_bytes: int, notify_words: int) -> None:
        self.topo = topo
        L = topo.num_ranks_per_node
        self.notify_words = notify_words
        # Control block offsets.
        self._pid_off = 0
        self._doorbell_off = _LINE
        self._notify_seq_off = 2 * _LINE  # two lines
        self._failure_off = 4 * _LINE  # used in local rank 0's area only
        self._waits_off = 5 * _LINE
        self._acked_off = 6 * _LINE  # L lines: reader i's ack of this outbox
        self._published_off = self._acked_off + L * _LINE
        self._ret_published_off = self._published_off + _LINE  # L lines, one per reducer
        self._ret_consumed_off = self._ret_published_off + L * _LINE  # L lines
        self._notify_rows_off = self._ret_consumed_off + L * _LINE
        ctrl_bytes = _align(self._notify_rows_off + 2 * notify_words * 8, 4096)
        num_slots = OUTBOX_SLOTS + L * RETURN_SLOTS
        self.slot_bytes = max(_MIN_SLOT_BYTES, (max(num_nvl_bytes, 0) - ctrl_bytes) // num_slots // _LINE * _LINE)
        self._outbox_off = ctrl_bytes
        self._returns_off = ctrl_bytes + OUTBOX_SLOTS * self.slot_bytes
        self.area_bytes = ctrl_bytes + num_slots * self.slot_bytes
        self._segment, self.token = self._map_segment(group, topo, L * self.area_bytes)
        self._base = self._segment.address
        self._bell_lock = threading.Lock()  # rail waiter threads ring while close() may unmap
        _C.atomic_store(self._addr(topo.local_rank, self._pid_off), os.getpid())
        dist.barrier(group=group)  # every pid is written before anyone reads it
        self.local_pids = {topo.rank_of(topo.node, j): self.load(self._addr(j, self._pid_off))
                           for j in range(L) if j != topo.local_rank}
        self._notify_seq = 0
        # [parity][local rank]: int64 views of the notify rows, made once (a view costs ~20 us).
        self._notify_rows = [[self.view(self._addr(j, self._notify_rows_off + parity * notify_words * 8),
                                        notify_words * 8).view(torch.int64) for j in range(L)] for parity in (0, 1)]
        self.failures = FailureBoard(self._addr(0, self._failure_off), self.ring_node)
        self.waits = WaitBoard(topo, lambda j: self._addr(j, self._waits_off))

    @staticmethod
    def _map_segment(group: dist.ProcessGroup, topo: Topology,
                     size_bytes: int) -> Tuple["_C.SharedMemorySegment", str]:
        """Maps the node's segment; returns it and the buffer's token (the same on every rank)."""
        token: List[str] = [uuid.uuid4().hex[:16] if dist.get_rank(group) == 0 else ""]
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
        name = f"/dispatch-{token[0]}-node{topo.node}"
        creator = topo.local_rank == 0
        segment = _C.SharedMemorySegment(name, size_bytes, True) if creator else None
        try:
            dist.barrier(group=group)
            if not creator:
                segment = _C.SharedMemorySegment(name, size_bytes, False)
            dist.barrier(group=group)
        finally:
            if segment is not None and creator:
                segment.unlink()
        return segment, token[0]

    # --- addresses -------------------------------------------------------------------------
    def _addr(self, local_rank: int, offset: int) -> int:
        return self._base + local_rank * self.area_bytes + offset

    def outbox_published(self, producer: int) -> int:
        return self._addr(producer, self._published_off)

    def outbox_acked(self, producer: int, reader: int) -> int:
        return self._addr(producer, self._acked_off + reader * _LINE)

    def outbox_slot(self, producer: int, position: int) -> int:
        return self._addr(producer, self._outbox_off + (position % OUTBOX_SLOTS) * self.slot_bytes)

    def return_published(self, writer: int, reducer: int) -> int:
        return self._addr(writer, self._ret_published_off + reducer * _LINE)

    def return_consumed(self, writer: int, reducer: int) -> int:
        return self._addr(writer, self._ret_consumed_off + reducer * _LINE)

    def return_slot(self, writer: int, reducer: int, position: int) -> int:
        slot = reducer * RETURN_SLOTS + position % RETURN_SLOTS
        return self._addr(writer, self._returns_off + slot * self.slot_bytes)

    def progress(self, timeout_s: float, what: str, blocker: Callable[[], Optional[int]]) -> Progress:
        """A Progress for a loop of this rank: sleeps on its doorbell, watches the node's pids
        and the buffer's first failure, and says what it waits on when stalled."""
        return Progress(timeout_s, what, blocker, self.local_pids, bell=self, failures=self.failures,
                        waits=self.waits)

    # --- doorbells ------------------------------------------------------------------------
    def ring(self, local_rank: int) -> None:
        """Wakes ``local_rank`` (after changing something it may wait on); a no-op for self."""
        if local_rank != self.topo.local_rank:
            _C.doorbell_ring(self._addr(local_rank, self._doorbell_off))

    def ring_node(self) -> None:
        """Wakes every other local rank."""
        for j in range(self.topo.num_ranks_per_node):
            self.ring(j)

    def record_failure(self, origin: int) -> None:
        """Records a failure heard from another node (a rail waiter thread, possibly after
        close()), waking the other local ranks; the rail's completion hook (``ring_self``) then
        wakes this one."""
        with self._bell_lock:
            if self._segment is not None:
                self.failures.record(origin)

    def ring_self(self) -> None:
        """Wakes this rank's own loop: called by rail waiter threads, possibly after close()."""
        with self._bell_lock:
            if self._segment is not None:
                _C.doorbell_ring(self._addr(self.topo.local_rank, self._doorbell_off))

    def bell_rings(self) -> int:
        """This rank's ring count: read it before looking for work, then wait on it."""
        return _C.doorbell_rings(self._addr(self.topo.local_rank, self._doorbell_off))

    def wait_bell(self, seen: int, timeout_s: float) -> bool:
        """Sleeps until this rank's bell rang since ``seen`` or ``timeout_s`` passed."""
        return _C.doorbell_wait(self._addr(self.topo.local_rank, self._doorbell_off), seen, timeout_s)

    @staticmethod
    def load(address: int) -> int:
        return _C.atomic_load(address)

    @staticmethod
    def store(address: int, value: int) -> None:
        _C.atomic_store(address, value)

    def view(self, address: int, num_bytes: int) -> torch.Tensor:
        """A uint8 tensor over ``num_bytes`` of the segment at ``address`` (for gloo receives)."""
        return torch.frombuffer(_C.memoryview_at(address, num_bytes), dtype=torch.uint8)

    # --- notify --------------------------------------------------------------------------
    def exchange_rows(self, row: torch.Tensor, timeout_s: float, what: str) -> torch.Tensor:
        """All-gathers one int64 row per local rank through the segment: returns ``[L, words]``.

        Two row slots alternate by call parity: a rank can be at most one exchange ahead of a
        peer still reading, because it needs that peer's next row to finish its own.
        """
        L = self.topo.num_ranks_per_node
        self._notify_seq += 1
        seq = self._notify_seq
        parity = seq % 2
        me = self.topo.local_rank
        rows = self._notify_rows[parity]
        rows[me].copy_(row)
        self.store(self._addr(me, self._notify_seq_off + parity * _LINE), seq)
        self.ring_node()
        out = torch.empty((L, self.notify_words), dtype=torch.int64)
        pending = set(range(L))
        progress = self.progress(timeout_s, what, lambda: self.topo.rank_of(self.topo.node, min(pending)))
        while pending:
            done = [j for j in pending if self.load(self._addr(j, self._notify_seq_off + parity * _LINE)) == seq]
            for j in done:
                out[j].copy_(rows[j])
                pending.discard(j)
            if pending:
                progress.step(bool(done))
        progress.finish()
        return out

    def close(self) -> None:
        with self._bell_lock:
            self.failures.close()
            self.waits.close()
            self._notify_rows = []
            if self._segment is not None:
                self._segment.close()
                self._segment = None

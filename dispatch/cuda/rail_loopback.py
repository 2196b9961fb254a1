"""The loopback rail transport: ``N x L`` virtual ranks in one process, on one GPU or on the SIMT
runtime, run the whole two-hop pipeline with the rail replaced by a device copy.

A ``LoopbackFabric`` (one per virtual cluster) stands for the wires: a rank's ``post`` first
registers its receives (where each chunk must land, which counter to bump), then takes, for each
of its sends, the matching receive its rail peer registered (waiting for it on the host, at most
``timeout_s``) and enqueues on its own rail stream: an optional throttle kernel (the bandwidth
cap: each chunk takes at least ``bytes / bandwidth``), the copy (device to device; ``memcpy`` on
SIMT), then the release store of the receiver's arrival counter. Receives are registered before
any send waits, so no two ranks can wait on each other's post.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..errors import PeerTimeoutError
from .rail import RailChunk


class LoopbackFabric:
    """The rail wires of one loopback cluster, shared by its virtual ranks.

    Args:
        bandwidth_bytes_per_s: per-link cap (0 = uncapped: the copy's own speed).

    Attributes:
        silent_ranks: ranks whose sends are dropped (fault injection: a rail peer that never
            sends); their peers' forwarders then time out naming them.
    """

    def __init__(self, bandwidth_bytes_per_s: float = 0.0) -> None:
        if bandwidth_bytes_per_s < 0:
            raise ValueError(f"bandwidth_bytes_per_s must be >= 0, got {bandwidth_bytes_per_s!r}")
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        self.silent_ranks: Set[int] = set()
        self._cond = threading.Condition()
        # (source rank, destination rank) -> receives the destination registered, in post order
        self._recvs: Dict[Tuple[int, int], Deque[Tuple[RailChunk, Optional[Any]]]] = defaultdict(deque)
        # the per-call host exchange: call number -> rank -> object, and how many ranks read it
        self._gather_calls: Dict[int, int] = defaultdict(int)
        self._gathers: Dict[int, Dict[int, Any]] = {}
        self._gather_reads: Dict[int, int] = defaultdict(int)

    def all_gather(self, rank: int, size: int, obj: Any, timeout_s: float) -> List[Any]:
        """Every rank's ``obj`` of this call (the n-th call of each rank pairs with the n-th of the
        others); raises ``PeerTimeoutError`` naming the lowest missing rank after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            call = self._gather_calls[rank]
            self._gather_calls[rank] += 1
            slots = self._gathers.setdefault(call, {})
            slots[rank] = obj
            self._cond.notify_all()
            while len(slots) < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = min(set(range(size)) - set(slots))
                    raise PeerTimeoutError(missing, "did not join the call (host exchange of the two-hop path)",
                                           timeout_s)
                self._cond.wait(min(left, 0.1))
            out = [slots[r] for r in range(size)]
            self._gather_reads[call] += 1
            if self._gather_reads[call] == size:
                del self._gathers[call], self._gather_reads[call]
            return out

    def register(self, src: int, dst: int, chunk: RailChunk, ready: Optional[Any]) -> None:
        with self._cond:
            self._recvs[(src, dst)].append((chunk, ready))
            self._cond.notify_all()

    def take(self, src: int, dst: int, timeout_s: float) -> Tuple[RailChunk, Optional[Any]]:
        """The oldest receive ``dst`` registered for chunks from ``src``; raises
        ``PeerTimeoutError`` naming ``dst`` when none comes within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            queue = self._recvs[(src, dst)]
            while not queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeoutError(dst, f"posted no rail receive for rank {src} (loopback rail)", timeout_s)
                self._cond.wait(min(left, 0.1))
            return queue.popleft()


class LoopbackRail:
    """``RailTransport`` of one virtual rank over a ``LoopbackFabric``.

    Args:
        fabric: the cluster's wires.
        rank: this global rank; num_ranks_per_node: ``L`` (the rail peer on node ``m`` is
            ``m * L + rank % L``).
        device: the ``GpuDevice``/``SimtDevice`` the ranks share.
        timeout_s: how long a send waits for its peer's receive.
    """

    num_sms = 0  # copy engine (GPU) or host memcpy (SIMT): no SM of the kernels
    name = "loopback"

    def __init__(self, fabric: LoopbackFabric, rank: int, num_ranks_per_node: int, device: Any,
                 timeout_s: float) -> None:
        self.fabric = fabric
        self.rank = rank
        self.L = num_ranks_per_node
        self.device = device
        self.mod = device.mod
        self.timeout_s = timeout_s

    def _peer(self, node: int) -> int:
        return node * self.L + self.rank % self.L

    def _ready_event(self, stream: int) -> Optional[Any]:
        """What the sender's copy must wait for: the receiver's work so far on ``stream`` (its
        counters zeroed, its region allocated). On SIMT that work was done by the host thread."""
        if self.device.kind != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.ExternalStream(stream))
        return event

    def post(self, sends: Sequence[RailChunk], recvs: Sequence[RailChunk], stream: int) -> None:
        """Registers ``recvs``, then enqueues each send's copy and its peer's counter store on
        ``stream`` (see the module docstring). Sizes must match the peer's receive."""
        ready = self._ready_event(stream) if recvs else None
        for chunk in recvs:
            self.fabric.register(self._peer(chunk.peer_node), self.rank, chunk, ready)
        cap = self.fabric.bandwidth_bytes_per_s
        for chunk in sends:
            peer = self._peer(chunk.peer_node)
            target, peer_ready = self.fabric.take(self.rank, peer, self.timeout_s)
            if target.num_bytes != chunk.num_bytes:
                raise RuntimeError(f"rail chunk size mismatch: rank {self.rank} sends {chunk.num_bytes} bytes, rank "
                                   f"{peer} expects {target.num_bytes}")
            if self.rank in self.fabric.silent_ranks:
                continue
            if peer_ready is not None:
                torch.cuda.ExternalStream(stream).wait_event(peer_ready)
            min_ns = int(chunk.num_bytes / cap * 1e9) if cap > 0 else 0
            self.mod.rail_loopback_copy(target.address, chunk.address, chunk.num_bytes, target.arrival_counter,
                                        target.arrival_value, min_ns, stream)

    def all_gather_object(self, obj: Any, size: int) -> List[Any]:
        """The per-call host exchange over the fabric, with this rail's timeout."""
        return self.fabric.all_gather(self.rank, size, obj, self.timeout_s)

    def close(self) -> None:
        """Nothing to release (the fabric belongs to the cluster)."""

    def abort(self) -> None:
        """Nothing to end: a loopback round is device copies only, which never wait on a peer."""

"""The rail seam of the CUDA backend: how chunks cross between rail peers (the ranks with the
same local index on different nodes), and how the receiving kernels learn that they arrived.

The two-hop kernels never talk to a network. They see two things only:

* "send chunk ``i`` of my records to my rail peer on node ``m``": the rail sender kernel packs
  the chunk into this rank's rail send region; the backend then hands the transport a
  ``RailChunk`` per (peer node, chunk) with the region's address;
* "chunk ``i`` from node ``m`` has arrived": a uint64 **arrival counter** in device memory of the
  receiving rank, which the transport sets to ``i + 1`` in stream order after the bytes of chunk
  ``i`` are in place. The forwarder kernel polls it with an acquire load, exactly like a ring
  tail.

A transport is host-issued (NCCL ``ncclSend``/``ncclRecv`` on the rail stream, or a copy for the
loopback); a GPU-initiated transport (NCCL's device API) would replace ``post`` by device calls
behind the same two facts, without touching the kernels' protocol.

Implementations: ``LoopbackRail`` (``dispatch/cuda/rail_loopback.py``: a device copy, N x L
virtual ranks on one GPU or on the SIMT runtime) and ``NcclRail``
(``dispatch/cuda/rail_nccl.py``: the production path, a communicator per rail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class RailChunk:
    """One chunk crossing the rail, seen from one side.

    Attributes:
        peer_node: the node of the rail peer (the destination of a send, the source of a receive).
        address: device address of the chunk's bytes (send: where they are read; receive: where
            they land).
        num_bytes: size of the chunk; both sides post the same size (the plan gives both).
        arrival_counter: receive only: device address of the uint64 set to ``arrival_value`` in
            stream order once the chunk has landed (0: no counter).
        arrival_value: the value written there (chunk index + 1).
    """

    peer_node: int
    address: int
    num_bytes: int
    arrival_counter: int = 0
    arrival_value: int = 0


class RailTransport(Protocol):
    """Moves chunks between this rank and its rail peers, in the order posted, on a stream.

    Attributes:
        num_sms: SMs the transport itself occupies while it moves data (0 for copy engines):
            reported beside the kernels' ``num_sms``.
        name: short name for reports (``"loopback"``, ``"nccl"``).
    """

    num_sms: int
    name: str

    def post(self, sends: Sequence[RailChunk], recvs: Sequence[RailChunk], stream: int) -> None:
        """Enqueues one round of sends and receives on ``stream`` (an integer stream handle),
        then the arrival counter stores of the receives, in stream order. Returns at once; every
        rail peer posts the matching round (same sizes) in the same order."""
        ...

    def close(self) -> None:
        """Releases the transport's resources (communicators, streams). Idempotent."""
        ...

    def abort(self) -> None:
        """Ends at once whatever the transport still has in flight, then releases it like
        ``close`` (idempotent; ``close`` afterwards does nothing). Called after a failure: a
        round waiting on a dead rail peer would otherwise hold its stream, and the ``destroy()``
        that drains the stream, forever."""
        ...

"""The first failure of a buffer, known to every rank of the node, so that survivors name the
rank that failed first rather than a node-mate that merely left because of it.

When rank 1 dies, its node-mates notice its pid and its rail peers their broken connection; the
other ranks only see messengers stop (a node-mate that gave up, a rail peer that left). So the
first rank of a node to give up records whom it blames in the node segment's *failure word*
(one ``uint64``: 0, or ``origin + 1``; compare-exchange, so the first writer wins), and rings
the node; every stalled loop pass of the node reads it for free and gives up naming the same
rank. Once a failure is recorded, the buffer is dead on that node: later calls raise at once.

Across nodes the word travels over the rail's abort channel (rail_link.py): a rank whose call
failed sends its rail peers the rank it blames, and each records it in its own node's word,
whence its node-mates read it and pass it on along their rails. A rank that hears of a failure
only as a rail peer leaving therefore waits (a quarter of a timeout at most) for that peer's word
before naming anyone. (A store-based board was tried and removed: a store read over a silently
cut link blocks in the TCP stack for minutes, which would turn a timeout into a hang.)
"""

from __future__ import annotations

from typing import Callable, Optional

from .. import _C
from ..errors import PeerTimeoutError


class FailureBoard:
    """Records and reads the first failed rank seen on this node, for one buffer.

    Args:
        word_address: address of the node segment's failure word.
        ring_node: wakes the node's other ranks after a record, so they read it at once.
    """

    def __init__(self, word_address: int, ring_node: Callable[[], None]) -> None:
        self._word = word_address
        self._ring_node = ring_node
        self._origin: Optional[int] = None
        self._closed = False  # the segment holding the word is unmapped

    def origin(self) -> Optional[int]:
        """The first failed rank, if a rank of the node recorded one (one atomic load)."""
        if self._origin is not None or self._closed:
            return self._origin
        value = _C.atomic_load(self._word)
        if value:
            self._origin = int(value) - 1
        return self._origin

    def settle(self, error: PeerTimeoutError) -> PeerTimeoutError:
        """Records ``error.rank`` as the first failure unless one is known; returns the error to
        raise, naming the first failure."""
        origin = self.origin()
        if origin is None and error.rank >= 0:
            origin = self.record(error.rank)
        if origin is None or origin == error.rank:
            return error
        first = PeerTimeoutError(origin, "failed first; this rank stopped waiting for the ranks it left behind")
        first.__cause__ = error
        return first

    def record(self, rank: int) -> Optional[int]:
        """Records ``rank`` as the first failure unless one is known, waking the node; returns
        the first failure (``rank`` or an earlier record), None once closed."""
        origin = self.origin()
        if origin is not None or self._closed:
            return origin
        held = _C.atomic_compare_exchange(self._word, 0, rank + 1)
        self._origin = rank if held == 0 else int(held) - 1
        self._ring_node()
        return self._origin

    def close(self) -> None:
        self._closed = True

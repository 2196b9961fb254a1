"""The first failure of a buffer, known to every rank, so that every survivor names the same rank.

When rank 1 dies, its node-mates notice its pid and its rail peers their broken connection; the
other ranks only see messengers stop (a node-mate that gave up, a rail peer that left). So the
first rank to give up records whom it blames, and every other rank blames that one:

- in the node segment's *failure word* (one ``uint64``: 0, or ``origin + 1``; compare-exchange,
  so the first writer wins), read by every stalled loop pass of the node for free;
- in the process group's store (``compare_set`` on a key unique to the buffer), which crosses
  nodes: a stalled rank reads it at most every ``STORE_POLL_S``, through its own client with a
  short timeout, so an unreachable store costs a bounded wait and is then left alone.

Once a failure is recorded the buffer is dead on every rank: later calls raise at once.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

from .. import _C
from ..errors import PeerTimeoutError

STORE_POLL_S = 0.25
STORE_TIMEOUT_S = 2.0


def _store_client() -> Optional[Any]:
    """A private client of the default group's store (None where there is none)."""
    try:
        store = dist.distributed_c10d._get_default_store().clone()
        store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
        return store
    except Exception:  # no store, or a store type without clone(): the node word still works
        return None


class FailureBoard:
    """Records and reads the first failed rank of one buffer.

    Args:
        word_address: address of the node segment's failure word.
        key: store key unique to this buffer (every rank of the group passes the same).
        ring_node: wakes the node's other ranks after a record, so they read it at once.
    """

    def __init__(self, word_address: int, key: str, ring_node) -> None:
        self._word = word_address
        self._key = key
        self._ring_node = ring_node
        self._store = _store_client()
        self._next_store_poll_s = 0.0
        self._origin: Optional[int] = None
        self._closed = False  # the segment holding the word is unmapped

    def origin(self) -> Optional[int]:
        """The first failed rank, if any rank has recorded one (cheap: call on every stall)."""
        if self._origin is not None or self._closed:
            return self._origin
        value = _C.atomic_load(self._word)
        if value:
            self._origin = int(value) - 1
            return self._origin
        now = time.monotonic()
        if self._store is not None and now >= self._next_store_poll_s:
            self._next_store_poll_s = now + STORE_POLL_S
            try:
                if self._store.check([self._key]):
                    self._adopt(int(self._store.get(self._key)))
            except Exception:  # store gone (its host died): rely on the node word from now on
                self._store = None
        return self._origin

    def settle(self, error: PeerTimeoutError) -> PeerTimeoutError:
        """Records ``error.rank`` as the first failure unless one is known; returns the error to
        raise, naming the first failure."""
        origin = self.origin()
        if origin is None and error.rank >= 0 and not self._closed:
            origin = self._record(error.rank)
        if origin is None or origin == error.rank:
            return error
        first = PeerTimeoutError(origin, "failed first; this rank stopped waiting for the ranks it left behind")
        first.__cause__ = error
        return first

    def _record(self, rank: int) -> int:
        origin = rank
        if self._store is not None:  # the store decides across nodes; the node word follows it
            try:
                origin = int(self._store.compare_set(self._key, "", str(rank)))
            except Exception:
                self._store = None
        held = _C.atomic_compare_exchange(self._word, 0, origin + 1)
        if held and self._store is None:
            origin = int(held) - 1
        self._origin = origin
        self._ring_node()
        return origin

    def _adopt(self, origin: int) -> None:
        self._origin = origin
        _C.atomic_compare_exchange(self._word, 0, origin + 1)

    def close(self) -> None:
        self._closed = True
        self._store = None

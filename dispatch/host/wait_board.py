"""What each stalled rank of a node waits on, so that a rank stalled behind a node-mate names
the rank at the end of the node's wait chain instead of the node-mate.

A node-mate that stops moving is usually a messenger: it waits on something else (a rail peer
across a cut link, a node-mate of its own). Its own timeout may come later than ours (notify's
rail wait is 1.25 timeouts + 1 s, and a rank then waits a quarter timeout for its rail peer's
abort word), so the failure word it would record comes too late. A CI run (2026-12-04) had
both ranks of a node name rank 1 after a link cut: rank 0 waited in combine for rank 1's rows,
rank 1 waited in combine's notify for rank 3 across the cut, and rank 0's grace ran out first.

Each rank's area of the node segment holds one word: ``stamp_ms << 20 | (blocker + 1)``,
refreshed by every stalled loop pass at most every 0.1 s (progress.py). A word older than
``FRESH_S`` is ignored: its rank is moving, or gone, or gave up and recorded a failure.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional

from .. import _C
from ..topology import Topology

_RANK_BITS = 20
_RANK_MASK = (1 << _RANK_BITS) - 1
# A stalled pass refreshes its word every ~0.1 s; allow for a loaded 2-core machine.
FRESH_S = 1.0


def _now_ms() -> int:
    # CLOCK_MONOTONIC: one clock for every process of the host, so stamps compare across ranks.
    return time.monotonic_ns() // 1_000_000


class WaitBoard:
    """Publishes this rank's blocker and follows the node's chain of blockers.

    Args:
        topo: this rank's topology.
        word_address: local rank -> address of that rank's wait word in the node segment.
    """

    def __init__(self, topo: Topology, word_address: Callable[[int], int]) -> None:
        self.topo = topo
        self._addresses = [word_address(j) for j in range(topo.num_ranks_per_node)]
        self._closed = False  # the segment holding the words is unmapped

    def publish(self, blocker: Optional[int]) -> None:
        """Says this rank is stalled waiting on global rank ``blocker`` (None: on nothing known)."""
        if self._closed:
            return
        _C.atomic_store(self._addresses[self.topo.local_rank],
                        (_now_ms() << _RANK_BITS) | (0 if blocker is None else blocker + 1))

    def waits_on(self, rank: int) -> Optional[int]:
        """What node-mate ``rank`` said it waits on within the last ``FRESH_S``, if anything."""
        if self._closed:
            return None
        word = _C.atomic_load(self._addresses[self.topo.local_of(rank)])
        blocker = (word & _RANK_MASK) - 1
        if blocker < 0 or _now_ms() - (word >> _RANK_BITS) > FRESH_S * 1000:
            return None
        return blocker

    def follow(self, rank: int) -> List[int]:
        """The wait chain from node-mate ``rank``: ``[rank, what it waits on, ...]``, ending at a
        rank of another node, a node-mate that said nothing fresh, or before a cycle (one back to
        this rank included). Its last entry is the rank to blame."""
        chain = [rank]
        while self.topo.node_of(chain[-1]) == self.topo.node:
            blocker = self.waits_on(chain[-1])
            if blocker is None or blocker == self.topo.rank or blocker in chain:
                break
            chain.append(blocker)
        return chain

    def close(self) -> None:
        self._closed = True

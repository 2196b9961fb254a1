"""Errors raised by dispatch."""

from __future__ import annotations

from typing import Optional


class PeerTimeoutError(RuntimeError):
    """A peer rank died or did not take part in a collective call in time.

    Attributes:
        rank: the global rank (within the buffer's group) that was waited for.
    """

    def __init__(self, rank: int, what: str, timeout_s: Optional[float] = None):
        detail = f" after {timeout_s:g} s" if timeout_s is not None else ""
        super().__init__(f"rank {rank} {what}{detail}")
        self.rank = rank

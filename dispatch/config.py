"""Per-call tuning knobs (DeepEP's `Config`, reduced to what this library uses)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass
class Config:
    """How a dispatch or combine may run.

    Args:
        num_sms: SMs the CUDA kernels may take (even, >= 2). On the CPU backend it bounds the
            worker threads of each rank instead (never more than the cores per rank).
        chunk_tokens: most token records per chunk on either link; ``None`` lets the staging
            budget decide (capped at 4096).
        round_rail_partials: combine sends each node's partial sum over the rail rounded to
            ``x``'s dtype (bfloat16/float16) instead of float32, as DeepEP does: half the rail
            bytes, but the result is no longer the exact fixed-order float32 sum (each remote
            node's partial is rounded once; see docs/semantics.md). No effect for float32/64 x.
            Every rank must pass the same value.
    """

    num_sms: int = 20
    chunk_tokens: Optional[int] = None
    round_rail_partials: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_sms, int) or self.num_sms < 1:
            raise ValueError(f"num_sms must be a positive int, got {self.num_sms!r}")
        if self.chunk_tokens is not None and (not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be a positive int or None, got {self.chunk_tokens!r}")
        if not isinstance(self.round_rail_partials, bool):
            raise TypeError(f"round_rail_partials must be a bool, got {self.round_rail_partials!r}")

    def cpu_threads(self, ranks_on_host: int) -> int:
        """Worker threads per rank on the CPU backend: ``num_sms``, capped by the cores per rank."""
        cores_per_rank = max(1, (os.cpu_count() or 1) // max(1, ranks_on_host))
        return max(1, min(self.num_sms, cores_per_rank))

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
    """

    num_sms: int = 20
    chunk_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_sms, int) or self.num_sms < 1:
            raise ValueError(f"num_sms must be a positive int, got {self.num_sms!r}")
        if self.chunk_tokens is not None and (not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be a positive int or None, got {self.chunk_tokens!r}")

    def cpu_threads(self, ranks_on_host: int) -> int:
        """Worker threads per rank on the CPU backend: ``num_sms``, capped by the cores per rank."""
        cores_per_rank = max(1, (os.cpu_count() or 1) // max(1, ranks_on_host))
        return max(1, min(self.num_sms, cores_per_rank))

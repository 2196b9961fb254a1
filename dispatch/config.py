"""Per-call tuning knobs: DeepEP's `Config`, mapped onto this library's chunking."""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass
from typing import Optional, Tuple

# What a DeepEP config means for staging sizes when it sets no chunking of its own.
DEFAULT_HINT_CHUNK_TOKENS = 1024
# DeepEP assumes up to 8 NVLink peers per node when a size hint only knows the rank count.
DEEPEP_NVL_PEERS = 8


@dataclass
class Config:
    """How a dispatch or combine may run.

    The first five arguments are DeepEP's, positional or by name; this library's own options
    are keyword-only.

    Args:
        num_sms: SMs the CUDA kernels may take (even, >= 2). On the CPU backend it bounds the
            worker threads of each rank instead (never more than the cores per rank).
        num_max_nvl_chunked_send_tokens: DeepEP's in-node send step per channel. Checked as
            DeepEP does (``0 < send < recv``) but not used: chunks here go whole.
        num_max_nvl_chunked_recv_tokens: DeepEP's in-node receive window per channel. With
            ``num_sms // 2`` channels, a dispatch keeps ``num_sms // 2 * window`` tokens in
            flight per link: that is the chunk size here (see :meth:`chunk_records`).
        num_max_rdma_chunked_send_tokens: DeepEP's rail send step (``<= recv / 2``; the receive
            window is rounded up to a multiple of it, as in DeepEP).
        num_max_rdma_chunked_recv_tokens: DeepEP's rail receive window per channel; bounds the
            chunk size across nodes like the in-node one. ``None`` (any of the four): not set,
            the link's chunks are bounded by the staging budget only.
        chunk_tokens: most token records per chunk on either link; overrides the DeepEP windows.
            ``None`` with no window set lets the staging budget decide (capped at 4096).
        round_rail_partials: combine sends each node's partial sum over the rail rounded to
            ``x``'s dtype (bfloat16/float16) instead of float32, as DeepEP does: half the rail
            bytes, but the result is no longer the exact fixed-order float32 sum (each remote
            node's partial is rounded once; see docs/semantics.md). No effect for float32/64 x.
            Every rank must pass the same value.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: Optional[int] = None
    num_max_nvl_chunked_recv_tokens: Optional[int] = None
    num_max_rdma_chunked_send_tokens: Optional[int] = None
    num_max_rdma_chunked_recv_tokens: Optional[int] = None
    _: KW_ONLY
    chunk_tokens: Optional[int] = None
    round_rail_partials: bool = False

    def __post_init__(self) -> None:
        if not _is_positive_int(self.num_sms):
            raise ValueError(f"num_sms must be a positive int, got {self.num_sms!r}")
        for name in ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens", "chunk_tokens"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        nvl_send, nvl_recv = self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens
        if nvl_send is not None and nvl_recv is not None and nvl_send >= nvl_recv:
            raise ValueError(f"num_max_nvl_chunked_send_tokens={nvl_send} must be below "
                             f"num_max_nvl_chunked_recv_tokens={nvl_recv}")
        rdma_send, rdma_recv = self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens
        if rdma_send is not None and rdma_recv is not None:
            # DeepEP's rule: the window holds whole send steps, at least two of them.
            self.num_max_rdma_chunked_recv_tokens = rdma_recv = -(-rdma_recv // rdma_send) * rdma_send
            if rdma_send > rdma_recv // 2:
                raise ValueError(f"num_max_rdma_chunked_send_tokens={rdma_send} must be at most half of "
                                 f"num_max_rdma_chunked_recv_tokens={rdma_recv}")
        if not isinstance(self.round_rail_partials, bool):
            raise TypeError(f"round_rail_partials must be a bool, got {self.round_rail_partials!r}")

    def cpu_threads(self, ranks_on_host: int) -> int:
        """Worker threads per rank on the CPU backend: ``num_sms``, capped by the cores per rank."""
        cores_per_rank = max(1, (os.cpu_count() or 1) // max(1, ranks_on_host))
        return max(1, min(self.num_sms, cores_per_rank))

    def chunk_records(self, num_nodes: int) -> Optional[int]:
        """Most token records per chunk this config asks for (``None``: the budget decides).

        ``chunk_tokens`` if set; else the DeepEP receive windows times the ``num_sms // 2``
        channels DeepEP would run, the smaller of the in-node and (across nodes) rail ones.

        Args:
            num_nodes: nodes of the buffer (the rail window counts only when there are several).
        """
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        windows = [self.num_max_nvl_chunked_recv_tokens]
        if num_nodes > 1:
            windows.append(self.num_max_rdma_chunked_recv_tokens)
        windows = [w for w in windows if w is not None]
        if not windows:
            return None
        return max(1, self.num_sms // 2) * min(windows)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """In-node staging per rank (``Buffer``'s ``num_nvl_bytes``) that lets this config's chunks flow.

        Args:
            hidden_bytes: bytes of one token row as DeepEP counts them (``hidden * max(element size, 2)``).
            num_ranks: ranks of the group. The ranks per node are ``LOCAL_WORLD_SIZE`` when set,
                else ``min(num_ranks, 8)`` as in DeepEP.

        Returns:
            bytes: enough for full chunks; a smaller buffer still works, with smaller chunks.
        """
        row_bytes = _accumulator_row_bytes(hidden_bytes)
        ranks_per_node, num_nodes = _hint_topology(num_ranks)
        chunk = self.chunk_records(num_nodes) or DEFAULT_HINT_CHUNK_TOKENS
        return nvl_staging_bytes(row_bytes, ranks_per_node, chunk)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Rail staging per rank (``Buffer``'s ``num_rdma_bytes``); 0 when the group is one node.

        Args:
            hidden_bytes: bytes of one token row as DeepEP counts them.
            num_ranks: ranks of the group (nodes as in :meth:`get_nvl_buffer_size_hint`).

        Returns:
            bytes: 0 for one node (note ``Buffer(num_rdma_bytes=0)`` means the default budget,
            which one node never allocates).
        """
        row_bytes = _accumulator_row_bytes(hidden_bytes)
        _, num_nodes = _hint_topology(num_ranks)
        if num_nodes == 1:
            return 0
        chunk = self.chunk_records(num_nodes) or DEFAULT_HINT_CHUNK_TOKENS
        return rdma_staging_bytes(row_bytes, num_nodes, chunk)


def nvl_staging_bytes(row_bytes: int, num_ranks_per_node: int, chunk_tokens: int) -> int:
    """In-node staging per rank for chunks of ``chunk_tokens`` rows of ``row_bytes`` (float32 terms)."""
    from .host.node_link import OUTBOX_SLOTS, RETURN_SLOTS
    record_bytes = row_bytes + 1024  # record metadata and alignment, generously
    return (OUTBOX_SLOTS + num_ranks_per_node * RETURN_SLOTS) * chunk_tokens * record_bytes + (1 << 20)


def rdma_staging_bytes(row_bytes: int, num_nodes: int, chunk_tokens: int) -> int:
    """Rail staging per rank for chunks of ``chunk_tokens`` rows of ``row_bytes`` (float32 terms)."""
    return 4 * max(1, num_nodes - 1) * chunk_tokens * (row_bytes + 1024)


def _accumulator_row_bytes(hidden_bytes: int) -> int:
    if not _is_positive_int(hidden_bytes):
        raise ValueError(f"hidden_bytes must be a positive int, got {hidden_bytes!r}")
    # DeepEP counts at least 2 bytes per element; combine moves float32 partials here: twice that.
    return 2 * hidden_bytes


def _hint_topology(num_ranks: int) -> Tuple[int, int]:
    """(ranks per node, nodes) a size hint assumes for ``num_ranks``."""
    if not _is_positive_int(num_ranks):
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    local = os.environ.get("LOCAL_WORLD_SIZE")
    per_node = int(local) if local and local.isdigit() and int(local) > 0 else DEEPEP_NVL_PEERS
    per_node = min(num_ranks, per_node)
    if num_ranks % per_node:
        raise ValueError(f"num_ranks={num_ranks} is not a multiple of the {per_node} ranks per node")
    return per_node, num_ranks // per_node


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0

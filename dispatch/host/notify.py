"""Notify: every call starts with a hierarchical all-gather of one int64 row per rank.

The rows carry the call's sequence number and kind, the rank's verdict on its own arguments,
the shape facts that must agree across ranks, and the counts that size the receive side.
Node rows go through shared memory; each rank then swaps its node's block with its rail peers,
so metadata crosses the slow link once per node pair, like the data.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..errors import PeerTimeoutError
from .node_link import NodeLink
from .rail_link import RailLink, wait_all

HEADER_WORDS = 16
MAX_EXPERTS = 2048
NOTIFY_TAG = 1 << 24

# Header words.
(SEQ, OP, STATUS, HIDDEN, DTYPE, NUM_TOPK, NUM_EXPERTS, NUM_TOKENS, SCALE_COLS, MISSING, WORST, PARTIAL_DTYPE,
 HAS_EXPERT_COUNTS, HAS_WEIGHTS) = range(14)
STATUS_OK, STATUS_BAD_ARGS, STATUS_MISSING_PEER = 0, 1, 2
OP_NAMES = {1: "dispatch", 2: "cached dispatch", 3: "combine"}


def notify_words(num_ranks: int, num_nodes: int) -> int:
    return HEADER_WORDS + num_ranks + num_nodes + MAX_EXPERTS


def exchange(node: NodeLink, rail: RailLink, row: torch.Tensor, timeout_s: float, what: str) -> torch.Tensor:
    """All-gathers ``row`` (int64 ``[words]``) over the whole group: returns ``[R, words]``.

    A rank that times out on a local peer still sends its block, marked with the missing rank,
    so ranks on other nodes name the real culprit rather than the messenger.
    """
    topo = node.topo
    L, N = topo.num_ranks_per_node, topo.num_nodes
    try:
        block = node.exchange_rows(row, timeout_s, what)
    except PeerTimeoutError as error:
        poisoned = row.clone()
        poisoned[STATUS] = STATUS_MISSING_PEER
        poisoned[MISSING] = error.rank
        block = poisoned.expand(L, -1).contiguous()
        _send_block_best_effort(rail, block)
        raise
    matrix = torch.empty((N, L, row.numel()), dtype=torch.int64)
    matrix[topo.node] = block
    if N > 1:
        pending: Dict[int, object] = {}  # peer -> receive, then peer -> send
        sends = {}
        for m in range(N):
            if m == topo.node:
                continue
            peer = topo.rail_peer(m)
            sends[peer] = rail.isend(block, peer, NOTIFY_TAG)
            pending[peer] = rail.irecv(matrix[m], peer, NOTIFY_TAG)
        # Longer than a local wait, so a poisoned block from a peer's node arrives first.
        progress = node.progress(timeout_s * 1.25 + 1.0, what, lambda: min(pending, default=None))
        wait_all(pending, progress)
        # A poisoned block means its sender gave up and will never take ours: check before
        # waiting on our sends.
        _raise_if_poisoned(matrix.view(topo.num_ranks, -1), what, timeout_s)
        pending.update(sends)
        wait_all(pending, progress)
    matrix = matrix.view(topo.num_ranks, -1)
    _raise_if_poisoned(matrix, what, timeout_s)
    return matrix


def _raise_if_poisoned(matrix: torch.Tensor, what: str, timeout_s: float) -> None:
    for row in matrix[:, :HEADER_WORDS].tolist():
        if row[STATUS] == STATUS_MISSING_PEER:
            raise PeerTimeoutError(int(row[MISSING]), f"did not take part in {what}", timeout_s)


def _send_block_best_effort(rail: RailLink, block: torch.Tensor) -> None:
    topo = rail.topo
    if topo.num_nodes == 1:
        return
    for m in range(topo.num_nodes):
        if m != topo.node:
            try:
                rail.isend(block, topo.rail_peer(m), NOTIFY_TAG)
            except Exception:  # the messenger must not mask the original error
                pass


def check_agreement(matrix: torch.Tensor, op: int, my_error: Optional[BaseException]) -> None:
    """Raises on every rank when ranks disagree on the call or one rejected its arguments."""
    # Plain Python over the header words: a handful of small torch ops per check would cost more.
    header = matrix[:, :HEADER_WORDS].tolist()
    seq0 = header[0][SEQ]
    for rank, row in enumerate(header):
        if row[OP] != op or row[SEQ] != seq0:
            raise RuntimeError(
                f"rank {rank} is in {OP_NAMES.get(row[OP], 'another call')} #{row[SEQ]} while this "
                f"rank is in {OP_NAMES[op]} #{seq0}: every rank must make the same calls in the same order")
    if my_error is not None:
        raise my_error
    bad = [rank for rank, row in enumerate(header) if row[STATUS] == STATUS_BAD_ARGS]
    if bad:
        raise ValueError(f"{OP_NAMES[op]}: rank {bad[0]} rejected its arguments (see its error); nothing was sent")


# (header word, what must agree, how a rank's value reads in the message)
Field = Tuple[int, str, Callable[[int], str]]


def check_same(matrix: torch.Tensor, fields: Sequence[Field]) -> None:
    """Raises ``ValueError`` on every rank when a header word differs across ranks, naming the
    setting and both ranks' values in words (a dtype's name, not its code).

    Args:
        matrix: the gathered notify rows.
        fields: the header words that must agree.
    """
    header = matrix[:, :HEADER_WORDS].tolist()
    for word, name, describe in fields:
        first = header[0][word]
        for rank, row in enumerate(header):
            if row[word] != first:
                raise ValueError(f"{name} must be the same on every rank: rank 0 has {describe(first)}, "
                                 f"rank {rank} has {describe(row[word])}")

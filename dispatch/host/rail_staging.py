"""Rail staging of one rank: the buffers rail chunks are packed into before they are sent, and
received into before they are read (chunks sent to a node's outbox land in shared memory
instead, see node_link.py)."""

from __future__ import annotations

from typing import List

import torch

# Slots per remote node and direction: chunk i+1 is packed (or posted) while chunk i is on the wire.
SLOTS_PER_DIRECTION = 2
_MIN_SLOT_BYTES = 4096


class RailStaging:
    """Owns which slot serves which remote node and direction.

    Per remote node (numbered ``0..N-2`` in ascending node order, skipping this rank's own),
    ``SLOTS_PER_DIRECTION`` slots for what this rank sends there (dispatch chunks, combine
    partials) and as many for what it receives from there (combine partials). Memory is taken
    at the first use, so a one-node buffer or a buffer never called costs nothing.

    Args:
        num_remote_nodes: ``N - 1``.
        budget_bytes: ``num_rdma_bytes``, split evenly over the slots.
    """

    def __init__(self, num_remote_nodes: int, budget_bytes: int) -> None:
        self.num_remote_nodes = num_remote_nodes
        num_slots = max(1, 2 * SLOTS_PER_DIRECTION * num_remote_nodes)
        self.slot_bytes = max(_MIN_SLOT_BYTES, budget_bytes // num_slots)
        self._slots: List[torch.Tensor] = []

    def _all(self) -> List[torch.Tensor]:
        if not self._slots:
            self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8)
                           for _ in range(2 * SLOTS_PER_DIRECTION * self.num_remote_nodes)]
        return self._slots

    def send_slots(self, remote_index: int) -> List[torch.Tensor]:
        """The slots this rank packs chunks for remote node ``remote_index`` into."""
        begin = 2 * SLOTS_PER_DIRECTION * remote_index
        return self._all()[begin:begin + SLOTS_PER_DIRECTION]

    def recv_slots(self, remote_index: int) -> List[torch.Tensor]:
        """The slots this rank receives chunks from remote node ``remote_index`` into."""
        begin = 2 * SLOTS_PER_DIRECTION * remote_index + SLOTS_PER_DIRECTION
        return self._all()[begin:begin + SLOTS_PER_DIRECTION]

    def free(self) -> None:
        self._slots = []

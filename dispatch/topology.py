"""Cluster topology: ranks, nodes, local indices and rail peers.

``rank = node * num_ranks_per_node + local_rank``. The *rail peer* of a rank on another node is
the rank of that node with the same local index: the only rank it talks to over the slow link.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """Static description of one rank's place in the cluster.

    Args:
        num_ranks: ``R``, the group size.
        num_ranks_per_node: ``L``, ranks per node (must divide ``R``).
        rank: this rank, in ``[0, R)``.
    """

    num_ranks: int
    num_ranks_per_node: int
    rank: int

    def __post_init__(self) -> None:
        if not isinstance(self.num_ranks_per_node, int) or self.num_ranks_per_node < 1:
            raise ValueError(f"num_ranks_per_node must be a positive int, got {self.num_ranks_per_node!r}")
        if self.num_ranks % self.num_ranks_per_node != 0:
            raise ValueError(
                f"num_ranks_per_node={self.num_ranks_per_node} must divide the group size {self.num_ranks}")
        if self.num_ranks_per_node > 64:
            raise ValueError(f"num_ranks_per_node={self.num_ranks_per_node} exceeds the supported 64")
        if not 0 <= self.rank < self.num_ranks:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_ranks})")

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.num_ranks_per_node

    @property
    def node(self) -> int:
        return self.rank // self.num_ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.num_ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.num_ranks_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.num_ranks_per_node

    def rank_of(self, node: int, local_rank: int) -> int:
        return node * self.num_ranks_per_node + local_rank

    def rail_peer(self, node: int) -> int:
        """The rank on ``node`` with this rank's local index."""
        return self.rank_of(node, self.local_rank)

    def node_ranks(self, node: Optional[int] = None) -> List[int]:
        node = self.node if node is None else node
        return [self.rank_of(node, j) for j in range(self.num_ranks_per_node)]

    def rail_ranks(self, local_rank: Optional[int] = None) -> List[int]:
        local_rank = self.local_rank if local_rank is None else local_rank
        return [self.rank_of(m, local_rank) for m in range(self.num_nodes)]


def detect_num_ranks_per_node(group: "dist.ProcessGroup") -> int:
    """``LOCAL_WORLD_SIZE`` if set, else the number of ranks sharing this rank's host name.

    Collective over ``group`` when the host names are used. Raises ``ValueError`` when ranks
    of one host are not contiguous or hosts hold different rank counts.
    """
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env:
        return int(env)
    hosts: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    per_node = hosts.count(hosts[0])
    for start in range(0, len(hosts), per_node):
        block = hosts[start:start + per_node]
        if len(block) != per_node or any(h != block[0] for h in block):
            raise ValueError("ranks are not grouped into equal contiguous blocks per host; "
                             "pass num_ranks_per_node explicitly")
    return per_node

"""A reference expert-parallel MoE layer built on dispatch/combine, and its dense twin.

:class:`MoELayer` is what a DeepEP user writes: route, dispatch the tokens to the ranks holding
their experts, run the local experts as one grouped MLP over the received tokens, apply the router
weights on the receiving side (``recv_topk_weights``), combine. With :mod:`dispatch.autograd`
underneath it trains: gradients reach the input, the expert weights and, through
``recv_topk_weights``, the router.

:class:`DenseMoE` holds all experts in one process and computes, per token,
``sum_j w_j * expert_{e_j}(x)`` with the same router: the reference the expert-parallel layer is
tested against. :meth:`MoELayer.from_dense` copies a dense model's weights (router whole, experts
sliced to this rank) so both compute the same function.

Expert ``e`` lives on rank ``e // (E / R)``. Node-limited routing (DeepSeek-V3) splits the experts
into ``num_groups`` contiguous groups (by default one per node, so a group is a node), keeps the
``num_topk_groups`` groups with the highest score (sum of their two best expert scores) and picks
the top-``k`` experts among those: each token then crosses the slow link to at most
``num_topk_groups`` nodes.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .autograd import DispatchOutput, differentiable_combine, differentiable_dispatch

__all__ = ["TopKRouter", "GroupedMLP", "DenseMoE", "MoELayer", "group_received_tokens"]


class TopKRouter(nn.Module):
    """Softmax top-k router with optional group-limited (node-limited) routing.

    Args:
        hidden: ``H``, the token size.
        num_experts: ``E``.
        num_topk: ``k`` experts per token.
        num_groups: split the experts into this many contiguous groups (1: no group limit).
        num_topk_groups: keep only this many groups per token (``None``: all groups).
        normalize_weights: divide the ``k`` weights by their sum (else they are the softmax scores).
    """

    def __init__(self, hidden: int, num_experts: int, num_topk: int, *, num_groups: int = 1,
                 num_topk_groups: Optional[int] = None, normalize_weights: bool = False) -> None:
        super().__init__()
        if num_experts % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts}")
        num_topk_groups = num_groups if num_topk_groups is None else num_topk_groups
        if not 1 <= num_topk_groups <= num_groups:
            raise ValueError(f"num_topk_groups={num_topk_groups} must be in [1, num_groups={num_groups}]")
        if not 1 <= num_topk <= num_topk_groups * (num_experts // num_groups):
            raise ValueError(f"num_topk={num_topk} must be in [1, {num_topk_groups * (num_experts // num_groups)}]"
                             f" (the experts of num_topk_groups={num_topk_groups} groups)")
        self.hidden = hidden
        self.num_experts = num_experts
        self.num_topk = num_topk
        self.num_groups = num_groups
        self.num_topk_groups = num_topk_groups
        self.normalize_weights = normalize_weights
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        nn.init.normal_(self.weight, std=hidden ** -0.5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Route ``x``.

        Args:
            x: ``[T, H]`` tokens.

        Returns:
            topk_idx: ``[T, k]`` int64 expert ids (distinct per token).
            topk_weights: ``[T, k]`` float32 weights, differentiable w.r.t. ``x`` and the router weight.
        """
        # Scores in float32 whatever the activation dtype: routing decisions are precision-sensitive.
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        choice = scores.detach()
        if self.num_topk_groups < self.num_groups:
            num_tokens = x.size(0)
            per_group = self.num_experts // self.num_groups
            grouped = choice.view(num_tokens, self.num_groups, per_group)
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
            group_idx = group_scores.topk(self.num_topk_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, self.num_experts)
        topk_idx = choice.topk(self.num_topk, dim=-1).indices
        topk_weights = scores.gather(1, topk_idx)
        if self.normalize_weights:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weights


class GroupedMLP(nn.Module):
    """``num_experts`` independent MLPs ``silu(x @ w1[e]) @ w2[e]`` over contiguous row segments.

    Args:
        num_experts: experts held here (the local experts of a rank, or all of them when dense).
        hidden: ``H``.
        ffn_hidden: ``F``, the inner size of each expert.
    """

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden))
        nn.init.normal_(self.w1, std=hidden ** -0.5)
        nn.init.normal_(self.w2, std=ffn_hidden ** -0.5)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on the rows ``x`` (``[M, H]``)."""
        return F.silu(x @ self.w1[e].to(x.dtype)) @ self.w2[e].to(x.dtype)

    def forward(self, x: torch.Tensor, num_rows_per_expert: List[int]) -> torch.Tensor:
        """Run expert ``e`` on the ``e``-th segment of rows.

        Args:
            x: ``[sum(num_rows_per_expert), H]`` rows grouped by expert.
            num_rows_per_expert: segment sizes (may include padding rows).

        Returns:
            ``[sum(num_rows_per_expert), H]`` outputs in the same layout.
        """
        if len(num_rows_per_expert) != self.num_experts:
            raise ValueError(f"num_rows_per_expert has {len(num_rows_per_expert)} entries, "
                             f"expected {self.num_experts}")
        # One matmul pair per expert, empty segments included, so every rank builds the same graph.
        segments = torch.split(x, num_rows_per_expert, dim=0)
        return torch.cat([self.expert(e, seg) for e, seg in enumerate(segments)], dim=0)


def group_received_tokens(recv_topk_idx: torch.Tensor, num_recv_tokens_per_expert_list: List[int]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each (received row, top-k slot) pair goes in the expert-grouped layout.

    The grouped layout has one segment per local expert, of ``num_recv_tokens_per_expert_list[e]``
    rows (the real pairs of ``e`` first, in received-row order, then zero padding up to the
    ``expert_alignment`` multiple), as a grouped GEMM expects.

    Args:
        recv_topk_idx: ``[n, k]`` local expert ids from dispatch, ``-1`` for none.
        num_recv_tokens_per_expert_list: segment sizes from dispatch.

    Returns:
        row_idx: ``[M]`` received row of each pair.
        slot_idx: ``[M]`` top-k slot of each pair.
        grouped_pos: ``[M]`` row of each pair in the grouped layout.
    """
    num_local_experts = len(num_recv_tokens_per_expert_list)
    row_idx, slot_idx = (recv_topk_idx >= 0).nonzero(as_tuple=True)
    expert_idx = recv_topk_idx[row_idx, slot_idx]
    order = torch.argsort(expert_idx, stable=True)
    row_idx, slot_idx, expert_idx = row_idx[order], slot_idx[order], expert_idx[order]
    counts = torch.bincount(expert_idx, minlength=num_local_experts)
    device = recv_topk_idx.device  # everything stays on the tokens' device (CPU or GPU)
    segment_sizes = torch.tensor(num_recv_tokens_per_expert_list, dtype=torch.int64, device=device)
    if bool((counts > segment_sizes).any()):
        raise RuntimeError(f"dispatch reported num_recv_tokens_per_expert_list={num_recv_tokens_per_expert_list} "
                           f"but recv_topk_idx holds {counts.tolist()} pairs per local expert")
    segment_start = torch.cumsum(segment_sizes, 0) - segment_sizes
    pair_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(expert_idx.numel(), device=device) - pair_start[expert_idx]
    grouped_pos = segment_start[expert_idx] + rank_in_expert
    return row_idx, slot_idx, grouped_pos


def _group_info(group: Any) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class MoELayer(nn.Module):
    """Expert-parallel MoE layer: route, dispatch, grouped local experts, weight, combine.

    Holds the router (replicated: its gradient is this rank's share, all-reduce it for data
    parallel training) and the ``E / R`` local experts of this rank. ``forward`` is collective:
    every rank of the buffer's group calls it (with its own tokens, possibly none).

    Args:
        buffer: a :class:`dispatch.Buffer` (any backend).
        hidden: ``H``.
        ffn_hidden: ``F`` of each expert.
        num_experts: ``E`` over all ranks (a multiple of the group size).
        num_topk: ``k``.
        num_topk_groups: node-limited routing: each token goes to at most this many nodes
            (``None``: no limit).
        num_groups: groups for ``num_topk_groups`` (default: the number of nodes, which needs
            ``num_ranks_per_node`` from the buffer or the argument).
        normalize_weights: renormalize the ``k`` weights to sum to 1.
        expert_alignment: pad each local expert's segment to a multiple of this (grouped GEMM).
        num_worst_tokens: if ``> 0``, dispatch to exactly this many rows (static shapes).
        config: passed on to the buffer.
        group: the process group (default: ``buffer.group``).
        num_ranks_per_node: ``L`` (default: taken from the buffer).
    """

    def __init__(self, buffer: Any, hidden: int, ffn_hidden: int, num_experts: int, num_topk: int, *,
                 num_topk_groups: Optional[int] = None, num_groups: Optional[int] = None,
                 normalize_weights: bool = False, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Any = None, group: Any = None, num_ranks_per_node: Optional[int] = None) -> None:
        super().__init__()
        group = group if group is not None else getattr(buffer, "group", None)
        self.rank, self.num_ranks = _group_info(group)
        if num_experts % self.num_ranks != 0:
            raise ValueError(f"num_experts={num_experts} must be a multiple of the group size {self.num_ranks}")
        if num_groups is None:
            if num_topk_groups is None:
                num_groups = 1
            else:
                # Node-limited routing: one group per node.
                if num_ranks_per_node is None:
                    num_ranks_per_node = _buffer_ranks_per_node(buffer)
                num_groups = self.num_ranks // num_ranks_per_node
        self.buffer = buffer
        self.hidden = hidden
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.num_ranks
        self.expert_alignment = expert_alignment
        self.num_worst_tokens = num_worst_tokens
        self.config = config
        self.router = TopKRouter(hidden, num_experts, num_topk, num_groups=num_groups,
                                 num_topk_groups=num_topk_groups, normalize_weights=normalize_weights)
        self.experts = GroupedMLP(self.num_local_experts, hidden, ffn_hidden)
        self.last_topk_idx: Optional[torch.Tensor] = None

    @classmethod
    def from_dense(cls, dense: "DenseMoE", buffer: Any, **kwargs: Any) -> "MoELayer":
        """An expert-parallel layer computing the same function as ``dense`` (weights copied).

        Args:
            dense: the dense model (identical on every rank).
            buffer: the buffer to communicate with.
            kwargs: further :class:`MoELayer` arguments (``expert_alignment``, ``num_worst_tokens``, ...).
        """
        r = dense.router
        layer = cls(buffer, dense.hidden, dense.ffn_hidden, r.num_experts, r.num_topk,
                    num_topk_groups=r.num_topk_groups if r.num_topk_groups < r.num_groups else None,
                    num_groups=r.num_groups, normalize_weights=r.normalize_weights, **kwargs)
        lo = layer.rank * layer.num_local_experts
        hi = lo + layer.num_local_experts
        with torch.no_grad():
            layer.router.weight.copy_(r.weight)
            layer.experts.w1.copy_(dense.experts.w1[lo:hi])
            layer.experts.w2.copy_(dense.experts.w2[lo:hi])
        return layer

    def run_local_experts(self, out: DispatchOutput) -> torch.Tensor:
        """Grouped local experts on the received tokens, weighted by ``recv_topk_weights``.

        Args:
            out: the dispatch result.

        Returns:
            ``[n, H]`` (``n`` = rows of ``recv_x``): per received row, the weighted sum of its local
            experts' outputs (0 for padding rows), ready for combine.
        """
        recv_x = out.recv_x
        row_idx, slot_idx, grouped_pos = group_received_tokens(
            out.recv_topk_idx, out.num_recv_tokens_per_expert_list)
        num_grouped_rows = sum(out.num_recv_tokens_per_expert_list)
        grouped_x = recv_x.new_zeros(num_grouped_rows, recv_x.size(1)).index_copy(
            0, grouped_pos, recv_x[row_idx])
        grouped_y = self.experts(grouped_x, out.num_recv_tokens_per_expert_list)
        # Weights applied here, on the receiving side, so the router's gradient flows back through
        # recv_topk_weights and the dispatch backward.
        weights = out.recv_topk_weights[row_idx, slot_idx].to(recv_x.dtype).unsqueeze(1)
        return recv_x.new_zeros(recv_x.shape).index_add(0, row_idx, grouped_y[grouped_pos] * weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Collective MoE forward.

        Args:
            x: ``[T, H]`` this rank's tokens (``T`` may differ across ranks, may be 0).

        Returns:
            ``[T, H]``: per token ``sum_j w_j * expert_{e_j}(x)``.
        """
        topk_idx, topk_weights = self.router(x)
        self.last_topk_idx = topk_idx
        out = differentiable_dispatch(self.buffer, x, topk_idx, topk_weights, self.num_experts,
                                      expert_alignment=self.expert_alignment,
                                      num_worst_tokens=self.num_worst_tokens, config=self.config)
        y = self.run_local_experts(out)
        return differentiable_combine(self.buffer, y, out.handle, config=self.config)


def _buffer_ranks_per_node(buffer: Any) -> int:
    """``L`` as the buffer knows it (``buffer.topology``, or a ``num_ranks_per_node`` attribute)."""
    topology = getattr(buffer, "topology", None)
    if topology is not None and hasattr(topology, "num_ranks_per_node"):
        return int(topology.num_ranks_per_node)
    value = getattr(buffer, "num_ranks_per_node", None)
    if isinstance(value, int) and value > 0:
        return value
    # Guessing (e.g. one node) would silently disable node-limited routing: ask instead.
    raise ValueError("cannot tell num_ranks_per_node from the buffer; pass num_ranks_per_node "
                     "(or num_groups) to MoELayer")


class DenseMoE(nn.Module):
    """Single-process MoE with all experts: the reference for :class:`MoELayer`.

    Args:
        hidden: ``H``.
        ffn_hidden: ``F`` of each expert.
        num_experts: ``E``.
        num_topk: ``k``.
        num_groups: router groups (the number of nodes, for node-limited routing).
        num_topk_groups: groups kept per token (``None``: all).
        normalize_weights: renormalize the ``k`` weights.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, num_topk: int, *,
                 num_groups: int = 1, num_topk_groups: Optional[int] = None,
                 normalize_weights: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.ffn_hidden = ffn_hidden
        self.router = TopKRouter(hidden, num_experts, num_topk, num_groups=num_groups,
                                 num_topk_groups=num_topk_groups, normalize_weights=normalize_weights)
        self.experts = GroupedMLP(num_experts, hidden, ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H] -> [T, H]``: per token ``sum_j w_j * expert_{e_j}(x)``, summed in slot order."""
        topk_idx, topk_weights = self.router(x)
        out = torch.zeros_like(x)
        for j in range(topk_idx.size(1)):
            for e in range(self.experts.num_experts):
                tokens = (topk_idx[:, j] == e).nonzero(as_tuple=True)[0]
                if tokens.numel() == 0:
                    continue
                y = self.experts.expert(e, x[tokens]) * topk_weights[tokens, j].to(x.dtype).unsqueeze(1)
                out = out.index_add(0, tokens, y)
        return out

"""Gradients of dispatch and combine (``dispatch.autograd``): ``torch.autograd.gradcheck`` in float64.

Dispatch and combine are collective, so a per-rank gradcheck would mix ranks: the backward of a
dispatch on rank ``r`` sums the cotangents of *every* rank. Instead every rank checks the same
*global* function of the inputs of all ranks: it takes the stacked inputs ``[R, ...]`` (identical
on every rank), keeps its own slice (backward: all-reduce, so every rank gets the full gradient),
runs the collective, and all-gathers the outputs (backward: keep its own slice, the cotangent
being identical on every rank). gradcheck then compares the full Jacobian, including the routes
across nodes, on every rank in lockstep (same inputs, same order of evaluations).
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dispatch
from dispatch.autograd import _fit_rows, differentiable_combine, differentiable_dispatch

NUM_TOKENS = 3      # per rank
HIDDEN = 2
NUM_TOPK = 2
EXPERTS_PER_RANK = 2


# ----------------------------------------------------------------------------------------------
# global-function helpers (run inside the workers)
# ----------------------------------------------------------------------------------------------

class _Shard(torch.autograd.Function):
    """``X[R, ...] -> X[rank]``; backward all-reduces, so every rank holds the full gradient."""

    @staticmethod
    def forward(ctx: Any, stacked: torch.Tensor, rank: int, group: Any) -> torch.Tensor:
        ctx.rank, ctx.group, ctx.shape = rank, group, stacked.shape
        return stacked[rank].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        full = grad.new_zeros(ctx.shape)
        full[ctx.rank] = grad
        dist.all_reduce(full, group=ctx.group)
        return full, None, None


class _AllGather(torch.autograd.Function):
    """``x`` (same shape on every rank) -> ``[R, ...]``; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rank: int, group: Any) -> torch.Tensor:
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad[ctx.rank].clone(), None, None


def _routing(world_size: int, seed: int) -> List[torch.Tensor]:
    """Per-rank ``topk_idx`` with distinct experts per token, some ``-1`` and one unrouted token."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = EXPERTS_PER_RANK * world_size
    result = []
    for r in range(world_size):
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:NUM_TOPK] for _ in range(NUM_TOKENS)])
        idx[0, 1] = -1
        if r == 0:
            idx[1] = -1  # a token sent nowhere: its gradient must be exactly 0
        result.append(idx)
    return result


def _num_recv(all_topk_idx: List[torch.Tensor], rank: int) -> int:
    dest = torch.cat(all_topk_idx).div(EXPERTS_PER_RANK, rounding_mode="floor")
    return int(((dest == rank) & (torch.cat(all_topk_idx) >= 0)).any(dim=1).sum())


def _check(name: str, fn: Any, inputs: tuple, errors: Dict[str, str]) -> None:
    try:
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, raise_exception=True)
    except Exception as exc:  # every rank fails identically (same global function), so no hang
        errors[name] = f"{type(exc).__name__}: {exc}"[:2000]


def _gradcheck_job(ctx: Any, seed: int) -> Dict[str, str]:
    rank, world_size, group = ctx.rank, ctx.world_size, ctx.group
    num_experts = EXPERTS_PER_RANK * world_size
    all_topk_idx = _routing(world_size, seed)
    topk_idx = all_topk_idx[rank]
    num_recv = [_num_recv(all_topk_idx, r) for r in range(world_size)]
    max_recv = max(num_recv)
    gen = torch.Generator().manual_seed(seed + 1)
    x_all = torch.randn(world_size, NUM_TOKENS, HIDDEN, dtype=torch.float64, generator=gen)
    w_all = torch.rand(world_size, NUM_TOKENS, NUM_TOPK, dtype=torch.float64, generator=gen)
    y_all = torch.randn(world_size, max_recv, HIDDEN, dtype=torch.float64, generator=gen)
    bias_all = torch.randn(world_size, NUM_TOKENS, HIDDEN, dtype=torch.float64, generator=gen)
    errors: Dict[str, str] = {}

    buf = dispatch.Buffer(group, num_ranks_per_node=ctx.ranks_per_node)
    try:
        def dispatch_fn(x_stacked: torch.Tensor, w_stacked: torch.Tensor, num_worst_tokens: int = 0):
            x = _Shard.apply(x_stacked, rank, group)
            w = _Shard.apply(w_stacked, rank, group)
            out = differentiable_dispatch(buf, x, topk_idx, w, num_experts, num_worst_tokens=num_worst_tokens)
            pad = max_recv - out.recv_x.size(0) if num_worst_tokens == 0 else 0
            recv_x = F.pad(out.recv_x, (0, 0, 0, pad))
            recv_w = F.pad(out.recv_topk_weights, (0, 0, 0, pad))
            return _AllGather.apply(recv_x, rank, group), _AllGather.apply(recv_w, rank, group)

        _check("dispatch", dispatch_fn, (x_all.clone().requires_grad_(), w_all.clone().requires_grad_()), errors)
        worst = max_recv + 2
        _check("dispatch num_worst_tokens",
               lambda x, w: dispatch_fn(x, w, worst),
               (x_all.clone().requires_grad_(), w_all.clone().requires_grad_()), errors)

        # Combine along a fixed handle (the routing does not depend on the values).
        with torch.no_grad():
            handle = differentiable_dispatch(buf, x_all[rank], topk_idx, w_all[rank], num_experts).handle
            handle_worst = differentiable_dispatch(buf, x_all[rank], topk_idx, w_all[rank], num_experts,
                                                   num_worst_tokens=worst).handle

        def combine_fn(y_stacked: torch.Tensor, bias_stacked: torch.Tensor, h: Any, num_rows: int):
            y = _fit_rows(_Shard.apply(y_stacked, rank, group), num_rows)
            bias = _Shard.apply(bias_stacked, rank, group)
            return _AllGather.apply(differentiable_combine(buf, y, h, bias=bias), rank, group)

        _check("combine", lambda y, b: combine_fn(y, b, handle, num_recv[rank]),
               (y_all.clone().requires_grad_(), bias_all.clone().requires_grad_()), errors)
        # After a num_worst_tokens dispatch, combine takes W rows; the padding gets zero gradient.
        y_worst = torch.randn(world_size, worst, HIDDEN, dtype=torch.float64, generator=gen)
        _check("combine num_worst_tokens", lambda y, b: combine_fn(y, b, handle_worst, worst),
               (y_worst.requires_grad_(), bias_all.clone().requires_grad_()), errors)
    finally:
        buf.destroy()
    return errors


@pytest.mark.parametrize("shape", [(1, 2), (2, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gradcheck_dispatch_combine(cluster_factory, shape):
    cluster = cluster_factory(*shape)
    results = cluster.run(_gradcheck_job, 1234, timeout_s=300)
    assert results[0] == {}, "\n".join(f"{k}: {v}" for k, v in results[0].items())
    assert all(r == results[0] for r in results)


# ----------------------------------------------------------------------------------------------
# float32 weight path (the buffer's own recv_topk_weights / combined_topk_weights)
# ----------------------------------------------------------------------------------------------

def _float32_job(ctx: Any, seed: int) -> Dict[str, torch.Tensor]:
    """Grad of ``(rank + 1) * (sum(recv_x) + sum(recv_topk_weights))`` on every rank.

    Known in closed form: a source token's ``x`` gradient is the sum of ``d + 1`` over the ranks
    ``d`` that received it; ``topk_weights[t, j]``'s is ``d + 1`` for the rank holding expert
    ``topk_idx[t, j]``, 0 for ``-1``. Exact in float32 (small integers)."""
    rank, world_size = ctx.rank, ctx.world_size
    num_experts = EXPERTS_PER_RANK * world_size
    topk_idx = _routing(world_size, seed)[rank]
    gen = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).requires_grad_()
    w = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen).requires_grad_()
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node)
    try:
        out = differentiable_dispatch(buf, x, topk_idx, w, num_experts)
        scale = float(rank + 1)  # tells the receivers apart in the gradient
        loss = (out.recv_x * scale).sum() + (out.recv_topk_weights * scale).sum()
        loss.backward()
    finally:
        buf.destroy()
    return {"topk_idx": topk_idx, "grad_x": x.grad, "grad_w": w.grad}


def test_float32_weight_gradients(cluster_factory):
    shape = (2, 2)
    world_size = shape[0] * shape[1]
    results = cluster_factory(*shape).run(_float32_job, 99, timeout_s=120)
    for res in results:
        idx = res["topk_idx"]
        dest = torch.where(idx >= 0, idx.div(EXPERTS_PER_RANK, rounding_mode="floor"), -1)
        # grad_x[t] = sum over distinct receiving ranks d of (d + 1)
        expected_x = torch.zeros(NUM_TOKENS)
        for t in range(NUM_TOKENS):
            for d in range(world_size):
                if (dest[t] == d).any():
                    expected_x[t] += d + 1
        torch.testing.assert_close(res["grad_x"], expected_x[:, None].expand(-1, HIDDEN), rtol=0, atol=0)
        # grad_w[t, j] = (d + 1) for the one rank d holding expert j, 0 for j == -1
        expected_w = torch.where(dest >= 0, dest + 1, 0).float()
        torch.testing.assert_close(res["grad_w"], expected_w, rtol=0, atol=0)

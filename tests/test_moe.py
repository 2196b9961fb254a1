"""The expert-parallel :class:`dispatch.moe.MoELayer` against the single-process :class:`DenseMoE`.

On emulated 1x2, 2x2 and 2x4 clusters every rank runs the EP layer on its own tokens (one rank
with none) and backpropagates a random cotangent; the forward output and every gradient (input,
router, expert weights) must match the dense model with the same weights, run in the parent
process on the same per-rank token batches, in float32 with a tight tolerance.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch

import dispatch
from dispatch.moe import DenseMoE, GroupedMLP, MoELayer, TopKRouter, group_received_tokens

HIDDEN = 16
FFN_HIDDEN = 32
NUM_EXPERTS = 8
NUM_TOPK = 3
TOLERANCE = dict(rtol=1e-5, atol=1e-5)

# (num_nodes, ranks_per_node), tokens per rank, layer options; together they cover node-limited
# routing, expert alignment, num_worst_tokens, weight normalisation and ranks without tokens.
CASES: Dict[str, Dict[str, Any]] = {
    "1x2": dict(shape=(1, 2), tokens=[24, 17], kwargs={}),
    "2x2": dict(shape=(2, 2), tokens=[20, 7, 33, 16],
                kwargs=dict(num_topk_groups=1, expert_alignment=4)),
    "2x4": dict(shape=(2, 4), tokens=[16, 9, 5, 21, 16, 30, 12, 16],
                kwargs=dict(num_topk_groups=1, normalize_weights=True, num_worst_tokens=160)),
    # Ranks with no tokens still run every collective, forward and backward, in step.
    "2x2-empty-ranks": dict(shape=(2, 2), tokens=[0, 19, 0, 11], kwargs=dict(num_topk_groups=1)),
}


def _dense(num_nodes: int, kwargs: Dict[str, Any], seed: int = 0) -> DenseMoE:
    torch.manual_seed(seed)
    return DenseMoE(HIDDEN, FFN_HIDDEN, NUM_EXPERTS, NUM_TOPK,
                    num_groups=num_nodes if kwargs.get("num_topk_groups") else 1,
                    num_topk_groups=kwargs.get("num_topk_groups"),
                    normalize_weights=kwargs.get("normalize_weights", False))


def _rank_data(rank: int, num_tokens: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    grad_out = torch.randn(num_tokens, HIDDEN, generator=gen)
    return [x, grad_out]


def _layer_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in ("expert_alignment", "num_worst_tokens")}


def _ep_job(ctx: Any, tokens: List[int], kwargs: Dict[str, Any], num_steps: int = 2) -> Dict[str, Any]:
    """Run the EP layer ``num_steps`` times (forward + backward) and return the last step's results."""
    dense = _dense(ctx.num_nodes, kwargs)
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node)
    try:
        layer = MoELayer.from_dense(dense, buf, **_layer_kwargs(kwargs))
        x, grad_out = _rank_data(ctx.rank, tokens[ctx.rank])
        for _ in range(num_steps):  # twice: a second step must reuse nothing stale
            layer.zero_grad()
            x_in = x.clone().requires_grad_()
            y = layer(x_in)
            y.backward(grad_out)
    finally:
        buf.destroy()
    return {
        "y": y.detach(), "grad_x": x_in.grad, "grad_router": layer.router.weight.grad,
        "grad_w1": layer.experts.w1.grad, "grad_w2": layer.experts.w2.grad,
        "topk_idx": layer.last_topk_idx,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_ep_layer_matches_dense(cluster_factory, case):
    shape, tokens, kwargs = CASES[case]["shape"], CASES[case]["tokens"], CASES[case]["kwargs"]
    num_nodes, ranks_per_node = shape
    results = cluster_factory(num_nodes, ranks_per_node).run(_ep_job, tokens, kwargs, timeout_s=240)

    dense = _dense(num_nodes, kwargs)
    for rank, res in enumerate(results):
        # Dense reference per rank batch: same shapes, so the router matmul rounds identically
        # and both sides pick the same experts.
        x, grad_out = _rank_data(rank, tokens[rank])
        x.requires_grad_()
        y = dense(x)
        if y.requires_grad:  # False for a rank without tokens (nothing routed)
            y.backward(grad_out)
        grad_x = x.grad if x.grad is not None else torch.zeros_like(x)
        torch.testing.assert_close(res["topk_idx"], dense.router(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(res["y"], y.detach(), **TOLERANCE, msg=lambda m: f"rank {rank} output: {m}")
        torch.testing.assert_close(res["grad_x"], grad_x, **TOLERANCE, msg=lambda m: f"rank {rank} grad x: {m}")

    # The router is replicated: its full gradient is the sum of the ranks' shares.
    grad_router = torch.stack([res["grad_router"] for res in results]).sum(0)
    torch.testing.assert_close(grad_router, dense.router.weight.grad, **TOLERANCE)
    # Expert e lives on rank e // (E / R): concatenating the local gradients gives all experts.
    torch.testing.assert_close(torch.cat([res["grad_w1"] for res in results]), dense.experts.w1.grad, **TOLERANCE)
    torch.testing.assert_close(torch.cat([res["grad_w2"] for res in results]), dense.experts.w2.grad, **TOLERANCE)
    assert dense.router.weight.grad.abs().sum() > 0  # the router really receives a gradient

    if kwargs.get("num_topk_groups"):
        # Node-limited routing: every token reaches at most num_topk_groups nodes.
        experts_per_node = NUM_EXPERTS // num_nodes
        for res in results:
            nodes = res["topk_idx"] // experts_per_node
            per_token = [len(set(row.tolist())) for row in nodes]
            assert all(n <= kwargs["num_topk_groups"] for n in per_token)


# ----------------------------------------------------------------------------------------------
# single-process parts
# ----------------------------------------------------------------------------------------------

def test_router_node_limited_picks_best_groups():
    torch.manual_seed(0)
    router = TopKRouter(HIDDEN, 16, 4, num_groups=4, num_topk_groups=2)
    x = torch.randn(64, HIDDEN)
    topk_idx, topk_weights = router(x)
    scores = torch.nn.functional.linear(x, router.weight).softmax(-1)  # as the router computes it
    grouped = scores.view(64, 4, 4)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    for t in range(64):
        best_groups = set(group_scores[t].topk(2).indices.tolist())
        assert set((topk_idx[t] // 4).tolist()) <= best_groups
        allowed = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in sorted(best_groups)])
        expected = allowed[scores[t, allowed].topk(4).indices]
        assert sorted(topk_idx[t].tolist()) == sorted(expected.tolist())
    torch.testing.assert_close(topk_weights, scores.gather(1, topk_idx))


def test_router_weights_and_validation():
    torch.manual_seed(0)
    router = TopKRouter(HIDDEN, 8, 2, normalize_weights=True)
    _, topk_weights = router(torch.randn(10, HIDDEN))
    torch.testing.assert_close(topk_weights.sum(-1), torch.ones(10))
    with pytest.raises(ValueError, match="num_topk"):
        TopKRouter(HIDDEN, 8, 5, num_groups=2, num_topk_groups=1)
    with pytest.raises(ValueError, match="num_groups"):
        TopKRouter(HIDDEN, 8, 2, num_groups=3)
    # Zero tokens route to empty outputs.
    idx, w = router(torch.zeros(0, HIDDEN))
    assert idx.shape == (0, 2) and w.shape == (0, 2)


def test_group_received_tokens_layout():
    recv_topk_idx = torch.tensor([[1, -1, 0], [-1, -1, -1], [0, 1, -1], [1, -1, -1]])
    counts_aligned = [4, 4]  # 2 and 3 real pairs, aligned to 4
    row_idx, slot_idx, pos = group_received_tokens(recv_topk_idx, counts_aligned)
    got = sorted(zip(pos.tolist(), row_idx.tolist(), slot_idx.tolist()))
    # expert 0: rows 0, 2 -> positions 0, 1; expert 1: rows 0, 2, 3 -> positions 4, 5, 6
    assert got == [(0, 0, 2), (1, 2, 0), (4, 0, 0), (5, 2, 1), (6, 3, 0)]
    with pytest.raises(RuntimeError, match="num_recv_tokens_per_expert_list"):
        group_received_tokens(recv_topk_idx, [1, 4])


def test_grouped_mlp_matches_per_expert_loop():
    torch.manual_seed(0)
    mlp = GroupedMLP(3, HIDDEN, FFN_HIDDEN)
    x = torch.randn(7, HIDDEN)
    out = mlp(x, [2, 0, 5])
    expected = torch.cat([mlp.expert(0, x[:2]), mlp.expert(2, x[2:])])
    torch.testing.assert_close(out, expected)


def test_dense_moe_matches_per_token_formula():
    torch.manual_seed(0)
    dense = DenseMoE(HIDDEN, FFN_HIDDEN, NUM_EXPERTS, NUM_TOPK)
    x = torch.randn(12, HIDDEN)
    y = dense(x)
    topk_idx, topk_weights = dense.router(x)
    for t in range(12):
        expected = sum(topk_weights[t, j] * dense.experts.expert(int(topk_idx[t, j]), x[t:t + 1])[0]
                       for j in range(NUM_TOPK))
        torch.testing.assert_close(y[t], expected)

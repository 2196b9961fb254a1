"""Buffer.get_dispatch_layout against reference_layout (int64 and int32 topk_idx)."""

from __future__ import annotations

import pytest
import torch

from dispatch.reference import reference_layout
from tests.dispatch_utils import SHAPE_IDS, SHAPES, diff, failures, gen, make_routing, shape_results


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_layout_in_every_case(cluster_factory, shape):
    """The layout of every dispatch case (random, node-limited, one-rank, empty ranks, int32 ids)."""
    fails = failures(shape_results(cluster_factory, shape), categories=["layout"])
    assert not fails, "\n".join(fails[:30])


def _job_layout_sweep(ctx, seed):
    import dispatch

    R, L = ctx.world_size, ctx.ranks_per_node
    fails = []
    with dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=15.0) as buf:
        for i, (T, k, per_rank, routing, neg) in enumerate([
                (0, 4, 2, "random", 0.0), (1, 1, 1, "random", 0.0), (37, 8, 4, "random", 0.3),
                (64, 6, 3, "node_limited", 0.1), (50, 2, 2, "one_rank", 0.0), (20, 3, 5, "random", 1.0)]):
            E = per_rank * R
            topk = make_routing(gen(seed, ctx.rank, i), T, E, min(k, E), R, L, routing, neg,
                                target_rank=(i + ctx.rank) % R)
            want = reference_layout(topk, E, R, L)
            for dtype in (torch.int64, torch.int32):
                got = buf.get_dispatch_layout(topk.to(dtype), E)
                for name, g, w in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank",
                                       "num_tokens_per_expert", "is_token_in_rank"), got[:4], want):
                    msg = diff(name, g, w)
                    if msg:
                        fails.append(f"case {i} {dtype}: {msg}")
    return fails


@pytest.mark.parametrize("shape", [(1, 4), (4, 2)], ids=["1x4", "4x2"])
def test_layout_sweep(cluster_factory, shape):
    results = cluster_factory(*shape).run(_job_layout_sweep, 5)
    fails = [f"rank {r}: {m}" for r, res in enumerate(results) for m in res]
    assert not fails, "\n".join(fails[:30])

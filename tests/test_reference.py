"""The reference itself (hand-computed tiny cases, an independent scalar loop) and the cluster harness."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from dispatch.reference import (reference_combine, reference_dispatch, reference_is_token_in_rank,
                                reference_layout, reference_traffic)
from tests.cluster import Cluster, ClusterTimeout, JobFailed, WorkerDied


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_layout_hand_computed(idx_dtype):
    # R=4, L=2, E=8: rank r holds experts 2r, 2r+1
    topk_idx = torch.tensor([[0, 3], [-1, -1], [7, 6], [2, -1]], dtype=idx_dtype)
    per_rank, per_rdma, per_expert, in_rank = reference_layout(topk_idx, 8, 4, 2)
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == [1, 2, 0, 1]
    assert per_rdma.dtype == torch.int32 and per_rdma.tolist() == [2, 1]
    assert per_expert.dtype == torch.int32 and per_expert.tolist() == [1, 0, 1, 1, 0, 0, 1, 1]
    assert in_rank.dtype == torch.bool
    assert in_rank.tolist() == [[True, True, False, False], [False] * 4,
                                [False, False, False, True], [False, True, False, False]]
    # one node: no per-node counts
    assert reference_layout(topk_idx, 8, 4, 4)[1] is None


def test_layout_empty_and_duplicates():
    per_rank, per_rdma, per_expert, in_rank = reference_layout(torch.zeros(0, 3, dtype=torch.long), 4, 2, 1)
    assert per_rank.tolist() == [0, 0] and per_rdma.tolist() == [0, 0]
    assert per_expert.tolist() == [0] * 4 and in_rank.shape == (0, 2)
    with pytest.raises(ValueError):
        reference_layout(torch.tensor([[4]]), 4, 2, 1)
    with pytest.raises(ValueError):
        reference_layout(torch.tensor([[0]]), 5, 2, 1)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------

def _tiny_dispatch_inputs():
    xs = [torch.tensor([[1., 2.], [3., 4.], [5., 6.]]), torch.tensor([[7., 8.]])]
    topk = [torch.tensor([[0, 3], [2, -1], [1, 0]]), torch.tensor([[3, 1]])]
    weights = [torch.tensor([[.5, .25], [1., 0.], [.125, .75]]), torch.tensor([[.1, .2]])]
    return xs, topk, weights


def test_dispatch_hand_computed():
    xs, topk, weights = _tiny_dispatch_inputs()  # R=2, E=4: rank 0 has experts 0,1; rank 1 has 2,3
    r0 = reference_dispatch(xs, topk, weights, 4, 2, 0)
    assert r0["recv_x"].tolist() == [[1., 2.], [5., 6.], [7., 8.]]
    assert r0["recv_topk_idx"].dtype == torch.int64
    assert r0["recv_topk_idx"].tolist() == [[0, -1], [1, 0], [-1, 1]]
    assert r0["recv_topk_weights"].dtype == torch.float32
    assert torch.equal(r0["recv_topk_weights"], torch.tensor([[.5, 0.], [.125, .75], [0., .2]]))
    assert r0["num_recv_tokens_per_expert_list"] == [2, 2]
    assert r0["recv_src_rank"].tolist() == [0, 0, 1] and r0["recv_src_token"].tolist() == [0, 2, 0]

    r1 = reference_dispatch(xs, topk, weights, 4, 1, 1, expert_alignment=4)
    assert r1["recv_x"].tolist() == [[1., 2.], [3., 4.], [7., 8.]]
    assert r1["recv_topk_idx"].tolist() == [[-1, 1], [0, -1], [1, -1]]
    assert torch.equal(r1["recv_topk_weights"], torch.tensor([[0., .25], [1., 0.], [.1, 0.]]))
    assert r1["num_recv_tokens_per_expert_list"] == [4, 4]  # [1, 2] rounded up to 4
    assert r1["recv_src_rank"].tolist() == [0, 0, 1] and r1["recv_src_token"].tolist() == [0, 1, 0]

    no_w = reference_dispatch(xs, topk, None, 4, 2, 1)
    assert no_w["recv_topk_weights"] is None


def test_dispatch_fp8_pair_and_empty():
    h = 200
    x8 = torch.randn(3, h).to(torch.float8_e4m3fn)
    scales = torch.rand(3, 2)
    xs = [(x8, scales), (torch.zeros(0, h, dtype=torch.float8_e4m3fn), torch.zeros(0, 2))]
    topk = [torch.tensor([[1], [-1], [1]]), torch.zeros(0, 1, dtype=torch.long)]
    out1 = reference_dispatch(xs, topk, None, 2, 2, 1)
    rx, rs = out1["recv_x"]
    assert rx.dtype == torch.float8_e4m3fn and rx.view(torch.uint8).equal(x8[[0, 2]].view(torch.uint8))
    assert rs.equal(scales[[0, 2]])
    out0 = reference_dispatch(xs, topk, None, 2, 2, 0)
    assert out0["recv_x"][0].shape == (0, h) and out0["recv_x"][1].shape == (0, 2)
    assert out0["recv_topk_idx"].shape == (0, 1) and out0["num_recv_tokens_per_expert_list"] == [0]


# ----------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------

def _single_token_combine(rows, num_ranks_per_node, src, bias=None, dtype=torch.float32):
    """Source ``src`` has one token, received by every rank; rank d's row is ``rows[d]``."""
    n = len(rows)
    recv_xs = [torch.tensor([[v]], dtype=dtype) for v in rows]
    src_ranks = [torch.tensor([src]) for _ in range(n)]
    src_tokens = [torch.tensor([0]) for _ in range(n)]
    weights = [torch.tensor([[v]], dtype=torch.float32) for v in rows]
    return reference_combine(recv_xs, weights, src_ranks, src_tokens, num_ranks_per_node, src, 1, bias=bias)


def test_combine_groups_by_node():
    # R=4, L=2, source 0: (r0 + r1) + (r2 + r3) = (1 + 0) + (1e8 - 1e8) = 1 ; a flat sum gives 0
    out, w = _single_token_combine([1.0, 0.0, 1e8, -1e8], 2, 0)
    assert out.item() == 1.0 and w.item() == 1.0
    # the same rows with one node of 4: ((1 + 0) + 1e8) - 1e8 = 0 in float32
    out, _ = _single_token_combine([1.0, 0.0, 1e8, -1e8], 4, 0)
    assert out.item() == 0.0


def test_combine_own_node_first():
    # R=3, L=1, source 2: (r2 + r0) + r1 = (1 + 1e8) - 1e8 = 0 ; ascending order would give 1
    out, w = _single_token_combine([1e8, -1e8, 1.0], 1, 2)
    assert out.item() == 0.0 and w.item() == 0.0
    out, _ = _single_token_combine([1e8, -1e8, 1.0], 1, 0)  # source 0: (1e8 - 1e8) + 1
    assert out.item() == 1.0


def test_combine_bias_after_sum():
    out, w = _single_token_combine([1.0, 0.0, 1e8, -1e8], 2, 0, bias=torch.tensor([[0.5]]))
    assert out.item() == 1.5 and w.item() == 1.0  # no bias on the weights
    # a pair is added one after the other: (1 + 1e8) - 1e8 = 0, not 1 + (1e8 - 1e8)
    out, _ = _single_token_combine([1.0, 0.0, 1e8, -1e8], 2, 0,
                                   bias=(torch.tensor([[1e8]]), torch.tensor([[-1e8]])))
    assert out.item() == 0.0


def test_combine_dtypes():
    # bf16 rows: accumulate in fp32, cast once (1 + 2^-8 + 2^-8 = 1 + 2^-7, exact in bf16;
    # a bf16 accumulator would round each step back to 1)
    out, _ = _single_token_combine([1.0, 2 ** -8, 2 ** -8], 1, 0, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.float().item() == 1 + 2 ** -7
    # float64 rows accumulate in float64
    out, _ = _single_token_combine([1e8, 1.0], 2, 0, dtype=torch.float64)
    assert out.dtype == torch.float64 and out.item() == 100000001.0
    out, _ = _single_token_combine([1e8, 1.0], 2, 0, dtype=torch.float32)
    assert out.item() == 1e8


def test_combine_unsent_tokens_and_padding():
    # source 0 has 3 tokens; only token 1 was sent (to rank 1); rank 1 has one padding row
    recv_xs = [torch.zeros(0, 2), torch.tensor([[3., 4.], [99., 99.]])]
    weights = [torch.zeros(0, 1), torch.tensor([[0.5], [99.]])]
    src_ranks = [torch.zeros(0, dtype=torch.long), torch.tensor([0])]
    src_tokens = [torch.zeros(0, dtype=torch.long), torch.tensor([1])]
    bias = torch.ones(3, 2)
    out, w = reference_combine(recv_xs, weights, src_ranks, src_tokens, 1, 0, 3, bias=bias)
    assert out.tolist() == [[1., 1.], [4., 5.], [1., 1.]]
    assert w.tolist() == [[0.], [0.5], [0.]]
    out, w = reference_combine(recv_xs, None, src_ranks, src_tokens, 1, 0, 3)
    assert w is None and out.tolist() == [[0., 0.], [3., 4.], [0., 0.]]


def _scalar_combine(recv_xs, src_ranks, src_tokens, L, rank, num_tokens):
    """The contract's loop, literally, on numpy float32 scalars (independent of torch's kernels)."""
    R = len(recv_xs)
    N = R // L
    H = recv_xs[rank].shape[1]
    out = np.zeros((num_tokens, H), dtype=np.float32)
    me = rank // L
    for t in range(num_tokens):
        for h in range(H):
            acc = np.float32(0)
            for m in [me] + [m for m in range(N) if m != me]:
                part = None
                for j in range(L):
                    d = m * L + j
                    hit = ((src_ranks[d] == rank) & (src_tokens[d] == t)).nonzero().flatten()
                    if hit.numel():
                        v = np.float32(recv_xs[d][hit[0], h].float().item())
                        part = (np.float32(0) if part is None else part) + v
                if part is not None:
                    acc = np.float32(acc + part)
            out[t, h] = acc
    return torch.from_numpy(out)


@pytest.mark.parametrize("num_ranks,L", [(4, 2), (6, 2), (4, 1)])
def test_combine_matches_scalar_loop(num_ranks, L):
    g = torch.Generator().manual_seed(7)
    E, k, H = num_ranks * 2, 3, 5
    xs, topk = [], []
    for _ in range(num_ranks):
        T = int(torch.randint(0, 6, (1,), generator=g))
        scores = torch.rand(T, E, generator=g)
        ti = scores.topk(k, dim=1).indices
        ti[torch.rand(T, k, generator=g) < 0.2] = -1
        xs.append(torch.randn(T, H, generator=g))
        topk.append(ti)
    recv = [reference_dispatch(xs, topk, None, E, L, d) for d in range(num_ranks)]
    # large-magnitude random rows make the summation order visible
    ys = [(torch.randn(r["recv_x"].shape[0], H, generator=g) * 10 ** torch.randint(0, 8, (1,), generator=g))
          .to(torch.bfloat16) for r in recv]
    for s in range(num_ranks):
        out, _ = reference_combine(ys, None, [r["recv_src_rank"] for r in recv],
                                   [r["recv_src_token"] for r in recv], L, s, xs[s].shape[0])
        want = _scalar_combine(ys, [r["recv_src_rank"] for r in recv],
                               [r["recv_src_token"] for r in recv], L, s, xs[s].shape[0])
        assert torch.equal(out, want.to(torch.bfloat16))


def test_dispatch_then_combine_roundtrip():
    """Combining the dispatched rows unchanged gives x times the number of receiving ranks."""
    g = torch.Generator().manual_seed(3)
    R, L, E = 4, 2, 8
    xs = [torch.randint(-8, 8, (5, 3), generator=g).double() for _ in range(R)]
    topk = [torch.rand(5, E, generator=g).topk(2, dim=1).indices for _ in range(R)]
    recv = [reference_dispatch(xs, topk, None, E, L, d) for d in range(R)]
    for s in range(R):
        out, _ = reference_combine([r["recv_x"] for r in recv], None, [r["recv_src_rank"] for r in recv],
                                   [r["recv_src_token"] for r in recv], L, s, 5)
        copies = reference_is_token_in_rank(topk[s], E, R).sum(dim=1, keepdim=True).double()
        assert torch.equal(out, xs[s] * copies)


# ----------------------------------------------------------------------------------------------
# traffic
# ----------------------------------------------------------------------------------------------

def test_traffic_hand_computed():
    # R=4, L=2, E=4 (expert r on rank r)
    topk = [torch.tensor([[2, 3], [1, -1], [0, 2]]), torch.tensor([[2, -1]]),
            torch.tensor([[0, 1]]), torch.tensor([[3, -1], [2, 0]])]
    t0 = reference_traffic(topk, 4, 2, 0)
    assert t0["dispatch"] == {"rail_token_copies": 2, "flat_rail_token_copies": 3, "node_token_copies": 2}
    assert t0["combine"] == {"rail_token_copies": 1, "flat_rail_token_copies": 2, "node_token_copies": 1}
    t2 = reference_traffic(topk, 4, 2, 2)
    assert t2["dispatch"] == {"rail_token_copies": 1, "flat_rail_token_copies": 2, "node_token_copies": 1}
    assert t2["combine"] == {"rail_token_copies": 2, "flat_rail_token_copies": 3, "node_token_copies": 2}
    # one node: nothing crosses a rail
    t = reference_traffic(topk, 4, 4, 0)
    assert t["dispatch"]["rail_token_copies"] == 0 and t["combine"]["flat_rail_token_copies"] == 0


def test_traffic_totals_are_consistent():
    """Summed over ranks, dispatch rail copies == combine rail copies (same (token, node) pairs)."""
    g = torch.Generator().manual_seed(11)
    R, L, E = 8, 2, 16
    topk = [torch.rand(20, E, generator=g).topk(4, dim=1).indices for _ in range(R)]
    tr = [reference_traffic(topk, E, L, r) for r in range(R)]
    for key in ("rail_token_copies", "flat_rail_token_copies", "node_token_copies"):
        assert sum(t["dispatch"][key] for t in tr) == sum(t["combine"][key] for t in tr), key


# ----------------------------------------------------------------------------------------------
# the cluster harness
# ----------------------------------------------------------------------------------------------

def _job_all_reduce(ctx, scale):
    import torch.distributed as dist
    t = torch.tensor([float(ctx.rank + 1)]) * scale
    dist.all_reduce(t, group=ctx.group)
    ctx.cache["calls"] = ctx.cache.get("calls", 0) + 1
    return {"rank": ctx.rank, "sum": t.item(), "node": ctx.node, "local": ctx.local_rank,
            "world": ctx.world_size, "calls": ctx.cache["calls"], "tensor": torch.arange(ctx.rank + 1)}


def _job_raise_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        raise ValueError(f"bad thing on rank {ctx.rank}")
    return ctx.rank


def _job_sleep(ctx, seconds):
    time.sleep(seconds)
    return ctx.rank


def _job_exit_on(ctx, rank):
    if ctx.rank == rank:
        os._exit(3)
    return ctx.rank


def test_cluster_harness(cluster_factory):
    cluster = cluster_factory(2, 2)
    results = cluster.run(_job_all_reduce, 2.0)
    assert [r["sum"] for r in results] == [20.0] * 4
    assert [(r["node"], r["local"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(torch.equal(r["tensor"], torch.arange(i + 1)) for i, r in enumerate(results))
    calls = [r["calls"] for r in results]
    assert [r["calls"] for r in cluster.run(_job_all_reduce, 1.0)] == [c + 1 for c in calls]  # cache kept

    out = cluster.run(_job_raise_on, 1, return_exceptions=True)
    assert out[0] == 0 and out[2] == 2 and isinstance(out[1], ValueError) and "rank 1" in str(out[1])
    assert "Traceback" in out[1].remote_traceback
    assert cluster.healthy()

    with pytest.raises(JobFailed, match="bad thing on rank 3"):
        cluster.run(_job_raise_on, 3)
    assert not cluster.healthy()
    again = cluster_factory(2, 2)  # a failed cluster is replaced
    assert again is not cluster and cluster.closed
    assert [r["sum"] for r in again.run(_job_all_reduce, 1.0)] == [10.0] * 4


def test_cluster_timeout_and_dead_worker():
    with Cluster(1, 2) as cluster:
        start = time.monotonic()
        with pytest.raises(ClusterTimeout, match="timed out"):
            cluster.run(_job_sleep, 60, timeout_s=2)
        assert time.monotonic() - start < 20 and cluster.closed
    with Cluster(1, 2) as cluster:
        out = cluster.run(_job_exit_on, 1, return_exceptions=True, timeout_s=30)
        assert out[0] == 0 and isinstance(out[1], WorkerDied) and out[1].rank == 1
        assert not cluster.healthy()
        assert cluster.run(_job_sleep, 0) == [0, None]  # runs on the survivors
    with Cluster(1, 2) as cluster:
        cluster.kill_rank(0)
        assert cluster.alive_ranks() == [1]

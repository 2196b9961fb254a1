"""Buffer.dispatch / Buffer.combine against dispatch.reference, bit for bit, on 5 cluster shapes.

The cases (``tests/dispatch_utils.case_specs``) run in one job per cluster shape; each test
below asserts on the cases it covers.
"""

from __future__ import annotations

import pytest
import torch

from tests.dispatch_utils import (SHAPE_IDS, SHAPES, case_specs, failures, make_combine_x,
                                  make_inputs, shape_results, diff, check_traffic)
from dispatch.reference import reference_combine, reference_dispatch, reference_traffic

shapes = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)


def _assert_ok(fails):
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:30])


@shapes
def test_all_cases_ran(cluster_factory, shape):
    results = shape_results(cluster_factory, shape)
    assert sorted(results) == sorted(s["name"] for s in case_specs(*shape))
    _assert_ok(failures(results, categories=["raised"]))


@shapes
def test_dtypes_and_hidden_sizes(cluster_factory, shape):
    """float32/bfloat16/float16/float64 and the FP8 pair; hidden sizes 72, 200 (not multiples of 128)."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["dtype", "hidden", "fp8"]))


@shapes
def test_routing(cluster_factory, shape):
    """Random routing with -1 entries, node-limited routing, dense and mostly-empty rows."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["routing"]))


@shapes
def test_edge_cases(cluster_factory, shape):
    """A rank with zero tokens; every token to one rank."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["edge"]))


@shapes
def test_cached_dispatch(cluster_factory, shape):
    _assert_ok(failures(shape_results(cluster_factory, shape), categories=["cached"]))


@shapes
def test_num_worst_tokens(cluster_factory, shape):
    """Padded outputs of exactly W rows, padding ignored by combine; W < n raises everywhere."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["worst"]))


@shapes
def test_expert_alignment(cluster_factory, shape):
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["alignment"]))


@shapes
def test_without_weights_or_topk(cluster_factory, shape):
    """topk_weights None (recv/combined weights None); no topk_idx at all (layout only)."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["weights"]))


@shapes
def test_bias(cluster_factory, shape):
    """Combine bias as a tensor and as a pair (added after the sum, in order)."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["bias"]))


@shapes
def test_combine_bit_exact(cluster_factory, shape):
    """combined_x / combined_topk_weights equal the reference loop bit for bit in every case."""
    _assert_ok(failures(shape_results(cluster_factory, shape), categories=["combine"]))


@shapes
def test_dispatch_bit_exact(cluster_factory, shape):
    _assert_ok(failures(shape_results(cluster_factory, shape), categories=["dispatch", "worst"]))


@shapes
def test_reproducible(cluster_factory, shape):
    """Two runs of the same dispatch + combine give identical bytes."""
    _assert_ok(failures(shape_results(cluster_factory, shape), categories=["repro"]))


@shapes
def test_chunking_and_threads(cluster_factory, shape):
    """Config(num_sms, chunk_tokens) changes nothing in the results."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["chunks"]))


@shapes
def test_round_rail_partials(cluster_factory, shape):
    """Config(round_rail_partials=True): remote node partials cross the rail in x's 16-bit dtype
    (half the rail bytes); the result equals the reference loop with that one rounding, bit for
    bit; float32 x is unaffected."""
    _assert_ok(failures(shape_results(cluster_factory, shape), tags=["rounded"]))


@shapes
def test_auto_layout(cluster_factory, shape):
    """dispatch(x, topk_idx=, topk_weights=, num_experts=) without the layout tensors."""
    _assert_ok(failures(shape_results(cluster_factory, shape), names=["auto-layout"]))


# ----------------------------------------------------------------------------------------------
# a batch many times larger than the staging buffers
# ----------------------------------------------------------------------------------------------

LARGE = dict(name="large", dtype="float32", H=1024, k=4, experts_per_rank=4, T=(1100, 1300), neg_frac=0.1,
             weights=True)


def _job_large_batch(ctx, spec, seed):
    import time

    import dispatch

    R, L, me = ctx.world_size, ctx.ranks_per_node, ctx.rank
    spec = dict(spec, _R=R)
    inputs = [make_inputs(spec, seed, s, R, L) for s in range(R)]
    E, T = inputs[me]["E"], inputs[me]["T"]
    xs = [i["x"] for i in inputs]
    topks = [i["topk_idx"] for i in inputs]
    wts = [i["topk_weights"] for i in inputs]
    refs = [reference_dispatch(xs, topks, wts, E, L, d) for d in range(R)]
    fails = []
    t0 = time.monotonic()
    with dispatch.Buffer(ctx.group, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20, num_ranks_per_node=L,
                         timeout_s=60.0) as buf:
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inputs[me]["topk_idx"], E)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            xs[me], num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=inputs[me]["topk_idx"],
            topk_weights=wts[me])
        for name, got in (("recv_x", recv_x), ("recv_topk_idx", recv_idx), ("recv_topk_weights", recv_w),
                          ("num_recv_tokens_per_expert_list", counts)):
            fails.append(diff(name, got, refs[me][name]))
        traffic = reference_traffic(topks, E, L, me)
        fails.extend(check_traffic(buf.get_traffic_stats(), traffic["dispatch"], "dispatch"))
        ys = [make_combine_x(spec, seed, d, refs[d]["recv_src_rank"].shape[0]) for d in range(R)]
        combined, combined_w, _ = buf.combine(ys[me], handle, topk_weights=refs[me]["recv_topk_weights"])
        want, want_w = reference_combine(ys, [r["recv_topk_weights"] for r in refs],
                                         [r["recv_src_rank"] for r in refs], [r["recv_src_token"] for r in refs],
                                         L, me, T)
        fails.append(diff("combined_x", combined, want))
        fails.append(diff("combined_topk_weights", combined_w, want_w))
        fails.extend(check_traffic(buf.get_traffic_stats(), traffic["combine"], "combine"))
    elapsed = time.monotonic() - t0
    return {"fails": [f for f in fails if f], "bytes_sent": xs[me].numel() * xs[me].element_size(),
            "bytes_received": refs[me]["recv_x"].numel() * 4, "seconds": elapsed}


@pytest.mark.parametrize("shape", [(2, 2), (2, 4)], ids=["2x2", "2x4"])
def test_large_batch_through_small_buffers(cluster_factory, shape):
    """~5 MB per rank through 1 MiB of staging: the batch must stream in chunks."""
    results = cluster_factory(*shape).run(_job_large_batch, LARGE, 99, timeout_s=400)
    assert min(r["bytes_sent"] for r in results) > 4 * (1 << 20)
    fails = [f"rank {r}: {msg}" for r, res in enumerate(results) for msg in res["fails"]]
    _assert_ok(fails)

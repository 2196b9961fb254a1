"""Shared machinery of the Buffer tests: deterministic inputs, case runner, bitwise comparisons.

Every rank generates *every* rank's inputs from ``(seed, case, rank)``, so it can compute the
reference (``dispatch.reference``) for itself without gathering anything; the Buffer under test
only sees its own rank's inputs. A case returns a list of ``(category, message)`` failures;
categories: ``layout``, ``dispatch``, ``cached``, ``worst``, ``combine``, ``traffic``, ``repro``,
``raised``.

The cluster jobs here run many cases at once (a job has overhead); tests read their results
through :func:`shape_results`, which runs the job once per cluster shape per session.
"""

from __future__ import annotations

import math
import traceback
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from dispatch.reference import (reference_combine, reference_dispatch, reference_layout,
                                reference_traffic)

SHAPES = [(1, 2), (1, 4), (2, 2), (2, 4), (4, 2)]
SHAPE_IDS = [f"{n}x{l}" for n, l in SHAPES]

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
FP8 = "fp8"

Failure = Tuple[str, str]  # (category, message)


# ----------------------------------------------------------------------------------------------
# deterministic inputs
# ----------------------------------------------------------------------------------------------

def gen(*key: Any) -> torch.Generator:
    """A generator seeded from an arbitrary key (same on every process)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_routing(g: torch.Generator, T: int, E: int, k: int, R: int, L: int, routing: str,
                 neg_frac: float = 0.2, max_nodes: Optional[int] = None, target_rank: int = 0) -> torch.Tensor:
    """``[T, k]`` int64 expert ids (distinct per row, ``-1`` = none).

    routing: ``random`` (any experts), ``node_limited`` (each token's experts on at most
    ``max_nodes`` nodes), ``one_rank`` (only experts of ``target_rank``).
    """
    N = R // L
    if routing == "random":
        scores = torch.rand(T, E, generator=g)
    elif routing == "node_limited":
        max_nodes = min(N, 4) if max_nodes is None else max_nodes
        experts_per_node = E // N
        node_scores = torch.rand(T, N, generator=g)
        chosen = node_scores.topk(max_nodes, dim=1).indices
        allowed = torch.zeros(T, N, dtype=torch.bool)
        allowed.scatter_(1, chosen, True)
        scores = torch.rand(T, E, generator=g)
        scores[~allowed.repeat_interleave(experts_per_node, dim=1)] = -1.0
    elif routing == "one_rank":
        scores = torch.full((T, E), -1.0)
        per_rank = E // R
        scores[:, target_rank * per_rank:(target_rank + 1) * per_rank] = torch.rand(T, per_rank, generator=g)
    else:
        raise ValueError(routing)
    values, idx = scores.topk(k, dim=1)
    idx[values < 0] = -1
    if neg_frac > 0:
        idx[torch.rand(T, k, generator=g) < neg_frac] = -1
    return idx.to(torch.int64)


def make_x(g: torch.Generator, T: int, H: int, dtype: str):
    """Hidden states: a tensor of a float dtype, or the FP8 pair."""
    if dtype == FP8:
        rows = (torch.randn(T, H, generator=g) * 4).to(torch.float8_e4m3fn)
        scales = torch.rand(T, math.ceil(H / 128), generator=g) + 0.5
        return (rows, scales)
    # wide magnitudes, so that a wrong summation order shows in combine
    mag = torch.pow(2.0, torch.randint(-8, 9, (T, H), generator=g).double())
    return (torch.randn(T, H, generator=g, dtype=torch.float64) * mag).to(FLOAT_DTYPES[dtype])


def num_tokens_of(spec: Dict[str, Any], seed: int, s: int) -> int:
    if spec.get("zero_rank") is not None and s == spec["zero_rank"] % spec["_R"]:
        return 0
    lo, hi = spec.get("T", (16, 96))
    return int(torch.randint(lo, hi + 1, (1,), generator=gen(seed, spec["name"], "T", s)))


def make_inputs(spec: Dict[str, Any], seed: int, s: int, R: int, L: int, variant: int = 0) -> Dict[str, Any]:
    """Rank ``s``'s dispatch inputs for ``spec`` (``variant`` changes only ``x``)."""
    T = num_tokens_of(spec, seed, s)
    E = spec.get("experts_per_rank", 4) * R
    g = gen(seed, spec["name"], "route", s)
    topk_idx = make_routing(g, T, E, spec.get("k", 4), R, L, spec.get("routing", "random"),
                            spec.get("neg_frac", 0.2), spec.get("max_nodes"), spec.get("target_rank", 0) % R)
    weights = torch.rand(T, topk_idx.shape[1], generator=g) + 0.25
    x = make_x(gen(seed, spec["name"], "x", s, variant), T, spec.get("H", 256), spec.get("dtype", "float32"))
    return {"x": x, "topk_idx": topk_idx, "topk_weights": weights, "T": T, "E": E}


def combine_dtype(spec: Dict[str, Any]) -> str:
    dtype = spec.get("combine_dtype") or spec.get("dtype", "float32")
    return "bfloat16" if dtype == FP8 else dtype


def make_combine_x(spec: Dict[str, Any], seed: int, d: int, n: int, variant: int = 0) -> torch.Tensor:
    return make_x(gen(seed, spec["name"], "y", d, variant), n, spec.get("H", 256), combine_dtype(spec))


def make_bias(spec: Dict[str, Any], seed: int, s: int, T: int):
    kind = spec.get("bias")
    if kind is None:
        return None
    H = spec.get("H", 256)
    g = gen(seed, spec["name"], "bias", s)
    b0 = make_x(g, T, H, combine_dtype(spec))
    if kind == "tensor":
        return b0
    return (b0, (torch.randn(T, H, generator=g) * 100).to(torch.float32))


# ----------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------

def _raw(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8)


def diff(name: str, got: Any, want: Any) -> Optional[str]:
    """``None`` if ``got`` and ``want`` are bit-identical (tensors, FP8 pairs, None, lists)."""
    if want is None or got is None:
        return None if (want is None and got is None) else f"{name}: got {type(got).__name__}, want {type(want).__name__}"
    if isinstance(want, (tuple, list)) and not (want and isinstance(want[0], (int, float))):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{name}: got {type(got).__name__}, want a pair"
        for i, (a, b) in enumerate(zip(got, want)):
            msg = diff(f"{name}[{i}]", a, b)
            if msg:
                return msg
        return None
    if not isinstance(want, torch.Tensor):
        return None if got == want else f"{name}: got {got!r}, want {want!r}"
    if not isinstance(got, torch.Tensor):
        return f"{name}: got {type(got).__name__}, want a tensor"
    if got.dtype != want.dtype:
        return f"{name}: dtype {got.dtype}, want {want.dtype}"
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    if want.numel() == 0:
        return None
    if want.dtype == torch.bool:
        same = torch.equal(got, want)
        bad = (got != want)
    else:
        a, b = _raw(got), _raw(want)
        same = torch.equal(a, b)
        bad = (a != b).reshape(got.shape[0], -1).any(dim=1) if got.dim() >= 1 else None
    if same:
        return None
    rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if bad is not None else []
    first = rows[0] if rows else 0
    return (f"{name}: {len(rows)} of {got.shape[0]} rows differ, first row {first}: "
            f"got {got[first].flatten()[:6].tolist()} want {want[first].flatten()[:6].tolist()}")


def pad_rows(t, rows: int, fill: float = 0):
    """``t`` (or each part of a pair) padded with ``fill`` rows up to ``rows``."""
    if isinstance(t, tuple):
        return tuple(pad_rows(p, rows, fill) for p in t)
    if t.shape[0] >= rows:
        return t
    pad = torch.full((rows - t.shape[0],) + tuple(t.shape[1:]), fill, dtype=torch.float32).to(t.dtype)
    return torch.cat([t, pad], dim=0)


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------

def check_traffic(stats: Dict[str, Any], want: Dict[str, int], op: str) -> List[str]:
    errors = []
    if stats.get("op") != op:
        errors.append(f"op={stats.get('op')!r}, want {op!r}")
    for key, value in want.items():
        if stats.get(key) != value:
            errors.append(f"{key}={stats.get(key)}, want {value}")
    for kind in ("rail", "node"):
        copies, per, total = (stats.get(f"{kind}_token_copies"), stats.get(f"{kind}_bytes_per_token"),
                              stats.get(f"{kind}_bytes"))
        if not isinstance(per, int) or per <= 0:
            errors.append(f"{kind}_bytes_per_token={per!r} is not a positive int")
        elif total != copies * per:
            errors.append(f"{kind}_bytes={total} != {kind}_token_copies*{kind}_bytes_per_token={copies}*{per}")
    return errors


def run_case(buf: Any, rank: int, R: int, L: int, spec: Dict[str, Any], seed: int) -> List[Failure]:
    """Run one dispatch (+ cached dispatch) + combine case on this rank against the reference."""
    import dispatch

    spec = dict(spec, _R=R)
    fails: List[Failure] = []

    def fail(category: str, message: Optional[str]) -> None:
        if message:
            fails.append((category, message))

    inputs = [make_inputs(spec, seed, s, R, L) for s in range(R)]
    mine = inputs[rank]
    E, T = mine["E"], mine["T"]
    with_topk = spec.get("pass_topk", True)
    with_weights = with_topk and spec.get("weights", True)
    alignment = spec.get("alignment", 1)
    xs = [i["x"] for i in inputs]
    topks = [i["topk_idx"] for i in inputs]
    wts = [i["topk_weights"] for i in inputs] if with_weights else None
    refs = [reference_dispatch(xs, topks, wts, E, L, d, alignment) for d in range(R)]
    ref = refs[rank]
    n = ref["recv_x"][0].shape[0] if isinstance(ref["recv_x"], tuple) else ref["recv_x"].shape[0]
    idx_dtype = torch.int32 if spec.get("idx_dtype") == "int32" else torch.int64
    topk_idx = mine["topk_idx"].to(idx_dtype)
    config = dispatch.Config(**spec["config"]) if spec.get("config") else None

    # ---- layout
    layout = buf.get_dispatch_layout(topk_idx, E)
    want_layout = reference_layout(mine["topk_idx"], E, R, L)
    for name, got, want in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                                "is_token_in_rank"), layout[:4], want_layout):
        fail("layout", diff(name, got, want))

    # ---- dispatch
    worst = spec.get("worst", 0)
    W = 0
    if worst == "pad":
        W = max(r["recv_src_rank"].shape[0] for r in refs) + 3
    elif worst == "small":
        W = 1
    kwargs: Dict[str, Any] = {"expert_alignment": alignment, "num_worst_tokens": W, "config": config}
    if spec.get("layout", "explicit") == "explicit":
        kwargs.update(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                      is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    else:
        kwargs.update(num_experts=E)
    if with_topk:
        kwargs["topk_idx"] = topk_idx
        if with_weights:
            kwargs["topk_weights"] = mine["topk_weights"]

    if worst == "small":
        max_n = max(r["recv_src_rank"].shape[0] for r in refs)
        try:
            buf.dispatch(mine["x"], **kwargs)
            if max_n > 1:
                fail("worst", f"num_worst_tokens=1 < {max_n} received rows did not raise")
        except ValueError:
            if max_n <= 1:
                fail("worst", "num_worst_tokens=1 raised although no rank receives more than one row")
        except Exception as exc:  # noqa: BLE001
            fail("worst", f"num_worst_tokens=1 raised {type(exc).__name__}: {exc} (want ValueError)")
        return fails

    recv_x, recv_idx, recv_w, per_expert, handle, _event = buf.dispatch(mine["x"], **kwargs)
    cat = "worst" if W else "dispatch"
    want_x, want_idx, want_w = ref["recv_x"], ref["recv_topk_idx"], ref["recv_topk_weights"]
    if W:
        want_x = pad_rows(want_x, W)
        want_idx = pad_rows(want_idx, W, -1)
        want_w = None if want_w is None else pad_rows(want_w, W)
    fail(cat, diff("recv_x", recv_x, want_x))
    fail(cat, diff("recv_topk_idx", recv_idx, want_idx if with_topk else None))
    fail(cat, diff("recv_topk_weights", recv_w, want_w if with_weights else None))
    # The list comes from num_tokens_per_expert (given with the explicit layout, else computed from
    # topk_idx); with num_worst_tokens it is empty, as in DeepEP.
    has_counts = with_topk or spec.get("layout", "explicit") == "explicit"
    want_per_expert = [] if W else (ref["num_recv_tokens_per_expert_list"] if has_counts else None)
    fail(cat, diff("num_recv_tokens_per_expert_list", per_expert, want_per_expert))
    want_traffic = reference_traffic(topks, E, L, rank)
    fail("traffic", "; ".join(check_traffic(buf.get_traffic_stats(), want_traffic["dispatch"], "dispatch")))

    # ---- cached dispatch: new x along the same routes
    if spec.get("cached", False):
        xs2 = [make_inputs(spec, seed, s, R, L, variant=1)["x"] for s in range(R)]
        ref2 = reference_dispatch(xs2, topks, None, E, L, rank, alignment)
        out2 = buf.dispatch(xs2[rank], handle=handle, config=config)
        want2 = ref2["recv_x"]
        got_rows = (out2[0][0] if isinstance(out2[0], tuple) else out2[0]).shape[0]
        if W and got_rows != n:  # after a num_worst_tokens dispatch: n rows, or W with zero padding
            want2 = pad_rows(want2, W)
        fail("cached", diff("cached recv_x", out2[0], want2))
        if out2[1] is not None or out2[2] is not None or out2[3] is not None or out2[4] is not handle:
            fail("cached", f"cached dispatch returned {[type(o).__name__ for o in out2[1:5]]}, "
                           "want (None, None, None, handle)")
        fail("traffic", "; ".join("cached: " + e for e in
                                  check_traffic(buf.get_traffic_stats(), want_traffic["dispatch"], "dispatch")))

    # ---- combine
    ys = [make_combine_x(spec, seed, d, refs[d]["recv_src_rank"].shape[0]) for d in range(R)]
    y = ys[rank]
    y_w = ref["recv_topk_weights"] if with_weights else None
    if W:  # padding rows hold garbage that combine must ignore
        y = torch.cat([y, make_combine_x(spec, seed, rank, W - n, variant=7)])
        y_w = None if y_w is None else torch.cat([y_w, torch.full((W - n, y_w.shape[1]), 1e30)])
    bias = make_bias(spec, seed, rank, T)
    combined, combined_w, _event = buf.combine(y, handle, topk_weights=y_w, bias=bias, config=config)
    rounded = bool(config is not None and config.round_rail_partials)
    want_c, want_cw = reference_combine(
        ys, [r["recv_topk_weights"] for r in refs] if with_weights else None,
        [r["recv_src_rank"] for r in refs], [r["recv_src_token"] for r in refs], L, rank, T, bias=bias,
        round_rail_partials=rounded)
    fail("combine", diff("combined_x", combined, want_c))
    fail("combine", diff("combined_topk_weights", combined_w, want_cw))
    combine_stats = buf.get_traffic_stats()
    fail("traffic", "; ".join("combine: " + e for e in check_traffic(combine_stats, want_traffic["combine"], "combine")))
    if rounded:  # partials cross the rail in x's dtype when that is 16-bit: a row of 2-byte elements
        elem = 2 if y.dtype in (torch.bfloat16, torch.float16) else 4
        want_row = (y.shape[1] * elem + 4 * (y_w.shape[1] if y_w is not None else 0) + 15) // 16 * 16
        if R > L and combine_stats["rail_bytes_per_token"] != want_row:
            fail("rounded", f"rail_bytes_per_token {combine_stats['rail_bytes_per_token']}, want {want_row}")
        if rank == 0 and R > L and elem == 2:  # the inputs (fixed seeds) must exercise the rounding
            exact, _ = reference_combine(ys, None, [r["recv_src_rank"] for r in refs],
                                         [r["recv_src_token"] for r in refs], L, rank, T, bias=bias)
            if torch.equal(exact, want_c):
                fail("rounded", "rounding the rail partials changes nothing at rank 0: the case tests nothing")

    # ---- the same again: identical bytes
    if spec.get("repeat", False):
        again = buf.dispatch(mine["x"], **kwargs)
        fail("repro", diff("second recv_x", again[0], recv_x))
        fail("repro", diff("second recv_topk_weights", again[2], recv_w))
        combined2, combined_w2, _ = buf.combine(y, again[4], topk_weights=y_w, bias=bias, config=config)
        fail("repro", diff("second combined_x", combined2, combined))
        fail("repro", diff("second combined_topk_weights", combined_w2, combined_w))
    return fails


# ----------------------------------------------------------------------------------------------
# the cases and the job
# ----------------------------------------------------------------------------------------------

def case_specs(num_nodes: int, ranks_per_node: int) -> List[Dict[str, Any]]:
    """The cases run on every cluster shape (small tensors; tags say what each one covers)."""
    R = num_nodes * ranks_per_node
    cases = [
        dict(name="float32", tags=["dtype", "cached", "repro"], dtype="float32", H=256, cached=True, repeat=True),
        dict(name="bfloat16-h200", tags=["dtype", "hidden", "bias"], dtype="bfloat16", H=200, bias="tensor",
             repeat=True),
        dict(name="float16", tags=["dtype", "bias"], dtype="float16", H=128, bias="pair"),
        dict(name="float64-h72", tags=["dtype", "hidden"], dtype="float64", H=72, cached=True),
        dict(name="fp8-h200", tags=["dtype", "fp8", "cached", "hidden"], dtype=FP8, H=200, cached=True,
             repeat=True),
        dict(name="fp8-h512-f32-combine", tags=["dtype", "fp8"], dtype=FP8, H=512, combine_dtype="float32",
             bias="pair"),
        dict(name="node-limited", tags=["routing"], dtype="bfloat16", H=256, routing="node_limited",
             k=6, experts_per_rank=4, neg_frac=0.1, T=(40, 160)),
        dict(name="node-limited-1", tags=["routing"], dtype="float32", H=128, routing="node_limited",
             max_nodes=1, k=3, neg_frac=0.0),
        dict(name="dense-no-neg", tags=["routing"], dtype="bfloat16", H=64, k=4, experts_per_rank=2,
             neg_frac=0.0, T=(1, 40)),
        dict(name="mostly-neg", tags=["routing"], dtype="float32", H=64, neg_frac=0.9),
        dict(name="zero-tokens", tags=["edge"], dtype="bfloat16", H=200, zero_rank=R - 1, cached=True,
             bias="tensor"),
        dict(name="all-to-one-rank", tags=["edge", "routing"], dtype="float32", H=136,
             routing="one_rank", target_rank=R - 1, k=2, experts_per_rank=2, cached=True),
        dict(name="all-to-rank-0", tags=["edge", "routing"], dtype="bfloat16", H=64,
             routing="one_rank", target_rank=0, k=4, neg_frac=0.3),
        dict(name="worst-pad", tags=["worst"], dtype="bfloat16", H=200, worst="pad", cached=True),
        dict(name="worst-pad-fp8", tags=["worst", "fp8"], dtype=FP8, H=256, worst="pad"),
        dict(name="worst-too-small", tags=["worst"], dtype="float32", H=64, worst="small"),
        dict(name="alignment-4", tags=["alignment"], dtype="float32", H=64, alignment=4),
        dict(name="alignment-7", tags=["alignment"], dtype="bfloat16", H=64, alignment=7, worst="pad"),
        dict(name="no-weights", tags=["weights"], dtype="bfloat16", H=128, weights=False, bias="pair"),
        dict(name="no-topk", tags=["weights"], dtype="float32", H=128, pass_topk=False),
        dict(name="auto-layout", tags=["layout"], dtype="float16", H=96, layout="auto"),
        dict(name="int32-topk", tags=["layout"], dtype="float32", H=64, idx_dtype="int32"),
        dict(name="small-chunks", tags=["chunks", "repro"], dtype="float32", H=200,
             config={"num_sms": 2, "chunk_tokens": 3}, cached=True, repeat=True),
        dict(name="one-chunk-token", tags=["chunks"], dtype="bfloat16", H=64,
             config={"num_sms": 1, "chunk_tokens": 1}, T=(0, 12), bias="tensor"),
        dict(name="rounded-partials-bf16", tags=["rounded"], dtype="bfloat16", H=200, bias="tensor",
             config={"round_rail_partials": True}, repeat=True),
        dict(name="rounded-partials-fp16", tags=["rounded"], dtype="float16", H=128,
             config={"round_rail_partials": True, "chunk_tokens": 5}),
        dict(name="rounded-partials-fp32", tags=["rounded"], dtype="float32", H=64,
             config={"round_rail_partials": True}),
    ]
    return cases


def job_run_cases(ctx: Any, specs: Sequence[Dict[str, Any]], seed: int,
                  buffer_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, List[Failure]]:
    """Cluster job: every case in order on one Buffer; returns ``{case name: failures}``.

    When a case raises on any rank (agreed over the gloo world group, not through the buffer),
    every rank replaces its Buffer, so one broken case does not poison the following ones.
    """
    import torch.distributed as dist

    import dispatch

    # Generous: each rank also computes every reference, which takes seconds on a loaded machine.
    kwargs = {"num_ranks_per_node": ctx.ranks_per_node, "timeout_s": 30.0, "device": "cpu"}
    kwargs.update(buffer_kwargs or {})
    results: Dict[str, List[Failure]] = {}
    buf = dispatch.Buffer(ctx.group, **kwargs)
    try:
        for spec in specs:
            raised = 0
            try:
                results[spec["name"]] = run_case(buf, ctx.rank, ctx.world_size, ctx.ranks_per_node, spec, seed)
            except Exception:  # noqa: BLE001 - keep going, report per case
                results[spec["name"]] = [("raised", traceback.format_exc())]
                raised = 1
            flag = torch.tensor([raised])
            dist.all_reduce(flag, group=ctx.group)
            if int(flag) > 0:
                buf.destroy()
                buf = dispatch.Buffer(ctx.group, **kwargs)
    finally:
        buf.destroy()
    return results


_RESULTS: Dict[Tuple[int, int], Any] = {}


def shape_results(cluster_factory: Any, shape: Tuple[int, int], seed: int = 1234) -> Dict[str, List[str]]:
    """``{case name: ["rank r [category] message", ...]}`` for all cases on ``shape`` (cached)."""
    if shape not in _RESULTS:
        cluster = cluster_factory(*shape)
        try:
            per_rank = cluster.run(job_run_cases, case_specs(*shape), seed, timeout_s=400)
        except BaseException as exc:  # noqa: BLE001
            _RESULTS[shape] = exc
        else:
            merged: Dict[str, List[Tuple[str, str]]] = {}
            for r, res in enumerate(per_rank):
                for name, fails in res.items():
                    merged.setdefault(name, [])
                    merged[name].extend((cat, f"rank {r} [{cat}] {msg}") for cat, msg in fails)
            _RESULTS[shape] = merged
    result = _RESULTS[shape]
    if isinstance(result, BaseException):
        raise AssertionError(f"the case job failed on {shape}: {result}")
    return result


def failures(results: Dict[str, List[Tuple[str, str]]], *, tags: Sequence[str] = (),
             categories: Sequence[str] = (), names: Sequence[str] = ()) -> List[str]:
    """Failure messages of the cases with any of ``tags`` (or ``names``), in ``categories``
    (all categories when empty). A case that raised counts when cases are selected by tag or
    name; a selection by category alone leaves it to ``test_all_cases_ran`` and the tag tests."""
    specs = {s["name"]: s for s in case_specs(1, 1)}
    out = []
    for name, fails in results.items():
        spec = specs.get(name, {})
        if (tags or names) and not (set(tags) & set(spec.get("tags", ())) or name in names):
            continue
        for cat, msg in fails:
            if not categories or cat in categories or (cat == "raised" and (tags or names)):
                out.append(f"{name}: {msg}")
    return out


# ----------------------------------------------------------------------------------------------
# CUDA backend tests (tests/test_cuda_*.py): devices and loopback helpers. They run on "simt" (the
# kernels on the CPU SIMT runtime) when dispatch._simt is built and on "cuda" when a GPU and
# dispatch._cuda are present; sizes shrink on SIMT, where every CUDA thread is a fiber.
# ----------------------------------------------------------------------------------------------


def cuda_device_params() -> List[Any]:
    """``pytest.param`` per device; a device that is missing is a skip that says why.

    ``DISPATCH_TEST_DEVICES`` (e.g. ``cuda``) restricts the run to the devices it names:
    ``scripts/test_gpu.sh`` runs each device in a process of its own.
    """
    import os

    import pytest

    from dispatch.cuda.device import gpu_available, simt_available
    wanted = os.environ.get("DISPATCH_TEST_DEVICES")
    chosen = set(wanted.split(",")) if wanted else {"simt", "cuda"}
    unavailable = {"simt": None if simt_available() else "dispatch._simt was not built",
                   "cuda": None if gpu_available() else "needs a CUDA GPU and dispatch._cuda"}
    params = []
    for device in ("simt", "cuda"):
        reason = unavailable[device] if device in chosen else f"not in DISPATCH_TEST_DEVICES={wanted}"
        params.append(pytest.param(device, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return params


def torch_device(device: str) -> torch.device:
    """Where a device kind's tensors live (SIMT device memory is host memory)."""
    return torch.device("cuda") if device == "cuda" else torch.device("cpu")


def to_device(x: Any, device: str) -> Any:
    if isinstance(x, tuple):
        return tuple(t.to(torch_device(device)) for t in x)
    return x.to(torch_device(device))


def to_cpu(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(t.cpu() for t in x)
    return x.cpu()


def sync(device: str) -> None:
    """Waits for this thread's compute stream (on SIMT that is the host thread: nothing to do)."""
    if device == "cuda":
        torch.cuda.current_stream().synchronize()


def make_loopback(device: str, num_ranks: int, **kwargs: Any) -> Any:
    """A ``dispatch.testing.Loopback`` of ``num_ranks`` virtual ranks on ``device``."""
    from dispatch.testing import Loopback
    return Loopback(num_ranks, device=device, **kwargs)


def loopback_inputs(L: int, E: int, k: int, H: int, dtype: Any, seed: int, tokens: Any = None, fp8: bool = False,
           max_tokens: int = 200):
    """Per-rank ``x`` (or FP8 pairs), ``topk_idx`` (10% -1) and ``topk_weights`` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(L):
        T = tokens[r] if tokens is not None else int(torch.randint(0, max_tokens, (1,), generator=g))
        scores = torch.rand(T, E, generator=g)
        idx = scores.topk(k, dim=1).indices
        idx[torch.rand(T, k, generator=g) < 0.1] = -1
        if fp8:
            x = (torch.randn(T, H, generator=g) * 4).to(torch.float8_e4m3fn)
            s = torch.rand(T, (H + 127) // 128, generator=g)
            xs.append((x, s))
        else:
            xs.append(torch.randn(T, H, generator=g).to(dtype))
        idxs.append(idx)
        ws.append(torch.rand(T, k, generator=g))
    return xs, idxs, ws


def bit_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of tensors or FP8 pairs."""
    if isinstance(a, tuple):
        return all(bit_equal(p, q) for p, q in zip(a, b))
    return torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                       b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)

"""Errors: bad arguments (every rank raises, nothing sent, buffer usable afterwards), a peer that
never joins and a peer that dies (``dispatch.PeerTimeoutError`` naming it)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch

from tests.cluster import Cluster
from tests.dispatch_utils import gen, make_routing, run_case

GOOD_CASE = dict(name="after-errors", dtype="float32", H=64, T=(8, 40), cached=True, bias="tensor")


def _describe(exc):
    return f"{type(exc).__name__}: {exc}"


def _job_bad_arguments(ctx, seed):
    import dispatch

    R, L, me = ctx.world_size, ctx.ranks_per_node, ctx.rank
    E, H, T, k = 4 * R, 64, 24, 4
    g = gen(seed, me)
    x = torch.randn(T, H, generator=g)
    topk = make_routing(g, T, E, k, R, L, "random", 0.2)
    w = torch.rand(T, k, generator=g)
    fails = []
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=5.0)
    layout = buf.get_dispatch_layout(topk, E)

    def kw(**over):
        args = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                    is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=topk,
                    topk_weights=w)
        args.update(over)
        return args

    big = topk.clone()
    big[0, 0] = E
    small = topk.clone()
    small[-1, -1] = -2
    fp8_x = (x.to(torch.float8_e4m3fn), torch.ones(T, 1))
    bad_fp8_x = (x.to(torch.float8_e4m3fn), torch.ones(T, 3))

    # (name, {bad: call}, argument names the bad rank may mention, every rank is bad)
    dispatch_cases = [
        ("topk_idx >= num_experts", lambda bad: buf.dispatch(x, **kw(topk_idx=big if bad else topk)), ["topk_idx"]),
        ("topk_idx < -1", lambda bad: buf.dispatch(x, **kw(topk_idx=small if bad else topk)), ["topk_idx"]),
        ("topk_idx float", lambda bad: buf.dispatch(x, **kw(topk_idx=topk.float() if bad else topk)), ["topk_idx"]),
        ("topk_idx 1-D", lambda bad: buf.dispatch(x, **kw(topk_idx=topk[:, 0] if bad else topk)), ["topk_idx"]),
        ("x 1-D", lambda bad: buf.dispatch(x[:, 0] if bad else x, **kw()), ["x"]),
        ("x int32", lambda bad: buf.dispatch(x.to(torch.int32) if bad else x, **kw()), ["x"]),
        ("x rows != topk_idx rows", lambda bad: buf.dispatch(x[:-1] if bad else x, **kw()),
         ["x", "topk_idx", "is_token_in_rank", "topk_weights"]),
        ("topk_weights shape", lambda bad: buf.dispatch(x, **kw(topk_weights=w[:, :-1] if bad else w)),
         ["topk_weights"]),
        ("topk_weights float64", lambda bad: buf.dispatch(x, **kw(topk_weights=w.double() if bad else w)),
         ["topk_weights"]),
        ("is_token_in_rank shape",
         lambda bad: buf.dispatch(x, **kw(is_token_in_rank=layout[3][:, :-1] if bad else layout[3])),
         ["is_token_in_rank"]),
        ("expert_alignment 0", lambda bad: buf.dispatch(x, expert_alignment=0 if bad else 1, **kw()),
         ["expert_alignment"]),
        ("num_worst_tokens -1", lambda bad: buf.dispatch(x, num_worst_tokens=-1 if bad else 0, **kw()),
         ["num_worst_tokens"]),
        ("fp8 scales shape", lambda bad: buf.dispatch(bad_fp8_x if bad else fp8_x, **kw()), ["x", "scale"]),
    ]
    all_bad_cases = [
        ("hidden size differs", lambda bad: buf.dispatch(torch.randn(T, H + 8) if bad else x, **kw()), None),
        ("num_experts % R != 0", lambda bad: buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E + 1),
         ["num_experts"]),
        ("num_worst_tokens < received", lambda bad: buf.dispatch(x, num_worst_tokens=1, **kw()), None),
        ("Buffer num_ranks_per_node", lambda bad: dispatch.Buffer(ctx.group, num_ranks_per_node=3, timeout_s=5.0),
         ["num_ranks_per_node"]),
    ]

    def check(name, call, names, bad_rank, everyone=False):
        """``bad_rank`` (None: every rank) passes the bad argument. The bad rank must raise
        ValueError/TypeError naming one of ``names``; the others ValueError naming the bad rank
        (``everyone``: every rank just raises ValueError, naming ``names`` when given)."""
        bad = bad_rank is None or me == bad_rank
        try:
            call(bad)
        except Exception as exc:  # noqa: BLE001
            if everyone:
                if not isinstance(exc, ValueError):
                    fails.append(f"{name}: raised {_describe(exc)}, want ValueError")
                elif names and not any(n in str(exc) for n in names):
                    fails.append(f"{name}: message {str(exc)!r} does not name {names}")
            elif bad:
                if not isinstance(exc, (ValueError, TypeError)):
                    fails.append(f"{name} (bad rank): raised {_describe(exc)}, want ValueError/TypeError")
                elif not any(n in str(exc) for n in names):
                    fails.append(f"{name} (bad rank): message {str(exc)!r} does not name {names}")
            else:
                if not isinstance(exc, ValueError):
                    fails.append(f"{name} (bad rank {bad_rank}): raised {_describe(exc)}, want ValueError")
                elif not re.search(rf"\brank {bad_rank}\b", str(exc)):
                    fails.append(f"{name} (bad rank {bad_rank}): message {str(exc)!r} does not name rank {bad_rank}")
            return
        fails.append(f"{name}: did not raise" + ("" if bad_rank is None else f" (bad rank {bad_rank})"))

    for i, (name, call, names) in enumerate(dispatch_cases):
        check(name, call, names, (3 * i + 1) % R)
    for i, (name, call, names) in enumerate(all_bad_cases):
        check(name, call, names, (i + 2) % R if name == "hidden size differs" else None, everyone=True)

    # get_dispatch_layout is local: the bad rank raises, the others may not notice
    b = R - 1
    try:
        buf.get_dispatch_layout(big if me == b else topk, E)
        if me == b:
            fails.append("get_dispatch_layout with topk_idx >= num_experts did not raise")
    except ValueError as exc:
        if me == b and "topk_idx" not in str(exc):
            fails.append(f"get_dispatch_layout: message {str(exc)!r} does not name topk_idx")
        if me != b and not re.search(rf"\brank {b}\b", str(exc)):
            fails.append(f"get_dispatch_layout raised on a good rank: {exc}")
    except Exception as exc:  # noqa: BLE001
        fails.append(f"get_dispatch_layout: raised {_describe(exc)}, want ValueError")

    # a good dispatch, then bad cached dispatches / combines along its handle
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **kw())
    n = recv_x.shape[0]
    y = torch.randn(n, H)
    combine_cases = [
        ("cached dispatch x rows", lambda bad: buf.dispatch(x[:-1] if bad else x, handle=handle), ["x"]),
        ("cached dispatch handle type", lambda bad: buf.dispatch(x, handle=object() if bad else handle),
         ["handle"]),
        ("combine x rows", lambda bad: buf.combine(torch.randn(n + 1, H) if bad else y, handle), ["x"]),
        ("combine x int", lambda bad: buf.combine(y.to(torch.int32) if bad else y, handle), ["x"]),
        ("combine x 1-D", lambda bad: buf.combine(y[:, 0] if bad else y, handle), ["x"]),
        ("combine topk_weights rows",
         lambda bad: buf.combine(y, handle, topk_weights=torch.rand(n + 2, k) if bad else recv_w), ["topk_weights"]),
        ("combine bias shape", lambda bad: buf.combine(y, handle, bias=torch.randn(T + 1, H) if bad
                                                        else torch.randn(T, H)), ["bias"]),
        ("combine bias hidden", lambda bad: buf.combine(y, handle, bias=torch.randn(T, H - 1) if bad
                                                         else torch.randn(T, H)), ["bias"]),
        ("combine handle type", lambda bad: buf.combine(y, None if bad else handle), ["handle"]),
    ]
    for i, (name, call, names) in enumerate(combine_cases):
        check(name, call, names, (2 * i + 1) % R)

    # the buffer is still usable: a full good case against the reference
    for category, msg in run_case(buf, me, R, L, GOOD_CASE, seed):
        fails.append(f"good case after the errors: [{category}] {msg}")
    buf.destroy()
    return fails


@pytest.mark.parametrize("shape", [(1, 4), (2, 4)], ids=["1x4", "2x4"])
def test_bad_arguments(cluster_factory, shape):
    results = cluster_factory(*shape).run(_job_bad_arguments, 21, timeout_s=400)
    fails = [f"rank {r}: {m}" for r, res in enumerate(results) for m in res]
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:40])


# ----------------------------------------------------------------------------------------------
# missing and dead peers
# ----------------------------------------------------------------------------------------------

def _job_make_buffer(ctx, timeout_s):
    import dispatch

    ctx.cache["buf"] = dispatch.Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node, timeout_s=timeout_s)
    return True


def _dispatch_inputs(ctx):
    R, L = ctx.world_size, ctx.ranks_per_node
    E = 4 * R
    g = gen(77, ctx.rank)
    topk = make_routing(g, 16, E, 4, R, L, "random", 0.0)
    return torch.randn(16, 32, generator=g), topk, E


def _job_dispatch_unless(ctx, absent_rank, die):
    """``absent_rank`` skips the dispatch (or dies, with ``die``); the others dispatch."""
    import dispatch

    if ctx.rank == absent_rank:
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"skipped": True}
    x, topk, E = _dispatch_inputs(ctx)
    buf = ctx.cache["buf"]
    start = time.monotonic()
    try:
        buf.dispatch(x, topk_idx=topk, num_experts=E)
    except Exception as exc:  # noqa: BLE001
        return {"type": type(exc).__name__, "msg": str(exc),
                "is_peer_timeout": isinstance(exc, dispatch.PeerTimeoutError),
                "is_runtime_error": isinstance(exc, RuntimeError),
                "rank_attr": getattr(exc, "rank", None), "seconds": time.monotonic() - start}
    return {"type": None, "seconds": time.monotonic() - start}


def _job_destroy(ctx):
    start = time.monotonic()
    buf = ctx.cache.pop("buf", None)
    if buf is not None:
        buf.destroy()
    return time.monotonic() - start


def _check_peer_errors(results, absent, timeout_s, limit_s):
    fails = []
    for r, res in enumerate(results):
        if r == absent or res is None or res.get("skipped"):
            continue
        if res["type"] is None:
            fails.append(f"rank {r}: dispatch returned without the peer")
            continue
        if not res["is_peer_timeout"]:
            fails.append(f"rank {r}: raised {res['type']}: {res['msg']} (want dispatch.PeerTimeoutError)")
        if res["rank_attr"] != absent:
            fails.append(f"rank {r}: .rank = {res['rank_attr']!r}, want {absent} ({res['msg']})")
        if not re.search(rf"\brank {absent}\b", res["msg"]):
            fails.append(f"rank {r}: message {res['msg']!r} does not name rank {absent}")
        if res["seconds"] > limit_s:
            fails.append(f"rank {r}: took {res['seconds']:.1f}s (timeout_s={timeout_s})")
    return fails


def test_peer_never_joins():
    """Rank 3 of 2x2 skips a dispatch: ranks 0 (no link to it), 1 (rail peer), 2 (local peer)
    raise PeerTimeoutError naming rank 3 after about timeout_s=3."""
    with Cluster(2, 2) as cluster:
        cluster.run(_job_make_buffer, 3.0)
        results = cluster.run(_job_dispatch_unless, 3, False, timeout_s=120)
        fails = _check_peer_errors(results, 3, 3.0, 30.0)
        assert not fails, "\n".join(fails)
        cluster.mark_broken()


def test_killed_peer():
    """Rank 3 of 2x2 is SIGKILLed during a dispatch: the others get an error naming it; destroy
    works on the survivors."""
    with Cluster(2, 2) as cluster:
        cluster.run(_job_make_buffer, 10.0)
        results = cluster.run(_job_dispatch_unless, 3, True, timeout_s=120, return_exceptions=True)
        assert type(results[3]).__name__ == "WorkerDied"
        fails = _check_peer_errors(results, 3, 10.0, 60.0)
        assert not fails, "\n".join(fails)
        destroy_s = cluster.run(_job_destroy, timeout_s=60)
        assert max(t for t in destroy_s if t is not None) < 30


def _job_rounding_disagrees(ctx):
    """Rank 0 asks for rounded rail partials, the others not: every rank raises ValueError naming
    the option, and the next combine works."""
    import dispatch

    x, topk, E = _dispatch_inputs(ctx)
    x = x.to(torch.bfloat16)
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node, timeout_s=8.0)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, num_experts=E)
    config = dispatch.Config(round_rail_partials=ctx.rank == 0)
    try:
        buf.combine(recv_x, handle, config=config)
        raised = None
    except ValueError as exc:
        raised = str(exc)
    combined, _, _ = buf.combine(recv_x, handle)
    buf.destroy()
    return raised, combined.shape[0] == x.shape[0]


def test_round_rail_partials_must_agree():
    with Cluster(2, 1) as cluster:
        results = cluster.run(_job_rounding_disagrees, timeout_s=120)
    for rank, (raised, usable) in enumerate(results):
        assert raised is not None and "round_rail_partials" in raised, f"rank {rank}: {raised!r}"
        assert usable, f"rank {rank}: the combine after the error failed"
    with pytest.raises(TypeError, match="round_rail_partials"):
        import dispatch
        dispatch.Config(round_rail_partials=1)

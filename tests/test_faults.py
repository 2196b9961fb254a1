"""Faults seen by whole programs and by every survivor: a timed-out process exits cleanly (in a
loop: the abort at exit was intermittent), every survivor blames the rank that failed first,
and settings that differ across ranks fail in the constructor on every rank."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.cluster import REPO_ROOT, Cluster, leaked_shm, shm_snapshot
from tests.dispatch_utils import gen, make_routing

WORKER = os.path.join(REPO_ROOT, "tests", "fault_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_programs(mode: str, world_size: int = 4, timeout_s: float = 90.0):
    """Runs ``fault_worker.py MODE`` as ``world_size`` processes: returns (exit code, stdout,
    stderr) per rank; kills them all on timeout."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, mode], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    out = []
    try:
        # Reap every exit at once, as a launcher does: a dead rank is then no zombie whose pid
        # still answers its node-mates' liveness checks.
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


@pytest.mark.parametrize("mode", ["sleep-destroy", "sleep-keep"])
def test_timed_out_process_exits_cleanly(mode):
    """Rank 3 of 2x2 sleeps through a dispatch; the others catch the timeout, (destroy,) stay a
    second and exit. Before the fix the rail peer aborted at exit (SIGABRT) on most runs."""
    before = shm_snapshot()
    for attempt in range(2):
        results = _run_programs(mode)
        for rank, (code, stdout, stderr) in enumerate(results):
            where = f"attempt {attempt}, rank {rank}"
            assert code == 0, f"{where}: exit code {code}\n{stderr[-2000:]}"
            assert "terminate called" not in stderr, f"{where}: {stderr[-2000:]}"
            if rank != 3:
                assert "BLAMED 3" in stdout, f"{where}: {stdout!r} {stderr[-1000:]}"
    assert leaked_shm(before) == []


def test_destroying_the_group_before_the_buffer_exits_cleanly():
    """A program that destroys its process groups while a Buffer is alive: the rail's abort
    channel still has receives posted, and the exit hook must end them (no abort at exit)."""
    for attempt in range(2):
        results = _run_programs("group-first")
        for rank, (code, stdout, stderr) in enumerate(results):
            where = f"attempt {attempt}, rank {rank}"
            assert code == 0, f"{where}: exit code {code}\n{stderr[-2000:]}"
            assert "terminate called" not in stderr and "DONE" in stdout, f"{where}: {stdout!r} {stderr[-1000:]}"


def test_uneven_agents_fail_fast():
    """Two torchrun agents of 3 + 1 processes: LOCAL_WORLD_SIZE differs, so every rank (the
    lone one too) raises ValueError naming num_ranks_per_node at once, and exits."""
    results = _run_programs("uneven-agents")
    for rank, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"rank {rank}: exit code {code}\n{stderr[-2000:]}"
        match = re.search(r"VALUEERROR (\S+) (.*)", stdout)
        assert match, f"rank {rank}: {stdout!r} {stderr[-1000:]}"
        assert float(match.group(1)) < 10.0, f"rank {rank} took {match.group(1)} s"
        assert "num_ranks_per_node" in match.group(2) and "rank 3" in match.group(2), match.group(2)


# ----------------------------------------------------------------------------------------------
# blame: every survivor names the rank that failed first
# ----------------------------------------------------------------------------------------------

def _job_buffer(ctx, timeout_s):
    import dispatch

    ctx.cache["buf"] = dispatch.Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node, timeout_s=timeout_s)
    return True


def _job_dispatch_or_die(ctx, victim, calls):
    """``victim`` SIGKILLs itself in the middle of a stream of dispatches and combines; the
    others report what they raised."""
    import dispatch

    R, L = ctx.world_size, ctx.ranks_per_node
    E = 4 * R
    g = gen(91, ctx.rank)
    topk = make_routing(g, 256, E, 4, R, L, "random", 0.0)
    x = torch.randn(256, 64, generator=g)
    buf = ctx.cache["buf"]
    start = time.monotonic()
    try:
        for call in range(calls):
            if ctx.rank == victim and call == calls // 2:
                os.kill(os.getpid(), signal.SIGKILL)
            recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, num_experts=E)
            buf.combine(recv_x, handle)
    except dispatch.PeerTimeoutError as error:
        later = None
        try:  # the buffer is dead: the next call raises at once, naming the same rank
            buf.dispatch(x, topk_idx=topk, num_experts=E)
        except dispatch.PeerTimeoutError as again:
            later = again.rank
        return {"rank": error.rank, "msg": str(error), "seconds": time.monotonic() - start, "later": later}
    return {"rank": None, "msg": "no error", "seconds": time.monotonic() - start, "later": None}


def test_every_exiting_survivor_blames_the_killed_rank():
    """2x2 programs, rank 1 killed from a timer thread while data moves; each survivor exits as
    soon as it has its error (in a loop: which survivor notices first varies). Rank 0 is its
    node-mate, rank 3 its rail peer, rank 2 neither and used to blame rank 3, which had left."""
    victim = 1
    before = shm_snapshot()
    for attempt in range(3):
        results = _run_programs(f"kill-{victim}")
        for rank, (code, stdout, stderr) in enumerate(results):
            if rank == victim:
                assert code == -signal.SIGKILL, f"attempt {attempt}: victim exit code {code}"
                continue
            where = f"attempt {attempt}, rank {rank}"
            assert code == 0, f"{where}: exit code {code}\n{stderr[-2000:]}"
            assert f"BLAMED {victim} " in stdout, f"{where}: {stdout!r} {stderr[-1000:]}"
    assert leaked_shm(before) == []


def test_every_survivor_blames_the_killed_rank():
    """The same in long-lived workers, which then find the buffer dead: the next call raises at
    once, naming the same rank."""
    victim = 1
    before = shm_snapshot()
    for attempt in range(1):
        with Cluster(2, 2) as cluster:
            cluster.run(_job_buffer, 6.0)
            results = cluster.run(_job_dispatch_or_die, victim, 40, timeout_s=120, return_exceptions=True)
            for rank, res in enumerate(results):
                if rank == victim:
                    assert type(res).__name__ == "WorkerDied", res
                    continue
                assert isinstance(res, dict), f"attempt {attempt}, rank {rank}: {res!r}"
                assert res["rank"] == victim and re.search(rf"\brank {victim}\b", res["msg"]), \
                    f"attempt {attempt}, rank {rank} blamed: {res}"
                assert res["later"] == victim, f"attempt {attempt}, rank {rank}: later call {res}"
                assert res["seconds"] < 30, f"attempt {attempt}, rank {rank}: {res}"
            cluster.mark_broken()
    assert leaked_shm(before) == []


def _job_messenger_carries_the_origin(ctx, messenger, origin, timeout_s):
    """``messenger`` gives up blaming ``origin`` exactly as a failed call does (records it in its
    node's failure word, announces it on the rail's abort channel); then every rank dispatches.
    Returns (blamed rank, seconds until the error) per rank."""
    import dispatch
    from dispatch.errors import PeerTimeoutError

    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node, timeout_s=timeout_s)
    x = torch.randn(8, 16)
    topk = make_routing(gen(3, ctx.rank), 8, 2 * ctx.world_size, 2, ctx.world_size, ctx.ranks_per_node, "random", 0.0)
    buf.dispatch(x, topk_idx=topk, num_experts=2 * ctx.world_size)  # every link works
    torch.distributed.barrier(ctx.group)  # and every rank is out of that call
    if ctx.rank == messenger:
        backend = buf._backend
        backend.node.failures.settle(PeerTimeoutError(origin, "was seen to fail (test)"))
        backend.rail.announce_abort(origin)
    start = time.monotonic()
    try:
        buf.dispatch(x, topk_idx=topk, num_experts=2 * ctx.world_size)
        blamed = None
    except dispatch.PeerTimeoutError as error:
        blamed = error.rank
    seconds = time.monotonic() - start
    buf.destroy()
    return blamed, seconds


@pytest.mark.parametrize("nodes,ranks_per_node", [(2, 2), (3, 2)])
def test_the_origin_crosses_nodes_on_the_abort_channel(cluster_factory, nodes, ranks_per_node):
    """Rank 0 gave up on its node-mate 1 and then stays silent: ranks of the other nodes used to
    wait out the timeout and name rank 0, the messenger. The abort channel carries the origin:
    every rank names rank 1 at once (node 1's rank 2 hears it from its rail peer 0; rank 3
    reads it in its node's failure word; with 3 nodes, node 2 hears it the same way)."""
    timeout_s = 20.0
    results = cluster_factory(nodes, ranks_per_node).run(_job_messenger_carries_the_origin, 0, 1, timeout_s,
                                                          timeout_s=120)
    for rank, (blamed, seconds) in enumerate(results):
        assert blamed == 1, f"rank {rank} blamed {blamed} after {seconds:.1f} s"
        assert seconds < timeout_s / 4, f"rank {rank} took {seconds:.1f} s"


def _job_destroy_says_goodbye(ctx, lone_rank):
    """Everyone destroys a buffer together, then ``lone_rank`` destroys a second buffer alone
    (the others a moment later): returns the seconds each destroy took and whether the abort
    channel's receives ended with the peers' goodbyes (no socket shut down)."""
    import dispatch

    L = ctx.ranks_per_node
    out = {}
    for name in ("together", "lone"):
        buf = dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=10.0)
        x = torch.randn(8, 16)
        topk = make_routing(gen(5, ctx.rank), 8, 2 * ctx.world_size, 2, ctx.world_size, L, "random", 0.0)
        buf.dispatch(x, topk_idx=topk, num_experts=2 * ctx.world_size)
        rail = buf._backend.rail
        receives = list(rail._abort_receives.values())
        torch.distributed.barrier(ctx.group)
        if name == "lone" and ctx.rank != lone_rank:
            time.sleep(3.0)
        start = time.monotonic()
        buf.destroy()
        out[name] = (time.monotonic() - start, len(receives),
                     all(p.finished and p.error is None for p in receives))
    return out


def test_destroy_ends_the_abort_channel_with_goodbyes(cluster_factory):
    """A collective destroy ends every abort-channel receive with the peers' goodbye word, fast;
    a rank destroying alone waits a second at most for goodbyes that do not come, then shuts its
    rail down; the others' destroys later still return."""
    results = cluster_factory(2, 2).run(_job_destroy_says_goodbye, 0, timeout_s=120)
    for rank, out in enumerate(results):
        seconds, receives, goodbyes = out["together"]
        assert receives == 1 and goodbyes, f"rank {rank}: {out}"
        assert seconds < 2.0, f"rank {rank}: {out}"  # the goodbyes, not the 1 s wait for them
        assert out["lone"][0] < 3.0, f"rank {rank}: {out}"


def _job_one_way_notify_loss(ctx, dropper, victim, timeout_s):
    """After a good dispatch, ``dropper`` loses its combine notify block to ``victim`` (a rail
    peer) as a cut link would: ``victim`` waits in notify, its node-mates in combine for its
    rows. Returns (blamed rank, message, seconds until the error) per rank."""
    import dispatch
    from dispatch.host.notify import NOTIFY_TAG
    from dispatch.host.rail_link import Pending

    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node, timeout_s=timeout_s)
    R, L = ctx.world_size, ctx.ranks_per_node
    x = torch.randn(64, 16)
    topk = make_routing(gen(7, ctx.rank), 64, 2 * R, 2, R, L, "random", 0.0)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, num_experts=2 * R)
    torch.distributed.barrier(ctx.group)  # every rank is out of dispatch
    if ctx.rank == dropper:
        rail, isend = buf._backend.rail, buf._backend.rail.isend

        def lossy_isend(tensor, peer, tag):
            if peer == victim and tag == NOTIFY_TAG:
                lost = Pending(None)
                lost.finished = True  # sent, as far as this rank can tell
                return lost
            return isend(tensor, peer, tag)

        rail.isend = lossy_isend
    start = time.monotonic()
    try:
        buf.combine(recv_x, handle)
        blamed, message = None, ""
    except dispatch.PeerTimeoutError as error:
        blamed, message = error.rank, str(error)
    seconds = time.monotonic() - start
    buf.destroy()
    return blamed, message, seconds


def test_node_mates_behind_a_lost_block_name_the_rank_across_the_link(cluster_factory):
    """Rank 3's combine notify block never reaches rank 1: rank 0 enters combine and waits for
    rank 1's rows, rank 1 waits in notify for rank 3. Rank 0 used to grant its live node-mate a
    grace and then name it (rank 1's own notify wait is longer), and rank 1 followed: the CI
    link-cut failure of 2026-12-04. Rank 1 says on the node's wait board that it waits on rank
    3, so both name rank 3, well before rank 0's grace would have ended."""
    timeout_s = 6.0
    results = cluster_factory(2, 2).run(_job_one_way_notify_loss, 3, 1, timeout_s, timeout_s=120)
    for rank, (blamed, message, seconds) in enumerate(results):
        assert blamed is not None, f"rank {rank}: combine returned after {seconds:.1f} s"
        assert seconds < 3 * timeout_s, f"rank {rank}: {message} after {seconds:.1f} s"
    for rank in (0, 1):
        blamed, message, seconds = results[rank]
        assert blamed == 3, f"rank {rank}: {message} after {seconds:.1f} s"
        assert seconds < 1.5 * timeout_s, f"rank {rank}: {message} after {seconds:.1f} s"
    assert "rank 1 waits on it" in results[0][1], results[0]


# ----------------------------------------------------------------------------------------------
# arguments that disagree across ranks, foreign handles, stale layouts, messages in words
# ----------------------------------------------------------------------------------------------

def _raises(call):
    """(exception type name, message) of ``call()``, or (None, '') when it returned."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return None, ""


def _job_disagreements(ctx):
    """Every case: (name, outcome on this rank). A bad rank must raise ValueError/TypeError naming
    the argument; the others ValueError naming it or the bad rank; and the buffer stays usable."""
    import dispatch

    R, L, me = ctx.world_size, ctx.ranks_per_node, ctx.rank
    E, T, H, k = 4 * R, 32, 64, 4
    g = gen(17, me)
    x = torch.randn(T, H, generator=g)
    topk = make_routing(g, T, E, k, R, L, "random", 0.0)
    other_topk = make_routing(g, T, E, k, R, L, "random", 0.0)
    w = torch.rand(T, k, generator=g)
    out = {}
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=10.0)
    layout = buf.get_dispatch_layout(topk, E)
    stale = buf.get_dispatch_layout(other_topk, E)

    def kw(**over):
        args = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                    num_tokens_per_expert=layout[2], topk_idx=topk, topk_weights=w)
        args.update(over)
        return args

    # item 3: presence of topk_weights / topk_idx is part of the handshake
    out["no weights on rank 1"] = _raises(lambda: buf.dispatch(x, **kw(topk_weights=None if me == 1 else w)))
    out["no topk_idx on rank 2"] = _raises(lambda: buf.dispatch(
        x, **kw(topk_idx=None if me == 2 else topk, topk_weights=None if me == 2 else w)))
    # item 8: dtypes and settings in words
    out["dtype on rank 0"] = _raises(lambda: buf.dispatch(x.to(torch.bfloat16) if me == 0 else x, **kw()))
    # item 6: stale layouts
    out["stale is_token_in_rank on rank 3"] = _raises(lambda: buf.dispatch(
        x, **kw(is_token_in_rank=stale[3] if me == 3 else layout[3], num_tokens_per_rank=None)))
    out["stale num_tokens_per_expert on rank 1"] = _raises(lambda: buf.dispatch(
        x, **kw(num_tokens_per_expert=stale[2] if me == 1 else layout[2])))

    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **kw())
    bf16_x = recv_x.to(torch.bfloat16)
    out["rounding on rank 0"] = _raises(lambda: buf.combine(
        bf16_x, handle, config=dispatch.Config(round_rail_partials=me == 0)))
    # item 4: handles of other buffers are refused before anything moves
    other_topology = dispatch.Buffer(ctx.group, num_ranks_per_node=1, timeout_s=10.0)
    foreign = other_topology.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E)[4]
    other_topology.destroy()
    twin = dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=10.0)
    twin_handle = twin.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E)[4]
    twin.destroy()
    out["other topology combine"] = _raises(lambda: buf.combine(recv_x, foreign))
    out["other topology cached dispatch"] = _raises(lambda: buf.dispatch(x, handle=foreign))
    out["other buffer combine on rank 2"] = _raises(lambda: buf.combine(recv_x, twin_handle if me == 2 else handle))
    # item 5: settings that differ across ranks fail in the constructor, on every rank
    start = time.monotonic()
    out["Buffer num_ranks_per_node"] = _raises(lambda: dispatch.Buffer(
        ctx.group, num_ranks_per_node=1 if me == 0 else L, timeout_s=10.0))
    out["Buffer num_nvl_bytes"] = _raises(lambda: dispatch.Buffer(
        ctx.group, 64 << 20 if me == 3 else 32 << 20, num_ranks_per_node=L, timeout_s=10.0))
    out["constructor seconds"] = time.monotonic() - start

    # still usable: the same dispatch and combine as before the errors, bit for bit
    again_x, _, again_w, _, again_handle, _ = buf.dispatch(x, **kw())
    out["usable"] = (torch.equal(again_x, recv_x) and torch.equal(again_w, recv_w)
                     and torch.equal(buf.combine(again_x, again_handle)[0], buf.combine(recv_x, handle)[0]))
    buf.destroy()
    return out


# name: (bad rank or None for all, words the bad rank's message must hold (empty: as the others'),
#        words the other ranks' messages must hold)
DISAGREEMENTS = {
    "no weights on rank 1": (1, [], ["topk_weights", "rank 1"]),
    "no topk_idx on rank 2": (2, [], ["topk_idx", "rank 2"]),
    "dtype on rank 0": (0, [], ["float32", "bfloat16"]),
    "stale is_token_in_rank on rank 3": (3, ["is_token_in_rank", "topk_idx"], ["rank 3"]),
    "stale num_tokens_per_expert on rank 1": (1, ["num_tokens_per_expert", "topk_idx"], ["rank 1"]),
    "rounding on rank 0": (0, [], ["round_rail_partials=True", "round_rail_partials=False"]),
    "other topology combine": (None, ["handle", "num_ranks_per_node=1"], []),
    "other topology cached dispatch": (None, ["handle", "num_ranks_per_node=1"], []),
    "other buffer combine on rank 2": (2, ["handle", "another Buffer"], ["rank 2"]),
    "Buffer num_ranks_per_node": (None, [], ["num_ranks_per_node", "rank 0 has 1"]),
    "Buffer num_nvl_bytes": (None, [], ["num_nvl_bytes", "rank 3 has"]),
}


def test_disagreements_and_foreign_handles(cluster_factory):
    results = cluster_factory(2, 2).run(_job_disagreements, timeout_s=300)
    fails = []
    for rank, out in enumerate(results):
        for name, (bad_rank, bad_words, all_words) in DISAGREEMENTS.items():
            kind, msg = out[name]
            is_bad = bad_rank is None or bad_rank == rank
            allowed = ("ValueError", "TypeError") if is_bad else ("ValueError",)
            words = (bad_words or all_words) if is_bad else all_words
            if kind not in allowed:
                fails.append(f"rank {rank}, {name}: raised {kind}: {msg}")
            elif not all(word in msg for word in words):
                fails.append(f"rank {rank}, {name}: {msg!r} lacks one of {words}")
        if out["constructor seconds"] > 20:
            fails.append(f"rank {rank}: the failing constructors took {out['constructor seconds']:.1f} s")
        if not out["usable"]:
            fails.append(f"rank {rank}: the buffer changed its results after the errors")
    assert not fails, "\n".join(fails)

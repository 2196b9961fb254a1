"""No /dev/shm/dispatch* entries are left behind: after Buffer.destroy(), after a killed process,
and at the end of the test session."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.cluster import Cluster, leaked_shm, shm_snapshot
from tests.dispatch_utils import gen, make_routing


def _job_buffer_cycle(ctx, destroy):
    import dispatch

    R, L = ctx.world_size, ctx.ranks_per_node
    E = 2 * R
    topk = make_routing(gen(5, ctx.rank), 12, E, 2, R, L, "random", 0.0)
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=10.0)
    buf.dispatch(torch.randn(12, 16), topk_idx=topk, num_experts=E)
    if destroy:
        buf.destroy()
    else:
        ctx.cache["buf"] = buf
    return os.getpid()


def _job_kill_self_or_destroy(ctx, victim):
    if ctx.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    buf = ctx.cache.pop("buf")
    buf.destroy()
    return True


def _mapped_dispatch_shm(pid):
    """/dev/shm/dispatch* mappings of a live process."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sorted({line.split()[-1] for line in f if "/dev/shm/dispatch" in line})
    except OSError:
        return []


@pytest.mark.parametrize("shape", [(1, 4), (2, 2)], ids=["1x4", "2x2"])
def test_no_shm_after_destroy(cluster_factory, shape):
    before = shm_snapshot()
    cluster = cluster_factory(*shape)
    pids = cluster.run(_job_buffer_cycle, True)
    assert leaked_shm(before) == []
    assert {p: _mapped_dispatch_shm(p) for p in pids} == {p: [] for p in pids}, "destroy() left segments mapped"


def test_no_shm_after_killed_process():
    before = shm_snapshot()
    with Cluster(1, 4) as cluster:
        cluster.run(_job_buffer_cycle, False)
        cluster.kill_rank(1)  # holds its mappings until the kernel reaps it
        out = cluster.run(_job_kill_self_or_destroy, 2, return_exceptions=True, timeout_s=120)
        assert out[0] is True and out[3] is True, out
    assert leaked_shm(before) == []


@pytest.mark.run_last
def test_no_shm_left_at_end_of_session(cluster_factory, shm_at_start):
    cluster_factory.close_all()  # the cached clusters destroy the buffers they still hold
    assert leaked_shm(shm_at_start) == []

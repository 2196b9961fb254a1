"""A device buffer's ``destroy()`` waits for its peers (they may still touch its staging) at most
``destroy_wait_s(timeout_s)``: a peer that died or never calls ``destroy()`` costs a warning,
not a hang until the process group's own timeout (30 min by default)."""

from __future__ import annotations

import time
import warnings

import pytest

from dispatch.backend import destroy_wait_s
from tests.dispatch_utils import cuda_device_params, make_loopback

DEVICES = cuda_device_params()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,L", [(1, 2), (2, 1), (2, 2)])
def test_destroy_without_a_peer_warns_after_the_timeout(device, N, L):
    """Rank 0 destroys while the others stay away: its destroy returns after the bounded wait,
    warning that not every rank came; the others' destroys then return at once, warning too.
    (N = 1: the in-node backend; N > 1: the two-hop backend.)"""
    timeout_s = 0.25
    wait_s = destroy_wait_s(timeout_s)
    lb = make_loopback(device, N * L, num_ranks_per_node=L, timeout_s=timeout_s)

    def destroy(r, buf):
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            buf.destroy()
        return time.monotonic() - start, [str(w.message) for w in caught if w.category is RuntimeWarning]

    try:
        alone = lb.run(lambda r, buf: destroy(r, buf) if r == 0 else None)[0]
        later = lb.run(lambda r, buf: destroy(r, buf) if r != 0 else None)[1:]
    finally:
        lb.buffers = [None] * lb.num_ranks  # each buffer was destroyed above (or the test failed)
    seconds, messages = alone
    assert wait_s * 0.9 <= seconds < wait_s + 5.0, seconds
    assert any("rank 0" in m and f"within {wait_s:g} s" in m for m in messages), messages
    for rank, (seconds, messages) in enumerate(later, start=1):
        assert seconds < 1.0, (rank, seconds)
        assert messages, f"rank {rank}: no warning"


@pytest.mark.parametrize("device", DEVICES)
def test_a_collective_destroy_does_not_warn(device):
    lb = make_loopback(device, 4, num_ranks_per_node=2, timeout_s=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lb.destroy()


def _job_bounded_barrier(ctx, late_s, timeout_s):
    """On a fresh gloo group: rank 0 waits in ``GroupComm.barrier(timeout_s)``, the others come
    ``late_s`` later. Returns (whether it passed, seconds) per rank."""
    import torch.distributed as dist

    from dispatch.backend import GroupComm

    group = dist.new_group(backend="gloo")
    if ctx.rank != 0:
        time.sleep(late_s)
    start = time.monotonic()
    passed = GroupComm(group).barrier(timeout_s)
    seconds = time.monotonic() - start
    # The late ranks met rank 0's timed-out barrier: the group is in step again.
    dist.barrier(group=group)
    return passed, seconds


def test_group_barrier_is_bounded_on_gloo(cluster_factory):
    results = cluster_factory(1, 2).run(_job_bounded_barrier, 3.0, 1.0, timeout_s=60)
    passed, seconds = results[0]
    assert not passed and 0.9 <= seconds < 2.5, results[0]
    assert results[1][0], results[1]
    results = cluster_factory(1, 2).run(_job_bounded_barrier, 0.0, 10.0, timeout_s=60)
    assert all(passed for passed, _ in results), results

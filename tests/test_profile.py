"""dispatch.profile: the SM / worker-thread usage profiler."""

from __future__ import annotations

import threading
import time
import timeit

import pytest
import torch

import dispatch.profile as dprof
from dispatch.profile import Profiler, Record, summarize

def test_off_by_default_and_record_is_a_noop():
    assert dprof.is_enabled() is False
    p = Profiler()           # created but not started: collects nothing
    dprof.record("dispatch.pack_rail", 0, 1, 2, 3)
    assert p.records == []


def test_context_manager_collects_and_summarizes():
    with dprof.profile() as prof:
        assert dprof.is_enabled()
        dprof.record("dispatch.pack_rail", 0, 1_000, 3_000, 1_000_000)
        dprof.record("dispatch.pack_rail", 1, 2_000, 5_000, 2_000_000)
        dprof.record("combine.reduce", 0, 6_000, 7_000, 0)
    assert not dprof.is_enabled()
    dprof.record("dispatch.pack_rail", 0, 0, 1, 1)          # after exit: dropped
    recs = prof.records
    assert len(recs) == 3
    assert all(isinstance(r, Record) and r.sm_id == -1 for r in recs)
    s = prof.summary()
    assert list(s) == ["dispatch.pack_rail", "combine.reduce"]
    pr = s["dispatch.pack_rail"]
    assert pr.records == 2 and pr.units == 2 and pr.ranks == 1 and not pr.on_sm
    assert pr.busy_us == pytest.approx(5.0)           # 2 us + 3 us
    assert pr.span_us == pytest.approx(4.0)           # 1 us .. 5 us
    assert pr.bytes_moved == 3_000_000
    assert pr.unit_us_per_gb == pytest.approx(5.0 / 0.003)
    assert s["combine.reduce"].unit_us_per_gb == float("inf")
    table = prof.table()
    assert "dispatch.pack_rail" in table and "threads" in table
    assert set(prof.to_json()) == {"records", "summary"}


def test_module_is_callable_and_nesting():
    import dispatch
    with dprof() as outer:                  # the module itself works as a context manager factory
        dprof.record("a.x", 0, 0, 10, 1)
        with dprof.profile() as inner:
            dprof.record("a.y", 0, 10, 20, 1)
        assert dprof.is_enabled()           # the outer one is still on
        dprof.record("a.z", 0, 20, 30, 1)
    assert not dprof.is_enabled()
    assert [r.kernel for r in outer.records] == ["a.x", "a.y", "a.z"]
    assert [r.kernel for r in inner.records] == ["a.y"]
    assert dispatch is not None


def test_record_device_buffer():
    """The GPU path: rows (sm_id, start_ns, end_ns) per block, end 0 = block did not run."""
    buf = torch.tensor([[3, 100, 400], [7, 150, 250], [3, 500, 700], [9, 0, 0]], dtype=torch.int64)
    with dprof.profile() as prof:
        dprof.record_device_buffer("dispatch.pack_rail", buf, bytes_moved=1000)
    recs = prof.records
    assert [(r.worker, r.sm_id, r.start_ns, r.end_ns) for r in recs] == [(0, 3, 100, 400), (1, 7, 150, 250),
                                                                          (2, 3, 500, 700)]
    assert sum(r.bytes_moved for r in recs) == 1000
    s = prof.summary()["dispatch.pack_rail"]
    assert s.on_sm and s.units == 2 and s.busy_us == pytest.approx(0.6)
    dprof.record_device_buffer("x", buf)        # off: nothing happens
    assert len(prof.records) == 3


def test_threads_record_concurrently():
    with dprof.profile() as prof:
        def work(w):
            for i in range(500):
                t = time.perf_counter_ns()
                dprof.record("combine.reduce", w, t, t + 10, 8)
        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(prof.records) == 2000
    s = prof.summary()["combine.reduce"]
    assert s.units == 4 and s.bytes_moved == 16000


def test_timeline_png(tmp_path):
    recs = [Record("dispatch.pack_rail", w, 1000 * w, 1000 * w + 500, 10, -1, r) for r in range(2) for w in range(3)]
    recs.append(Record("combine.reduce", 0, 4000, 6000, 10, -1, 1))
    p = Profiler()
    p.add(recs)
    path = p.timeline(str(tmp_path / "t.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert summarize(recs)["dispatch.pack_rail"].ranks == 2
    assert Profiler().timeline(str(tmp_path / "empty.png"))   # no records: still a picture


def test_disabled_check_is_cheap():
    """Profiling off costs one global read per kernel: well under a microsecond."""
    n = 100_000
    per_call = min(timeit.repeat(dprof.is_enabled, number=n, repeat=3)) / n
    assert per_call < 1e-6
    per_record = min(timeit.repeat(lambda: dprof.record("k", 0, 0, 1, 1), number=n, repeat=3)) / n
    assert per_record < 2e-6


# ----------------------------------------------------------------------------- on a real cluster

def _profiled_job(ctx):
    from dispatch import Buffer
    from bench.common import gen_topk_idx
    # Not kept in ctx.cache: a buffer left alive would count as a leak in test_shm_cleanup.
    buf = Buffer(ctx.group, num_ranks_per_node=ctx.ranks_per_node)
    E = 4 * ctx.world_size
    idx = gen_topk_idx(64, E, 4, ctx.world_size, ctx.ranks_per_node, None, seed=1, rank=ctx.rank)
    x = torch.randn(64, 256).to(torch.bfloat16)
    w = torch.rand(64, 4)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    with dprof.profile() as prof:
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
        buf.combine(recv_x, handle, topk_weights=recv_w)
    # off again: nothing more is recorded
    buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    buf.destroy()
    mine = prof.records
    prof.gather(ctx.group)
    return [r.__dict__ for r in mine], len(prof.records)


def test_profiler_on_cpu_cluster(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 2)
    results = cluster.run(_profiled_job, timeout_s=180)
    total = sum(len(recs) for recs, _ in results)
    assert all(n == total for _, n in results)      # gather gives every rank all records
    kernels = set()
    for rank, (recs, _) in enumerate(results):
        assert recs, f"rank {rank} recorded nothing"
        for d in recs:
            r = Record(**d)
            assert r.rank == rank
            assert r.worker >= 0 and r.sm_id == -1
            assert 0 < r.start_ns <= r.end_ns
            assert r.bytes_moved >= 0
            assert r.kernel.split(".")[0] in ("dispatch", "combine")
            kernels.add(r.kernel)
    assert any(k.startswith("dispatch.") for k in kernels)
    assert any(k.startswith("combine.") for k in kernels)
    p = Profiler()
    p.add(Record(**d) for recs, _ in results for d in recs)
    s = p.summary()
    assert all(v.units >= 1 and v.busy_us >= 0 for v in s.values())
    assert p.timeline(str(tmp_path / "cluster.png"))


def _job_profile_workers(ctx):
    import dispatch
    import dispatch.profile as dprof

    R, L = ctx.world_size, ctx.ranks_per_node
    E = 2 * R
    topk = torch.stack([torch.randperm(E)[:2] for _ in range(2048)])
    x = torch.randn(2048, 256)
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=30.0)
    with dprof.profile() as prof:
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, num_experts=E,
                                                  config=dispatch.Config(num_sms=8))
        buf.combine(recv_x, handle, config=dispatch.Config(num_sms=8))
    buf.destroy()
    threads = dispatch.Config(num_sms=8).cpu_threads(L)
    return threads, [(r.kernel, r.worker, r.start_ns, r.end_ns) for r in prof.records]


def test_cpu_profile_records_real_workers(cluster_factory):
    """The movers' records name the worker threads that ran them (worker 0 is the calling
    thread), one record per worker slice: as many workers as the thread budget allows."""
    threads, records = cluster_factory(2, 1).run(_job_profile_workers, timeout_s=120)[0]
    workers = {w for _, w, _, _ in records}
    assert workers == set(range(threads)), (threads, workers)
    assert all(end >= start for _, _, start, end in records)

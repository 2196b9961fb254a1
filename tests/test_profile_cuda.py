"""dispatch.profile on the CUDA backend: every block of every communication kernel records its SM
id and start/end times (csrc/cuda/profile_record.h) into a buffer the backend passes; on SIMT
the same kernel source runs with virtual SM ids (the resident slot of the block)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from typing import Any, Dict, List

import pytest
import torch

import dispatch.profile as dprof
from tests.dispatch_utils import cuda_device_params as device_params
from tests.dispatch_utils import loopback_inputs as inputs
from tests.dispatch_utils import make_loopback as loopback
from tests.dispatch_utils import sync, to_device

DEVICES = device_params()
L, E, K, H = 2, 8, 2, 64
NUM_SMS = 4  # 2 channels: dispatch and combine run 4 blocks per rank


class LaunchSpy:
    """Stands for the backend's module: forwards everything, and notes each launch's kernel and
    profile address (0: no buffer passed)."""

    def __init__(self, mod: Any, seen: List[Any]) -> None:
        self._mod, self._seen = mod, seen

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._mod, name)
        if name in ("launch_layout", "launch_notify", "launch_dispatch", "launch_combine"):
            def spy(a: Any, stream: int) -> None:
                self._seen.append((name, a.profile))
                target(a, stream)
            return spy
        return target


def _step(device: str, xs, idxs, ws, spy_log: Dict[int, List[Any]]):
    from dispatch import Config
    config = Config(num_sms=NUM_SMS)

    def step(r: int, buf: Any) -> Dict[str, Any]:
        backend = buf._backend
        if not isinstance(backend.mod, LaunchSpy):
            backend.mod = LaunchSpy(backend.mod, spy_log.setdefault(r, []))
        x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                       config=config)
        out, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=config)
        sync(device)
        return {"T": x.shape[0], "records_sent": int(in_rank.sum()), "recv_rows": recv_x.shape[0],
                "hidden_bytes": H * x.element_size(), "k": idx.shape[1], "out": out.cpu()}

    return step


@pytest.mark.parametrize("device", DEVICES)
def test_loopback_records_every_block(device, tmp_path):
    xs, idxs, ws = inputs(L, E, K, H, torch.bfloat16, seed=7, tokens=[40, 300])
    spy_log: Dict[int, List[Any]] = {}
    with loopback(device, L) as lb:
        with dprof.profile() as prof:
            res = lb.run(_step(device, xs, idxs, ws, spy_log))
        # on: every launch got a buffer
        assert all(addr != 0 for log in spy_log.values() for _, addr in log)
        assert {name for _, log in spy_log.items() for name, _ in log} == {
            "launch_layout", "launch_notify", "launch_dispatch", "launch_combine"}
        launches = {(r, name): sum(1 for n, _ in log if n == name) for r, log in spy_log.items()
                    for name, _ in log}
        # off: no buffer passed to any kernel
        for log in spy_log.values():
            log.clear()
        lb.run(_step(device, xs, idxs, ws, spy_log))
        mod = lb.buffers[0]._backend.mod._mod
        assert all(not b._backend._profile_pending for b in lb.buffers)
    assert all(spy_log[r] for r in range(L))
    assert all(addr == 0 for log in spy_log.values() for _, addr in log)

    recs = prof.records
    by = {(r.rank, r.kernel): [] for r in recs}
    for r in recs:
        by[(r.rank, r.kernel)].append(r)
    from dispatch import _C
    for rank in range(L):
        for kernel in ("dispatch.layout", "notify", "dispatch.node_copy", "combine.node_copy"):
            assert (rank, kernel) in by, (rank, kernel, sorted(by))
        # one record per block of every launch: 2 per channel for the copies; the layout kernel
        # takes ceil(T / 256) blocks, at most num_sms; notify one
        T = res[rank]["T"]
        for kernel, launch, blocks in (("dispatch.node_copy", "launch_dispatch", NUM_SMS),
                                       ("combine.node_copy", "launch_combine", NUM_SMS),
                                       ("dispatch.layout", "launch_layout", min(NUM_SMS, (T + 255) // 256)),
                                       ("notify", "launch_notify", 1)):
            n = launches[(rank, launch)]
            assert n >= 1
            assert Counter(r.worker for r in by[(rank, kernel)]) == {b: n for b in range(blocks)}, kernel
        # bytes: what the kernels moved
        rec_bytes = _C.RecordLayout(1, res[rank]["k"], res[rank]["hidden_bytes"], 0).bytes
        assert sum(r.bytes_moved for r in by[(rank, "dispatch.node_copy")]) == res[rank]["records_sent"] * rec_bytes
        row_bytes = _C.ReturnRowLayout(res[rank]["hidden_bytes"], res[rank]["k"]).bytes
        assert sum(r.bytes_moved for r in by[(rank, "combine.node_copy")]) == res[rank]["recv_rows"] * row_bytes
        assert sum(r.bytes_moved for r in by[(rank, "dispatch.layout")]) == launches[(rank, "launch_layout")] * T * (K * 8 + L)
    # plausible ids and times
    sm_limit = mod.resident_block_limit(512) if device == "simt" else torch.cuda.get_device_properties(0).multi_processor_count
    for r in recs:
        assert r.start_ns > 0 and r.start_ns <= r.end_ns, r
        assert 0 <= r.sm_id < min(sm_limit, 4096), r
    if device == "simt":
        # a virtual SM holds one block at a time: blocks (of any rank and kernel) that ran at the
        # same time had different ids (a GPU SM may hold several blocks)
        for i, a in enumerate(recs):
            for b in recs[i + 1:]:
                if a.start_ns < b.end_ns and b.start_ns < a.end_ns:
                    assert a.sm_id != b.sm_id, (a, b)

    summary = prof.summary()
    copy = summary["dispatch.node_copy"]
    assert copy.on_sm and copy.records == L * NUM_SMS and copy.units >= NUM_SMS and copy.ranks == L
    assert copy.unit_us_per_gb > 0 and copy.bytes_moved > 0
    table = prof.table()
    for column in ("kernel", "blocks", "occupied", "busy us", "SM-us/GB", "dispatch.node_copy", "combine.node_copy",
                   f"{copy.units} SMs"):
        assert column in table, (column, table)
    path = prof.timeline(str(tmp_path / "cuda_timeline.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("device", DEVICES)
def test_async_calls_are_collected_later(device):
    """With async_finish the rows are read once the kernels finished: at the next call's start."""
    from dispatch import Config
    xs, idxs, ws = inputs(1, E, K, H, torch.float32, seed=3, tokens=[64])
    with loopback(device, 1) as lb:
        with dprof.profile() as prof:
            def step(r: int, buf: Any) -> int:
                x, idx = to_device(xs[r], device), to_device(idxs[r], device)
                _, _, _, _, _, event = buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=2),
                                                    async_finish=True)
                event.current_stream_wait()
                sync(device)
                pending = len(buf._backend._profile_pending)
                buf.get_dispatch_layout(idx, E)   # its start collects what finished
                return pending
            pending = lb.run(step)[0]
    kernels = [r.kernel for r in prof.records]
    assert pending >= 1  # the async dispatch left its rows for later
    assert kernels.count("dispatch.node_copy") == 2 and "dispatch.layout" in kernels


def test_simt_virtual_sm_ids_follow_resident_slots():
    """The SIMT runtime's virtual SM id is the block's resident slot: capped at 2 resident blocks,
    the 3 blocks of a layout launch all run on virtual SM 0 or 1, and every row is written."""
    from dispatch.cuda.device import SimtDevice, simt_available
    if not simt_available():
        pytest.skip("dispatch._simt was not built")
    from dispatch import _simt as mod
    T, k, R, E = 600, 2, 4, 8  # 600 tokens: 3 blocks of 256 threads
    idx = torch.randint(0, E, (T, k))
    outs = [torch.zeros(R, dtype=torch.int32), torch.zeros(R, dtype=torch.int32),
            torch.zeros(E, dtype=torch.int32), torch.zeros(T, R, dtype=torch.bool)]
    rows = torch.zeros(3, 3, dtype=torch.int64)
    a = mod.LayoutArgs()
    a.topk_idx, a.num_tokens, a.num_topk = idx.data_ptr(), T, k
    a.num_ranks, a.num_ranks_per_node, a.num_experts, a.num_blocks = R, R, E, 3
    a.per_rank, a.per_node, a.per_expert, a.in_rank = (t.data_ptr() for t in outs)
    a.profile = rows.data_ptr()
    stream = mod.Stream()
    SimtDevice.configure(max_resident_blocks=2)
    try:
        mod.launch_layout(a, stream.handle)
        stream.synchronize()
    finally:
        SimtDevice.configure(max_resident_blocks=0)
    assert set(rows[:, 0].tolist()) <= {0, 1}, rows
    assert bool((rows[:, 1] > 0).all()) and bool((rows[:, 1] <= rows[:, 2]).all()), rows
    assert int(outs[2].sum()) > 0  # the kernel itself still ran
    # profiling off (address 0): nothing written anywhere but the outputs
    a.profile = 0
    rows.zero_()
    for t in outs:
        t.zero_()
    mod.launch_layout(a, stream.handle)
    stream.synchronize()
    assert int(rows.abs().sum()) == 0 and int(outs[2].sum()) > 0


KERNEL_SOURCES = ("layout.cu", "notify.cu", "intranode_dispatch.cu", "intranode_combine.cu", "rail_dispatch.cu",
                  "rail_combine.cu")


@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_nvcc_compiles_the_profile_hook(source, tmp_path):
    """nvcc (where installed) compiles every kernel file with its hook, and the PTX reads the SM
    id, the global timer and raises the end time atomically (the GPU side of the records)."""
    import os
    import shutil
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH: the CUDA build is not checked here")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ptx = tmp_path / "kernel.ptx"
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-Icsrc", "-ptx", f"csrc/cuda/{source}", "-o", str(ptx)],
                   cwd=root, check=True, timeout=300)
    text = ptx.read_text()
    for needle in ("%smid", "%globaltimer", "atom.global.max.u64"):
        assert needle in text, (source, needle)

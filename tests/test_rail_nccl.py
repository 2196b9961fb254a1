"""The NCCL rail transport (dispatch/cuda/rail_nccl.py) up to the point a second GPU is needed.

* Always (no NCCL needed): the rail groups of N x L topologies, the config initializer, argument
  checks, and the exact call order of construction and ``post()`` against a recording fake of the
  NCCL function table (``FakeNccl``) with a fake device.
* With a real NCCL (``DISPATCH_NCCL_LIBRARY`` or the ``nvidia-nccl-cu12`` wheel; not installed by
  scripts/setup.sh: the wheel is 351 MB): library loaded, ``ncclGetVersion``,
  ``ncclGetUniqueId``, an error naming the call, and ``ncclConfig_t``'s layout compiled from the
  wheel's ``nccl.h`` against ``NcclConfig``. These skip, saying so, when the library is absent.
* A real send/receive needs two GPUs (one communicator rank each): skipped below two GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
from typing import Any, List, Optional, Tuple

import pytest
import torch

from dispatch.cuda.rail import RailChunk
from dispatch.errors import PeerTimeoutError
from dispatch.cuda.rail_nccl import (NCCL_API_MAGIC, NCCL_CONFIG_HEADER_VERSION, NCCL_CONFIG_UNDEF_INT,
                                     NcclConfig, NcclError, NcclRail, find_nccl_library, make_config,
                                     rail_group)
from dispatch.testing import LoopbackComm, _RankComm
from dispatch.topology import Topology

LIBRARY = find_nccl_library()
needs_nccl = pytest.mark.skipif(LIBRARY is None, reason="libnccl.so.2 not found (nvidia-nccl-cu12 is 351 MB, "
                                "not installed in CI; set DISPATCH_NCCL_LIBRARY)")


class FakeNccl:
    """Records every call of the NCCL function table, in order; ``fail`` makes one call fail."""

    def __init__(self, log: Optional[List[Tuple[Any, ...]]] = None, uid_byte: int = 7,
                 fail: Optional[str] = None, states: Optional[List[int]] = None) -> None:
        self.calls: List[Tuple[Any, ...]] = [] if log is None else log
        self.uid_byte, self.fail = uid_byte, fail
        self.states = list(states or [])  # what the polls see before "ready" (0)

    def _call(self, *entry: Any) -> None:
        self.calls.append(entry)
        if entry[0] == self.fail:
            raise NcclError(f"{entry[0]} failed: injected")

    def get_unique_id(self) -> bytes:
        self._call("get_unique_id")
        return bytes([self.uid_byte]) * 128

    def comm_init_rank_config(self, nranks: int, unique_id: bytes, rank: int, config: NcclConfig) -> int:
        self._call("init", nranks, unique_id, rank, config.minCTAs, config.maxCTAs)
        return 0xC0 + rank

    def comm_destroy(self, comm: int) -> None:
        self._call("destroy", comm)

    def comm_abort(self, comm: int) -> None:
        self._call("abort", comm)

    def comm_get_async_error(self, comm: int) -> int:
        self._call("poll", comm)
        return self.states.pop(0) if self.states else 0

    @staticmethod
    def error_string(code: int) -> str:
        return f"fake error {code}"

    def group_start(self) -> None:
        self._call("group_start")

    def group_end(self) -> None:
        self._call("group_end")

    def send(self, address: int, num_bytes: int, peer: int, comm: int, stream: int) -> None:
        self._call("send", address, num_bytes, peer, comm, stream)

    def recv(self, address: int, num_bytes: int, peer: int, comm: int, stream: int) -> None:
        self._call("recv", address, num_bytes, peer, comm, stream)


class FakeDevice:
    """``scope()`` and a ``mod`` whose ``rail_loopback_copy`` records into the same log."""

    def __init__(self, log: List[Tuple[Any, ...]]) -> None:
        self.in_scope = False

        class Mod:
            @staticmethod
            def rail_loopback_copy(dst: int, src: int, num_bytes: int, counter: int, value: int, min_ns: int,
                                   stream: int) -> None:
                log.append(("copy", dst, src, num_bytes, counter, value, min_ns, stream))
        self.mod = Mod()

    @contextlib.contextmanager
    def scope(self) -> Any:
        self.in_scope = True
        try:
            yield
        finally:
            self.in_scope = False


class OneRankComm:
    """Host exchange seen by one rank: every node-0 rank contributes ``uid``."""

    def __init__(self, topo: Topology, uid: Any) -> None:
        self.topo, self.uid = topo, uid

    def all_gather_object(self, obj: Any) -> List[Any]:
        return [self.uid if self.topo.node_of(r) == 0 else None for r in range(self.topo.num_ranks)]


def make_rail(rank: int = 5, R: int = 8, L: int = 4, **kw: Any) -> Tuple[NcclRail, List[Tuple[Any, ...]]]:
    log: List[Tuple[Any, ...]] = []
    topo = Topology(R, L, rank)
    rail = NcclRail(OneRankComm(topo, bytes([3]) * 128), topo, FakeDevice(log), lib=FakeNccl(log), **kw)
    return rail, log


# --- rail groups ------------------------------------------------------------------------------
@pytest.mark.parametrize("N,L", [(2, 1), (2, 8), (4, 2), (3, 4)])
def test_rail_groups_partition_ranks_by_local_index(N: int, L: int) -> None:
    groups = [rail_group(N * L, L, j) for j in range(L)]
    for j, g in enumerate(groups):
        assert g == [m * L + j for m in range(N)]
        assert [Topology(N * L, L, r).local_rank for r in g] == [j] * N
        assert [Topology(N * L, L, r).node for r in g] == list(range(N))  # communicator rank = node
    assert sorted(r for g in groups for r in g) == list(range(N * L))


@pytest.mark.parametrize("args,name", [((8, 3, 0), "num_ranks=8"), ((8, 4, 4), "local_index=4"),
                                       ((8, 4, -1), "local_index=-1"), ((8, 0, 0), "num_ranks_per_node"),
                                       ((0, 4, 0), "num_ranks=0")])
def test_rail_group_rejects_bad_shapes(args: Tuple[int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        rail_group(*args)
    with pytest.raises(TypeError, match="local_index"):
        rail_group(8, 4, 1.0)  # type: ignore[arg-type]


# --- config -----------------------------------------------------------------------------------
def test_config_is_initialized_like_the_header_initializer() -> None:
    c = make_config(2, 6)
    assert c.size == ctypes.sizeof(NcclConfig) and c.magic == NCCL_API_MAGIC
    assert c.version == NCCL_CONFIG_HEADER_VERSION
    assert (c.minCTAs, c.maxCTAs, c.blocking) == (2, 6, 0)  # nonblocking: polled with a deadline
    assert make_config(2, 6, blocking=True).blocking == 1
    ints = [n for n, t in NcclConfig._fields_[3:] if t is ctypes.c_int and n not in ("minCTAs", "maxCTAs", "blocking")]
    assert len(ints) == 18 and all(getattr(c, n) == NCCL_CONFIG_UNDEF_INT for n in ints)
    assert c.netName is None and c.commName is None


def _nccl_header() -> Optional[str]:
    if LIBRARY is None or not os.path.isabs(LIBRARY):
        return None
    header = os.path.join(os.path.dirname(os.path.dirname(LIBRARY)), "include", "nccl.h")
    return header if os.path.exists(header) else None


def _cuda_include() -> Optional[str]:
    for base in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_runtime.h")):
            return os.path.join(base, "include")
    return None


@pytest.mark.skipif(_nccl_header() is None or _cuda_include() is None or shutil.which("g++") is None,
                    reason="needs the nvidia-nccl-cu12 wheel's nccl.h (351 MB wheel, not in CI), CUDA headers, g++")
def test_config_layout_matches_the_wheels_header(tmp_path: Any) -> None:
    header = _nccl_header()
    assert header is not None
    names = [n for n, _ in NcclConfig._fields_]
    lines = [f'printf("{n} %zu\\n", offsetof(ncclConfig_t, {n}));' for n in names]
    src = tmp_path / "layout.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <nccl.h>\nint main(void) {\n"
                   'printf("sizeof %zu\\n", sizeof(ncclConfig_t));\n'
                   'printf("header_version %d\\n", NCCL_VERSION_CODE);\n'
                   "ncclConfig_t init = NCCL_CONFIG_INITIALIZER;\n"
                   'printf("init_min %d\\n", init.minCTAs);\n' + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["g++", "-x", "c++", str(src), "-I", os.path.dirname(header), "-I", _cuda_include(),
                    "-o", str(exe)], check=True, capture_output=True, timeout=120)
    out = dict(line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                       text=True).stdout.splitlines())
    assert int(out["sizeof"]) == ctypes.sizeof(NcclConfig)
    assert int(out["header_version"]) == NCCL_CONFIG_HEADER_VERSION
    assert int(out["init_min"]) == make_config(1, 1).cgaClusterSize == NCCL_CONFIG_UNDEF_INT
    for n in names:
        assert int(out[n]) == getattr(NcclConfig, n).offset, n


# --- the real library, without a GPU ------------------------------------------------------------
@needs_nccl
def test_real_library_version_unique_id_and_checked_errors() -> None:
    from dispatch.cuda.rail_nccl import NcclLibrary
    lib = NcclLibrary(LIBRARY)
    version = lib.get_version()
    assert version >= 21700, version  # ncclConfig_t with minCTAs/maxCTAs
    a, b = lib.get_unique_id(), lib.get_unique_id()
    assert len(a) == 128 and a != b and any(a)
    lib.group_start()
    lib.group_end()
    if torch.cuda.device_count() == 0:  # without a GPU the init fails, and says which call
        with pytest.raises(NcclError, match=r"ncclCommInitRankConfig failed: .*ncclResult_t \d"):
            lib.comm_init_rank_config(1, a, 0, make_config(1, 2))
        topo = Topology(2, 1, 0)  # the whole construction, on the real library: fails at the init, fast
        with pytest.raises(NcclError, match="ncclCommInitRankConfig failed"):
            NcclRail(OneRankComm(topo, a), topo, FakeDevice([]), lib=lib, timeout_s=5)


# --- construction (collective), with the fake -------------------------------------------------
def test_construction_exchanges_one_unique_id_per_rail_and_joins_by_node() -> None:
    N, L = 3, 2
    shared = LoopbackComm(N * L)
    logs: List[List[Tuple[Any, ...]]] = [[] for _ in range(N * L)]
    rails: List[Optional[NcclRail]] = [None] * (N * L)
    errors: List[BaseException] = []

    def run(rank: int) -> None:
        try:
            lib = FakeNccl(logs[rank], uid_byte=rank + 1)
            rails[rank] = NcclRail(_RankComm(shared, rank), Topology(N * L, L, rank), FakeDevice(logs[rank]),
                                   max_ctas=3, min_ctas=2, lib=lib)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(N * L)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for rank in range(N * L):
        node, j = divmod(rank, L)
        drew = [e for e in logs[rank] if e[0] == "get_unique_id"]
        assert len(drew) == (1 if node == 0 else 0)
        (init,) = [e for e in logs[rank] if e[0] == "init"]
        assert init == ("init", N, bytes([j + 1]) * 128, node, 2, 3)  # rail j's id comes from rank j
        assert logs[rank][-1] == ("poll", 0xC0 + node)  # the nonblocking init, polled until ready
        rail = rails[rank]
        assert rail is not None and rail.num_sms == 3 and rail.name == "nccl"
        assert rail.members == [m * L + j for m in range(N)]


def test_init_runs_with_the_gpu_current_and_checks_ctas() -> None:
    log: List[Tuple[Any, ...]] = []
    topo = Topology(4, 2, 1)
    device = FakeDevice(log)
    seen = []

    class Lib(FakeNccl):
        def comm_init_rank_config(self, *a: Any) -> int:
            seen.append(device.in_scope)
            return super().comm_init_rank_config(*a)

    rail = NcclRail(OneRankComm(topo, b"\1" * 128), topo, device, lib=Lib(log))
    assert seen == [True]
    assert rail.config.blocking == 0 and (rail.config.minCTAs, rail.config.maxCTAs) == (1, rail.num_sms)
    for kw, name in (({"min_ctas": 0}, "min_ctas"), ({"max_ctas": 1, "min_ctas": 2}, "max_ctas"),
                     ({"max_ctas": 2.0}, "max_ctas"), ({"timeout_s": 0}, "timeout_s")):
        with pytest.raises((ValueError, TypeError), match=name):
            NcclRail(OneRankComm(topo, b"\1" * 128), topo, device, lib=FakeNccl(log), **kw)
    with pytest.raises(ValueError, match="at least 2"):
        NcclRail(OneRankComm(Topology(4, 4, 0), b"\1" * 128), Topology(4, 4, 0), device, lib=FakeNccl(log))
    with pytest.raises(RuntimeError, match=r"rank 1 sent no NCCL unique id for rail 1 \(failed: boom\)"):
        NcclRail(OneRankComm(topo, "failed: boom"), topo, device, lib=FakeNccl(log))
    # the drawing rank still joins the exchange (its peers must not wait), then raises its error
    joined: List[Any] = []

    class Comm(OneRankComm):
        def all_gather_object(self, obj: Any) -> List[Any]:
            joined.append(obj)
            return super().all_gather_object(obj)
    with pytest.raises(NcclError, match="get_unique_id failed"):
        NcclRail(Comm(Topology(4, 2, 1), None), Topology(4, 2, 1), device, lib=FakeNccl(log, fail="get_unique_id"))
    assert joined and joined[0].startswith("failed: get_unique_id failed")
    with pytest.raises(RuntimeError, match="rank 1 sent no NCCL unique id for rail 1"):
        NcclRail(OneRankComm(topo, None), topo, device, lib=FakeNccl(log))


# --- post(): order and checks -----------------------------------------------------------------
def test_post_issues_one_group_then_counter_stores_in_stream_order() -> None:
    rail, log = make_rail(rank=5, R=12, L=4)  # node 1 of 3, rail 1: comm handle 0xC0 + node
    del log[:]
    sends = [RailChunk(0, 0x1000, 256), RailChunk(2, 0x2000, 128), RailChunk(0, 0x1100, 64)]
    recvs = [RailChunk(2, 0x9000, 512, arrival_counter=0x80, arrival_value=1),
             RailChunk(0, 0xA000, 0, arrival_counter=0x88, arrival_value=1),
             RailChunk(2, 0x9200, 32, arrival_counter=0x80, arrival_value=2),
             RailChunk(0, 0xA100, 16)]  # no counter: no store
    rail.post(sends, recvs, stream=77)
    comm = 0xC0 + 1
    assert log == [("group_start",),
                   ("send", 0x1000, 256, 0, comm, 77), ("send", 0x2000, 128, 2, comm, 77),
                   ("send", 0x1100, 64, 0, comm, 77),
                   ("recv", 0x9000, 512, 2, comm, 77), ("recv", 0xA000, 0, 0, comm, 77),
                   ("recv", 0x9200, 32, 2, comm, 77), ("recv", 0xA100, 16, 0, comm, 77),
                   ("group_end",), ("poll", comm),
                   ("copy", 0, 0, 0, 0x80, 1, 0, 77), ("copy", 0, 0, 0, 0x88, 1, 0, 77),
                   ("copy", 0, 0, 0, 0x80, 2, 0, 77)]
    del log[:]
    rail.post([], [], 77)
    assert log == []  # nothing to move: no empty group


def test_post_closes_the_group_when_a_call_fails_and_stores_nothing() -> None:
    log: List[Tuple[Any, ...]] = []
    topo = Topology(4, 2, 2)
    rail = NcclRail(OneRankComm(topo, b"\2" * 128), topo, FakeDevice(log), lib=FakeNccl(log, fail="recv"))
    del log[:]
    with pytest.raises(NcclError, match="recv failed"):
        rail.post([RailChunk(0, 0x10, 8)], [RailChunk(0, 0x20, 8, 0x30, 1)], 1)
    assert [e[0] for e in log] == ["group_start", "send", "recv", "group_end"]


BAD_POSTS = [
    (lambda: ([RailChunk(1, 0x10, 8)], []), ValueError, r"sends\[0\].peer_node=1 is not a rail peer"),
    (lambda: ([RailChunk(4, 0x10, 8)], []), ValueError, r"sends\[0\].peer_node=4"),
    (lambda: ([], [RailChunk(0, 0x10, 8), RailChunk(-1, 0x10, 8)]), ValueError, r"recvs\[1\].peer_node must be >= 0"),
    (lambda: ([RailChunk(0, 0x10, -8)], []), ValueError, r"sends\[0\].num_bytes must be >= 0"),
    (lambda: ([RailChunk(0, 0, 8)], []), ValueError, r"sends\[0\].address is 0"),
    (lambda: ([RailChunk(0, 0x10, 8, arrival_counter=0x40, arrival_value=1)], []), ValueError,
     r"sends\[0\].arrival_counter must be 0"),
    (lambda: ([], [RailChunk(2, 0x10, 8, arrival_counter=0x40)]), ValueError, r"recvs\[0\].arrival_value must be >= 1"),
    (lambda: ([RailChunk(0, 0x10, 8.0)], []), TypeError, r"sends\[0\].num_bytes must be an int"),  # type: ignore[arg-type]
    (lambda: ([(0, 0x10, 8)], []), TypeError, r"sends\[0\] must be a RailChunk"),
    (lambda: (RailChunk(0, 0x10, 8), []), TypeError, "sends must be a sequence"),
]


@pytest.mark.parametrize("case", range(len(BAD_POSTS)))
def test_post_rejects_bad_chunks_before_any_nccl_call(case: int) -> None:
    rail, log = make_rail(rank=5, R=12, L=4)  # node 1 of 3
    del log[:]
    make, exc, message = BAD_POSTS[case]
    sends, recvs = make()
    with pytest.raises(exc, match=message):
        rail.post(sends, recvs, 5)
    assert log == []


def test_post_rejects_a_bad_stream_and_a_closed_rail() -> None:
    rail, log = make_rail(rank=0, R=4, L=2)
    del log[:]
    with pytest.raises(TypeError, match="stream"):
        rail.post([RailChunk(1, 0x10, 8)], [], None)  # type: ignore[arg-type]
    assert log == []
    rail.close()
    rail.close()  # idempotent: one destroy
    assert log == [("destroy", 0xC0)]
    with pytest.raises(RuntimeError, match="after close"):
        rail.post([RailChunk(1, 0x10, 8)], [], 1)


def test_abort_aborts_the_communicator_once_and_close_then_does_nothing() -> None:
    """After a failure the backend aborts the rail (a round waiting on a dead peer keeps NCCL's
    kernel on the rail stream until the communicator is aborted), then closes it as usual."""
    rail, log = make_rail(rank=0, R=4, L=2)
    del log[:]
    rail.abort()
    rail.abort()
    rail.close()
    assert log == [("abort", 0xC0)]
    with pytest.raises(RuntimeError, match="after close"):
        rail.post([RailChunk(1, 0x10, 8)], [], 1)


def test_two_hop_constructs_the_rail_with_its_call_signature() -> None:
    """two_hop.TwoHopBackend._default_rail calls ``NcclRail(comm, topo, device, timeout_s=...)``."""
    import inspect

    from dispatch.cuda import two_hop
    src = inspect.getsource(two_hop.TwoHopBackend._default_rail)
    assert "NcclRail(self.comm, self.topo, self.device, timeout_s=self.timeout_s)" in src
    params = list(inspect.signature(NcclRail).parameters)
    assert params[:3] == ["comm", "topo", "device"]


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="NCCL's own send/receive needs a GPU (this machine has none)")
def test_one_gpu_self_send_through_the_real_library() -> None:  # pragma: no cover - needs a GPU
    """The ctypes ABI on a GPU: our ncclConfig_t accepted (min/maxCTAs), a one-rank communicator
    sends 1000 bytes to itself in a group, the stream carries them."""
    if LIBRARY is None:
        pytest.skip("needs libnccl.so.2 beside the GPU")
    from dispatch.cuda.rail_nccl import NcclLibrary
    lib = NcclLibrary(LIBRARY)
    comm = lib.comm_init_rank_config(1, lib.get_unique_id(), 0, make_config(1, 2, blocking=True))
    try:
        src = torch.arange(1000, device="cuda").to(torch.uint8)
        dst = torch.zeros(1000, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
        lib.group_start()
        lib.send(src.data_ptr(), 1000, 0, comm, stream)
        lib.recv(dst.data_ptr(), 1000, 0, comm, stream)
        lib.group_end()
        torch.cuda.synchronize()
        assert torch.equal(dst, src) and lib.comm_get_async_error(comm) == 0
    finally:
        lib.comm_destroy(comm)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a real NCCL send/receive needs two GPUs "
                    f"(this machine has {torch.cuda.device_count()})")
def test_two_gpus_move_a_chunk_and_bump_the_counter() -> None:  # pragma: no cover - needs two GPUs
    from dispatch.cuda.device import GpuDevice, gpu_available
    if not gpu_available() or LIBRARY is None:
        pytest.skip("needs dispatch._cuda and libnccl.so.2 beside the two GPUs")
    shared = LoopbackComm(2)
    out: List[Any] = [None, None]
    errors: List[BaseException] = []

    def run(rank: int) -> None:
        try:
            device = GpuDevice(rank)
            with device.scope():
                rail = NcclRail(_RankComm(shared, rank), Topology(2, 1, rank), device, max_ctas=2)
                stream = device.new_stream()
                src = torch.arange(256, dtype=torch.uint8, device=device.torch_device) + rank
                dst = torch.zeros(256, dtype=torch.uint8, device=device.torch_device)
                counter = torch.zeros(1, dtype=torch.int64, device=device.torch_device)
                peer = 1 - rank
                rail.post([RailChunk(peer, src.data_ptr(), 256)],
                          [RailChunk(peer, dst.data_ptr(), 256, counter.data_ptr(), 1)], stream.cuda_stream)
                stream.synchronize()
                out[rank] = (dst.cpu(), int(counter.item()))
                rail.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for rank in range(2):
        dst, counter = out[rank]
        assert torch.equal(dst, torch.arange(256, dtype=torch.uint8) + (1 - rank)) and counter == 1


# --- a peer that never shows up, a failing communicator: errors, never a hang ------------------
def test_init_times_out_naming_a_rail_peer_and_aborts() -> None:
    log: List[Tuple[Any, ...]] = []
    topo = Topology(6, 2, 3)  # node 1, rail 1: peers are ranks 1 and 5
    lib = FakeNccl(log, states=[7] * 10 ** 6)  # forever in progress
    with pytest.raises(PeerTimeoutError, match=r"rank 1 \(a rail peer of rank 3\) did not complete "
                       r"ncclCommInitRankConfig.* after 0.05 s") as info:
        NcclRail(OneRankComm(topo, b"\1" * 128), topo, FakeDevice(log), lib=lib, timeout_s=0.05)
    assert info.value.rank == 1
    assert log[-1] == ("abort", 0xC0 + 1) and ("destroy", 0xC0 + 1) not in log


def test_post_polls_until_ready_then_stores_and_reports_async_errors() -> None:
    log: List[Tuple[Any, ...]] = []
    topo = Topology(4, 2, 0)
    lib = FakeNccl(log)
    rail = NcclRail(OneRankComm(topo, b"\1" * 128), topo, FakeDevice(log), lib=lib)
    del log[:]
    lib.states = [7, 7]  # the group end connects to the peer first
    rail.post([RailChunk(1, 0x10, 8)], [RailChunk(1, 0x20, 8, 0x30, 1)], 9)
    assert [e[0] for e in log] == ["group_start", "send", "recv", "group_end", "poll", "poll", "poll", "copy"]
    del log[:]
    lib.states = [3]  # ncclInternalError reported asynchronously
    with pytest.raises(NcclError, match=r"ncclGroupEnd \(rail send/recv\) failed on rank 0: fake error 3"):
        rail.post([RailChunk(1, 0x10, 8)], [RailChunk(1, 0x20, 8, 0x30, 1)], 9)
    assert [e[0] for e in log][-2:] == ["poll", "abort"] and "copy" not in [e[0] for e in log]
    rail.close()  # aborted already: nothing left to destroy
    assert "destroy" not in [e[0] for e in log]
    with pytest.raises(RuntimeError, match="after close"):
        rail.post([], [], 9)

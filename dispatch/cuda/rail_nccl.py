"""The NCCL rail transport: the production ``RailTransport`` of the two-hop CUDA path.

One NCCL communicator per rail: the ranks with the same local index ``j`` on every node
(global ranks ``m * L + j``, ordered by node ``m``), so a rail peer's communicator rank is its
node. ``post`` issues, on the rail stream, ``ncclGroupStart``, one ``ncclSend``/``ncclRecv`` per
chunk (bytes as ``ncclUint8``), ``ncclGroupEnd``, then one arrival-counter store per received
chunk: stream order puts each store after the group's receives have landed.

The communicator is nonblocking (``ncclConfig_t.blocking = 0``): its set-up and each group end
are polled with ``ncclCommGetAsyncError`` up to ``timeout_s``; a rail peer that never shows up
aborts the communicator (``ncclCommAbort``) and raises ``PeerTimeoutError`` naming it, instead of
hanging the host. A peer dying after the group is enqueued leaves the NCCL kernel waiting on the
rail stream: the forwarder kernel's own timeout on the arrival counter names that peer, and the
backend's ``destroy()`` then aborts the communicator (``abort``) before draining the stream.

The transport's SMs are bounded by the communicator's ``ncclConfig_t`` (``minCTAs``/``maxCTAs``:
NCCL runs one CTA per channel, each on its own SM); ``num_sms`` reports ``max_ctas`` beside the
kernels' ``num_sms``.

Why ctypes over ``libnccl.so.2`` rather than C++ in ``_cuda``: the library is found at run time
(the ``nvidia-nccl-cu12`` wheel that CUDA builds of torch depend on, or ``DISPATCH_NCCL_LIBRARY``,
or the loader's path), so ``_cuda`` builds and loads on machines without NCCL headers, and the
call sequence can be checked without a GPU against a recording fake of the same function table
(``NcclLibrary`` is that table; tests pass their own). The cost is that ``ncclConfig_t`` is laid
out here by hand: ``NcclConfig`` follows ``nccl.h`` of NCCL 2.32 field by field (the struct is
versioned and append-only; NCCL reads ``size``/``version`` and takes the prefix it knows), and a
test compiles a C program against the wheel's header to compare sizes and offsets.

The arrival-counter store is the CUDA module's ``rail_loopback_copy`` with no bytes (it then
launches only its one-thread release-store kernel on the stream); a GPU-initiated transport
(NCCL's device API) would replace ``post`` by device-side puts and signals behind the same seam
(``dispatch/cuda/rail.py``).

Needs two GPUs to move a byte; everything up to that point is unit-tested without one
(``tests/test_rail_nccl.py``).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import PeerTimeoutError
from ..topology import Topology
from .rail import RailChunk

NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7  # a nonblocking communicator's call that is still being carried out
NCCL_UINT8 = 1  # ncclDataType_t: bytes
NCCL_API_MAGIC = 0xCAFEBEEF
NCCL_CONFIG_UNDEF_INT = -(2 ** 31)  # INT_MIN
NCCL_UNIQUE_ID_BYTES = 128
# NCCL_VERSION(2, 32, 3): the header NcclConfig was laid out from (and checked against in tests)
NCCL_CONFIG_HEADER_VERSION = 23203
DEFAULT_MAX_CTAS = 4  # SMs NCCL may take on the rail; the kernels keep the rest
DEFAULT_MIN_CTAS = 1
DEFAULT_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 0.001


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


class NcclConfig(ctypes.Structure):
    """``ncclConfig_t`` of ``nccl.h`` 2.32 (``ncclConfig_v23100``), field for field."""

    _fields_ = [
        ("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int), ("cgaClusterSize", ctypes.c_int), ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int), ("netName", ctypes.c_char_p), ("splitShare", ctypes.c_int),
        ("trafficClass", ctypes.c_int), ("commName", ctypes.c_char_p), ("collnetEnable", ctypes.c_int),
        ("CTAPolicy", ctypes.c_int), ("shrinkShare", ctypes.c_int), ("nvlsCTAs", ctypes.c_int),
        ("nChannelsPerNetPeer", ctypes.c_int), ("nvlinkCentricSched", ctypes.c_int),
        ("graphUsageMode", ctypes.c_int), ("numRmaCtx", ctypes.c_int), ("maxP2pPeers", ctypes.c_int),
        ("graphStreamOrdering", ctypes.c_int), ("launchOrderImplicit", ctypes.c_int),
        ("numRmaSig", ctypes.c_int), ("rmaEagerInit", ctypes.c_int), ("hostCftMode", ctypes.c_int),
        ("nvlsHostMode", ctypes.c_int),
    ]


def make_config(min_ctas: int, max_ctas: int, blocking: bool = False) -> NcclConfig:
    """An ``ncclConfig_t`` initialized as ``NCCL_CONFIG_INITIALIZER`` does (header, every field
    unset), then ``minCTAs``/``maxCTAs`` and ``blocking`` set.

    Args:
        min_ctas: lower bound of NCCL's CTAs (channels) on the communicator.
        max_ctas: upper bound: the SMs the rail may occupy.
        blocking: False (the transport's choice): calls return ``ncclInProgress`` and the caller
            polls with a deadline, so a dead peer is an error, not a hang.

    Returns:
        the config (pointer fields NULL, int fields ``NCCL_CONFIG_UNDEF_INT``).
    """
    config = NcclConfig()
    config.size = ctypes.sizeof(NcclConfig)
    config.magic = NCCL_API_MAGIC
    config.version = NCCL_CONFIG_HEADER_VERSION
    for name, ctype in NcclConfig._fields_[3:]:
        if ctype is ctypes.c_int:
            setattr(config, name, NCCL_CONFIG_UNDEF_INT)
    config.minCTAs = min_ctas
    config.maxCTAs = max_ctas
    config.blocking = int(blocking)
    return config


def rail_group(num_ranks: int, num_ranks_per_node: int, local_index: int) -> List[int]:
    """The global ranks of rail ``local_index``: ``m * L + local_index`` for each node ``m``,
    ordered by node (so a rank's position in its rail communicator is its node).

    Args:
        num_ranks: ``R``, the group size.
        num_ranks_per_node: ``L`` (must divide ``R``).
        local_index: the rail, in ``[0, L)``.

    Returns:
        ``R / L`` global ranks.
    """
    for name, value in (("num_ranks", num_ranks), ("num_ranks_per_node", num_ranks_per_node),
                        ("local_index", local_index)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_ranks_per_node < 1:
        raise ValueError(f"num_ranks_per_node must be >= 1, got {num_ranks_per_node}")
    if num_ranks < 1 or num_ranks % num_ranks_per_node:
        raise ValueError(f"num_ranks={num_ranks} must be a positive multiple of num_ranks_per_node="
                         f"{num_ranks_per_node}")
    if not 0 <= local_index < num_ranks_per_node:
        raise ValueError(f"local_index={local_index} outside [0, {num_ranks_per_node})")
    return [m * num_ranks_per_node + local_index for m in range(num_ranks // num_ranks_per_node)]


class NcclError(RuntimeError):
    """An NCCL call returned an error; the message names the call and ``ncclGetErrorString``."""


def find_nccl_library() -> Optional[str]:
    """Path or loader name of ``libnccl.so.2``: ``DISPATCH_NCCL_LIBRARY``, else the
    ``nvidia-nccl-cu12`` wheel's, else ``"libnccl.so.2"`` when the loader finds it; None if none."""
    env = os.environ.get("DISPATCH_NCCL_LIBRARY")
    if env:
        return env
    try:
        import nvidia.nccl  # type: ignore[import-not-found]
        for base in list(getattr(nvidia.nccl, "__path__", [])):
            path = os.path.join(base, "lib", "libnccl.so.2")
            if os.path.exists(path):
                return path
    except ImportError:
        pass
    try:
        ctypes.CDLL("libnccl.so.2")
        return "libnccl.so.2"
    except OSError:
        return None


class NcclLibrary:
    """The NCCL function table the transport uses, over ``libnccl.so.2`` by ctypes. Every call
    is checked: a failure raises ``NcclError`` naming the call and ``ncclGetErrorString``.

    Args:
        path: the library (default: ``find_nccl_library()``).
    """

    def __init__(self, path: Optional[str] = None) -> None:
        path = path or find_nccl_library()
        if path is None:
            raise RuntimeError("libnccl.so.2 not found: install nvidia-nccl-cu12 or set DISPATCH_NCCL_LIBRARY")
        self.path = path
        lib = ctypes.CDLL(path)
        c_void_p, c_int, c_size_t = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        sig = {
            "ncclGetVersion": [ctypes.POINTER(c_int)],
            "ncclGetUniqueId": [ctypes.POINTER(NcclUniqueId)],
            "ncclCommInitRankConfig": [ctypes.POINTER(c_void_p), c_int, NcclUniqueId, c_int,
                                       ctypes.POINTER(NcclConfig)],
            "ncclCommDestroy": [c_void_p],
            "ncclCommAbort": [c_void_p],
            "ncclCommGetAsyncError": [c_void_p, ctypes.POINTER(c_int)],
            "ncclGroupStart": [],
            "ncclGroupEnd": [],
            "ncclSend": [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p],
            "ncclRecv": [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p],
        }
        self._fn: Dict[str, Any] = {}
        for name, argtypes in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, c_int
            self._fn[name] = fn
        self._error_string = lib.ncclGetErrorString
        self._error_string.argtypes, self._error_string.restype = [c_int], ctypes.c_char_p

    def error_string(self, code: int) -> str:
        return (self._error_string(code) or b"?").decode(errors="replace")

    def _check(self, name: str, *args: Any) -> None:
        code = self._fn[name](*args)
        if code not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):  # in progress: the caller polls
            raise NcclError(f"{name} failed: {self.error_string(code)} (ncclResult_t {code})")

    def get_version(self) -> int:
        """``ncclGetVersion``: e.g. 23203 for 2.32.3."""
        out = ctypes.c_int()
        self._check("ncclGetVersion", ctypes.byref(out))
        return out.value

    def get_unique_id(self) -> bytes:
        """``ncclGetUniqueId``: the 128 bytes every member of a new communicator must pass."""
        uid = NcclUniqueId()
        self._check("ncclGetUniqueId", ctypes.byref(uid))
        return ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)

    def comm_init_rank_config(self, nranks: int, unique_id: bytes, rank: int, config: NcclConfig) -> int:
        """``ncclCommInitRankConfig`` on the current device; returns the communicator handle."""
        uid = NcclUniqueId()
        ctypes.memmove(ctypes.addressof(uid), unique_id, NCCL_UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        self._check("ncclCommInitRankConfig", ctypes.byref(comm), nranks, uid, rank, ctypes.byref(config))
        return int(comm.value or 0)

    def comm_destroy(self, comm: int) -> None:
        self._check("ncclCommDestroy", ctypes.c_void_p(comm))

    def comm_abort(self, comm: int) -> None:
        self._check("ncclCommAbort", ctypes.c_void_p(comm))

    def comm_get_async_error(self, comm: int) -> int:
        """``ncclCommGetAsyncError``: the communicator's state (0 ready, 7 in progress, else an
        error code; the call itself is checked)."""
        state = ctypes.c_int()
        self._check("ncclCommGetAsyncError", ctypes.c_void_p(comm), ctypes.byref(state))
        return state.value

    def group_start(self) -> None:
        self._check("ncclGroupStart")

    def group_end(self) -> None:
        self._check("ncclGroupEnd")

    def send(self, address: int, num_bytes: int, peer: int, comm: int, stream: int) -> None:
        self._check("ncclSend", ctypes.c_void_p(address), num_bytes, NCCL_UINT8, peer, ctypes.c_void_p(comm),
                    ctypes.c_void_p(stream))

    def recv(self, address: int, num_bytes: int, peer: int, comm: int, stream: int) -> None:
        self._check("ncclRecv", ctypes.c_void_p(address), num_bytes, NCCL_UINT8, peer, ctypes.c_void_p(comm),
                    ctypes.c_void_p(stream))


def _check_chunks(kind: str, chunks: Any, node: int, num_nodes: int) -> List[RailChunk]:
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence):
        raise TypeError(f"{kind} must be a sequence of RailChunk, got {type(chunks).__name__}")
    for i, c in enumerate(chunks):
        where = f"{kind}[{i}]"
        if not isinstance(c, RailChunk):
            raise TypeError(f"{where} must be a RailChunk, got {type(c).__name__}")
        for field in ("peer_node", "address", "num_bytes", "arrival_counter", "arrival_value"):
            value = getattr(c, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{where}.{field} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{where}.{field} must be >= 0, got {value}")
        if not c.peer_node < num_nodes or c.peer_node == node:
            raise ValueError(f"{where}.peer_node={c.peer_node} is not a rail peer of node {node} "
                             f"(nodes 0..{num_nodes - 1})")
        if c.num_bytes and not c.address:
            raise ValueError(f"{where}.address is 0 for {c.num_bytes} bytes")
        if kind == "sends" and c.arrival_counter:
            raise ValueError(f"{where}.arrival_counter must be 0: the receiver owns its counters")
        if kind == "recvs" and c.arrival_counter and c.arrival_value < 1:
            raise ValueError(f"{where}.arrival_value must be >= 1 (chunk index + 1), got {c.arrival_value}")
    return list(chunks)


class NcclRail:
    """One rank's end of its rail: a communicator over the ranks with its local index.

    Construction is collective over ``comm`` (every rank of the buffer): the node-0 member of
    each rail draws the rail's unique id, one host all-gather hands it to the others, then each
    rank joins its rail's communicator (``ncclCommInitRankConfig``, rank = node).

    Args:
        comm: host exchange over all ranks (``all_gather_object``).
        topo: this rank's topology.
        device: the ``GpuDevice`` (its ``scope()`` makes the GPU current; its ``mod`` stores the
            arrival counters).
        max_ctas: most SMs NCCL may occupy on the rail (``ncclConfig_t.maxCTAs``); also ``num_sms``.
        min_ctas: fewest (``ncclConfig_t.minCTAs``).
        lib: the NCCL function table (default: ``NcclLibrary()``; tests pass a recording fake).
        timeout_s: the communicator is nonblocking: its set-up and each ``post``'s group end
            waiting longer than this abort it and raise ``PeerTimeoutError`` naming a rail peer.
        store_counter: ``(address, value, stream)`` enqueuing a uint64 release store on the
            stream (default: the device module's, see the module docstring).
    """

    name = "nccl"

    def __init__(self, comm: Any, topo: Topology, device: Any, max_ctas: int = DEFAULT_MAX_CTAS,
                 min_ctas: int = DEFAULT_MIN_CTAS, lib: Optional[Any] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 store_counter: Optional[Callable[[int, int, int], None]] = None) -> None:
        if not isinstance(topo, Topology):
            raise TypeError(f"topo must be a Topology, got {type(topo).__name__}")
        for name, value in (("max_ctas", max_ctas), ("min_ctas", min_ctas)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if min_ctas < 1:
            raise ValueError(f"min_ctas must be >= 1, got {min_ctas}")
        if max_ctas < min_ctas:
            raise ValueError(f"max_ctas={max_ctas} must be >= min_ctas={min_ctas}")
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if topo.num_nodes < 2:
            raise ValueError(f"topo has {topo.num_nodes} node: the rail needs at least 2")
        self.topo = topo
        self.num_sms = max_ctas
        self.min_ctas = min_ctas
        self.timeout_s = float(timeout_s)
        self.members = rail_group(topo.num_ranks, topo.num_ranks_per_node, topo.local_rank)
        self.lib = lib if lib is not None else NcclLibrary()
        if store_counter is None:
            mod = device.mod

            def store_counter(address: int, value: int, stream: int) -> None:
                mod.rail_loopback_copy(0, 0, 0, address, value, 0, stream)
        self._store_counter = store_counter
        self._comm: Optional[int] = None
        mine: Any = None
        failure: Optional[BaseException] = None
        if topo.node == 0:
            try:
                mine = self.lib.get_unique_id()
            except NcclError as exc:  # still join the exchange: the rail's other ranks must not wait
                failure, mine = exc, f"failed: {exc}"
        gathered = comm.all_gather_object(mine)
        if failure is not None:
            raise failure
        unique_id = gathered[self.members[0]]
        if not isinstance(unique_id, bytes) or len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            detail = f" ({unique_id})" if isinstance(unique_id, str) else ""
            raise RuntimeError(f"rank {self.members[0]} sent no NCCL unique id for rail {topo.local_rank}{detail}")
        self.config = make_config(min_ctas, max_ctas)
        with device.scope():
            self._comm = self.lib.comm_init_rank_config(len(self.members), unique_id, topo.node, self.config)
            self._wait_ready("ncclCommInitRankConfig (joining the rail communicator)",
                             [m for m in range(topo.num_nodes) if m != topo.node])

    def _wait_ready(self, what: str, peer_nodes: Sequence[int]) -> None:
        """Polls the nonblocking communicator until ``what`` is carried out; on an error, or past
        ``timeout_s`` (a rail peer that never joined), aborts the communicator and raises."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            assert self._comm is not None
            state = self.lib.comm_get_async_error(self._comm)
            if state == NCCL_SUCCESS:
                return
            if state != NCCL_IN_PROGRESS or time.monotonic() > deadline:
                comm, self._comm = self._comm, None
                self.lib.comm_abort(comm)  # nothing of this rail can be trusted any more
                if state != NCCL_IN_PROGRESS:
                    text = self.lib.error_string(state) if hasattr(self.lib, "error_string") else "?"
                    raise NcclError(f"{what} failed on rank {self.topo.rank}: {text} (ncclResult_t {state})")
                peer = self.topo.rank_of(min(peer_nodes), self.topo.local_rank) if peer_nodes else self.topo.rank
                raise PeerTimeoutError(peer, f"(a rail peer of rank {self.topo.rank}) did not complete {what}; "
                                       f"the rail communicator was aborted", self.timeout_s)
            time.sleep(POLL_INTERVAL_S)

    def post(self, sends: Sequence[RailChunk], recvs: Sequence[RailChunk], stream: int) -> None:
        """One group of ``ncclSend``/``ncclRecv`` (one per chunk, in the order given) on
        ``stream``, then each receive's arrival-counter store in stream order. Arguments are
        checked before any NCCL call."""
        if self._comm is None:
            raise RuntimeError("NcclRail.post after close()")
        sends = _check_chunks("sends", sends, self.topo.node, self.topo.num_nodes)
        recvs = _check_chunks("recvs", recvs, self.topo.node, self.topo.num_nodes)
        if not isinstance(stream, int) or isinstance(stream, bool):
            raise TypeError(f"stream must be an int handle, got {type(stream).__name__}")
        if not sends and not recvs:
            return
        self.lib.group_start()
        try:
            for c in sends:
                self.lib.send(c.address, c.num_bytes, c.peer_node, self._comm, stream)
            for c in recvs:
                self.lib.recv(c.address, c.num_bytes, c.peer_node, self._comm, stream)
        finally:
            self.lib.group_end()  # a group left open would swallow every later NCCL call
        # the group is enqueued (first sends to a peer also connect to it) before the stores
        self._wait_ready("ncclGroupEnd (rail send/recv)", sorted({c.peer_node for c in (*sends, *recvs)}))
        for c in recvs:
            if c.arrival_counter:
                self._store_counter(c.arrival_counter, c.arrival_value, stream)

    def close(self) -> None:
        """``ncclCommDestroy`` of the rail communicator. Idempotent."""
        comm, self._comm = self._comm, None
        if comm is not None:
            self.lib.comm_destroy(comm)

    def abort(self) -> None:
        """``ncclCommAbort`` of the rail communicator: NCCL's kernels still waiting on a peer
        (one that died after a round was enqueued) return, so the rail stream drains; then the
        same as ``close``. Idempotent."""
        comm, self._comm = self._comm, None
        if comm is not None:
            self.lib.comm_abort(comm)

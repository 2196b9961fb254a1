"""CUDA backend, part 1: one node (N == 1), every rank one GPU (or one virtual rank of a loopback),
on a real GPU or on the CPU SIMT runtime (``dispatch.cuda.device``).

Per call, on the backend's own (communication) stream:
  1. ``channel_counts``: my tokens per (destination, channel); channel c carries tokens
     ``[T*c/C, T*(c+1)/C)`` with ``C = num_sms / 2``.
  2. ``notify``: node barrier, ring counters reset, counts written into every peer's staging
     header, second barrier, then the plan (``PlanView`` of ``csrc/common``): rows per source,
     first row per source and channel, per-expert counts. Every rank also posts its verdict on
     its own arguments; notify gathers them into ``status_out`` (mapped host memory), so a bad
     argument on any rank raises on every rank before data moves. A rank with bad arguments still
     launches notify (with no counts) so that its peers do not stall.
  3. ``dispatch``: block 2c sends channel c in batches of up to 512 tokens (all 16 warps pack,
     each token loaded once and stored into every peer ring that needs it), block 2c+1 places
     whatever has arrived from any peer into the rows the plan gives (notes atop the kernel files).
  4. ``combine``: the reverse; the reducing block sums a token per warp in ascending rank order
     in fp32 (fp64).

Host waits: outside CUDA graph capture every call waits for its notify (the verdicts; the
receive count of a dispatch), and a call without ``async_finish`` waits for its kernels and checks
the error words, so a stalled peer fails the call in which it stalls.
"""

from __future__ import annotations

import ctypes
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .. import _C
from ..backend import (CachedDispatchArgs, CallOptions, CombineArgs, CombineResult, DispatchArgs, DispatchResult,
                       HandleOrigin, dtype_codes, verdict_code, verdict_error, wait_for_peers_before_freeing)
from ..compat import DeepEPHandleView
from ..config import Config
from ..errors import PeerTimeoutError
from ..event import EventOverlap
from ..topology import Topology
from .calls import DeviceCalls
from .device import KERNEL_THREADS, Device

DEFAULT_NVL_BYTES = 256 << 20
# Staging below this fails: the control header plus 64 KiB of rings (small budgets are allowed,
# tests make the rings wrap).
MIN_RING_BYTES = 64 << 10
# status_out words (see NotifyArgs.status_out): [0] done, [1] lowest rank with a nonzero verdict
# or -1, [2 + r] rank r's verdict.
STATUS_DONE, STATUS_FIRST_BAD, STATUS_VERDICTS = 0, 1, 2
ERROR_WORDS = 4  # flag, stalled rank, channel, wait kind


def _shared_enums(mod: Any) -> Tuple[Dict[torch.dtype, int], Dict[int, str]]:
    """Dtype codes and wait-kind names as the C++ side defines them (``csrc/common``)."""
    return dtype_codes(mod), {int(k): str(v) for k, v in mod.WAIT_KIND_NAMES.items()}


FACTS_FLAG = 1 << 30  # a verdict word with this bit carries CallFacts, not a bad argument


@dataclass(frozen=True)
class CallFacts:
    """What every rank's call must agree on, packed into one verdict word: channels (num_sms),
    topk width, dtype and whether receive tensors are padded (num_worst_tokens > 0) in fields of
    their own, so a mismatch is named; hidden bytes, FP8 scale bytes and experts as a hash."""

    num_channels: int
    num_topk: int
    dtype_code: int
    worst: bool
    detail: Tuple[int, ...]

    # (shift, mask, name): channels - 1 | topk width | dtype | padded | hash of the rest
    FIELDS = ((0, 127, "num_sms"), (7, 63, "topk width"), (13, 7, "x dtype"),
              (16, 1, "num_worst_tokens > 0"),
              (17, 0x1FFF, "x hidden size (or FP8 scales, num_experts, whether num_tokens_per_expert is given, "
                           "the config's chunk window)"))

    def word(self) -> int:
        values = (self.num_channels - 1, self.num_topk, self.dtype_code, int(self.worst),
                  zlib.crc32(repr(self.detail).encode()))
        word = FACTS_FLAG
        for (shift, mask, _), value in zip(self.FIELDS, values):
            word |= (value & mask) << shift
        return word

    @classmethod
    def differing(cls, mine: int, theirs: int) -> List[str]:
        return [name for shift, mask, name in cls.FIELDS if (mine >> shift) & mask != (theirs >> shift) & mask]


@dataclass(eq=False)
class CudaHandle(DeepEPHandleView):
    """Routes of one CUDA dispatch, for combine and cached dispatch (all tensors on the device).
    Indexable like DeepEP's intranode handle for the entries both share (``DeepEPHandleView``):
    ``handle[3]`` ``recv_src_idx``, ``handle[4]`` ``is_token_in_rank``.

    Attributes:
        num_tokens: tokens at this rank.
        num_recv_tokens: received rows (None when ``num_worst_tokens`` kept it off the host).
        num_worst_tokens: rows of the receive tensors (0 = exactly the received rows).
        num_channels: channels of the dispatch (cached dispatch reuses them).
        plan: int32 plan (``PlanView``).
        is_token_in_rank: bool ``[T, R]``.
        recv_src_rank / recv_src_token: int32 source of every received row (-1 in padding rows).
        chan_counts: int32 ``[R, C]`` my tokens per destination per channel.
        origin: the buffer that made it (set by ``Buffer``, which refuses another buffer's handle).
    """

    num_tokens: int
    num_recv_tokens: Optional[int]
    num_worst_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    num_channels: int
    plan: torch.Tensor
    is_token_in_rank: torch.Tensor
    recv_src_rank: torch.Tensor
    recv_src_token: torch.Tensor
    chan_counts: torch.Tensor
    extra: Dict[str, object] = field(default_factory=dict)
    origin: Optional[HandleOrigin] = None

    @property
    def num_recv_rows(self) -> int:
        """Rows of this dispatch's receive tensors (what combine's ``x`` must have)."""
        if self.num_worst_tokens > 0:
            return self.num_worst_tokens
        assert self.num_recv_tokens is not None
        return self.num_recv_tokens

    # --- DeepEP's handle entries (DeepEPHandleView) --------------------------------------------
    @staticmethod
    def _deepep_num_nodes() -> int:
        return 1  # the CUDA backend serves one node

    def _deepep_entry(self, name: str) -> Optional[torch.Tensor]:
        if name == "rank_prefix_matrix":
            # notify leaves each rank only its own column (rows it receives per source)
            raise NotImplementedError("handle[0] (DeepEP's rank_prefix_matrix) is not kept by the CUDA backend: "
                                      "each rank learns only the rows it receives; shared entries here: "
                                      "[3] recv_src_idx, [4] is_token_in_rank")
        return super()._deepep_entry(name)


class CudaBackend(DeviceCalls):
    """Staging memory, peers, stream and kernels of one rank of one node.

    Construction is collective over ``comm`` (all ranks of the node).

    Args:
        comm: host exchange for set-up and ``destroy`` only (``all_gather_object``, ``barrier``):
            a ``dispatch.backend.GroupComm``, or the loopback's.
        topo: this rank's topology (one node).
        num_nvl_bytes: staging per rank (0 = 256 MiB); every rank must pass the same.
        timeout_s: a kernel waiting longer than this on a peer fails the call, naming the peer.
        device: a ``GpuDevice`` or ``SimtDevice``.
        loopback: peers live in this process (same device): share raw addresses instead of IPC
            handles, and check up front that all virtual ranks' blocks can be resident at once.
    """

    handle_type = CudaHandle

    def __new__(cls, comm: Any, topo: Topology, *args: Any, **kwargs: Any) -> Any:
        """Several nodes: the two-hop backend (``dispatch/cuda/two_hop.py``) instead."""
        if cls is CudaBackend and topo.num_nodes > 1:
            from .two_hop import TwoHopBackend
            return TwoHopBackend(comm, topo, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, comm: Any, topo: Topology, num_nvl_bytes: int, timeout_s: float, device: Device,
                 loopback: bool = False) -> None:
        mod = device.mod
        if topo.num_nodes != 1:  # __new__ builds a TwoHopBackend then; this is a direct call
            raise NotImplementedError("CudaBackend serves one node: use dispatch.cuda.two_hop.TwoHopBackend")
        if topo.num_ranks_per_node > mod.MAX_PEERS:
            raise ValueError(f"num_ranks_per_node={topo.num_ranks_per_node} exceeds the CUDA backend's {mod.MAX_PEERS}")
        self.mod = mod
        self.device = device
        self.device_kind = device.kind
        self.tensor_device = device.torch_device
        self.topo = topo
        self.comm = comm
        self.timeout_s = timeout_s
        self.loopback = loopback
        self.dtype_codes, self.wait_kinds = _shared_enums(mod)
        self.max_experts = mod.MAX_LOCAL_EXPERTS * topo.num_ranks  # the plan holds one node's experts
        self.last_stats: Dict[str, object] = {}
        self._stats_thunk: Optional[Tuple[str, CudaHandle, int]] = None
        L = topo.num_ranks_per_node
        staging_bytes = max(num_nvl_bytes or DEFAULT_NVL_BYTES, mod.HEADER_BYTES + MIN_RING_BYTES)
        with device.scope():
            # load the kernels before any can spin (lazy loading drains the device, see csrc/cuda/runtime.cu)
            mod.preload_kernels()
            self.staging = mod.DeviceAllocation(staging_bytes)
            self.host_out = mod.MappedHostMemory(4 * (1 + L + mod.MAX_LOCAL_EXPERTS))
            self.error = mod.MappedHostMemory(4 * ERROR_WORDS)
            self.status = mod.MappedHostMemory(4 * (STATUS_VERDICTS + mod.MAX_PEERS))
            self.stream = device.new_stream()
            self._mappings: List[Any] = []
            mine = self.staging.address if loopback else self.staging.ipc_handle()
            # Ring geometry comes from the staging size: Buffer() checked that every rank passed the
            # same num_nvl_bytes, so every rank derived the same size.
            gathered = comm.all_gather_object((staging_bytes, mine))
            self.peers: List[int] = []
            for p, (_, handle) in enumerate(gathered):
                if loopback or p == topo.rank:
                    self.peers.append(int(handle) if loopback else self.staging.address)
                else:
                    mapping = mod.PeerMapping(handle)
                    self._mappings.append(mapping)
                    self.peers.append(mapping.address)
        self._host_words = (ctypes.c_int32 * (1 + L + mod.MAX_LOCAL_EXPERTS)).from_address(self.host_out.host_address)
        self._error_words = (ctypes.c_int32 * ERROR_WORDS).from_address(self.error.host_address)
        self._status_words = (ctypes.c_int32 * (STATUS_VERDICTS + mod.MAX_PEERS)).from_address(
            self.status.host_address)
        self._agreed_facts: Dict[str, int] = {}  # per op: the facts word every rank last agreed on
        # profiled launches whose rows are not read yet: (kernel, rows, bytes, event)
        self._profile_pending: List[Tuple[str, torch.Tensor, Union[int, Callable[[], int]], Any]] = []

    # --- configuration ---------------------------------------------------------------------------
    def check_config(self, config: Config) -> None:
        """Even ``num_sms`` >= 2, within the device's SMs and the kernels' channel limit; in a
        loopback, all virtual ranks' blocks must fit on the device at once."""
        num_sms = config.num_sms
        if num_sms < 2 or num_sms % 2:
            raise ValueError(f"num_sms must be even and >= 2 on the CUDA backend, got {num_sms}")
        limit = min(self.device.sm_count(), 2 * self.mod.MAX_CHANNELS)
        if num_sms > limit:
            raise ValueError(f"num_sms={num_sms} exceeds this device's {limit} (SMs: {self.device.sm_count()}, "
                             f"channels: {self.mod.MAX_CHANNELS})")
        if self.loopback:
            # Virtual ranks' kernels spin on each other: a block that cannot become resident
            # until another finishes would deadlock them (the waits would time out).
            need = self.topo.num_ranks_per_node * num_sms
            have = self.device.resident_blocks()
            if need > have:
                raise ValueError(f"num_sms={num_sms}: a loopback of {self.topo.num_ranks_per_node} virtual ranks "
                                 f"needs {need} resident blocks of {KERNEL_THREADS} threads, the {self.device_kind} "
                                 f"device holds {have}; lower num_sms or the number of virtual ranks")

    # --- stream plumbing ---------------------------------------------------------------------------
    def _end(self, compute: Any, options: CallOptions, inputs: Tuple[Any, ...], outputs: Tuple[Any, ...]) -> EventOverlap:
        """Records the end of the call; without ``async_finish`` the compute stream waits for it
        and (outside graph capture) the host checks the error words, so a stalled peer fails
        this call."""
        event = self.device.record(self.stream)
        if options.allocate_on_comm_stream:
            self.device.keep_alive(self.stream, compute, event, inputs, outputs)
        else:  # outputs belong to the compute stream and are written by the comm stream
            self.device.keep_alive(self.stream, compute, event, inputs + outputs, ())
        if not options.async_finish:
            if not self.device.capturing():
                event.synchronize()
                self.check_error()
            self.device.compute_wait(compute, event)
        self._profile_collect(wait=not options.async_finish)
        return EventOverlap(event, extra_tensors=tuple(t for t in inputs if isinstance(t, torch.Tensor)),
                            device=self.device)

    # --- errors --------------------------------------------------------------------------------
    def check_error(self) -> None:
        """Raises the failure a kernel reported (the buffer is unusable after a timeout)."""
        if self._error_words[0]:
            rank, channel, kind = self._error_words[1], self._error_words[2], self._error_words[3]
            name = self.wait_kinds.get(kind, str(kind))
            if "row" in name or "overflow" in name:
                raise ValueError(f"num_worst_tokens is below the tokens rank {self.topo.rank} receives")
            where = "at the node barrier" if channel < 0 else f"on channel {channel}"
            raise PeerTimeoutError(rank, f"stalled {where} ({name}) as seen by rank {self.topo.rank}", self.timeout_s)

    def _args(self, cls: type) -> Any:
        a = cls()
        for i, address in enumerate(self.peers):
            a.set_peer(i, address)
        a.rank = self.topo.rank
        a.num_ranks = self.topo.num_ranks
        a.wait = self._wait_args()
        return a

    @staticmethod
    def _window(config: Config, num_channels: int) -> int:
        """Rows per (channel, peer) ring the config asks for (0: the staging budget decides).

        DeepEP's ``num_max_nvl_chunked_recv_tokens`` is its receive window per channel: the ring
        size here. ``chunk_tokens`` (records in flight per link) is spread over the channels."""
        records = config.chunk_records(1)
        return 0 if records is None else max(1, records // num_channels)

    def _ring_slots(self, num_channels: int, row_bytes: int, window: int) -> int:
        usable = self.staging.size_bytes - self.mod.HEADER_BYTES
        slots = usable // (num_channels * self.topo.num_ranks_per_node * row_bytes)
        if slots < 1:
            raise ValueError(f"num_nvl_bytes={self.staging.size_bytes} is too small for one {row_bytes}-byte row per "
                             f"(channel, peer) with {num_channels} channels")
        return int(min(slots, window)) if window else int(slots)

    # --- notify ------------------------------------------------------------------------------------
    def _notify(self, op: str, num_channels: int, error: Optional[BaseException], barrier_only: bool,
                facts: Optional["CallFacts"] = None, num_tokens: int = 0, chan_counts: Optional[torch.Tensor] = None,
                per_expert: Optional[torch.Tensor] = None, experts_per_rank: int = 0, alignment: int = 1,
                plan: Optional[torch.Tensor] = None) -> None:
        """Launches notify with this rank's verdict and, outside graph capture, waits for every
        rank's verdict: raises on every rank when any rank's arguments were bad.

        ``facts`` (what every rank's call must agree on) are checked first, in an extra
        barrier-only notify whose verdict words carry them, whenever they differ from the last
        facts this op agreed on: in steady state (same shapes every step) that round is skipped.
        A rank whose facts did not change takes no extra round; its peers then read its zero
        verdict as the old facts, so the rounds still pair up and every rank raises together.
        """
        capturing = self.device.capturing()
        agreed = self._agreed_facts.get(op)
        if error is None and facts is not None and not capturing and facts.word() != agreed:
            word = facts.word()
            self._launch_notify(num_channels, word, True)
            self._check_status(op, None, word, facts_round=True, agreed=agreed)
            self._agreed_facts[op] = agreed = word
        bad = error is not None
        self._launch_notify(num_channels, verdict_code(error), barrier_only or bad, 0 if bad else num_tokens,
                            None if bad else chan_counts, None if bad else per_expert, 0 if bad else experts_per_rank,
                            alignment, None if bad else plan)
        if not capturing:  # under capture the device-side skip flag is the only guard
            self._check_status(op, error, agreed if facts is not None else None, facts_round=False, agreed=None)

    def _launch_notify(self, num_channels: int, verdict: int, barrier_only: bool, num_tokens: int = 0,
                       chan_counts: Optional[torch.Tensor] = None, per_expert: Optional[torch.Tensor] = None,
                       experts_per_rank: int = 0, alignment: int = 1, plan: Optional[torch.Tensor] = None) -> None:
        a = self._args(self.mod.NotifyArgs)
        a.num_channels = num_channels
        a.barrier_only = int(barrier_only)
        a.num_tokens = num_tokens
        a.chan_counts = _ptr(chan_counts)
        a.per_expert = _ptr(per_expert)
        a.experts_per_rank = experts_per_rank
        a.expert_alignment = alignment
        a.plan = _ptr(plan)
        a.host_out = self.host_out.device_address if plan is not None else 0
        a.verdict = verdict
        a.status_out = self.status.device_address
        if not self.device.capturing():  # the host reads status_out only outside capture
            ctypes.memset(self.status.host_address, 0, ctypes.sizeof(self._status_words))
        # bytes: the count words written into every peer's header
        notify_bytes = 0 if barrier_only else 4 * self.topo.num_ranks_per_node * (2 + num_channels + experts_per_rank)
        self._launch_profiled("notify", self.mod.launch_notify, a, 1, notify_bytes)

    def _check_status(self, op: str, error: Optional[BaseException], my_facts: Optional[int], facts_round: bool,
                      agreed: Optional[int]) -> None:
        """Waits for notify's status and raises what every rank must raise: this rank's own
        error, a peer's bad argument (named), or facts that differ across ranks (named).

        Args:
            my_facts: this rank's facts word (None: this call has none).
            facts_round: the status of a facts round: a zero verdict then stands for ``agreed``
                (that peer's facts did not change).
        """
        self._wait_status(op)
        if error is not None:
            raise error
        for rank in range(self.topo.num_ranks):
            verdict = self._status_words[STATUS_VERDICTS + rank]
            if verdict == 0 and facts_round and agreed is not None:
                verdict = agreed
            if verdict == 0 or (facts_round and verdict == my_facts):
                continue
            if verdict & FACTS_FLAG:
                # a peer's facts round met this rank's call (or its facts differ): the call is
                # void on every rank
                fields = CallFacts.differing(my_facts, verdict) if my_facts is not None else []
                what = " and ".join(fields) if fields else "the call's shapes or config"
                raise ValueError(f"{op}: {what} differ(s) across ranks: rank {rank} does not match rank "
                                 f"{self.topo.rank}; nothing was sent")
            raise verdict_error(verdict, rank, op)

    def _wait_status(self, op: str) -> None:
        """Polls ``status_out[0]`` (set by notify last, also when it times out)."""
        # The notify kernel itself gives up after timeout_s once it runs; it may start later
        # than now (work queued ahead on the stream), hence the margin.
        deadline = time.monotonic() + 2 * self.timeout_s + 10.0
        pause_s = 1e-5
        while not self._status_words[STATUS_DONE]:
            if self._error_words[0]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{op}: notify did not finish within {2 * self.timeout_s + 10.0:g} s on rank "
                                   f"{self.topo.rank} (is the device hung?)")
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 1e-3)
        self.check_error()

    # --- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        self.check_error()
        options = args.options
        compute = self._begin(options)
        C = args.config.num_sms // 2
        if args.error is not None:
            self._notify("dispatch", C, args.error, True)
        topo = self.topo
        L, me = topo.num_ranks_per_node, topo.rank
        x, scales, topk_idx = args.x, args.scales, args.topk_idx
        in_rank = args.is_token_in_rank
        T, hidden = x.shape
        k = topk_idx.shape[1] if topk_idx is not None else 0
        epr = args.num_experts // topo.num_ranks
        hidden_bytes = hidden * x.element_size()
        scale_bytes = scales.shape[1] * 4 if scales is not None else 0
        record_bytes = _C.RecordLayout(1, k, hidden_bytes, scale_bytes).bytes
        stream_handle = self.device.handle(self.stream)
        dev = self.tensor_device
        with self.device.stream_scope(self.stream):
            # scratch of the comm stream: written and read by its kernels only
            chan_counts = torch.empty((L, C), dtype=torch.int32, device=dev)
            plan = torch.empty(self.mod.PlanView(L, C, epr).size(), dtype=torch.int32, device=dev)
        self.mod.launch_channel_counts(in_rank.data_ptr(), T, L, C, chan_counts.data_ptr(), stream_handle)
        has_counts = args.num_tokens_per_expert is not None
        window = self._window(args.config, C)
        facts = CallFacts(C, k, self.dtype_codes[x.dtype], args.num_worst_tokens > 0,
                          (hidden_bytes, scale_bytes, args.num_experts, has_counts, window))
        self._notify("dispatch", C, None, False, facts, T, chan_counts, args.num_tokens_per_expert, epr,
                     args.expert_alignment, plan)
        worst = args.num_worst_tokens
        num_recv: Optional[int] = None
        per_expert_list: Optional[List[int]] = None
        if not self.device.capturing():  # notify's status wait made its counts visible (Buffer
            # requires num_worst_tokens under capture)
            num_recv = int(self._host_words[0])
            if has_counts and worst == 0:  # every rank gave counts (a call fact); [] with worst (Buffer)
                per_expert_list = [int(self._host_words[1 + L + e]) for e in range(epr)]
        if worst > 0 and num_recv is not None:
            # Every rank learns in this call whether any rank's receive tensors are too small.
            too_small = ValueError(f"num_worst_tokens={worst} is below the {num_recv} tokens rank {me} receives")
            self._notify("dispatch", C, too_small if num_recv > worst else None, True)
        # after notify: every rank agreed on the row size and the staging size, so all raise alike
        slots = self._ring_slots(C, record_bytes, window)
        rows = worst if worst > 0 else num_recv
        pad = 0 if worst > 0 else None  # padding rows of worst-token tensors read as zeros
        recv_x = self._output((rows, hidden), x.dtype, options, pad)
        recv_scales = self._output((rows, scales.shape[1]), torch.float32, options, pad) if scales is not None else None
        recv_idx = recv_w = None
        if k:
            recv_idx = self._output((rows, k), torch.int64, options, -1)
            recv_w = self._output((rows, k), torch.float32, options, 0)
        src_rank = self._output((rows,), torch.int32, options, -1)
        src_token = self._output((rows,), torch.int32, options, -1)
        self._launch_dispatch(C, T, k, hidden_bytes, scale_bytes, slots, rows, x, scales, topk_idx,
                              args.topk_weights, in_rank, plan, recv_x, recv_scales, recv_idx, recv_w,
                              src_rank, src_token, me * max(epr, 1), max(epr, 1))
        handle = CudaHandle(num_tokens=T, num_recv_tokens=num_recv, num_worst_tokens=worst, hidden=hidden,
                            num_topk=k, num_experts=args.num_experts, num_channels=C, plan=plan,
                            is_token_in_rank=in_rank, recv_src_rank=src_rank, recv_src_token=src_token,
                            chan_counts=chan_counts)
        self._stats_thunk = ("dispatch", handle, record_bytes)
        event = self._end(compute, options, (x, scales, topk_idx, args.topk_weights, in_rank,
                                             args.num_tokens_per_expert, chan_counts, plan),
                          (recv_x, recv_scales, recv_idx, recv_w, src_rank, src_token))
        return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, per_expert_list, handle, event)

    def _start_on_handle(self, args: Any) -> Tuple[CallOptions, Any, CudaHandle, int]:
        """Start of a call along a dispatch's handle (cached dispatch, combine): the stream
        ordered, and the handle's channels (any channel count serves a rejected call's notify)."""
        self.check_error()
        compute = self._begin(args.options)
        C = args.handle.num_channels if args.error is None else args.config.num_sms // 2
        return args.options, compute, args.handle, C

    def cached_dispatch(self, args: CachedDispatchArgs) -> DispatchResult:
        options, compute, handle, C = self._start_on_handle(args)
        x, scales = args.x, args.scales
        facts = None
        if args.error is None:
            hidden_bytes = x.shape[1] * x.element_size()
            scale_bytes = scales.shape[1] * 4 if scales is not None else 0
            facts = CallFacts(C, 0, self.dtype_codes[x.dtype], False,
                              (hidden_bytes, scale_bytes, self._window(args.config, C)))
        self._notify("cached dispatch", C, args.error, True, facts)
        T, hidden = x.shape
        record_bytes = _C.RecordLayout(1, 0, hidden_bytes, scale_bytes).bytes
        slots = self._ring_slots(C, record_bytes, self._window(args.config, C))
        rows = handle.num_recv_rows
        pad = 0 if handle.num_worst_tokens > 0 else None
        recv_x = self._output((rows, hidden), x.dtype, options, pad)
        recv_scales = self._output((rows, scales.shape[1]), torch.float32, options, pad) if scales is not None else None
        with self.device.stream_scope(self.stream):
            # routes are known: the kernel's source columns are scratch here
            src_rank = torch.empty(rows, dtype=torch.int32, device=self.tensor_device)
            src_token = torch.empty(rows, dtype=torch.int32, device=self.tensor_device)
        self._launch_dispatch(C, T, 0, hidden_bytes, scale_bytes, slots, rows, x, scales, None, None,
                              handle.is_token_in_rank, handle.plan, recv_x, recv_scales, None, None,
                              src_rank, src_token, 0, 1)
        self._stats_thunk = ("dispatch", handle, record_bytes)
        event = self._end(compute, options, (x, scales, src_rank, src_token), (recv_x, recv_scales))
        return DispatchResult(recv_x, recv_scales, None, None, None, handle, event)

    def _launch_dispatch(self, C: int, T: int, k: int, hidden_bytes: int, scale_bytes: int, slots: int, rows: int,
                         x: torch.Tensor, scales: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
                         topk_weights: Optional[torch.Tensor], in_rank: torch.Tensor, plan: torch.Tensor,
                         recv_x: torch.Tensor, recv_scales: Optional[torch.Tensor], recv_idx: Optional[torch.Tensor],
                         recv_w: Optional[torch.Tensor], src_rank: torch.Tensor, src_token: torch.Tensor,
                         expert_begin: int, experts_per_rank: int) -> None:
        a = self._args(self.mod.DispatchArgs)
        a.num_channels, a.num_topk = C, k
        a.num_tokens, a.hidden_bytes, a.scale_bytes, a.ring_slots, a.max_rows = T, hidden_bytes, scale_bytes, slots, rows
        a.x = x.data_ptr()
        a.scales = _ptr(scales)
        a.topk_idx = _ptr(topk_idx)
        a.topk_weights = _ptr(topk_weights)
        a.in_rank = in_rank.data_ptr()
        a.plan = plan.data_ptr()
        a.recv_x = recv_x.data_ptr()
        a.recv_scales = _ptr(recv_scales)
        a.recv_topk_idx = _ptr(recv_idx)
        a.recv_topk_weights = _ptr(recv_w)
        a.recv_src_rank, a.recv_src_token = src_rank.data_ptr(), src_token.data_ptr()
        a.expert_begin, a.experts_per_rank = expert_begin, experts_per_rank
        record_bytes = _C.RecordLayout(1, k, hidden_bytes, scale_bytes).bytes
        self._launch_profiled("dispatch.node_copy", self.mod.launch_dispatch, a, 2 * C,
                              lambda: int(in_rank.sum()) * record_bytes)

    # --- combine ---------------------------------------------------------------------------------
    def combine(self, args: CombineArgs) -> CombineResult:
        """fp32 (fp64 for float64) sums in ascending source-rank order."""
        options, compute, handle, C = self._start_on_handle(args)
        x, topk_weights = args.x, args.topk_weights
        facts = None
        if args.error is None:
            k = topk_weights.shape[1] if topk_weights is not None else 0
            facts = CallFacts(C, k, self.dtype_codes[x.dtype], False,
                              (x.shape[1] * x.element_size(), self._window(args.config, C)))
        self._notify("combine", C, args.error, True, facts)
        hidden = x.shape[1]
        k = topk_weights.shape[1] if topk_weights is not None else 0
        row_bytes = _C.ReturnRowLayout(hidden * x.element_size(), k).bytes
        slots = self._ring_slots(C, row_bytes, self._window(args.config, C))
        out = self._output((handle.num_tokens, hidden), x.dtype, options)
        out_w = self._output((handle.num_tokens, k), torch.float32, options) if k else None
        a = self._args(self.mod.CombineArgs)
        a.num_channels, a.num_topk, a.dtype = C, k, self.dtype_codes[x.dtype]
        a.num_tokens, a.hidden, a.ring_slots = handle.num_tokens, hidden, slots
        a.x = x.data_ptr()
        a.topk_weights = _ptr(topk_weights)
        a.recv_src_token = handle.recv_src_token.data_ptr()
        a.in_rank = handle.is_token_in_rank.data_ptr()
        a.plan = handle.plan.data_ptr()
        a.out = out.data_ptr()
        a.out_weights = _ptr(out_w)
        b0, b1 = args.bias
        a.bias0, a.bias1 = _ptr(b0), _ptr(b1)
        a.bias0_dtype = self.dtype_codes[b0.dtype] if b0 is not None else 0
        a.bias1_dtype = self.dtype_codes[b1.dtype] if b1 is not None else 0
        self._launch_profiled("combine.node_copy", self.mod.launch_combine, a, 2 * C,
                              lambda: self._rows_received(handle) * row_bytes)
        self._stats_thunk = ("combine", handle, row_bytes)
        event = self._end(compute, options, (x, topk_weights, b0, b1), (out, out_w))
        return CombineResult(out, out_w, event)

    def _rows_received(self, handle: CudaHandle) -> int:
        """Rows this rank received in ``handle``'s dispatch (what its combine sends back)."""
        view = self.mod.PlanView(self.topo.num_ranks, handle.num_channels, 0)
        return int(handle.plan.cpu()[view.num_recv()])

    # --- counters (computed on demand: reading them waits for the device) -----------------------
    def stats(self) -> Dict[str, object]:
        if self._stats_thunk is None:
            return dict(self.last_stats)
        op, handle, row_bytes = self._stats_thunk
        self.stream.synchronize()
        self.check_error()
        me = self.topo.rank
        if op == "dispatch":
            per_dest = handle.chan_counts.sum(dim=1).cpu()
            node_copies = int(per_dest.sum()) - int(per_dest[me])
        else:
            view = self.mod.PlanView(self.topo.num_ranks, handle.num_channels, 0)
            counts = handle.plan.cpu()[view.recv_count(0):view.recv_count(0) + self.topo.num_ranks]
            node_copies = int(counts.sum()) - int(counts[me])
        self.last_stats = {"op": op, "rail_token_copies": 0, "flat_rail_token_copies": 0,
                           "node_token_copies": node_copies, "rail_bytes_per_token": row_bytes,
                           "node_bytes_per_token": row_bytes, "rail_bytes": 0, "node_bytes": node_copies * row_bytes}
        self._stats_thunk = None
        return dict(self.last_stats)

    def destroy(self) -> None:
        """Waits for this rank's stream, then for every rank (peers may still read or write this
        rank's staging until their own kernels finished; bounded, see
        ``wait_for_peers_before_freeing``), then frees."""
        try:
            self.stream.synchronize()
        except Exception:  # noqa: BLE001 - a failed device must not block the barrier
            pass
        wait_for_peers_before_freeing(self.comm, self.timeout_s, self.topo.rank)
        self._mappings = []
        self.staging = None
        self.host_out = None
        self.error = None
        self.status = None


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0

"""CUDA backend, part 2: several nodes (N > 1). A token crosses the rail once per destination
node, to the rank with the same local index there, which forwards it over NVLink (the in-node
rings of the staging) to every rank of its node that needs it; combine runs backwards, summing
inside the node before the rail (``csrc/cuda/rail_api.h``).

Per call, on the backend's communication stream (the rail's copies on a rail stream of their own):
  1. host: every rank's verdict, call facts and counts are all-gathered over the buffer's group
     (a bad argument or a mismatch raises on every rank before anything moves); the plan is the
     CPU backend's (``plan_sends``: same rows, bit for bit), built on the host and uploaded.
  2. ``notify`` (barrier only): the node's ring counters restart at 0.
  3. dispatch: rail sender kernel (records per destination node) -> the rail transport moves
     chunk i to the rail peer and bumps its arrival counter -> forwarder/receiver kernel (chunk i
     forwarded while chunk i+1 is on the wire).
  4. combine: return + reduce kernel (one partial per (token, node), fixed order) -> rail ->
     final kernel at the source (own node's partial, then the others ascending, + bias).
Cost of this first version: the host exchange and plan read ``is_token_in_rank`` on the host
(a device sync per dispatch, not graph-capturable); the rail regions are per-call tensors.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _C
from ..backend import (CachedDispatchArgs, CallOptions, CombineArgs, CombineResult, DispatchArgs, DispatchResult,
                       HandleOrigin, dtype_codes, verdict_code, verdict_error, wait_for_peers_before_freeing)
from ..compat import CountedHandleView
from ..config import Config
from ..errors import PeerTimeoutError
from ..event import EventOverlap
from ..planner import plan_sends, stream_chunks
from ..topology import Topology
from .calls import DeviceCalls
from .device import KERNEL_THREADS, Device
from .rail import RailChunk

DEFAULT_NVL_BYTES = 256 << 20
MIN_RING_BYTES = 64 << 10
DEFAULT_CHUNK_RECORDS = 128  # records per rail chunk when the config does not say
ERROR_WORDS = 4
KERNEL_LIMIT_BLOCKS = 132  # most blocks a two-hop kernel took before num_sms bounded them (final)
WAIT_BARRIER = 1


@dataclass(eq=False)
class TwoHopHandle(CountedHandleView):
    """Routes of one two-hop dispatch (plan on the host and on the device).

    Attributes:
        num_tokens / num_recv_tokens / num_worst_tokens / hidden / num_topk / num_experts: as
            ``CudaHandle``.
        rank_counts: int64 ``[R, R]`` tokens of each source for each destination (host).
        node_counts: int64 ``[R, N]`` tokens of each rank for each node (host).
        node_begin: ``N + 1`` offsets of my records per destination node.
        fwd_begin: ``N + 1`` offsets of the records I forward per source node.
        chunk_records: records per rail chunk.
        device_plan: the uploaded plan tensors (names as the kernels' arguments).
        routes: int32 ``[forwarded records, L]`` dst_row of every record I forwarded.
    """

    num_tokens: int
    num_recv_tokens: int
    num_worst_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    is_token_in_rank: torch.Tensor
    recv_src_rank: torch.Tensor
    recv_src_token: torch.Tensor
    rank_counts: torch.Tensor
    node_counts: torch.Tensor
    node_begin: List[int]
    fwd_begin: List[int]
    chunk_records: int
    device_plan: Dict[str, torch.Tensor]
    routes: torch.Tensor
    rank: int
    num_ranks_per_node: int
    origin: Optional[HandleOrigin] = None


# Facts every rank's call must agree on, by name (the message names the first that differs).
DISPATCH_FACTS = ("x's hidden size", "x's dtype", "topk_idx width", "FP8 scale columns", "num_experts",
                  "whether num_tokens_per_expert (or topk_idx) is given", "topk_weights's presence")
CACHED_FACTS = ("x's hidden size", "x's dtype", "FP8 scale columns")
COMBINE_FACTS = ("x's hidden size", "x's dtype", "topk_weights", "config.round_rail_partials")


class TwoHopBackend(DeviceCalls):
    """Staging, rail transport, streams and kernels of one rank of a multi-node CUDA buffer.

    Construction is collective over ``comm`` (every rank of the buffer).

    Args:
        comm: host exchange over all ranks (``all_gather_object``, ``barrier``).
        topo: this rank's topology (``num_nodes > 1``).
        num_nvl_bytes: staging per rank for the in-node rings (0 = 256 MiB).
        timeout_s: a kernel or a rail post waiting longer than this fails the call, naming the peer.
        device: a ``GpuDevice`` or ``SimtDevice``.
        loopback: peers live in this process; the rail is then the loopback's (``comm.shared.rail_fabric``).
        rail: a ``RailTransport`` (default: the loopback's, or NCCL's for real ranks).
    """

    handle_type = TwoHopHandle

    def __init__(self, comm: Any, topo: Topology, num_nvl_bytes: int, timeout_s: float, device: Device,
                 loopback: bool = False, rail: Optional[Any] = None) -> None:
        mod = device.mod
        L, N = topo.num_ranks_per_node, topo.num_nodes
        if L > mod.MAX_PEERS:
            raise ValueError(f"num_ranks_per_node={L} exceeds the CUDA backend's {mod.MAX_PEERS}")
        if N > mod.MAX_NODES:
            raise ValueError(f"{N} nodes exceed the two-hop path's {mod.MAX_NODES}")
        self.mod, self.device, self.topo, self.comm = mod, device, topo, comm
        self.device_kind = device.kind
        self.tensor_device = device.torch_device
        self.timeout_s = timeout_s
        self.loopback = loopback
        self.dtype_codes = dtype_codes(mod)
        self.wait_kinds = {int(k): str(v) for k, v in mod.WAIT_KIND_NAMES.items()}
        self.max_experts = mod.MAX_LOCAL_EXPERTS * topo.num_ranks
        self.last_stats: Dict[str, object] = {}
        self._stats_thunk: Optional[Tuple[str, TwoHopHandle, Tuple[int, int]]] = None
        staging_bytes = max(num_nvl_bytes or DEFAULT_NVL_BYTES, mod.HEADER_BYTES + MIN_RING_BYTES)
        with device.scope():
            mod.preload_kernels()
            self.staging = mod.DeviceAllocation(staging_bytes)
            self.error = mod.MappedHostMemory(4 * ERROR_WORDS)
            self.status = mod.MappedHostMemory(4 * (2 + mod.MAX_PEERS))
            self.stream = device.new_stream()
            self.rail_stream = device.new_stream()
            self._mappings: List[Any] = []
            mine = self.staging.address if loopback else self.staging.ipc_handle()
            gathered = comm.all_gather_object((topo.node, mine))
            self.peers: List[int] = []
            for r in topo.node_ranks():
                _, handle = gathered[r]
                if loopback or r == topo.rank:
                    self.peers.append(int(handle) if loopback else self.staging.address)
                else:
                    mapping = mod.PeerMapping(handle)
                    self._mappings.append(mapping)
                    self.peers.append(mapping.address)
        self._error_words = (ctypes.c_int32 * ERROR_WORDS).from_address(self.error.host_address)
        self._status_words = (ctypes.c_int32 * (2 + mod.MAX_PEERS)).from_address(self.status.host_address)
        self._pending: List[Any] = []
        # profiled launches whose rows are not read yet (DeviceCalls._launch_profiled)
        self._profile_pending: List[Tuple[str, torch.Tensor, Any, Any]] = []
        # rail buffers, one per role, kept across calls and grown when a call needs more
        self._rail_buffers: Dict[str, torch.Tensor] = {}
        self._events: List[Tuple[Any, List[Any]]] = []
        if rail is None:
            rail = self._default_rail()
        self.rail = rail

    def _default_rail(self) -> Any:
        if self.loopback:
            from .rail_loopback import LoopbackFabric, LoopbackRail
            shared = self.comm.shared
            fabric = getattr(shared, "rail_fabric", None)
            if fabric is None:
                raise RuntimeError("a loopback of several nodes needs a rail fabric (dispatch.testing.Loopback "
                                   "with num_ranks_per_node)")
            assert isinstance(fabric, LoopbackFabric)
            return LoopbackRail(fabric, self.topo.rank, self.topo.num_ranks_per_node, self.device, self.timeout_s)
        try:
            from .rail_nccl import NcclRail  # type: ignore[import-not-found]
        except ImportError as exc:
            raise NotImplementedError("the CUDA backend across nodes needs the NCCL rail (dispatch/cuda/rail_nccl.py)"
                                      ) from exc
        return NcclRail(self.comm, self.topo, self.device, timeout_s=self.timeout_s)  # pragma: no cover - needs GPUs

    # --- configuration -----------------------------------------------------------------------
    def check_config(self, config: Config) -> None:
        """Every two-hop kernel's grid is at most ``num_sms`` blocks: the forward and reduce
        kernels take ``2 min(num_sms / 2, N)`` (a forwarder and a receiver block per pair, each
        serving several source nodes when ``2 N > num_sms``), so ``num_sms`` must be even and
        >= 2: the two blocks of a pair wait on each other's work across ranks and must be
        resident at once. In a loopback, every virtual rank's blocks must fit on the device at
        once."""
        num_sms = config.num_sms
        if num_sms < 2 or num_sms % 2:
            raise ValueError(f"num_sms must be even and >= 2 on the CUDA backend (a forwarder and a receiver block), "
                             f"got {num_sms}")
        pair_blocks = 2 * min(num_sms // 2, self.topo.num_nodes)
        have = int(self.mod.resident_block_limit(self.mod.THREADS_PER_BLOCK)) or (1 << 30)
        if not self.loopback and pair_blocks > have:
            raise ValueError(f"num_sms={num_sms}: the two-hop kernels need {pair_blocks} resident blocks of "
                             f"{KERNEL_THREADS} threads, the {self.device_kind} device holds {have}; lower num_sms")
        if self.loopback:
            need = self.topo.num_ranks * pair_blocks
            if need > have:
                raise ValueError(f"num_sms={num_sms}: a loopback of {self.topo.num_ranks} virtual ranks on "
                                 f"{self.topo.num_nodes} nodes needs {need} resident blocks of {KERNEL_THREADS} "
                                 f"threads, the {self.device_kind} device holds {have}; lower num_sms")

    # --- stream plumbing ------------------------------------------------------------------------
    def _end(self, compute: Any, options: CallOptions, inputs: Tuple[Any, ...], outputs: Tuple[Any, ...]) -> EventOverlap:
        self._order(self.stream, self.rail_stream)  # the rail stream's copies are part of the call
        event = self.device.record(self.stream)
        # the cross-stream events live until the call's end has passed (a freed event a stream
        # still waits on is a use after free on SIMT)
        self._events = [(end, held) for end, held in self._events if not end.query()]
        self._events.append((event, self._pending))
        self._pending = []
        if options.allocate_on_comm_stream:
            self.device.keep_alive(self.stream, compute, event, inputs, outputs)
        else:
            self.device.keep_alive(self.stream, compute, event, inputs + outputs, ())
        if not options.async_finish:
            event.synchronize()
            self.check_error()
            self.device.compute_wait(compute, event)
        self._profile_collect(wait=not options.async_finish)
        return EventOverlap(event, extra_tensors=tuple(t for t in inputs if isinstance(t, torch.Tensor)),
                            device=self.device)

    def _order(self, later: Any, earlier: Any) -> None:
        """``later`` waits for the work queued on ``earlier`` so far."""
        event = self.device.record(earlier)
        self._pending.append(event)
        self.device.order_after(later, None, event)

    def _scratch(self, data: Any, dtype: torch.dtype) -> torch.Tensor:
        """A plan tensor on the device, written in the comm stream's order."""
        with self.device.stream_scope(self.stream):
            t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
            return t.to(device=self.tensor_device, dtype=dtype).contiguous()

    def _empty(self, num_bytes: int) -> torch.Tensor:
        with self.device.stream_scope(self.stream):
            return torch.empty(max(num_bytes, 16), dtype=torch.uint8, device=self.tensor_device)

    def _rail_regions(self, role: str, sizes_bytes: Sequence[int]) -> List[torch.Tensor]:
        """Byte regions of the persistent buffer of ``role`` (no allocation once it is big enough).

        Calls are ordered on ``self.stream`` and each call's rail copies are ordered before its end,
        so the next call may reuse the regions. A grown-out buffer lives until this call's end event.

        Args:
            role: which buffer (one per use, so two uses in one call never alias).
            sizes_bytes: the regions' sizes.

        Returns:
            One uint8 view per size, each 256-byte aligned.
        """
        offsets, total = [], 0
        for size in sizes_bytes:
            offsets.append(total)
            total += (max(int(size), 16) + 255) // 256 * 256
        buf = self._rail_buffers.get(role)
        if buf is None or buf.numel() < total:
            if buf is not None:
                self._pending.append(buf)  # earlier calls may still be reading it
            buf = self._empty(total)
            self._rail_buffers[role] = buf
        return [buf[o:o + max(int(s), 16)] for o, s in zip(offsets, sizes_bytes)]

    def _rail_words(self, role: str, values: Optional[Sequence[int]], count: int) -> torch.Tensor:
        """An int64 table in the persistent buffer of ``role``: ``values`` copied in, or zeros."""
        t = self._rail_regions(role, [8 * max(count, 1)])[0].view(torch.int64)
        with self.device.stream_scope(self.stream):
            if values is None:
                t.zero_()
            else:
                t[:count].copy_(torch.tensor(list(values), dtype=torch.int64))
        return t

    # --- errors -----------------------------------------------------------------------------------
    def check_error(self) -> None:
        """Raises the failure a kernel reported (the buffer is unusable after a timeout)."""
        if self._error_words[0]:
            rank, channel, kind = self._error_words[1], self._error_words[2], self._error_words[3]
            name = self.wait_kinds.get(kind, str(kind))
            if kind == 6:  # kWaitOverflow
                raise ValueError(f"num_worst_tokens is below the tokens rank {self.topo.rank} receives")
            if kind == WAIT_BARRIER:  # notify reports the local index
                rank = self.topo.rank_of(self.topo.node, rank)
            where = "at the node barrier" if channel < 0 else f"on source node {channel}"
            raise PeerTimeoutError(rank, f"stalled {where} ({name}) as seen by rank {self.topo.rank}", self.timeout_s)

    def _agree(self, op: str, error: Optional[BaseException], facts: Tuple[Any, ...], names: Sequence[str],
               extra: Any = None) -> List[Any]:
        """All-gathers (verdict, facts, extra) over every rank and raises what every rank must:
        this rank's own error, a peer's bad argument (named), or the first fact that differs."""
        self.check_error()
        entry = (verdict_code(error), None if error else facts, extra)
        if hasattr(self.rail, "all_gather_object"):  # the loopback's: times out naming a missing rank
            gathered = self.rail.all_gather_object(entry, self.topo.num_ranks)
        else:
            gathered = self.comm.all_gather_object(entry)
        if error is not None:
            raise error
        for rank, (verdict, _, _) in enumerate(gathered):
            if verdict:
                raise verdict_error(verdict, rank, op)
        for rank, (_, theirs, _) in enumerate(gathered):
            for name, a, b in zip(names, facts, theirs):
                if a != b:
                    raise ValueError(f"{op}: {name} differs across ranks: rank {rank} has {b!r}, rank "
                                     f"{self.topo.rank} has {a!r}; nothing was sent")
        return [entry[2] for entry in gathered]

    def _reset_rings(self) -> None:
        """The notify kernel as a node barrier: ring counters restart at 0 on every rank."""
        a = self.mod.NotifyArgs()
        for i, address in enumerate(self.peers):
            a.set_peer(i, address)
        a.rank, a.num_ranks = self.topo.local_rank, self.topo.num_ranks_per_node
        a.num_channels = self.topo.num_nodes
        a.barrier_only = 1
        a.verdict = 0
        a.status_out = self.status.device_address
        a.wait = self._wait_args()
        self.mod.launch_notify(a, self.device.handle(self.stream))

    def _ring_slots(self, row_bytes: int) -> int:
        usable = self.staging.size_bytes - self.mod.HEADER_BYTES
        slots = usable // (self.topo.num_nodes * self.topo.num_ranks_per_node * row_bytes)
        if slots < 1:
            raise ValueError(f"num_nvl_bytes={self.staging.size_bytes} is too small for one {row_bytes}-byte row per "
                             f"(node, peer) ring")
        return int(slots)

    def _profile_rows(self, num_sms: int) -> int:
        """Rows of a two-hop kernel's profile buffer: its grid is at most num_sms; the larger
        bound (the grids before they were sized by num_sms) keeps a grid that overshoots visible
        in the rows instead of writing past the buffer."""
        return max(num_sms, 2 * self.topo.num_nodes, KERNEL_LIMIT_BLOCKS)

    def _forwarded_records(self, handle: TwoHopHandle) -> int:
        """Records my forwarder writes into the node's rings: from (m, my local index) to every
        local rank j (me too), for every source node m."""
        topo, rc = self.topo, handle.rank_counts
        return sum(int(rc[topo.rank_of(m, topo.local_rank), topo.rank_of(topo.node, j)])
                   for m in range(topo.num_nodes) for j in range(topo.num_ranks_per_node))

    def _chunk_records(self, config: Config) -> int:
        return max(1, config.chunk_records(self.topo.num_nodes) or DEFAULT_CHUNK_RECORDS)

    def _chunks(self, peer_node: int, address: int, num_records: int, row_bytes: int, chunk_records: int,
                counter: int = 0) -> List[RailChunk]:
        out, first = [], 0
        for i, count in enumerate(stream_chunks(num_records, chunk_records)):
            out.append(RailChunk(peer_node, address + first * row_bytes, count * row_bytes,
                                 counter + 8 * peer_node if counter else 0, i + 1 if counter else 0))
            first += count
        return out

    # --- dispatch ---------------------------------------------------------------------------------
    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        options = args.options
        compute = self._begin(options)
        topo = self.topo
        R, N, L, me = topo.num_ranks, topo.num_nodes, topo.num_ranks_per_node, topo.rank
        facts: Tuple[Any, ...] = ()
        extra = None
        if args.error is None:
            x, scales, topk_idx = args.x, args.scales, args.topk_idx
            k = topk_idx.shape[1] if topk_idx is not None else 0
            # the host plan reads the routing: wait for what the call is ordered after (the
            # layout kernel, previous_event) first
            self.stream.synchronize()
            in_rank_host = args.is_token_in_rank.cpu()
            facts = (x.shape[1], str(x.dtype), k, scales.shape[1] if scales is not None else 0, args.num_experts,
                     args.num_tokens_per_expert is not None, args.topk_weights is not None)
            per_expert = args.num_tokens_per_expert.cpu() if args.num_tokens_per_expert is not None else None
            extra = (in_rank_host.sum(dim=0).to(torch.int64),
                     in_rank_host.view(-1, N, L).any(dim=2).sum(dim=0).to(torch.int64), per_expert,
                     args.num_worst_tokens)
        gathered = self._agree("dispatch", args.error, facts, DISPATCH_FACTS, extra)
        rank_counts = torch.stack([g[0] for g in gathered])
        node_counts = torch.stack([g[1] for g in gathered])
        recv_per_rank = rank_counts.sum(dim=0)
        for d, g in enumerate(gathered):
            if g[3] > 0 and int(recv_per_rank[d]) > g[3]:
                raise ValueError(f"num_worst_tokens={g[3]} at rank {d} is below the {int(recv_per_rank[d])} tokens "
                                 f"it receives")
        x, scales, topk_idx = args.x, args.scales, args.topk_idx
        T, hidden = x.shape
        k = topk_idx.shape[1] if topk_idx is not None else 0
        epr = args.num_experts // R
        num_recv = int(recv_per_rank[me])
        worst = args.num_worst_tokens
        rows = worst if worst > 0 else num_recv
        chunk_records = self._chunk_records(args.config)
        plan = plan_sends(topo, in_rank_host, rank_counts)
        n, l = topo.node, topo.local_rank
        fwd_counts = [int(node_counts[topo.rank_of(m, l), n]) for m in range(N)]
        fwd_begin = [0]
        for c in fwd_counts:
            fwd_begin.append(fwd_begin[-1] + c)
        src_of = [[topo.rank_of(m, j) for j in range(L)] for m in range(N)]
        recv_counts = [[int(rank_counts[s, me]) for s in row] for row in src_of]
        recv_base_flat = [0] + torch.cumsum(rank_counts[:, me], 0).tolist()
        recv_base = [[int(recv_base_flat[s]) for s in row] for row in src_of]
        positions = torch.full((T, N), -1, dtype=torch.int32)
        for m in range(N):
            tokens = plan.tokens(m).long()
            positions[tokens, m] = torch.arange(tokens.numel(), dtype=torch.int32)
        device_plan = {
            "node_tokens": self._scratch(plan.node_tokens, torch.int32),
            "node_dst_rows": self._scratch(plan.node_dst_rows, torch.int32),
            "fwd_begin": self._scratch(fwd_begin, torch.int64),
            "recv_counts": self._scratch(recv_counts, torch.int32),
            "recv_base": self._scratch(recv_base, torch.int32),
            "positions": self._scratch(positions, torch.int32),
        }
        with self.device.stream_scope(self.stream):
            routes = torch.empty((max(fwd_begin[-1], 1), L), dtype=torch.int32, device=self.tensor_device)
        pad = 0 if worst > 0 else None
        recv_x = self._output((rows, hidden), x.dtype, options, pad)
        recv_scales = self._output((rows, scales.shape[1]), torch.float32, options, pad) if scales is not None else None
        recv_idx = recv_w = None
        if k:
            recv_idx = self._output((rows, k), torch.int64, options, -1)
            recv_w = self._output((rows, k), torch.float32, options, 0)
        src_rank = self._output((rows,), torch.int32, options, -1)
        src_token = self._output((rows,), torch.int32, options, -1)
        handle = TwoHopHandle(num_tokens=T, num_recv_tokens=num_recv, num_worst_tokens=worst, hidden=hidden,
                              num_topk=k, num_experts=args.num_experts, is_token_in_rank=args.is_token_in_rank,
                              recv_src_rank=src_rank, recv_src_token=src_token, rank_counts=rank_counts,
                              node_counts=node_counts, node_begin=list(plan.node_token_begin), fwd_begin=fwd_begin,
                              chunk_records=chunk_records, device_plan=device_plan, routes=routes, rank=me,
                              num_ranks_per_node=L)
        keep = self._move(handle, x, scales, topk_idx, args.topk_weights, recv_x, recv_scales, recv_idx, recv_w,
                          src_rank, src_token, me * max(epr, 1), max(epr, 1), write_routes=True,
                          num_sms=args.config.num_sms)
        per_expert_list = None
        if worst == 0 and gathered[0][2] is not None:
            summed = torch.stack([g[2] for g in gathered])[:, me * epr:(me + 1) * epr].sum(dim=0).tolist()
            align = args.expert_alignment
            per_expert_list = [(c + align - 1) // align * align for c in summed]
        event = self._end(compute, options, (x, scales, topk_idx, args.topk_weights, args.is_token_in_rank) + keep,
                          (recv_x, recv_scales, recv_idx, recv_w, src_rank, src_token))
        return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, per_expert_list, handle, event)

    def cached_dispatch(self, args: CachedDispatchArgs) -> DispatchResult:
        options, handle = args.options, args.handle
        compute = self._begin(options)
        facts: Tuple[Any, ...] = ()
        if args.error is None:
            facts = (args.x.shape[1], str(args.x.dtype), args.scales.shape[1] if args.scales is not None else 0)
        self._agree("cached dispatch", args.error, facts, CACHED_FACTS)
        x, scales = args.x, args.scales
        rows = handle.num_recv_rows
        pad = 0 if handle.num_worst_tokens > 0 else None
        recv_x = self._output((rows, x.shape[1]), x.dtype, options, pad)
        recv_scales = self._output((rows, scales.shape[1]), torch.float32, options, pad) if scales is not None else None
        with self.device.stream_scope(self.stream):  # routes are known: source columns are scratch here
            src_rank = torch.empty(max(rows, 1), dtype=torch.int32, device=self.tensor_device)
            src_token = torch.empty(max(rows, 1), dtype=torch.int32, device=self.tensor_device)
        keep = self._move(handle, x, scales, None, None, recv_x, recv_scales, None, None, src_rank, src_token, 0, 1,
                          write_routes=False, num_sms=args.config.num_sms)
        event = self._end(compute, options, (x, scales, src_rank, src_token) + keep, (recv_x, recv_scales))
        return DispatchResult(recv_x, recv_scales, None, None, None, handle, event)

    def _move(self, handle: TwoHopHandle, x: torch.Tensor, scales: Optional[torch.Tensor],
              topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor], recv_x: torch.Tensor,
              recv_scales: Optional[torch.Tensor], recv_idx: Optional[torch.Tensor], recv_w: Optional[torch.Tensor],
              src_rank: torch.Tensor, src_token: torch.Tensor, expert_begin: int, experts_per_rank: int,
              write_routes: bool, num_sms: int) -> Tuple[torch.Tensor, ...]:
        """Rail sender -> rail -> forwarder/receivers (grids within ``num_sms``); returns the
        per-call tensors to keep alive."""
        topo = self.topo
        N, L, n = topo.num_nodes, topo.num_ranks_per_node, topo.node
        k = topk_idx.shape[1] if topk_idx is not None else 0
        hidden_bytes = x.shape[1] * x.element_size()
        scale_bytes = scales.shape[1] * 4 if scales is not None else 0
        rb = _C.RecordLayout(L, k, hidden_bytes, scale_bytes).bytes
        slots = self._ring_slots(rb)
        self._stats_thunk = ("dispatch", handle, (rb, rb))
        cr, nb, fb = handle.chunk_records, handle.node_begin, handle.fwd_begin
        send_region = self._rail_regions("dispatch_send", [nb[-1] * rb])[0]
        regions = self._rail_regions("dispatch_recv", [(fb[m + 1] - fb[m]) * rb for m in range(N)])
        recv_regions = [r if m != n else None for m, r in enumerate(regions)]
        fwd_regions = [send_region.data_ptr() + nb[n] * rb if m == n else recv_regions[m].data_ptr() for m in range(N)]
        fwd_regions_t = self._rail_words("dispatch_table", fwd_regions, N)
        arrival = self._rail_words("dispatch_arrival", None, N)
        plan = handle.device_plan
        a = self.mod.RailDispatchArgs()
        for i, address in enumerate(self.peers):
            a.set_peer(i, address)
        a.rank, a.num_ranks, a.node, a.num_nodes, a.num_topk = topo.local_rank, L, n, N, k
        a.num_tokens, a.hidden_bytes, a.scale_bytes, a.ring_slots = x.shape[0], hidden_bytes, scale_bytes, slots
        a.max_rows, a.chunk_records = recv_x.shape[0], cr
        a.x, a.scales, a.topk_idx, a.topk_weights = x.data_ptr(), _ptr(scales), _ptr(topk_idx), _ptr(topk_weights)
        a.node_tokens, a.node_dst_rows = plan["node_tokens"].data_ptr(), plan["node_dst_rows"].data_ptr()
        a.num_send_records, a.send_region = nb[-1], send_region.data_ptr()
        a.fwd_regions, a.fwd_begin, a.arrival = fwd_regions_t.data_ptr(), plan["fwd_begin"].data_ptr(), arrival.data_ptr()
        a.routes = handle.routes.data_ptr() if write_routes else 0
        a.recv_counts = plan["recv_counts"].data_ptr()
        a.recv_x, a.recv_scales, a.recv_topk_idx, a.recv_topk_weights = (recv_x.data_ptr(), _ptr(recv_scales),
                                                                         _ptr(recv_idx), _ptr(recv_w))
        a.recv_src_rank, a.recv_src_token = src_rank.data_ptr(), src_token.data_ptr()
        a.expert_begin, a.experts_per_rank = expert_begin, experts_per_rank
        a.num_sms = num_sms
        a.wait = self._wait_args()
        self._reset_rings()
        rows = self._profile_rows(num_sms)
        self._launch_profiled("dispatch.rail_pack", self.mod.launch_rail_pack, a, rows, nb[-1] * rb)
        self._order(self.rail_stream, self.stream)
        sends, recvs = [], []
        for m in range(N):
            if m == n:
                continue
            sends += self._chunks(m, send_region.data_ptr() + nb[m] * rb, nb[m + 1] - nb[m], rb, cr)
            recvs += self._chunks(m, recv_regions[m].data_ptr(), fb[m + 1] - fb[m], rb, cr, arrival.data_ptr())
        self.rail.post(sends, recvs, self.device.handle(self.rail_stream))
        self._launch_profiled("dispatch.rail_forward", self.mod.launch_rail_forward, a, rows,
                              self._forwarded_records(handle) * rb)
        return (send_region, fwd_regions_t, arrival, *[r for r in recv_regions if r is not None])

    # --- combine ----------------------------------------------------------------------------------
    def combine(self, args: CombineArgs) -> CombineResult:
        """Sums in the fixed order of docs/semantics.md (fp32, fp64 for float64)."""
        options, handle = args.options, args.handle
        compute = self._begin(options)
        x, topk_weights = args.x, args.topk_weights
        partial_dtype = -1
        facts: Tuple[Any, ...] = ()
        if args.error is None:
            if args.config.round_rail_partials and x.dtype in (torch.bfloat16, torch.float16):
                partial_dtype = self.dtype_codes[x.dtype]
            facts = (x.shape[1], str(x.dtype), topk_weights.shape[1] if topk_weights is not None else 0,
                     args.config.round_rail_partials)
        self._agree("combine", args.error, facts, COMBINE_FACTS)
        topo = self.topo
        N, L, n = topo.num_nodes, topo.num_ranks_per_node, topo.node
        hidden = x.shape[1]
        k = topk_weights.shape[1] if topk_weights is not None else 0
        acc_bytes = 8 if x.dtype == torch.float64 else 4
        row_bytes = _C.ReturnRowLayout(hidden * x.element_size(), k).bytes
        own_pb = _C.PartialRowLayout(hidden, acc_bytes, k, -1).bytes
        remote_pb = _C.PartialRowLayout(hidden, acc_bytes, k, partial_dtype).bytes
        slots = self._ring_slots(row_bytes)
        self._stats_thunk = ("combine", handle, (remote_pb, row_bytes))
        cr, nb, fb = handle.chunk_records, handle.node_begin, handle.fwd_begin
        partials = self._rail_regions("combine_partials",
                                      [(fb[m + 1] - fb[m]) * (own_pb if m == n else remote_pb) for m in range(N)])
        regions = self._rail_regions("combine_recv", [(nb[m + 1] - nb[m]) * remote_pb for m in range(N)])
        recv_regions = [r if m != n else None for m, r in enumerate(regions)]
        partials_t = self._rail_words("combine_partials_table", [p.data_ptr() for p in partials], N)
        regions_t = self._rail_words("combine_regions_table",
                                     [partials[n].data_ptr() if m == n else recv_regions[m].data_ptr() for m in range(N)], N)
        num_chunks = self._rail_words("combine_chunks_table",
                                      [0 if m == n else len(stream_chunks(nb[m + 1] - nb[m], cr)) for m in range(N)], N)
        arrival = self._rail_words("combine_arrival", None, N)
        out = self._output((handle.num_tokens, hidden), x.dtype, options)
        out_w = self._output((handle.num_tokens, k), torch.float32, options) if k else None
        plan = handle.device_plan
        a = self.mod.RailCombineArgs()
        for i, address in enumerate(self.peers):
            a.set_peer(i, address)
        a.rank, a.num_ranks, a.node, a.num_nodes, a.num_topk = topo.local_rank, L, n, N, k
        a.dtype, a.partial_dtype = self.dtype_codes[x.dtype], partial_dtype
        a.hidden, a.ring_slots, a.num_tokens, a.chunk_records = hidden, slots, handle.num_tokens, cr
        a.x, a.topk_weights = x.data_ptr(), _ptr(topk_weights)
        a.recv_base, a.recv_counts = plan["recv_base"].data_ptr(), plan["recv_counts"].data_ptr()
        a.fwd_begin, a.routes, a.partials = plan["fwd_begin"].data_ptr(), handle.routes.data_ptr(), partials_t.data_ptr()
        a.positions, a.partial_regions = plan["positions"].data_ptr(), regions_t.data_ptr()
        a.arrival, a.num_chunks = arrival.data_ptr(), num_chunks.data_ptr()
        a.out, a.out_weights = out.data_ptr(), _ptr(out_w)
        b0, b1 = args.bias
        a.bias0, a.bias1 = _ptr(b0), _ptr(b1)
        a.bias0_dtype = self.dtype_codes[b0.dtype] if b0 is not None else 0
        a.bias1_dtype = self.dtype_codes[b1.dtype] if b1 is not None else 0
        a.num_sms = args.config.num_sms
        a.wait = self._wait_args()
        self._reset_rings()
        rows = self._profile_rows(a.num_sms)
        # bytes: the rows I return to their forwarders; the partial rows the final sum reads
        self._launch_profiled("combine.rail_reduce", self.mod.launch_rail_reduce, a, rows,
                              handle.num_recv_tokens * row_bytes)
        self._order(self.rail_stream, self.stream)
        sends, recvs = [], []
        for m in range(N):
            if m == n:
                continue
            sends += self._chunks(m, partials[m].data_ptr(), fb[m + 1] - fb[m], remote_pb, cr)
            recvs += self._chunks(m, recv_regions[m].data_ptr(), nb[m + 1] - nb[m], remote_pb, cr, arrival.data_ptr())
        self.rail.post(sends, recvs, self.device.handle(self.rail_stream))
        self._launch_profiled("combine.rail_final", self.mod.launch_rail_final, a, rows,
                              sum((nb[m + 1] - nb[m]) * (own_pb if m == n else remote_pb) for m in range(N)))
        keep = (partials_t, regions_t, num_chunks, arrival, *partials, *[r for r in recv_regions if r is not None])
        event = self._end(compute, options, (x, topk_weights, b0, b1) + keep, (out, out_w))
        return CombineResult(out, out_w, event)

    # --- counters (the CPU backend's definitions, from the plan) -------------------------------------
    def stats(self) -> Dict[str, object]:
        if self._stats_thunk is None:
            return dict(self.last_stats)
        op, handle, (rail_row, node_row) = self._stats_thunk
        topo = self.topo
        me, n, l, L, N = topo.rank, topo.node, topo.local_rank, topo.num_ranks_per_node, topo.num_nodes
        rc, nc = handle.rank_counts, handle.node_counts
        remote_nodes = [m for m in range(N) if m != n]
        if op == "dispatch":
            rail = sum(int(nc[me, m]) for m in remote_nodes)
            flat = sum(int(rc[me, d]) for d in range(topo.num_ranks) if topo.node_of(d) != n)
            # records I forward: from (m, l) to the other ranks of my node
            node = sum(int(rc[topo.rank_of(m, l), topo.rank_of(n, j)]) for m in range(N) for j in range(L) if j != l)
        else:
            rail = sum(int(nc[topo.rank_of(m, l), n]) for m in remote_nodes)
            flat = sum(int(rc[s, me]) for s in range(topo.num_ranks) if topo.node_of(s) != n)
            node = sum(int(rc[s, me]) for s in range(topo.num_ranks) if topo.local_of(s) != l)
        self.last_stats = {"op": op, "rail_token_copies": rail, "flat_rail_token_copies": flat,
                           "node_token_copies": node, "rail_bytes_per_token": rail_row,
                           "node_bytes_per_token": node_row, "rail_bytes": rail * rail_row, "node_bytes": node * node_row}
        self._stats_thunk = None
        return dict(self.last_stats)

    def destroy(self) -> None:
        """Waits for this rank's streams, then for every rank (peers may still touch this rank's
        staging; bounded, see ``wait_for_peers_before_freeing``), then frees. After a failure a
        rail round may wait on a dead peer forever: the transport is aborted first, which ends
        it, so the streams drain."""
        if self._error_words[0]:
            self.rail.abort()
        try:
            self.rail_stream.synchronize()
            self.stream.synchronize()
        except Exception:  # noqa: BLE001 - a failed device must not block the barrier
            pass
        wait_for_peers_before_freeing(self.comm, self.timeout_s, self.topo.rank)
        self.rail.close()
        self._mappings = []
        self._rail_buffers = {}
        self.staging = None
        self.error = None
        self.status = None


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0

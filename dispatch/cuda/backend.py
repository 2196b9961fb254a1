"""CUDA backend, part 1: one node (N == 1), every rank one GPU (or one virtual rank of a loopback).

Per call, on the buffer's own stream:
  1. ``channel_counts``: my tokens per (destination, channel); channel c carries tokens
     ``[T*c/C, T*(c+1)/C)`` with ``C = num_sms / 2``.
  2. ``notify``: node barrier, ring counters reset, counts written into every peer's staging
     header, second barrier, then the plan (``csrc/cuda/plan_view.h``): rows per source, first row
     per source and channel, per-expert counts. The receive count reaches the host through mapped
     memory (one wait per dispatch) unless ``num_worst_tokens`` is given.
  3. ``dispatch``: block 2c sends channel c (warp d streams records to rank d's ring (c, me)),
     block 2c+1 receives it (warp s drains ring (c, s) into the rows the plan gives).
  4. ``combine``: the reverse; receiver blocks sum in ascending rank order in fp32 (fp64).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import _C
from ..errors import PeerTimeoutError
from ..topology import Topology

DEFAULT_NVL_BYTES = 256 << 20
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
WAIT_KINDS = {1: "node barrier", 2: "dispatch ring space", 3: "dispatch ring data", 4: "combine ring space",
              5: "combine ring data", 6: "receive rows"}


def load_module():
    """``dispatch._cuda``, or None when it was not built."""
    try:
        from .. import _cuda
    except ImportError:
        return None
    return _cuda


def plan_size(L: int, C: int, experts_per_rank: int) -> int:
    """Mirror of ``PlanView::size`` (csrc/cuda/plan_view.h)."""
    return 1 + 3 * L + 2 * L * C + experts_per_rank


class PlanOffsets:
    """Mirror of ``PlanView`` offsets."""

    def __init__(self, L: int, C: int) -> None:
        self.L, self.C = L, C

    def recv_count(self) -> slice:
        return slice(1, 1 + self.L)

    def recv_base(self) -> slice:
        return slice(1 + self.L, 1 + 2 * self.L)


class GroupComm:
    """Host-side exchange over a torch.distributed group (NCCL: objects travel via the GPU)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def all_gather_object(self, obj: Any) -> List[Any]:
        import torch.distributed as dist
        out: List[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out


@dataclass
class CudaHandle:
    """Routes of one CUDA dispatch, for combine and cached dispatch (all tensors on the device).

    Attributes:
        num_tokens: tokens at this rank.
        num_recv_tokens: received rows (None when ``num_worst_tokens`` kept it off the host).
        num_worst_tokens: rows of the receive tensors (0 = exactly the received rows).
        num_channels: channels of the dispatch (cached dispatch reuses them).
        plan: int32 plan (csrc/cuda/plan_view.h).
        is_token_in_rank: bool ``[T, R]``.
        recv_src_rank / recv_src_token: int32 source of every received row (-1 in padding rows).
        chan_counts: int32 ``[R, C]`` my tokens per destination per channel.
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

    @property
    def num_recv_rows(self) -> int:
        if self.num_worst_tokens > 0:
            return self.num_worst_tokens
        assert self.num_recv_tokens is not None
        return self.num_recv_tokens


class CudaBackend:
    """Staging memory, peers, stream and kernels of one rank of one node.

    Args:
        comm: host exchange for set-up only (``all_gather_object``): a GroupComm, or the loopback's.
        topo: this rank's topology (one node).
        num_nvl_bytes: staging per rank (0 = 256 MiB).
        timeout_s: a kernel waiting longer than this on a peer fails the call, naming the peer.
        device: the CUDA device.
        loopback: peers live in this process (same GPU): share raw addresses instead of IPC handles.
    """

    def __init__(self, comm: Any, topo: Topology, num_nvl_bytes: int, timeout_s: float, device: torch.device,
                 loopback: bool = False) -> None:
        mod = load_module()
        if mod is None:
            raise RuntimeError("dispatch._cuda is not built (nvcc was not found at install time)")
        if topo.num_nodes != 1:
            raise NotImplementedError("the CUDA backend serves one node so far (issue 'CUDA backend part 2')")
        if topo.num_ranks_per_node > mod.MAX_PEERS:
            raise ValueError(f"num_ranks_per_node={topo.num_ranks_per_node} exceeds the CUDA backend's {mod.MAX_PEERS}")
        self.mod = mod
        self.topo = topo
        self.device = device
        self.timeout_s = timeout_s
        self.last_stats: Dict[str, object] = {}
        self._stats_thunk = None
        L = topo.num_ranks_per_node
        with torch.cuda.device(device):
            # load the kernels before any can spin (lazy loading drains the device, see kernels.cu)
            mod.preload_kernels()
            # at least 64 KiB of rings: small budgets are allowed (tests make the rings wrap)
            self.staging = mod.DeviceAllocation(max(num_nvl_bytes or DEFAULT_NVL_BYTES, mod.HEADER_BYTES + (64 << 10)))
            self.host_out = mod.MappedHostMemory(4 * (1 + L + mod.MAX_LOCAL_EXPERTS))
            self.error = mod.MappedHostMemory(16)
            self.stream = torch.cuda.Stream(device)
            self._mappings = []
            if loopback:
                self.peers = [int(a) for a in comm.all_gather_object(self.staging.address)]
            else:
                handles = comm.all_gather_object(self.staging.ipc_handle())
                self.peers = []
                for p, handle in enumerate(handles):
                    if p == topo.rank:
                        self.peers.append(self.staging.address)
                    else:
                        mapping = mod.PeerMapping(handle)
                        self._mappings.append(mapping)
                        self.peers.append(mapping.address)
        self._host_words = (ctypes.c_int32 * (1 + L + mod.MAX_LOCAL_EXPERTS)).from_address(self.host_out.host_address)
        self._error_words = (ctypes.c_int32 * 4).from_address(self.error.host_address)

    # --- helpers -------------------------------------------------------------------------------
    def _wait_args(self):
        w = self.mod.WaitArgs()
        w.timeout_ns = int(self.timeout_s * 1e9)
        w.error = self.error.device_address
        return w

    def _args(self, cls):
        a = cls()
        for i, address in enumerate(self.peers):
            a.set_peer(i, address)
        a.rank = self.topo.rank
        a.num_ranks = self.topo.num_ranks
        a.wait = self._wait_args()
        return a

    def check_error(self) -> None:
        """Raises the failure a kernel reported (the buffer is unusable afterwards)."""
        if self._error_words[0]:
            rank, channel, kind = self._error_words[1], self._error_words[2], self._error_words[3]
            if kind == 6:
                raise ValueError(f"num_worst_tokens is below the tokens rank {self.topo.rank} receives")
            where = "at the node barrier" if channel < 0 else f"on channel {channel}"
            raise PeerTimeoutError(rank, f"stalled {where} ({WAIT_KINDS.get(kind, kind)}) as seen by rank "
                                         f"{self.topo.rank}", self.timeout_s)

    def _ring_slots(self, num_channels: int, row_bytes: int) -> int:
        usable = self.staging.size_bytes - self.mod.HEADER_BYTES
        slots = usable // (num_channels * self.topo.num_ranks_per_node * row_bytes)
        if slots < 1:
            raise ValueError(f"num_nvl_bytes={self.staging.size_bytes} is too small for one {row_bytes}-byte row per "
                             f"(channel, peer) with {num_channels} channels")
        return int(slots)

    def _notify(self, num_channels: int, stream: torch.cuda.Stream, barrier_only: bool, num_tokens: int = 0,
                chan_counts: Optional[torch.Tensor] = None, per_expert: Optional[torch.Tensor] = None,
                experts_per_rank: int = 0, alignment: int = 1, plan: Optional[torch.Tensor] = None) -> None:
        a = self._args(self.mod.NotifyArgs)
        a.num_channels = num_channels
        a.barrier_only = int(barrier_only)
        a.num_tokens = num_tokens
        a.chan_counts = chan_counts.data_ptr() if chan_counts is not None else 0
        a.per_expert = per_expert.data_ptr() if per_expert is not None else 0
        a.experts_per_rank = experts_per_rank
        a.expert_alignment = alignment
        a.plan = plan.data_ptr() if plan is not None else 0
        a.host_out = self.host_out.device_address if plan is not None else 0
        self.mod.launch_notify(a, stream.cuda_stream)

    # --- layout ----------------------------------------------------------------------------------
    def layout(self, topk_idx: torch.Tensor, num_experts: int, num_sms: int, num_ranks: int, L: int,
               outs: Tuple[torch.Tensor, ...]) -> None:
        a = self.mod.LayoutArgs()
        a.topk_idx = topk_idx.data_ptr()
        a.num_tokens, a.num_topk = topk_idx.shape
        a.num_ranks, a.num_ranks_per_node, a.num_experts = num_ranks, L, num_experts
        a.num_blocks = max(1, num_sms)
        per_rank, per_node, per_expert, in_rank = outs
        a.per_rank, a.per_node, a.per_expert, a.in_rank = (per_rank.data_ptr(), per_node.data_ptr(),
                                                           per_expert.data_ptr(), in_rank.data_ptr())
        self.mod.launch_layout(a, self.stream.cuda_stream)

    # --- dispatch --------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, scales: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], in_rank: torch.Tensor, per_expert: Optional[torch.Tensor],
                 num_experts: int, alignment: int, num_worst_tokens: int, num_channels: int,
                 handle: Optional[CudaHandle] = None):
        """Runs on ``self.stream`` (the caller orders it after the compute stream). Returns
        (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)."""
        self.check_error()
        topo, stream = self.topo, self.stream
        L, me = topo.num_ranks_per_node, topo.rank
        T, hidden = x.shape
        k = topk_idx.shape[1] if topk_idx is not None else 0
        epr = num_experts // topo.num_ranks if handle is None else 0
        C = num_channels if handle is None else handle.num_channels
        hidden_bytes = hidden * x.element_size()
        scale_bytes = scales.shape[1] * 4 if scales is not None else 0
        record_bytes = _C.RecordLayout(1, k, hidden_bytes, scale_bytes).bytes
        slots = self._ring_slots(C, record_bytes)
        with torch.cuda.stream(stream):
            if handle is None:
                chan_counts = torch.empty((L, C), dtype=torch.int32, device=x.device)
                self.mod.launch_channel_counts(in_rank.data_ptr(), T, L, C, chan_counts.data_ptr(), stream.cuda_stream)
                plan = torch.empty(plan_size(L, C, epr), dtype=torch.int32, device=x.device)
                self._notify(C, stream, False, T, chan_counts, per_expert, epr, alignment, plan)
            else:
                chan_counts, plan = handle.chan_counts, handle.plan
                self._notify(C, stream, True)
            num_recv: Optional[int] = handle.num_recv_tokens if handle is not None else None
            per_expert_list = None
            if handle is None and num_worst_tokens == 0:
                stream.synchronize()  # the one host wait of a dispatch: the receive count
                self.check_error()
                num_recv = int(self._host_words[0])
                per_expert_list = [int(self._host_words[1 + L + e]) for e in range(epr)]
            worst = num_worst_tokens if handle is None else handle.num_worst_tokens
            rows = worst if worst > 0 else num_recv
            pad = worst > 0
            alloc = torch.zeros if pad else torch.empty
            recv_x = alloc((rows, hidden), dtype=x.dtype, device=x.device)
            recv_scales = alloc((rows, scales.shape[1]), dtype=torch.float32, device=x.device) if scales is not None else None
            recv_idx = recv_w = None
            if k:
                recv_idx = torch.full((rows, k), -1, dtype=torch.int64, device=x.device)
                recv_w = torch.zeros((rows, k), dtype=torch.float32, device=x.device)
            if handle is None:
                src_rank = torch.full((rows,), -1, dtype=torch.int32, device=x.device)
                src_token = torch.full((rows,), -1, dtype=torch.int32, device=x.device)
            else:
                src_rank = torch.empty(rows, dtype=torch.int32, device=x.device)  # scratch: routes are known
                src_token = torch.empty(rows, dtype=torch.int32, device=x.device)
            a = self._args(self.mod.DispatchArgs)
            a.num_channels, a.num_topk = C, k
            a.num_tokens, a.hidden_bytes, a.scale_bytes, a.ring_slots, a.max_rows = T, hidden_bytes, scale_bytes, slots, rows
            a.x = x.data_ptr()
            a.scales = scales.data_ptr() if scales is not None else 0
            a.topk_idx = topk_idx.data_ptr() if topk_idx is not None else 0
            a.topk_weights = topk_weights.data_ptr() if topk_weights is not None else 0
            a.in_rank = (in_rank if handle is None else handle.is_token_in_rank).data_ptr()
            a.plan = plan.data_ptr()
            a.recv_x = recv_x.data_ptr()
            a.recv_scales = recv_scales.data_ptr() if recv_scales is not None else 0
            a.recv_topk_idx = recv_idx.data_ptr() if recv_idx is not None else 0
            a.recv_topk_weights = recv_w.data_ptr() if recv_w is not None else 0
            a.recv_src_rank, a.recv_src_token = src_rank.data_ptr(), src_token.data_ptr()
            a.expert_begin, a.experts_per_rank = me * max(epr, 1), max(epr, 1)
            self.mod.launch_dispatch(a, stream.cuda_stream)
        if handle is None:
            handle = CudaHandle(num_tokens=T, num_recv_tokens=num_recv, num_worst_tokens=num_worst_tokens,
                                hidden=hidden, num_topk=k, num_experts=num_experts, num_channels=C, plan=plan,
                                is_token_in_rank=in_rank, recv_src_rank=src_rank, recv_src_token=src_token,
                                chan_counts=chan_counts)
        self._stats_thunk = ("dispatch", handle, record_bytes)
        return recv_x, recv_scales, recv_idx, recv_w, per_expert_list, handle

    # --- combine ---------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: CudaHandle, topk_weights: Optional[torch.Tensor],
                bias: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]], num_channels: int):
        """Returns (combined_x, combined_topk_weights), produced on ``self.stream``."""
        self.check_error()
        stream = self.stream
        hidden = x.shape[1]
        k = topk_weights.shape[1] if topk_weights is not None else 0
        row_bytes = _C.ReturnRowLayout(hidden * x.element_size(), k).bytes
        slots = self._ring_slots(num_channels, row_bytes)
        with torch.cuda.stream(stream):
            out = torch.empty((handle.num_tokens, hidden), dtype=x.dtype, device=x.device)
            out_w = torch.empty((handle.num_tokens, k), dtype=torch.float32, device=x.device) if k else None
            self._notify(num_channels, stream, True)
            a = self._args(self.mod.CombineArgs)
            a.num_channels, a.num_topk, a.dtype = num_channels, k, DTYPE_CODES[x.dtype]
            a.num_tokens, a.hidden, a.ring_slots = handle.num_tokens, hidden, slots
            a.x = x.data_ptr()
            a.topk_weights = topk_weights.data_ptr() if topk_weights is not None else 0
            a.recv_src_token = handle.recv_src_token.data_ptr()
            a.in_rank = handle.is_token_in_rank.data_ptr()
            a.plan = handle.plan.data_ptr()
            a.out = out.data_ptr()
            a.out_weights = out_w.data_ptr() if out_w is not None else 0
            b0, b1 = bias
            a.bias0 = b0.data_ptr() if b0 is not None else 0
            a.bias1 = b1.data_ptr() if b1 is not None else 0
            a.bias0_dtype = DTYPE_CODES[b0.dtype] if b0 is not None else 0
            a.bias1_dtype = DTYPE_CODES[b1.dtype] if b1 is not None else 0
            self.mod.launch_combine(a, stream.cuda_stream)
        self._stats_thunk = ("combine", handle, row_bytes)
        return out, out_w

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
            counts = handle.plan[PlanOffsets(self.topo.num_ranks, handle.num_channels).recv_count()].cpu()
            node_copies = int(counts.sum()) - int(counts[me])
        self.last_stats = {"op": op, "rail_token_copies": 0, "flat_rail_token_copies": 0,
                           "node_token_copies": node_copies, "rail_bytes_per_token": row_bytes,
                           "node_bytes_per_token": row_bytes, "rail_bytes": 0, "node_bytes": node_copies * row_bytes}
        self._stats_thunk = None
        return dict(self.last_stats)

    def destroy(self) -> None:
        """Frees staging memory and peer mappings (after this rank's stream has drained)."""
        try:
            self.stream.synchronize()
        except Exception:
            pass
        self._mappings = []
        self.staging = None
        self.host_out = None
        self.error = None

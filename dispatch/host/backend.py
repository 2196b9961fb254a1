"""CPU backend: one rank per process, shared memory inside a node, gloo on the rail."""

from __future__ import annotations

import functools
import time
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from .. import _C
from ..backend import (CachedDispatchArgs, CallOptions, CombineArgs, CombineResult, DispatchArgs, DispatchResult,
                       LayoutResult, dtype_codes)
from ..config import Config
from ..errors import PeerTimeoutError
from ..event import EventOverlap
from ..topology import Topology
from . import notify as nt
from .combine_op import CombineInput, run_combine
from .dispatch_op import DispatchPayload, ReceiveTensors, run_dispatch
from .memory import host_empty
from .movers import ptr
from .node_link import NodeLink
from .plan import HostHandle, SendPlan, outbox_schedule, plan_sends
from .progress import MESSENGER_GRACE_FRACTION
from .rail_link import RailLink
from .rail_staging import RailStaging

DEFAULT_NVL_BYTES = 512 << 20
DEFAULT_RDMA_BYTES = 512 << 20
# Large chunks: each chunk costs a hand-off between processes and a pass of the Python loop.
MAX_CHUNK_RECORDS = 4096
OP_DISPATCH, OP_CACHED_DISPATCH, OP_COMBINE = 1, 2, 3

# How often a failed call looks for the origin while it waits on a messenger's abort word.
_MESSENGER_POLL_S = 0.005

_Method = TypeVar("_Method", bound=Callable)


def _blame_first_failure(method: _Method) -> _Method:
    """A ``PeerTimeoutError`` leaving a call names the buffer's first failed rank (failure.py)."""

    @functools.wraps(method)
    def wrapper(self: "HostBackend", *args, **kwargs):
        failures, rail = self.node.failures, self.rail
        origin = failures.origin()
        if origin is not None:
            rail.announce_abort(origin)
            raise PeerTimeoutError(origin, "failed in an earlier call: this Buffer is unusable, create a new one")
        try:
            return method(self, *args, **kwargs)
        except PeerTimeoutError as error:
            # A rail peer that left or stalled may have been a messenger: its abort word names the
            # origin (a dead peer ends the wait at once: its connection fails).
            deadline = time.monotonic() + MESSENGER_GRACE_FRACTION * self.timeout_s
            while (failures.origin() is None and not rail.abort_heard_from(error.rank)
                   and time.monotonic() < deadline):
                time.sleep(_MESSENGER_POLL_S)
            error = failures.settle(error)
            rail.announce_abort(error.rank)
            raise error

    return wrapper  # type: ignore[return-value]


DTYPE_CODES = dtype_codes(_C)  # defined once in csrc/common/codes.h, exported by the module
_DTYPE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in DTYPE_CODES.items()}

# Header words every rank must agree on, described in words for the error message.
_HIDDEN = (nt.HIDDEN, "x's hidden size", lambda v: f"hidden size {v}")
_DTYPE = (nt.DTYPE, "x's dtype", lambda v: _DTYPE_NAMES.get(v, f"dtype code {v}"))
_SCALES = (nt.SCALE_COLS, "x's kind (FP8 pair or plain tensor)",
           lambda v: f"an FP8 pair with {v} scale columns" if v else "a plain tensor")
_TOPK_IDX = (nt.NUM_TOPK, "topk_idx", lambda v: f"topk_idx with {v} columns" if v else "no topk_idx")
_WEIGHTS = (nt.HAS_WEIGHTS, "topk_weights's presence", lambda v: "topk_weights" if v else "no topk_weights")
_EXPERTS = (nt.NUM_EXPERTS, "num_experts", str)
_EXPERT_COUNTS = (nt.HAS_EXPERT_COUNTS, "whether num_tokens_per_expert (or topk_idx) is given",
                  lambda v: "num_tokens_per_expert" if v else "neither num_tokens_per_expert nor topk_idx")
_COMBINE_WEIGHTS = (nt.NUM_TOPK, "topk_weights", lambda v: f"topk_weights with {v} columns" if v else "no topk_weights")
_ROUNDING = (nt.PARTIAL_DTYPE, "config.round_rail_partials",
             lambda v: "round_rail_partials=False" if v < 0 else "round_rail_partials=True")


class HostBackend:
    """Owns the node segment, the rail group and the rail staging of one rank
    (``dispatch.backend.Backend`` for ``device="cpu"``: calls finish before they return).

    Args:
        group: the buffer's process group.
        topo: this rank's topology.
        num_nvl_bytes: shared-memory staging per rank (0 = 512 MiB).
        num_rdma_bytes: rail staging per rank (0 = 512 MiB).
        timeout_s: seconds without progress before a peer is declared missing.
    """

    device_kind = "cpu"
    tensor_device = torch.device("cpu")
    handle_type = HostHandle
    max_experts = nt.MAX_EXPERTS

    def __init__(self, group: dist.ProcessGroup, topo: Topology, num_nvl_bytes: int, num_rdma_bytes: int,
                 timeout_s: float) -> None:
        self.topo = topo
        self.timeout_s = timeout_s
        self.node = NodeLink(group, topo, num_nvl_bytes or DEFAULT_NVL_BYTES,
                             nt.notify_words(topo.num_ranks, topo.num_nodes))
        self.rail = RailLink(group, topo, timeout_s)
        self.rail.on_complete = self.node.ring_self
        self.rail.listen_for_aborts(self.node.record_failure)
        self.staging = RailStaging(topo.num_nodes - 1, num_rdma_bytes or DEFAULT_RDMA_BYTES)
        self.rdma_slot_bytes = self.staging.slot_bytes
        self._seq = 0
        self.last_stats: Dict[str, object] = {}

    # --- the Backend protocol (dispatch/backend.py) ------------------------------------------
    def check_config(self, config: Config) -> None:
        """Any valid Config runs here (``num_sms`` bounds the worker threads)."""

    @staticmethod
    def may_read_values() -> bool:
        return True

    def layout(self, topk_idx: torch.Tensor, num_experts: int, config: Config, options: CallOptions) -> LayoutResult:
        """Rank-local layout (``layout.h``) of checked int64 ``topk_idx``."""
        R, N = self.topo.num_ranks, self.topo.num_nodes
        per_rank = torch.zeros(R, dtype=torch.int32)
        per_node = torch.zeros(N, dtype=torch.int32)
        per_expert = torch.zeros(num_experts, dtype=torch.int32)
        in_rank = torch.empty((topk_idx.shape[0], R), dtype=torch.bool)
        _C.compute_layout(topk_idx.data_ptr(), False, topk_idx.shape[0], topk_idx.shape[1], R,
                          self.topo.num_ranks_per_node, num_experts, per_rank.data_ptr(), per_node.data_ptr(),
                          per_expert.data_ptr(), in_rank.data_ptr())
        return LayoutResult(per_rank, per_node if N > 1 else None, per_expert, in_rank, EventOverlap())

    def _threads(self, config: Config) -> int:
        return config.cpu_threads(self.topo.num_ranks_per_node)

    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        out = self.full_dispatch(args.x, args.scales, args.topk_idx, args.topk_weights, args.is_token_in_rank,
                                 args.num_tokens_per_rank, args.num_tokens_per_expert, args.num_experts,
                                 args.expert_alignment, args.num_worst_tokens,
                                 args.config.chunk_records(self.topo.num_nodes), self._threads(args.config), args.error)
        return DispatchResult(*out, EventOverlap())

    def cached_dispatch(self, args: CachedDispatchArgs) -> DispatchResult:
        recv_x, recv_scales = self.resend(args.x, args.scales, args.handle, self._threads(args.config), args.error)
        return DispatchResult(recv_x, recv_scales, None, None, None, args.handle, EventOverlap())

    def combine(self, args: CombineArgs) -> CombineResult:
        out, out_weights = self.reduce(args.x, args.handle, args.topk_weights, args.bias, self._threads(args.config),
                                       args.error, args.config.round_rail_partials)
        return CombineResult(out, out_weights, EventOverlap())

    def stats(self) -> Dict[str, object]:
        return dict(self.last_stats)

    # --- notify --------------------------------------------------------------------------
    def notify(self, op: int, header: Dict[int, int], payload: Optional[torch.Tensor],
               error: Optional[BaseException]) -> torch.Tensor:
        """Runs the per-call handshake; raises on every rank if any rank's arguments were bad."""
        self._seq += 1
        words = [0] * nt.HEADER_WORDS
        words[nt.SEQ] = self._seq
        words[nt.OP] = op
        words[nt.STATUS] = nt.STATUS_BAD_ARGS if error is not None else nt.STATUS_OK
        words[nt.MISSING] = -1
        for word, value in header.items():
            words[word] = int(value)
        row = torch.zeros(nt.notify_words(self.topo.num_ranks, self.topo.num_nodes), dtype=torch.int64)
        row[:nt.HEADER_WORDS] = torch.tensor(words, dtype=torch.int64)
        if payload is not None and error is None:
            row[nt.HEADER_WORDS:nt.HEADER_WORDS + payload.numel()] = payload
        matrix = nt.exchange(self.node, self.rail, row, self.timeout_s, nt.OP_NAMES[op])
        nt.check_agreement(matrix, op, error)
        return matrix

    # --- dispatch ------------------------------------------------------------------------
    @_blame_first_failure
    def full_dispatch(self, x: torch.Tensor, scales: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
                      topk_weights: Optional[torch.Tensor], is_token_in_rank: Optional[torch.Tensor],
                      num_tokens_per_rank: Optional[torch.Tensor], num_tokens_per_expert: Optional[torch.Tensor],
                      num_experts: int, expert_alignment: int, num_worst_tokens: int, chunk_tokens: Optional[int],
                      num_threads: int, error: Optional[BaseException]):
        """Full dispatch. Returns (recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle)."""
        topo = self.topo
        R, N, L = topo.num_ranks, topo.num_nodes, topo.num_ranks_per_node
        header = {}
        payload = None
        if error is None:
            num_tokens, hidden = x.shape
            k = topk_idx.shape[1] if topk_idx is not None else 0
            node_counts = is_token_in_rank.view(num_tokens, N, L).any(dim=2).sum(dim=0)
            expert_counts = (num_tokens_per_expert if num_tokens_per_expert is not None
                             else torch.zeros(num_experts, dtype=torch.int32))
            payload = torch.cat([num_tokens_per_rank.to(torch.int64), node_counts.to(torch.int64),
                                 expert_counts.to(torch.int64)])
            header = {nt.HIDDEN: hidden, nt.DTYPE: DTYPE_CODES[x.dtype], nt.NUM_TOPK: k,
                      nt.NUM_EXPERTS: num_experts, nt.NUM_TOKENS: num_tokens,
                      nt.SCALE_COLS: scales.shape[1] if scales is not None else 0, nt.WORST: num_worst_tokens,
                      nt.HAS_EXPERT_COUNTS: int(num_tokens_per_expert is not None),
                      nt.HAS_WEIGHTS: int(topk_weights is not None)}
        matrix = self.notify(OP_DISPATCH, header, payload, error)
        # Presence of topk_idx / topk_weights too: a rank without weights would otherwise send 1.0s.
        nt.check_same(matrix, (_HIDDEN, _DTYPE, _SCALES, _TOPK_IDX, _WEIGHTS, _EXPERTS, _EXPERT_COUNTS))
        h0 = nt.HEADER_WORDS
        rank_counts = matrix[:, h0:h0 + R]
        node_counts_all = matrix[:, h0 + R:h0 + R + N]
        expert_counts_all = matrix[:, h0 + R + N:h0 + R + N + num_experts]
        recv_per_rank = rank_counts.sum(dim=0)
        worst = matrix[:, nt.WORST]
        too_small = ((worst > 0) & (recv_per_rank > worst)).nonzero().flatten().tolist()
        if too_small:
            d = too_small[0]
            raise ValueError(f"num_worst_tokens={int(worst[d])} at rank {d} is below the {int(recv_per_rank[d])} "
                             f"tokens it receives")

        num_tokens, hidden = x.shape
        k = topk_idx.shape[1] if topk_idx is not None else 0
        record = _C.RecordLayout(L, k, hidden * x.element_size(), scales.shape[1] * 4 if scales is not None else 0)
        chunk_records = self._chunk_records(record, hidden, k, x.dtype == torch.float64, chunk_tokens)
        plan = plan_sends(topo, is_token_in_rank, rank_counts)
        schedules = [outbox_schedule(topo, topo.rank_of(topo.node, j), node_counts_all, chunk_records)
                     for j in range(L)]

        num_recv = int(recv_per_rank[topo.rank])
        rows = num_worst_tokens if num_worst_tokens > 0 else num_recv
        experts_per_rank = num_experts // R
        pad = num_worst_tokens > 0
        recv_x = host_empty((rows, hidden), x.dtype, zero=pad)
        recv_scales = host_empty((rows, scales.shape[1]), torch.float32, zero=pad) if scales is not None else None
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx = torch.full((rows, k), -1, dtype=torch.int64)
            recv_topk_weights = torch.zeros((rows, k), dtype=torch.float32)
        weights = topk_weights if topk_weights is not None else (
            torch.ones_like(topk_idx, dtype=torch.float32) if topk_idx is not None else None)
        payload_bytes = DispatchPayload(_bytes(x), _bytes(scales) if scales is not None else None,
                                        topk_idx, weights)
        receive = ReceiveTensors(_bytes(recv_x), _bytes(recv_scales) if recv_scales is not None else None,
                                 recv_topk_idx, recv_topk_weights, topo.rank * experts_per_rank, experts_per_rank)
        routes = run_dispatch(topo, self.node, self.rail, payload_bytes, receive, plan, schedules, chunk_records,
                              self.staging, record, num_threads, self.timeout_s, num_recv_rows=rows)

        per_expert = self._recv_per_expert(matrix, expert_counts_all, experts_per_rank, expert_alignment,
                                           num_worst_tokens)
        handle = HostHandle(num_tokens=num_tokens, num_recv_tokens=num_recv, num_worst_tokens=num_worst_tokens,
                            hidden=hidden, chunk_records=chunk_records, node_counts=node_counts_all,
                            rank_counts=rank_counts, send_plan=plan, schedules=schedules,
                            outbox_dst_rows=routes.outbox_dst_rows,
                            recv_rows_by_producer=routes.recv_rows_by_producer,
                            recv_src_rank=routes.recv_src_rank, recv_src_token=routes.recv_src_token,
                            rank=topo.rank, num_ranks_per_node=L, is_token_in_rank=is_token_in_rank)
        self._record_dispatch_stats(handle, record.bytes)
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, handle

    def _recv_per_expert(self, matrix: torch.Tensor, expert_counts_all: torch.Tensor, experts_per_rank: int,
                         expert_alignment: int, num_worst_tokens: int) -> Optional[List[int]]:
        """``num_recv_tokens_per_expert_list``: the summed, aligned counts; None when no rank had
        counts, or with ``num_worst_tokens`` (the front returns ``[]`` then, as DeepEP)."""
        if num_worst_tokens > 0:
            return None
        if not int(matrix[0, nt.HAS_EXPERT_COUNTS]):
            return None
        me = self.topo.rank
        counts = expert_counts_all[:, me * experts_per_rank:(me + 1) * experts_per_rank].sum(dim=0).tolist()
        return [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts]

    @_blame_first_failure
    def resend(self, x: torch.Tensor, scales: Optional[torch.Tensor], handle: HostHandle,
               num_threads: int, error: Optional[BaseException]):
        """Re-sends a new ``x`` along ``handle``'s routes. Returns (recv_x, recv_scales)."""
        header = {}
        if error is None:
            header = {nt.HIDDEN: x.shape[1], nt.DTYPE: DTYPE_CODES[x.dtype],
                      nt.SCALE_COLS: scales.shape[1] if scales is not None else 0}
        matrix = self.notify(OP_CACHED_DISPATCH, header, None, error)
        nt.check_same(matrix, (_HIDDEN, _DTYPE, _SCALES))
        topo = self.topo
        hidden = x.shape[1]
        record = _C.RecordLayout(topo.num_ranks_per_node, 0, hidden * x.element_size(),
                                 scales.shape[1] * 4 if scales is not None else 0)
        if handle.chunk_records * record.bytes > min(self.node.slot_bytes, self.rdma_slot_bytes):
            raise ValueError("x: rows of this cached dispatch are wider than the handle's chunks allow")
        rows = handle.num_recv_rows
        pad = handle.num_worst_tokens > 0
        recv_x = host_empty((rows, hidden), x.dtype, zero=pad)
        recv_scales = host_empty((rows, scales.shape[1]), torch.float32, zero=pad) if scales is not None else None
        payload = DispatchPayload(_bytes(x), _bytes(scales) if scales is not None else None, None, None)
        receive = ReceiveTensors(_bytes(recv_x), _bytes(recv_scales) if recv_scales is not None else None,
                                 None, None, 0, 1)
        run_dispatch(topo, self.node, self.rail, payload, receive, handle.send_plan, handle.schedules,
                     handle.chunk_records, self.staging, record, num_threads, self.timeout_s)
        self._record_dispatch_stats(handle, record.bytes)
        return recv_x, recv_scales

    def _chunk_records(self, record: "_C.RecordLayout", hidden: int, k: int, is_f64: bool,
                       chunk_tokens: Optional[int]) -> int:
        acc_bytes = 8 if is_f64 else 4
        return_row = _C.ReturnRowLayout(hidden * acc_bytes, k).bytes
        partial_row = _C.PartialRowLayout(hidden, acc_bytes, k).bytes
        fit_node = self.node.slot_bytes // max(record.bytes, return_row)
        fit_rail = self.rdma_slot_bytes // max(record.bytes, partial_row)
        chunk = min(chunk_tokens or MAX_CHUNK_RECORDS, fit_node, fit_rail)
        if chunk < 1:
            raise ValueError(f"num_nvl_bytes/num_rdma_bytes are too small for one token of hidden size {hidden}: "
                             f"see Buffer.get_nvl_buffer_size_hint")
        return chunk

    # --- combine -------------------------------------------------------------------------
    @_blame_first_failure
    def reduce(self, x: torch.Tensor, handle: HostHandle, topk_weights: Optional[torch.Tensor],
               bias: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]], num_threads: int,
               error: Optional[BaseException], round_rail_partials: bool = False):
        """Returns (combined_x, combined_topk_weights). With ``round_rail_partials``, remote
        partials cross the rail rounded to ``x.dtype`` when that is a 16-bit type."""
        partial_dtype = -1
        if round_rail_partials and x.dtype in (torch.bfloat16, torch.float16):
            partial_dtype = DTYPE_CODES[x.dtype]
        header = {}
        if error is None:
            header = {nt.HIDDEN: x.shape[1], nt.DTYPE: DTYPE_CODES[x.dtype],
                      nt.NUM_TOPK: topk_weights.shape[1] if topk_weights is not None else 0,
                      nt.PARTIAL_DTYPE: partial_dtype}
        matrix = self.notify(OP_COMBINE, header, None, error)
        nt.check_same(matrix, (_HIDDEN, _DTYPE, _COMBINE_WEIGHTS, _ROUNDING))
        topo = self.topo
        hidden = x.shape[1]
        k = topk_weights.shape[1] if topk_weights is not None else 0
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc_bytes = 8 if acc_dtype == torch.float64 else 4
        return_layout = _C.ReturnRowLayout(hidden * x.element_size(), k)
        partial_layout = _C.PartialRowLayout(hidden, acc_bytes, k, partial_dtype)
        C = handle.chunk_records
        if C * return_layout.bytes > self.node.slot_bytes or C * partial_layout.bytes > self.rdma_slot_bytes:
            raise ValueError("x: combine rows are wider than the dispatch's chunks allow (dispatch in float64 "
                             "to combine in float64)")
        acc = host_empty((handle.num_tokens, hidden), acc_dtype)  # run_combine initialises it
        acc_weights = torch.empty((handle.num_tokens, k), dtype=torch.float32) if k else None
        weights = topk_weights.contiguous() if topk_weights is not None else None
        out = host_empty((handle.num_tokens, hidden), x.dtype)
        bias0, bias1 = bias
        output = _C.CombineOutput(out.data_ptr(), DTYPE_CODES[x.dtype], ptr(bias0),
                                  DTYPE_CODES[bias0.dtype] if bias0 is not None else 0, ptr(bias1),
                                  DTYPE_CODES[bias1.dtype] if bias1 is not None else 0)
        data = CombineInput(_bytes(x), DTYPE_CODES[x.dtype], weights, acc, acc_weights, return_layout, partial_layout,
                            output)
        run_combine(topo, self.node, self.rail, handle, data, self.staging, num_threads, self.timeout_s)
        self._record_combine_stats(handle, return_layout.bytes, partial_layout.bytes)
        return out, acc_weights

    # --- traffic counters ----------------------------------------------------------------
    def _record_dispatch_stats(self, handle: HostHandle, record_bytes: int) -> None:
        topo = self.topo
        me, n, l = topo.rank, topo.node, topo.local_rank
        rail_copies = sum(int(handle.node_counts[me, m]) for m in range(topo.num_nodes) if m != n)
        flat = sum(int(handle.rank_counts[me, d]) for d in range(topo.num_ranks) if topo.node_of(d) != n)
        dst = handle.outbox_dst_rows
        node_copies = int((dst >= 0).sum()) - int((dst[:, l] >= 0).sum()) if dst.numel() else 0
        self.last_stats = _stats("dispatch", rail_copies, flat, node_copies, record_bytes, record_bytes)

    def _record_combine_stats(self, handle: HostHandle, return_bytes: int, partial_bytes: int) -> None:
        topo = self.topo
        n, l = topo.node, topo.local_rank
        rail_copies = sum(int(handle.node_counts[topo.rail_peer(m), n]) for m in range(topo.num_nodes) if m != n)
        src = handle.recv_src_rank[:handle.num_recv_tokens].long()
        flat = int((src // topo.num_ranks_per_node != n).sum())
        node_copies = int((src % topo.num_ranks_per_node != l).sum())
        self.last_stats = _stats("combine", rail_copies, flat, node_copies, partial_bytes, return_bytes)

    def destroy(self) -> None:
        self.rail.close()
        self.node.close()
        self.staging.free()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[rows, row_bytes]`` uint8 view of a 2-D tensor."""
    tensor = tensor.contiguous()
    if tensor.dim() != 2:
        return tensor.view(torch.uint8)
    return tensor.view(torch.uint8).view(tensor.shape[0], tensor.shape[1] * tensor.element_size())


def _stats(op: str, rail_copies: int, flat: int, node_copies: int, rail_bytes_per_token: int,
           node_bytes_per_token: int) -> Dict[str, object]:
    return {"op": op, "rail_token_copies": rail_copies, "flat_rail_token_copies": flat,
            "node_token_copies": node_copies, "rail_bytes_per_token": rail_bytes_per_token,
            "node_bytes_per_token": node_bytes_per_token, "rail_bytes": rail_copies * rail_bytes_per_token,
            "node_bytes": node_copies * node_bytes_per_token}

"""CudaBuffer: the Buffer API on the CUDA backend (chosen by ``Buffer(group)`` for NCCL groups).

Stream semantics follow DeepEP: every call runs on the buffer's own stream, ordered after
``previous_event`` (or the current stream); with ``async_finish`` the returned EventOverlap holds
a real CUDA event and the current stream does not wait, otherwise it waits before returning.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import validate as V
from ..buffer import Buffer
from ..config import Config
from ..event import EventOverlap
from ..topology import Topology, detect_num_ranks_per_node
from .backend import CudaBackend, CudaHandle, GroupComm

Tensors = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _capturing() -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:
        return False


def _channels(config: Optional[Config]) -> int:
    config = config or Config(num_sms=Buffer.num_sms)
    if not isinstance(config, Config):
        raise TypeError(f"config must be a dispatch.Config, got {type(config).__name__}")
    if config.num_sms < 2 or config.num_sms % 2:
        raise ValueError(f"num_sms must be even and >= 2 on the CUDA backend, got {config.num_sms}")
    return config.num_sms // 2


class CudaBuffer(Buffer):
    """Buffer on one node of GPUs (or a loopback of virtual ranks, see ``dispatch.testing``).

    Args:
        group: an NCCL process group, or a ``dispatch.testing.LoopbackGroup``.
        num_nvl_bytes: device staging per rank (0 = 256 MiB).
        num_rdma_bytes: unused until the multi-node part.
    """

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, *,
                 num_ranks_per_node: Optional[int] = None, timeout_s: float = 60.0) -> None:
        V.check_int("num_nvl_bytes", num_nvl_bytes, 0)
        V.check_int("num_rdma_bytes", num_rdma_bytes, 0)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        loopback = getattr(group, "is_loopback", False)
        self.group = group
        if loopback:
            self.rank, self.group_size, comm = group.rank, group.size, group.comm
            device = group.device
        else:
            self.rank, self.group_size, comm = dist.get_rank(group), dist.get_world_size(group), GroupComm(group)
            device = torch.device("cuda", torch.cuda.current_device())
        if num_ranks_per_node is None:
            num_ranks_per_node = self.group_size if loopback else detect_num_ranks_per_node(group)
        self.topology = Topology(self.group_size, num_ranks_per_node, self.rank)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.timeout_s = float(timeout_s)
        self.device = device
        self._backend = CudaBackend(comm, self.topology, num_nvl_bytes, self.timeout_s, device, loopback)

    # --- stream plumbing -------------------------------------------------------------------------
    def _begin(self, previous_event: Optional[EventOverlap]) -> torch.cuda.Stream:
        compute = torch.cuda.current_stream(self.device)
        comm = self._backend.stream
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(compute)
        return compute

    def _end(self, compute: torch.cuda.Stream, async_finish: bool, inputs: tuple, outputs: tuple) -> EventOverlap:
        comm = self._backend.stream
        if not _capturing():
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(comm)
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(compute)
        event = torch.cuda.Event()
        event.record(comm)
        if not async_finish:
            compute.wait_event(event)
        return EventOverlap(event, extra_tensors=tuple(t for t in inputs if isinstance(t, torch.Tensor)))

    # --- layout ------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Device layout kernel (same rules as ``layout.h``); topk_idx never leaves the GPU.
        Values of ``topk_idx`` outside ``[-1, E)`` are not checked here (that would wait on the host)."""
        topo = self.topology
        V.check_num_experts(num_experts, topo.num_ranks)
        idx = V.check_tensor("topk_idx", topk_idx, (torch.int64, torch.int32), 2)
        R, N = topo.num_ranks, topo.num_nodes
        compute = self._begin(previous_event)
        backend = self._backend
        with torch.cuda.stream(backend.stream):
            idx = idx.to(torch.int64).contiguous()
            outs = (torch.zeros(R, dtype=torch.int32, device=idx.device),
                    torch.zeros(N, dtype=torch.int32, device=idx.device),
                    torch.zeros(num_experts, dtype=torch.int32, device=idx.device),
                    torch.empty((idx.shape[0], R), dtype=torch.bool, device=idx.device))
            backend.layout(idx, num_experts, Buffer.num_sms, R, topo.num_ranks_per_node, outs)
        event = self._end(compute, async_finish, (topk_idx, idx), outs)
        per_rank, per_node, per_expert, in_rank = outs
        return per_rank, (per_node if N > 1 else None), per_expert, in_rank, event

    # --- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, x: Tensors, handle: Optional[CudaHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, num_experts: Optional[int] = None,
                 config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """See ``Buffer.dispatch``. With ``num_worst_tokens`` nothing waits on the host (graph
        capturable) and ``num_recv_tokens_per_expert_list`` is None (the counts stay on the device)."""
        backend = self._live_backend()
        C = _channels(config)
        rows, scales = V.split_x(x)
        rows = rows.contiguous()
        scales = scales.contiguous() if scales is not None else None
        T = rows.shape[0]
        if handle is not None:
            if not isinstance(handle, CudaHandle):
                raise TypeError(f"handle must come from Buffer.dispatch, got {type(handle).__name__}")
            if T != handle.num_tokens:
                raise ValueError(f"x has {T} rows but the handle routes {handle.num_tokens} tokens")
            compute = self._begin(previous_event)
            recv_x, recv_scales, _, _, _, _ = backend.dispatch(rows, scales, None, None, handle.is_token_in_rank, None,
                                                               handle.num_experts, 1, handle.num_worst_tokens, C, handle)
            event = self._end(compute, async_finish, (rows, scales), (recv_x, recv_scales))
            recv = (recv_x, recv_scales) if scales is not None else recv_x
            return recv, None, None, None, handle, event

        V.check_int("expert_alignment", expert_alignment, 1)
        V.check_int("num_worst_tokens", num_worst_tokens, 0)
        if num_tokens_per_expert is not None:
            E = num_tokens_per_expert.numel()
        elif num_experts is not None:
            E = num_experts
        elif topk_idx is not None:
            raise ValueError("num_experts is required when num_tokens_per_expert is not given")
        else:
            E = self.group_size
        V.check_num_experts(E, self.group_size)
        idx = weights = None
        if topk_idx is not None:
            idx = V.check_tensor("topk_idx", topk_idx, (torch.int64, torch.int32), 2, T).to(torch.int64).contiguous()
            if topk_weights is not None:
                weights = V.check_tensor("topk_weights", topk_weights, (torch.float32,), 2, T, idx.shape[1]).contiguous()
        elif topk_weights is not None:
            raise ValueError("topk_weights needs topk_idx")
        per_expert = None
        if is_token_in_rank is None or (num_tokens_per_expert is None and idx is not None):
            if idx is None:
                raise ValueError("dispatch needs topk_idx or is_token_in_rank")
            _, _, per_expert, layout_in_rank, _ = self.get_dispatch_layout(idx, E, previous_event)
            if is_token_in_rank is None:
                is_token_in_rank = layout_in_rank
        if num_tokens_per_expert is not None:
            per_expert = num_tokens_per_expert.to(torch.int32).contiguous()
        in_rank = V.check_tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), 2, T,
                                 self.group_size).contiguous()
        compute = self._begin(previous_event)
        recv_x, recv_scales, recv_idx, recv_w, per_expert_list, new_handle = backend.dispatch(
            rows, scales, idx, weights, in_rank, per_expert, E, expert_alignment, num_worst_tokens, C)
        event = self._end(compute, async_finish, (rows, scales, idx, weights, in_rank, per_expert),
                          (recv_x, recv_scales, recv_idx, recv_w, new_handle.recv_src_rank, new_handle.recv_src_token))
        if weights is None:
            recv_w = None
        if idx is None:
            per_expert_list = None
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        return recv, recv_idx, recv_w, per_expert_list, new_handle, event

    # --- combine -----------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: CudaHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """See ``Buffer.combine``: fp32 (fp64 for float64) sums in ascending source-rank order."""
        backend = self._live_backend()
        C = _channels(config)
        if not isinstance(handle, CudaHandle):
            raise TypeError(f"handle must come from Buffer.dispatch, got {type(handle).__name__}")
        x = V.check_tensor("x", x, V.FLOAT_DTYPES, 2).contiguous()
        allowed = {handle.num_worst_tokens} if handle.num_worst_tokens > 0 else set()
        if handle.num_recv_tokens is not None:
            allowed.add(handle.num_recv_tokens)
        if x.shape[0] not in allowed:
            raise ValueError(f"x has {x.shape[0]} rows but the handle received {sorted(allowed)}")
        if topk_weights is not None:
            topk_weights = V.check_tensor("topk_weights", topk_weights, (torch.float32,), 2, x.shape[0]).contiguous()
        biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        if bias is not None:
            pair = bias if isinstance(bias, tuple) else (bias, None)
            if len(pair) != 2:
                raise TypeError("bias must be a tensor or a pair of tensors")
            biases = tuple(None if b is None else V.check_tensor(
                "bias", b, V.FLOAT_DTYPES, 2, handle.num_tokens, x.shape[1]).contiguous() for b in pair)
        compute = self._begin(previous_event)
        out, out_w = backend.combine(x, handle, topk_weights, biases, C)
        event = self._end(compute, async_finish, (x, topk_weights) + tuple(biases), (out, out_w))
        return out, out_w, event

    def get_traffic_stats(self) -> dict:
        """This rank's part of the last dispatch or combine (waits for the buffer's stream)."""
        return self._live_backend().stats()

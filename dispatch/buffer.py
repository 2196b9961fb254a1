"""Buffer: the communication buffer for MoE dispatch and combine (DeepEP-compatible API)."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import validate as V
from .config import Config
from .event import EventOverlap
from .host.backend import HostBackend
from .host.plan import HostHandle
from .topology import Topology, detect_num_ranks_per_node

Tensors = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _is_nccl_group(group: Any) -> bool:
    try:
        return str(dist.get_backend(group)).lower() == "nccl"
    except Exception:
        return False


class Buffer:
    """The communication buffer of one rank: staging memory, links and the calls over them.

    Construction is collective over ``group``. Tensors on the CPU run the CPU backend (ranks
    are processes; shared memory inside a node, gloo point-to-point on the rails).

    Args:
        group: the process group of the expert-parallel ranks.
        num_nvl_bytes: in-node staging budget per rank (0: a 512 MiB default; pages are touched only as far as chunks need).
        num_rdma_bytes: rail staging budget per rank (0: a 512 MiB default).
        num_ranks_per_node: ranks per node ``L`` (default: ``LOCAL_WORLD_SIZE``, else by host name).
        timeout_s: seconds without progress before a missing peer is reported.
    """

    num_sms: int = 20

    def __new__(cls, group: Any = None, *args: Any, **kwargs: Any) -> "Buffer":
        # Backend selection: an NCCL group (CUDA tensors) gets the CUDA backend's Buffer.
        if cls is Buffer and _is_nccl_group(group):
            from .cuda.buffer import CudaBuffer
            cls = CudaBuffer
        return super().__new__(cls)

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, *,
                 num_ranks_per_node: Optional[int] = None, timeout_s: float = 60.0) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        error: Optional[BaseException] = None
        try:
            V.check_int("num_nvl_bytes", num_nvl_bytes, 0)
            V.check_int("num_rdma_bytes", num_rdma_bytes, 0)
            if not timeout_s > 0:
                raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
            if num_ranks_per_node is None:
                num_ranks_per_node = detect_num_ranks_per_node(group)
            V.check_int("num_ranks_per_node", num_ranks_per_node, 1)
            self.topology = Topology(self.group_size, num_ranks_per_node, self.rank)
        except (ValueError, TypeError) as exc:
            error = exc
        # Every rank raises alike, before the links are built (which would wait on the others).
        V.agree_across_ranks(group, error, num_ranks_per_node=num_ranks_per_node, num_nvl_bytes=num_nvl_bytes,
                             num_rdma_bytes=num_rdma_bytes)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.timeout_s = float(timeout_s)
        self._backend: Optional[HostBackend] = HostBackend(group, self.topology, num_nvl_bytes, num_rdma_bytes,
                                                           self.timeout_s)

    # --- class-wide settings and sizing -----------------------------------------------------
    @classmethod
    def set_num_sms(cls, num_sms: int) -> None:
        """Sets the default SM budget (CPU backend: worker-thread budget) of every call."""
        V.check_int("num_sms", num_sms, 1)
        cls.num_sms = num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int = 0) -> Config:
        return Config(num_sms=Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int = 0) -> Config:
        return Config(num_sms=Buffer.num_sms)

    @staticmethod
    def get_nvl_buffer_size_hint(hidden_bytes: int, num_ranks_per_node: int, chunk_tokens: int = 1024) -> int:
        """In-node staging per rank that lets chunks of ``chunk_tokens`` rows flow (hidden_bytes in
        float32 terms, as combine partials are)."""
        from .host.node_link import OUTBOX_SLOTS, RETURN_SLOTS
        row_bytes = hidden_bytes + 1024  # record metadata and alignment, generously
        return (OUTBOX_SLOTS + num_ranks_per_node * RETURN_SLOTS) * chunk_tokens * row_bytes + (1 << 20)

    @staticmethod
    def get_rdma_buffer_size_hint(hidden_bytes: int, num_nodes: int, chunk_tokens: int = 1024) -> int:
        """Rail staging per rank for chunks of ``chunk_tokens`` rows (hidden_bytes in float32 terms)."""
        return 4 * max(1, num_nodes - 1) * chunk_tokens * (hidden_bytes + 1024)

    # --- lifetime -----------------------------------------------------------------------------
    def destroy(self) -> None:
        """Frees the staging memory and the rail groups (idempotent)."""
        if self._backend is not None:
            self._backend.destroy()
            self._backend = None

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.destroy()

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:
            pass

    def _live_backend(self) -> HostBackend:
        if self._backend is None:
            raise RuntimeError("this Buffer was destroyed")
        return self._backend

    def _threads(self, config: Optional[Config]) -> Tuple[int, Optional[int]]:
        config = config or Config(num_sms=Buffer.num_sms)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a dispatch.Config, got {type(config).__name__}")
        return config.cpu_threads(self.topology.num_ranks_per_node), config.chunk_tokens

    # --- layout -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Computes where each token goes (local, no communication).

        Args:
            topk_idx: ``[T, k]`` int64 (int32 accepted) expert ids, -1 = none.
            num_experts: ``E``, a multiple of the group size.

        Returns:
            num_tokens_per_rank: int32 ``[R]``.
            num_tokens_per_rdma_rank: int32 ``[N]``, or None when there is one node.
            num_tokens_per_expert: int32 ``[E]``.
            is_token_in_rank: bool ``[T, R]``.
            event: an EventOverlap (already finished on the CPU).
        """
        from . import _C
        topo = self.topology
        V.check_num_experts(num_experts, topo.num_ranks)
        idx = V.check_topk_idx(topk_idx, num_experts)
        R, N = topo.num_ranks, topo.num_nodes
        per_rank = torch.zeros(R, dtype=torch.int32)
        per_node = torch.zeros(N, dtype=torch.int32)
        per_expert = torch.zeros(num_experts, dtype=torch.int32)
        in_rank = torch.empty((idx.shape[0], R), dtype=torch.bool)
        _C.compute_layout(idx.data_ptr(), False, idx.shape[0], idx.shape[1], R, topo.num_ranks_per_node,
                          num_experts, per_rank.data_ptr(), per_node.data_ptr(), per_expert.data_ptr(),
                          in_rank.data_ptr())
        return per_rank, (per_node if N > 1 else None), per_expert, in_rank, EventOverlap()

    # --- dispatch -----------------------------------------------------------------------------
    def dispatch(self, x: Tensors, handle: Optional[HostHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, num_experts: Optional[int] = None,
                 config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Sends every token to each rank holding one of its experts (two hops across nodes).

        Args:
            x: ``[T, H]`` float32/bfloat16/float16/float64, or the FP8 pair
                ``(float8_e4m3fn [T, H], float32 scales [T, ceil(H/128)])``.
            handle: a previous dispatch's handle: re-send ``x`` along the same routes.
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                the layout from ``get_dispatch_layout`` (computed from ``topk_idx`` when absent).
            topk_idx: ``[T, k]`` expert ids (-1 = none).
            topk_weights: ``[T, k]`` float32.
            expert_alignment: each per-expert receive count is rounded up to a multiple of this.
            num_worst_tokens: if > 0, the receive tensors have exactly this many rows.
            num_experts: ``E`` when ``num_tokens_per_expert`` is not given.
            config: SM (CPU: thread) budget and chunking.

        Returns:
            recv_x: received rows (a pair for FP8), ordered by source rank then source token.
            recv_topk_idx: ``[n, k]`` local expert ids or -1 (None without ``topk_idx``).
            recv_topk_weights: ``[n, k]`` float32, 0 where ``recv_topk_idx`` is -1.
            num_recv_tokens_per_expert_list: list of int per local expert (aligned).
            handle: routes for combine and cached dispatch.
            event: EventOverlap.
        """
        backend = self._live_backend()
        if handle is not None:
            return self._cached_dispatch(backend, x, handle, config)
        error: Optional[BaseException] = None
        rows = scales = idx = weights = None
        per_rank = per_expert = in_rank = None
        E = 0
        threads, chunk_tokens = 1, None
        try:
            threads, chunk_tokens = self._threads(config)
            rows, scales = V.split_x(x)
            T = rows.shape[0]
            V.check_int("expert_alignment", expert_alignment, 1)
            V.check_int("num_worst_tokens", num_worst_tokens, 0)
            if num_tokens_per_expert is not None:
                V.check_tensor("num_tokens_per_expert", num_tokens_per_expert, (torch.int32, torch.int64), 1)
                E = num_tokens_per_expert.numel()
                if num_experts is not None and num_experts != E:
                    raise ValueError(f"num_experts={num_experts} disagrees with len(num_tokens_per_expert)={E}")
            elif num_experts is not None:
                E = num_experts
            elif topk_idx is not None:
                raise ValueError("num_experts is required when num_tokens_per_expert is not given")
            else:
                E = self.group_size
            V.check_num_experts(E, self.group_size)
            from .host.notify import MAX_EXPERTS
            if E > MAX_EXPERTS:
                raise ValueError(f"num_experts={E} exceeds the supported {MAX_EXPERTS}")
            if topk_idx is not None:
                idx = V.check_topk_idx(topk_idx, E, T)
                if topk_weights is not None:
                    weights = V.check_tensor("topk_weights", topk_weights, (torch.float32,), 2, T,
                                             idx.shape[1]).contiguous()
            elif topk_weights is not None:
                raise ValueError("topk_weights needs topk_idx")
            if is_token_in_rank is None:
                if idx is None:
                    raise ValueError("dispatch needs topk_idx or is_token_in_rank")
                per_rank, _, per_expert, in_rank, _ = self.get_dispatch_layout(idx, E)
            else:
                in_rank = V.check_tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), 2, T,
                                         self.group_size).contiguous()
                per_rank = in_rank.sum(dim=0).to(torch.int32)
                if num_tokens_per_rank is not None:
                    V.check_tensor("num_tokens_per_rank", num_tokens_per_rank, (torch.int32, torch.int64), 1)
                    if not torch.equal(num_tokens_per_rank.to(torch.int32).cpu(), per_rank):
                        raise ValueError("num_tokens_per_rank disagrees with is_token_in_rank")
                per_expert = num_tokens_per_expert.to(torch.int32) if num_tokens_per_expert is not None else None
                if idx is not None:  # a stale layout would drop tokens silently
                    topk_layout = self.get_dispatch_layout(idx, E)
                    V.check_layout_matches_topk(self.topology.num_ranks_per_node, topk_layout, in_rank,
                                                num_tokens_per_rdma_rank, per_expert)
                    per_expert = topk_layout[2] if per_expert is None else per_expert
            rows = rows.contiguous()
        except (ValueError, TypeError) as exc:
            error = exc
        recv_x, recv_scales, recv_idx, recv_weights, per_expert_list, new_handle = backend.dispatch(
            rows, scales, idx, weights, in_rank, per_rank, per_expert, E, expert_alignment, num_worst_tokens,
            chunk_tokens, threads, error)
        if weights is None:
            recv_weights = None
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        return recv, recv_idx, recv_weights, per_expert_list, new_handle, EventOverlap()

    def _cached_dispatch(self, backend: HostBackend, x: Tensors, handle: HostHandle, config: Optional[Config]):
        error: Optional[BaseException] = None
        rows = scales = None
        threads = 1
        try:
            threads, _ = self._threads(config)
            backend.check_handle(handle)
            rows, scales = V.split_x(x)
            if rows.shape[0] != handle.num_tokens:
                raise ValueError(f"x has {rows.shape[0]} rows but the handle routes {handle.num_tokens} tokens")
            rows = rows.contiguous()
        except (ValueError, TypeError) as exc:
            error = exc
        recv_x, recv_scales = backend.cached_dispatch(rows, scales, handle, threads, error)
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        return recv, None, None, None, handle, EventOverlap()

    # --- combine ------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: HostHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Sums every token's expert outputs back at its source (reduced in-node first).

        Args:
            x: ``[n, H]`` rows in the order of ``recv_x`` (float32/bfloat16/float16/float64).
            handle: the handle of the dispatch being reversed.
            topk_weights: ``[n, k]`` float32, combined the same way.
            bias: None, a ``[T, H]`` tensor or a pair of them, added to the result.
            config: SM (CPU: thread) budget; ``round_rail_partials`` trades the exact sum for
                half the rail bytes.

        Returns:
            combined_x: ``[T, H]`` in ``x.dtype``.
            combined_topk_weights: ``[T, k]`` float32 (None without ``topk_weights``).
            event: EventOverlap.
        """
        backend = self._live_backend()
        error: Optional[BaseException] = None
        biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        threads = 1
        try:
            threads, _ = self._threads(config)
            backend.check_handle(handle)
            x = V.check_tensor("x", x, V.FLOAT_DTYPES, 2).contiguous()
            if x.shape[0] not in (handle.num_recv_tokens, handle.num_recv_rows):
                raise ValueError(f"x has {x.shape[0]} rows but the handle received {handle.num_recv_tokens}")
            if topk_weights is not None:
                topk_weights = V.check_tensor("topk_weights", topk_weights, (torch.float32,), 2, x.shape[0])
            if bias is not None:
                pair = bias if isinstance(bias, tuple) else (bias, None)
                if len(pair) != 2:
                    raise TypeError("bias must be a tensor or a pair of tensors")
                biases = tuple(None if b is None else V.check_tensor(
                    "bias", b, V.FLOAT_DTYPES, 2, handle.num_tokens, x.shape[1]).contiguous() for b in pair)
        except (ValueError, TypeError) as exc:
            error = exc
        round_partials = bool(config is not None and config.round_rail_partials)
        combined, combined_weights = backend.combine(x, handle, topk_weights, biases, threads, error, round_partials)
        return combined, combined_weights, EventOverlap()

    # --- counters -------------------------------------------------------------------------------
    def get_traffic_stats(self) -> dict:
        """This rank's part of the most recent dispatch or combine (see docs/semantics.md)."""
        return dict(self._live_backend().last_stats)

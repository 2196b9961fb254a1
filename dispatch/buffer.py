"""Buffer: the communication buffer for MoE dispatch and combine (DeepEP-compatible API).

One front for every backend: ``Buffer`` checks the arguments, fills in defaults and shapes the
results; the backend (``dispatch/backend.py``: CPU, CUDA or SIMT) moves the data. A bad argument
does not raise at once: it travels into the backend's handshake as this rank's verdict, so every
rank raises in the same call and nothing is sent.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import validate as V
from .backend import (DEVICE_KINDS, Backend, CachedDispatchArgs, CallOptions, CombineArgs, DispatchArgs,
                      DispatchResult, GroupComm, HandleOrigin)
from .compat import DeepEPBufferExtras, check_deepep_buffer_options, recommended_config
from .config import Config, nvl_staging_bytes, rdma_staging_bytes
from .event import EventOverlap
from .topology import Topology, detect_num_ranks_per_node

Tensors = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
# The config a call with a rejected config still runs its handshake with.
_FALLBACK_CONFIG = Config(num_sms=2)
# Numbers the Buffers of this process (a handle names the one that made it: HandleOrigin).
_BUFFER_IDS = itertools.count(1)


def default_device_kind() -> str:
    """``"cuda"`` where torch sees a GPU, else ``"cpu"``."""
    from .cuda.device import gpu_present
    return "cuda" if gpu_present() else "cpu"


def _device_kind(device: Union[None, str, torch.device]) -> Tuple[str, Optional[int]]:
    """(kind, GPU index or None) of Buffer's ``device`` argument."""
    if device is None:
        return default_device_kind(), None
    if isinstance(device, torch.device):
        kind, index = device.type, ("" if device.index is None else str(device.index))
    elif isinstance(device, str):
        kind, _, index = device.partition(":")
    else:
        raise TypeError(f"device must be None, a str or a torch.device, got {type(device).__name__}")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()):
        raise ValueError(f"device must be one of {DEVICE_KINDS} (or 'cuda:<index>'), got {device!r}")
    return kind, int(index) if index else None


class Buffer(DeepEPBufferExtras):
    """The communication buffer of one rank: staging memory, links and the calls over them.

    Construction is collective over ``group``. The backend follows where the tensors live, not
    the group's backend: ``device="cpu"`` runs the CPU backend (ranks are processes; shared memory
    inside a node, gloo point-to-point on the rails), ``"cuda"`` the CUDA kernels on this rank's
    GPU (the group, gloo or NCCL, serves only the set-up exchange), ``"simt"`` the same kernels on
    the CPU SIMT runtime (CPU tensors; tests and CI).
    DeepEP's constructor keywords are accepted (keyword-only) on every backend; those asking for
    something dispatch does not have raise ``NotImplementedError`` (see docs/deepep.md).

    Args:
        group: the process group of the expert-parallel ranks, or a ``dispatch.testing``
            loopback group.
        num_nvl_bytes: in-node staging budget per rank (0: the backend's default: 512 MiB on the
            CPU, of which pages are touched only as far as chunks need; 256 MiB of device memory).
        num_rdma_bytes: rail staging budget per rank (0: a 512 MiB default).
        low_latency_mode: DeepEP's low-latency mode: must be False (not provided).
        num_qps_per_rank: DeepEP's RDMA queue pairs per rank: checked (>= 1), unused (gloo rails).
        allow_nvlink_for_low_latency_mode: low-latency mode only: checked, unused.
        allow_mnnvl, use_fabric, enable_shrink: must be False (not provided).
        explicitly_destroy: accepted either way: ``destroy()`` may always be called and the
            destructor frees whatever it did not.
        comm: an mpi4py communicator instead of ``group``: not supported (must be None).
        num_ranks_per_node: ranks per node ``L`` (default: ``LOCAL_WORLD_SIZE``, else by host name).
        timeout_s: seconds without progress before a missing peer is reported.
        device: ``"cpu"``, ``"cuda"`` (``"cuda:<i>"``, or a ``torch.device``), ``"simt"``, or None:
            ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"`` (a loopback group
            brings its own).
    """

    num_sms: int = 20

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, *,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False, use_fabric: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Optional[Any] = None,
                 num_ranks_per_node: Optional[int] = None, timeout_s: float = 60.0,
                 device: Union[None, str, torch.device] = None) -> None:
        # What dispatch does not have, and the device keyword, are refused before anything
        # collective (no group needed).
        check_deepep_buffer_options(low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl,
                                    use_fabric, explicitly_destroy, enable_shrink, comm)
        self._backend: Optional[Backend] = None
        loopback = getattr(group, "is_loopback", False)
        kind, index = _device_kind(group.device_kind if loopback and device is None else device)
        self.group = group
        if loopback:
            self.rank, self.group_size = group.rank, group.size
        else:
            self.rank, self.group_size = dist.get_rank(group), dist.get_world_size(group)
        error: Optional[BaseException] = None
        try:
            if num_ranks_per_node is None:  # first: by host name it is collective, so every rank calls it
                num_ranks_per_node = self.group_size if loopback else detect_num_ranks_per_node(group)
            V.check_int("num_nvl_bytes", num_nvl_bytes, 0)
            V.check_int("num_rdma_bytes", num_rdma_bytes, 0)
            if not timeout_s > 0:
                raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
            if kind == "cpu" and loopback:
                raise ValueError("device='cpu' runs ranks as processes: a loopback group needs 'cuda' or 'simt'")
            V.check_int("num_ranks_per_node", num_ranks_per_node, 1)
            self.topology = Topology(self.group_size, num_ranks_per_node, self.rank)
        except (ValueError, TypeError) as exc:
            error = exc
        # Every rank raises alike, before the backend is built (which would wait on the others).
        exchange = group.comm if loopback else GroupComm(group)
        V.agree_across_ranks(exchange.all_gather_object, error, num_ranks_per_node=num_ranks_per_node,
                             num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.timeout_s = float(timeout_s)
        self.low_latency_mode = False
        self.explicitly_destroy = explicitly_destroy
        self._origin = HandleOrigin(next(_BUFFER_IDS), self.group_size, self.topology.num_ranks_per_node)
        self._backend = self._make_backend(kind, index, group, exchange, loopback)
        self.device_kind = kind

    def _make_backend(self, kind: str, index: Optional[int], group: Any, exchange: Any, loopback: bool) -> Backend:
        if kind == "cpu":
            from .host.backend import HostBackend
            return HostBackend(group, self.topology, self.num_nvl_bytes, self.num_rdma_bytes, self.timeout_s)
        from .cuda.backend import CudaBackend
        from .cuda.device import make_device
        device = group.device if loopback else make_device(kind, index)
        return CudaBackend(exchange, self.topology, self.num_nvl_bytes, self.timeout_s, device, loopback)

    # --- class-wide settings and sizing -----------------------------------------------------
    @classmethod
    def set_num_sms(cls, num_sms: int) -> None:
        """Sets the default SM budget (CPU backend: worker-thread budget) of every call, on every
        backend (the setting is ``Buffer``'s, whatever class it is called on). Any positive int
        here; the CUDA backend, like DeepEP, requires an even count at the call."""
        V.check_int("num_sms", num_sms, 1)
        Buffer.num_sms = num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A recommended dispatch config for ``num_ranks`` ranks (DeepEP's API; see ``compat.recommended_config``).

        Args:
            num_ranks: ranks of the group.

        Returns:
            config: with ``Buffer.num_sms`` and DeepEP's chunk fields set, so its size hints work.
        """
        return recommended_config(Buffer.num_sms, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """A recommended combine config for ``num_ranks`` ranks (see :meth:`get_dispatch_config`)."""
        return recommended_config(Buffer.num_sms, num_ranks)

    @staticmethod
    def get_nvl_buffer_size_hint(hidden_bytes: int, num_ranks_per_node: int, chunk_tokens: int = 1024) -> int:
        """In-node staging per rank that lets chunks of ``chunk_tokens`` rows flow (hidden_bytes in
        float32 terms, as combine partials are). DeepEP's form is ``Config.get_nvl_buffer_size_hint``."""
        return nvl_staging_bytes(hidden_bytes, num_ranks_per_node, chunk_tokens)

    @staticmethod
    def get_rdma_buffer_size_hint(hidden_bytes: int, num_nodes: int, chunk_tokens: int = 1024) -> int:
        """Rail staging per rank for chunks of ``chunk_tokens`` rows (hidden_bytes in float32 terms)."""
        return rdma_staging_bytes(hidden_bytes, num_nodes, chunk_tokens)

    # --- lifetime -----------------------------------------------------------------------------
    def destroy(self) -> None:
        """Frees the staging memory and the links (idempotent). Collective: a CUDA buffer waits
        for every rank before freeing what peers may still touch (on a gloo group at most
        2 x ``timeout_s`` + 5 s, then it frees with a ``RuntimeWarning``: a peer died or left)."""
        if self._backend is not None:
            backend, self._backend = self._backend, None
            backend.destroy()

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.destroy()

    def __del__(self) -> None:
        # Only the CPU backend frees here: a device backend's destroy is a collective that a
        # garbage collector must not start on one rank alone.
        backend = getattr(self, "_backend", None)
        if backend is not None and getattr(backend, "device_kind", "cpu") == "cpu":
            try:
                self.destroy()
            except Exception:
                pass

    def _live_backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("this Buffer was destroyed")
        return self._backend

    # --- argument helpers ---------------------------------------------------------------------
    def _config(self, backend: Backend, config: Optional[Config]) -> Config:
        config = config if config is not None else Config(num_sms=Buffer.num_sms)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a dispatch.Config, got {type(config).__name__}")
        backend.check_config(config)
        return config

    @staticmethod
    def _options(previous_event: Optional[EventOverlap], async_finish: bool,
                 allocate_on_comm_stream: bool) -> CallOptions:
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap, got {type(previous_event).__name__}")
        return CallOptions(previous_event, bool(async_finish), bool(allocate_on_comm_stream))

    def _tensor(self, backend: Backend, name: str, value: object, dtypes, dim: int, rows: Optional[int] = None,
                cols: Optional[int] = None) -> torch.Tensor:
        return V.check_tensor(name, value, dtypes, dim, rows, cols, device=backend.tensor_device)

    @staticmethod
    def _values_ready(backend: Backend, previous_event: Optional[EventOverlap]) -> None:
        """Argument checks read values on the compute stream (and the host), outside graph
        capture; some may still be written by the work ``previous_event`` marks (an async
        layout): the compute stream waits for it first."""
        if previous_event is not None and backend.may_read_values():
            previous_event.current_stream_wait()

    def _handle(self, backend: Backend, handle: object) -> Any:
        """``handle`` if this Buffer's dispatch made it: another buffer's routes, chunk sizes
        and ring positions would misroute or hang, so it is refused before anything moves."""
        if not isinstance(handle, backend.handle_type):
            raise TypeError(f"handle must come from this Buffer's dispatch, got {type(handle).__name__}")
        self._origin.check(handle.origin)
        return handle

    # --- layout -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Computes where each token goes (rank-local: no communication).

        Args:
            topk_idx: ``[T, k]`` int64 (int32 accepted) expert ids, -1 = none.
            num_experts: ``E``, a multiple of the group size.
            previous_event / async_finish / allocate_on_comm_stream: DeepEP's stream arguments
                (no effect on the CPU backend, where calls finish before returning).

        Returns:
            num_tokens_per_rank: int32 ``[R]``.
            num_tokens_per_rdma_rank: int32 ``[N]``, or None when there is one node.
            num_tokens_per_expert: int32 ``[E]``.
            is_token_in_rank: bool ``[T, R]``.
            event: an EventOverlap.
        """
        backend = self._live_backend()
        V.check_num_experts(num_experts, self.topology.num_ranks)
        options = self._options(previous_event, async_finish, allocate_on_comm_stream)
        self._values_ready(backend, previous_event)
        idx = V.check_topk_idx(topk_idx, num_experts, device=backend.tensor_device,
                               read_values=backend.may_read_values())
        out = backend.layout(idx, num_experts, self._config(backend, None), options)
        return (out.num_tokens_per_rank, out.num_tokens_per_rdma_rank, out.num_tokens_per_expert,
                out.is_token_in_rank, out.event)

    # --- dispatch -----------------------------------------------------------------------------
    def dispatch(self, x: Tensors, handle: Optional[Any] = None,
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
            num_worst_tokens: if > 0, the receive tensors have exactly this many rows and
                ``num_recv_tokens_per_expert_list`` is ``[]`` (as in DeepEP; on the CUDA backend
                nothing then waits on the host under graph capture).
            num_experts: ``E`` when ``num_tokens_per_expert`` is not given.
            config: SM (CPU: thread) budget and chunking (default: ``Buffer.num_sms``).
            previous_event / async_finish / allocate_on_comm_stream: DeepEP's stream arguments.
                Outside graph capture the argument checks read values (expert ids, the layout)
                after ``previous_event``: the compute stream waits for it first.

        Returns:
            recv_x: received rows (a pair for FP8), ordered by source rank then source token.
            recv_topk_idx: ``[n, k]`` local expert ids or -1 (None without ``topk_idx``).
            recv_topk_weights: ``[n, k]`` float32, 0 where ``recv_topk_idx`` is -1.
            num_recv_tokens_per_expert_list: list of int per local expert (aligned), summed from
                every rank's ``num_tokens_per_expert`` (computed from ``topk_idx`` when absent; None
                when no rank has either), on every backend; ``[]`` with ``num_worst_tokens > 0``.
            handle: routes for combine and cached dispatch; indexable like DeepEP's handle for
                the shared entries (``handle[0]``, ``handle[-4]``, ...; see ``compat.DeepEPHandleView``).
            event: EventOverlap.
        """
        backend = self._live_backend()
        if handle is not None:
            return self._cached_dispatch(backend, x, handle, config, previous_event, async_finish,
                                         allocate_on_comm_stream)
        error: Optional[BaseException] = None
        rows = scales = idx = weights = None
        per_rank = per_expert = in_rank = None
        E = 0
        run_config = _FALLBACK_CONFIG
        options = CallOptions(previous_event, bool(async_finish), bool(allocate_on_comm_stream))
        try:
            options = self._options(previous_event, async_finish, allocate_on_comm_stream)
            run_config = self._config(backend, config)
            self._values_ready(backend, previous_event)
            rows, scales = V.split_x(x, device=backend.tensor_device)
            T = rows.shape[0]
            V.check_int("expert_alignment", expert_alignment, 1)
            V.check_int("num_worst_tokens", num_worst_tokens, 0)
            if num_worst_tokens == 0 and not backend.may_read_values():
                raise ValueError("num_worst_tokens must be > 0 under CUDA graph capture (the receive count "
                                 "cannot reach the host)")
            E = self._num_experts(backend, num_tokens_per_expert, num_experts, topk_idx)
            if topk_idx is not None:
                idx = V.check_topk_idx(topk_idx, E, T, device=backend.tensor_device,
                                       read_values=backend.may_read_values())
                if topk_weights is not None:
                    weights = self._tensor(backend, "topk_weights", topk_weights, (torch.float32,), 2, T,
                                           idx.shape[1]).contiguous()
            elif topk_weights is not None:
                raise ValueError("topk_weights needs topk_idx")
            if num_tokens_per_expert is not None:
                per_expert = num_tokens_per_expert.to(torch.int32).contiguous()
            # A layout given with topk_idx is checked against it where values may be read (a stale
            # one would drop tokens silently): that needs topk_idx's layout, as do missing parts.
            check_stale = idx is not None and backend.may_read_values() and any(
                given is not None for given in (is_token_in_rank, num_tokens_per_expert, num_tokens_per_rdma_rank))
            layout = None
            if is_token_in_rank is None or (per_expert is None and idx is not None) or check_stale:
                if idx is None:
                    raise ValueError("is_token_in_rank or topk_idx is required: dispatch needs the routes")
                # On the comm stream after previous_event, like the dispatch itself; on the compute
                # stream when its values are read here.
                layout_options = (CallOptions(previous_event) if check_stale else
                                  CallOptions(previous_event, async_finish=True, allocate_on_comm_stream=True))
                layout = backend.layout(idx, E, run_config, layout_options)
                if is_token_in_rank is None:
                    in_rank, per_rank = layout.is_token_in_rank, layout.num_tokens_per_rank
                if per_expert is None:
                    per_expert = layout.num_tokens_per_expert
            if in_rank is None:
                in_rank = self._tensor(backend, "is_token_in_rank", is_token_in_rank, (torch.bool,), 2, T,
                                       self.group_size).contiguous()
                per_rank = self._rank_counts(backend, in_rank, num_tokens_per_rank)
            if check_stale:
                V.check_layout_matches_topk(self.topology.num_ranks_per_node, layout.num_tokens_per_expert,
                                            layout.is_token_in_rank, in_rank, num_tokens_per_rdma_rank, per_expert)
            rows = rows.contiguous()
            scales = scales.contiguous() if scales is not None else None
        except (ValueError, TypeError) as exc:
            error = exc
        result = backend.dispatch(DispatchArgs(
            x=rows, scales=scales, topk_idx=idx, topk_weights=weights, is_token_in_rank=in_rank,
            num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert, num_experts=E,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, config=run_config,
            options=options, error=error))
        result.handle.origin = self._origin
        return self._dispatch_outputs(result, scales is not None, weights is not None, num_worst_tokens > 0)

    def _num_experts(self, backend: Backend, num_tokens_per_expert: Optional[torch.Tensor],
                     num_experts: Optional[int], topk_idx: Optional[torch.Tensor]) -> int:
        if num_tokens_per_expert is not None:
            self._tensor(backend, "num_tokens_per_expert", num_tokens_per_expert, (torch.int32, torch.int64), 1)
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
        if E > backend.max_experts:
            raise ValueError(f"num_experts={E} exceeds the {backend.max_experts} this backend supports")
        return E

    def _rank_counts(self, backend: Backend, in_rank: torch.Tensor,
                     num_tokens_per_rank: Optional[torch.Tensor]) -> torch.Tensor:
        """Tokens per destination rank from ``is_token_in_rank``; a given ``num_tokens_per_rank``
        must agree (checked where values may be read on the host)."""
        per_rank = in_rank.sum(dim=0, dtype=torch.int32)
        if num_tokens_per_rank is not None:
            self._tensor(backend, "num_tokens_per_rank", num_tokens_per_rank, (torch.int32, torch.int64), 1,
                         self.group_size)
            if backend.may_read_values() and not torch.equal(num_tokens_per_rank.to(torch.int32), per_rank):
                raise ValueError("num_tokens_per_rank disagrees with is_token_in_rank")
        return per_rank

    def _cached_dispatch(self, backend: Backend, x: Tensors, handle: Any, config: Optional[Config],
                         previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        error: Optional[BaseException] = None
        rows = scales = None
        run_config = _FALLBACK_CONFIG
        options = CallOptions(previous_event, bool(async_finish), bool(allocate_on_comm_stream))
        try:
            options = self._options(previous_event, async_finish, allocate_on_comm_stream)
            run_config = self._config(backend, config)
            handle = self._handle(backend, handle)
            rows, scales = V.split_x(x, device=backend.tensor_device)
            if rows.shape[0] != handle.num_tokens:
                raise ValueError(f"x has {rows.shape[0]} rows but the handle routes {handle.num_tokens} tokens")
            rows = rows.contiguous()
            scales = scales.contiguous() if scales is not None else None
        except (ValueError, TypeError) as exc:
            error = exc
        result = backend.cached_dispatch(CachedDispatchArgs(x=rows, scales=scales, handle=handle, config=run_config,
                                                            options=options, error=error))
        recv = (result.recv_x, result.recv_scales) if scales is not None else result.recv_x
        return recv, None, None, None, result.handle, result.event

    @staticmethod
    def _dispatch_outputs(result: DispatchResult, fp8: bool, weighted: bool, worst: bool):
        """DeepEP's result tuple; the per-expert list is ``[]`` after a ``num_worst_tokens`` dispatch
        on every backend, as in DeepEP (its counts never wait on the host there)."""
        recv = (result.recv_x, result.recv_scales) if fp8 else result.recv_x
        recv_weights = result.recv_topk_weights if weighted else None
        per_expert = [] if worst else result.num_recv_tokens_per_expert_list
        return recv, result.recv_topk_idx, recv_weights, per_expert, result.handle, result.event

    # --- combine ------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: Any, topk_weights: Optional[torch.Tensor] = None,
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
            previous_event / async_finish / allocate_on_comm_stream: DeepEP's stream arguments.

        Returns:
            combined_x: ``[T, H]`` in ``x.dtype``.
            combined_topk_weights: ``[T, k]`` float32 (None without ``topk_weights``).
            event: EventOverlap.
        """
        backend = self._live_backend()
        error: Optional[BaseException] = None
        biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        run_config = _FALLBACK_CONFIG
        options = CallOptions(previous_event, bool(async_finish), bool(allocate_on_comm_stream))
        try:
            options = self._options(previous_event, async_finish, allocate_on_comm_stream)
            run_config = self._config(backend, config)
            handle = self._handle(backend, handle)
            x = self._tensor(backend, "x", x, V.FLOAT_DTYPES, 2).contiguous()
            allowed = {handle.num_recv_rows} | ({handle.num_recv_tokens} if handle.num_recv_tokens is not None else set())
            if x.shape[0] not in allowed:
                raise ValueError(f"x has {x.shape[0]} rows but the handle received {sorted(allowed)}")
            if topk_weights is not None:
                topk_weights = self._tensor(backend, "topk_weights", topk_weights, (torch.float32,), 2,
                                            x.shape[0]).contiguous()
            biases = self._biases(backend, bias, handle.num_tokens, x.shape[1])
        except (ValueError, TypeError) as exc:
            error = exc
        result = backend.combine(CombineArgs(x=x, handle=handle, topk_weights=topk_weights, bias=biases,
                                             config=run_config, options=options, error=error))
        return result.combined_x, result.combined_topk_weights, result.event

    def _biases(self, backend: Backend, bias: object, num_tokens: int,
                hidden: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``bias`` as a pair of ``[T, H]`` tensors or Nones."""
        if bias is None:
            return None, None
        pair = bias if isinstance(bias, tuple) else (bias, None)
        if len(pair) != 2:
            raise TypeError("bias must be a tensor or a pair of tensors")
        return tuple(None if b is None else self._tensor(backend, "bias", b, V.FLOAT_DTYPES, 2, num_tokens,
                                                          hidden).contiguous() for b in pair)

    # --- counters -------------------------------------------------------------------------------
    def get_traffic_stats(self) -> dict:
        """This rank's part of the most recent dispatch or combine (see docs/semantics.md; a
        device backend waits for its stream first)."""
        return self._live_backend().stats()

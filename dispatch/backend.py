"""The backend protocol: what ``Buffer`` asks of the CPU, CUDA and SIMT backends.

``Buffer`` (``dispatch/buffer.py``) is the one front: it checks arguments, fills in defaults and
shapes the DeepEP-style results. A backend moves the data. Every collective call hands the backend
one typed argument object (``DispatchArgs``, ``CachedDispatchArgs``, ``CombineArgs``) whose
``error`` field carries this rank's verdict on its own arguments: a backend must still take part
in the call's handshake when ``error`` is set, so that every rank raises (the bad rank its own
error, the others one naming the bad rank and argument) and no data moves.

Backends:
    * ``dispatch.host.backend.HostBackend`` (``device="cpu"``): ranks are processes, shared memory
      inside a node, gloo point-to-point on the rails.
    * ``dispatch.cuda.backend.CudaBackend`` (``device="cuda"`` or ``"simt"``): the in-node CUDA
      kernels, on a GPU or, compiled by g++ against the CPU SIMT runtime, on the host
      (``dispatch.cuda.device`` tells the two apart).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch

from .config import Config
from .event import EventOverlap

DEVICE_KINDS = ("cpu", "cuda", "simt")

# Argument names a rank's verdict can point at (``verdict_code``): the index travels between
# ranks, so every rank names the same argument. Append only: ranks must agree on the tuple.
ARGUMENT_NAMES = ("arguments", "x", "topk_idx", "topk_weights", "is_token_in_rank", "num_tokens_per_rank",
                  "num_tokens_per_rdma_rank", "num_tokens_per_expert", "num_experts", "expert_alignment",
                  "num_worst_tokens", "config", "num_sms", "handle", "bias", "num_nvl_bytes", "previous_event")


@dataclass
class CallOptions:
    """DeepEP's stream arguments of one call.

    Args:
        previous_event: the call's work starts after this event (default: after the compute
            stream's work so far).
        async_finish: return without making the compute stream wait; the returned EventOverlap
            marks the end.
        allocate_on_comm_stream: allocate the outputs on the communication stream (the caller
            then owns their stream lifetime, as in DeepEP).
    """

    previous_event: Optional[EventOverlap] = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False


@dataclass
class DispatchArgs:
    """One full dispatch, checked by ``Buffer`` (tensors contiguous, on the backend's device).

    When ``error`` is set, the tensor fields may be None or unchecked: the backend only takes
    part in the handshake and raises.

    Args:
        x: ``[T, H]`` rows (float8_e4m3fn when ``scales`` is given).
        scales: ``[T, ceil(H/128)]`` float32 FP8 scales, or None.
        topk_idx: ``[T, k]`` int64 expert ids in ``[-1, E)``, or None.
        topk_weights: ``[T, k]`` float32, or None.
        is_token_in_rank: bool ``[T, R]``.
        num_tokens_per_rank: int32 ``[R]`` (the row sums of ``is_token_in_rank``).
        num_tokens_per_expert: int32 ``[E]`` or None (no per-expert counts wanted).
        num_experts: ``E``.
        expert_alignment: per-expert receive counts are rounded up to a multiple of this.
        num_worst_tokens: rows of the receive tensors when > 0.
        config: the call's Config (``Buffer`` filled in the default).
        options: stream arguments.
        error: this rank's verdict on its arguments (None: fine).
    """

    x: Optional[torch.Tensor]
    scales: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]
    is_token_in_rank: Optional[torch.Tensor]
    num_tokens_per_rank: Optional[torch.Tensor]
    num_tokens_per_expert: Optional[torch.Tensor]
    num_experts: int
    expert_alignment: int
    num_worst_tokens: int
    config: Config
    options: CallOptions = field(default_factory=CallOptions)
    error: Optional[BaseException] = None


@dataclass
class CachedDispatchArgs:
    """A dispatch along a previous dispatch's routes (``handle``).

    Args:
        x / scales: as in ``DispatchArgs``.
        handle: the backend's handle from an earlier dispatch.
        config / options / error: as in ``DispatchArgs``.
    """

    x: Optional[torch.Tensor]
    scales: Optional[torch.Tensor]
    handle: Any
    config: Config
    options: CallOptions = field(default_factory=CallOptions)
    error: Optional[BaseException] = None


@dataclass
class CombineArgs:
    """One combine, checked by ``Buffer``.

    Args:
        x: ``[n, H]`` rows in the order of the dispatch's ``recv_x``.
        handle: the handle of the dispatch being reversed.
        topk_weights: ``[n, k]`` float32 or None.
        bias: up to two ``[T, H]`` tensors added to the result.
        config / options / error: as in ``DispatchArgs``.
    """

    x: Optional[torch.Tensor]
    handle: Any
    topk_weights: Optional[torch.Tensor]
    bias: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
    config: Config
    options: CallOptions = field(default_factory=CallOptions)
    error: Optional[BaseException] = None


@dataclass(frozen=True)
class HandleOrigin:
    """Which buffer made a dispatch handle: ``Buffer`` stamps every handle its dispatch returns
    and refuses another buffer's handle before anything moves (its routes, chunk sizes and ring
    positions belong to that buffer).

    Args:
        buffer_id: a number unique to the ``Buffer`` within this process.
        num_ranks / num_ranks_per_node: the topology the handle was made on.
    """

    buffer_id: int
    num_ranks: int
    num_ranks_per_node: int

    def check(self, handle_origin: Optional["HandleOrigin"]) -> None:
        """Raises ``ValueError`` naming ``handle`` unless ``handle_origin`` (the handle's) is this one."""
        if handle_origin is None:
            raise ValueError("handle was not made by a Buffer's dispatch; pass a handle from this Buffer's dispatch")
        if (handle_origin.num_ranks, handle_origin.num_ranks_per_node) != (self.num_ranks, self.num_ranks_per_node):
            raise ValueError(f"handle was made on {handle_origin.num_ranks} ranks with num_ranks_per_node="
                             f"{handle_origin.num_ranks_per_node}, but this Buffer has {self.num_ranks} ranks with "
                             f"num_ranks_per_node={self.num_ranks_per_node}")
        if handle_origin.buffer_id != self.buffer_id:
            raise ValueError("handle was made by another Buffer; pass a handle from this Buffer's dispatch")


@dataclass
class DispatchResult:
    """What a backend's dispatch returns; ``Buffer`` shapes it into DeepEP's tuple."""

    recv_x: torch.Tensor
    recv_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: Optional[List[int]]
    handle: Any
    event: EventOverlap


@dataclass
class CombineResult:
    combined_x: torch.Tensor
    combined_topk_weights: Optional[torch.Tensor]
    event: EventOverlap


@dataclass
class LayoutResult:
    num_tokens_per_rank: torch.Tensor
    num_tokens_per_rdma_rank: Optional[torch.Tensor]
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    event: EventOverlap


class Backend(Protocol):
    """What every backend implements (see the module docstring).

    Attributes:
        device_kind: ``"cpu"``, ``"cuda"`` or ``"simt"``.
        tensor_device: where this backend's tensors live (``Buffer`` checks every argument).
        handle_type: the class of this backend's dispatch handles (with an ``origin`` attribute,
            a ``HandleOrigin`` or None, that ``Buffer`` sets).
        max_experts: the most experts ``E`` a dispatch may route to.
    """

    device_kind: str
    tensor_device: torch.device
    handle_type: type
    max_experts: int

    def check_config(self, config: Config) -> None:
        """Raises ``ValueError`` naming the field when ``config`` does not fit this backend."""

    def may_read_values(self) -> bool:
        """Whether argument values may be read on the host now (False under CUDA graph capture:
        value checks that would wait for the device are skipped then)."""

    def layout(self, topk_idx: torch.Tensor, num_experts: int, config: Config, options: CallOptions) -> LayoutResult:
        """Rank-local layout of ``topk_idx`` (int64, checked)."""

    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        """Collective: a full dispatch (raises on every rank when any rank's ``error`` is set)."""

    def cached_dispatch(self, args: CachedDispatchArgs) -> DispatchResult:
        """Collective: re-sends ``x`` along ``args.handle``'s routes."""

    def combine(self, args: CombineArgs) -> CombineResult:
        """Collective: the reverse of the handle's dispatch, summed at each source."""

    def stats(self) -> Dict[str, object]:
        """This rank's traffic counters of the last dispatch or combine (docs/semantics.md)."""

    def destroy(self) -> None:
        """Collective over the node: frees staging and mappings once every rank is done (a
        device backend waits ``destroy_wait_s(timeout_s)`` at most, then warns and frees)."""


class GroupComm:
    """Host-side exchange over a torch.distributed group, for set-up and ``destroy`` only (any
    backend: a gloo group serves the handshake of a CUDA buffer)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def all_gather_object(self, obj: Any) -> List[Any]:
        import torch.distributed as dist
        out: List[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self, timeout_s: Optional[float] = None) -> bool:
        """Waits for every rank of the group; returns False if some rank did not come within
        ``timeout_s``. Bounded on gloo groups only (gloo's ``wait`` takes a timeout; a timed-out
        barrier stays posted and completes when the late rank arrives, so the group stays in
        step). On other backends ``wait`` does not block the host, so an unbounded exchange
        stands in (its end is the group's own timeout)."""
        import torch.distributed as dist
        if timeout_s is None or dist.get_backend(self.group) != "gloo":
            self.all_gather_object(None)
            return True
        work = dist.barrier(group=self.group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=timeout_s))
        except RuntimeError:  # "Operation timed out!"; a dead peer's connection fails the same way
            return False
        return True


# Beyond two timeouts, what a peer may take to reach destroy() after its kernels gave up.
DESTROY_SLACK_S = 5.0


def destroy_wait_s(timeout_s: float) -> float:
    """How long a device backend's ``destroy`` waits for the other ranks: a live peer may be in
    a failing call whose kernel waits ``timeout_s`` without progress, and that wait may have
    started up to ``timeout_s`` late (behind another kernel)."""
    return 2 * timeout_s + DESTROY_SLACK_S


def wait_for_peers_before_freeing(comm: Any, timeout_s: float, rank: int) -> None:
    """A device backend's ``destroy`` barrier: peers may still touch this rank's staging until
    they are past their kernels. A peer that died never comes: wait ``destroy_wait_s`` (every
    kernel of a live peer has given up by then), warn, and let the caller free."""
    wait_s = destroy_wait_s(timeout_s)
    if not comm.barrier(wait_s):
        warnings.warn(f"destroy() on rank {rank}: not every rank of the buffer called destroy() within "
                      f"{wait_s:g} s (a peer died or left); freeing this rank's staging anyway",
                      RuntimeWarning, stacklevel=3)


def dtype_codes(mod: Any) -> Dict[torch.dtype, int]:
    """``{torch dtype: code}`` from a C++ module's ``DTYPE_CODES`` (defined once in
    ``csrc/common``; keys are torch dtype names such as ``"bfloat16"``)."""
    return {getattr(torch, name): int(code) for name, code in mod.DTYPE_CODES.items() if hasattr(torch, name)}


def verdict_code(error: Optional[BaseException]) -> int:
    """Encodes this rank's verdict for its peers: 0 = fine, else ``1 + 2 * argument + is_type``.

    The argument is the first word of the message (every check in ``dispatch.validate`` starts
    its message with the argument's name), matched against ``ARGUMENT_NAMES``.
    """
    if error is None:
        return 0
    return 1 + 2 * ARGUMENT_NAMES.index(argument_of(error)) + int(isinstance(error, TypeError))


def argument_of(error: BaseException) -> str:
    """The argument an error from ``dispatch.validate`` names (``"arguments"`` when unknown)."""
    words = str(error).replace("[", " ").replace("=", " ").replace(".", " ").split()
    for word in words[:3]:
        if word in ARGUMENT_NAMES:
            return word
    return ARGUMENT_NAMES[0]


def verdict_error(code: int, rank: int, op: str) -> Exception:
    """The error a rank raises for a peer's nonzero verdict ``code`` (see ``verdict_code``)."""
    argument = ARGUMENT_NAMES[((code - 1) // 2) % len(ARGUMENT_NAMES)]
    cls = TypeError if (code - 1) % 2 else ValueError
    what = "its arguments" if argument == ARGUMENT_NAMES[0] else f"its argument {argument!r}"
    return cls(f"{op}: rank {rank} rejected {what} (see its error); nothing was sent")

"""DeepEP drop-in pieces: what DeepEP's normal-mode client code calls beyond the core API.

``import dispatch as deep_ep`` is meant to be the only change DeepEP normal-mode code needs; this
module holds the parts of that promise that are not dispatch/combine themselves, kept apart so
they move with the Buffer front as a whole (see docs/deepep.md):

- :class:`DeepEPBufferExtras`: ``capture``, ``is_sm90_compiled``, the rank/stream helpers, and
  low-latency entry points that raise ``NotImplementedError`` saying why.
- :func:`check_deepep_buffer_options`: DeepEP's constructor keywords, accepted or refused.
- :func:`recommended_config`: the per-rank-count configs of ``get_dispatch_config``.
- :class:`DeepEPHandleView`: a handle indexable like DeepEP's handle tuple, for the shared entries.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .config import Config
from .event import EventOverlap

# DeepEP's handle tuples, entry by entry (intranode: one node; internode: several).
INTRANODE_HANDLE = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix",
                    "recv_src_idx", "is_token_in_rank", "send_head")
INTERNODE_HANDLE = ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                    "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                    "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
                    "send_rdma_head", "send_nvl_head")

# The entries whose meaning both libraries share.
SHARED_HANDLE_ENTRIES = ("rank_prefix_matrix", "recv_src_idx", "is_token_in_rank", "recv_rdma_rank_prefix_sum",
                         "recv_gbl_rank_prefix_sum")

# Tokens in flight per link that recommended_config aims at (cf. DEFAULT_HINT_CHUNK_TOKENS).
RECOMMENDED_WINDOW_TOKENS = 1024

_LOW_LATENCY_REASON = ("DeepEP's low-latency mode (IBGDA, fixed-size per-expert receive buffers) is not "
                       "provided by dispatch: use the normal-mode dispatch/combine "
                       "(num_worst_tokens gives static shapes); see docs/deepep.md")


def check_deepep_buffer_options(low_latency_mode: bool, num_qps_per_rank: int,
                                allow_nvlink_for_low_latency_mode: bool, allow_mnnvl: bool, use_fabric: bool,
                                explicitly_destroy: bool, enable_shrink: bool, comm: Optional[Any]) -> None:
    """Checks DeepEP's ``Buffer`` constructor keywords; refuses what dispatch does not have.

    Raises:
        TypeError: a flag that is not a bool, ``num_qps_per_rank`` not an int.
        ValueError: ``num_qps_per_rank < 1``.
        NotImplementedError: ``low_latency_mode``, ``allow_mnnvl``, ``use_fabric``, ``enable_shrink``
            set, or an mpi4py ``comm`` given.
    """
    flags = {"low_latency_mode": low_latency_mode, "allow_nvlink_for_low_latency_mode": allow_nvlink_for_low_latency_mode,
             "allow_mnnvl": allow_mnnvl, "use_fabric": use_fabric, "explicitly_destroy": explicitly_destroy,
             "enable_shrink": enable_shrink}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if isinstance(num_qps_per_rank, bool) or not isinstance(num_qps_per_rank, int):
        raise TypeError(f"num_qps_per_rank must be an int, got {num_qps_per_rank!r}")
    if num_qps_per_rank < 1:
        raise ValueError(f"num_qps_per_rank must be >= 1, got {num_qps_per_rank}")
    refused = {
        "low_latency_mode": _LOW_LATENCY_REASON,
        "allow_mnnvl": "dispatch has no multi-node NVLink path; a larger NVLink domain is one node: "
                       "pass num_ranks_per_node=<domain size>",
        "use_fabric": "dispatch does not allocate fabric (multi-node NVLink) memory",
        "enable_shrink": "dispatch has no elastic shrinking of the group; build a new Buffer on the new group",
    }
    for name, reason in refused.items():
        if flags[name]:
            raise NotImplementedError(f"{name}=True: {reason}")
    if comm is not None:
        raise NotImplementedError("comm (an mpi4py communicator) is not supported: pass a torch.distributed group")


def recommended_config(num_sms: int, num_ranks: int) -> Config:
    """The config ``Buffer.get_dispatch_config``/``get_combine_config`` return.

    DeepEP tunes one config per rank count for its NVLink/RDMA channels. Here chunks are per link,
    not per peer, so every rank count gets the same windows: ``RECOMMENDED_WINDOW_TOKENS`` tokens
    in flight per link across the ``num_sms // 2`` channels, send steps an eighth of that.

    Args:
        num_sms: the SM (CPU: thread) budget, ``Buffer.num_sms``.
        num_ranks: ranks of the group (checked; DeepEP asserts it is one it has tuned).
    """
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    channels = max(1, num_sms // 2)
    recv = max(8, RECOMMENDED_WINDOW_TOKENS // channels // 8 * 8)
    send = recv // 8
    return Config(num_sms, send, recv, send, recv)


class DeepEPBufferExtras:
    """DeepEP's small ``Buffer`` helpers, for a buffer with a ``topology`` and a ``_backend``."""

    topology: Any

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream: a CUDA event when CUDA is in use, else already finished
        (the CPU and SIMT backends: the host's work so far is done).

        Returns:
            event: pass it as ``previous_event`` to order a call after the work queued so far.
        """
        from .cuda.device import GpuDevice
        return EventOverlap(GpuDevice.current_event())

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: what DeepEP gates on SM90 (dispatching FP8 pairs) works on every backend here."""
        return True

    def get_local_device_id(self) -> int:
        """This rank's CUDA device index; -1 on the CPU and SIMT backends (no GPU)."""
        device = getattr(getattr(self, "_backend", None), "tensor_device", None)
        if isinstance(device, torch.device) and device.type == "cuda" and device.index is not None:
            return device.index
        return -1

    def get_num_rdma_ranks(self) -> int:
        """Nodes of the group (DeepEP: ranks on the RDMA level, one per node)."""
        return self.topology.num_nodes

    def get_rdma_rank(self) -> int:
        """This rank's node."""
        return self.topology.node

    def get_root_rdma_rank(self, global_rank: bool) -> int:
        """The rank of node 0 with this rank's local index (this rank's rail peer on node 0).

        Args:
            global_rank: True: as a rank of the group; False: as a node index (always 0).
        """
        return self.topology.local_rank if global_rank else 0

    def get_comm_stream(self) -> Any:
        """The stream the communication runs on: the buffer's CUDA stream (SIMT: its
        ``dispatch._simt.Stream``), or on the CPU backend the current CPU stream (calls finish
        before they return)."""
        backend = getattr(self, "_backend", None)
        stream = getattr(backend, "stream", None)
        return stream if stream is not None else torch.cpu.current_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """Not provided: the staging memory holds live ring slots of every call; a user view of it
        would race with them (DeepEP uses it for low-latency tricks, which are not provided either)."""
        raise NotImplementedError("get_local_buffer_tensor is not provided: dispatch's staging memory is "
                                  "owned by its rings; allocate your own tensor (see docs/deepep.md)")

    @staticmethod
    def get_low_latency_rdma_size_hint(*args: Any, **kwargs: Any) -> int:
        """Not provided (low-latency mode)."""
        raise NotImplementedError(_LOW_LATENCY_REASON)

    def clean_low_latency_buffer(self, *args: Any, **kwargs: Any) -> None:
        """Not provided (low-latency mode)."""
        raise NotImplementedError(_LOW_LATENCY_REASON)

    def low_latency_dispatch(self, *args: Any, **kwargs: Any) -> Any:
        """Not provided (low-latency mode)."""
        raise NotImplementedError(_LOW_LATENCY_REASON)

    def low_latency_combine(self, *args: Any, **kwargs: Any) -> Any:
        """Not provided (low-latency mode)."""
        raise NotImplementedError(_LOW_LATENCY_REASON)


class DeepEPHandleView:
    """Makes a dispatch handle indexable like DeepEP's handle tuple, for the entries whose
    meaning both libraries share, with DeepEP's shapes and dtypes.

    One node: 6 entries (DeepEP's intranode handle); ``handle[0]`` ``rank_prefix_matrix``
    (int32 ``[R, R]``, ``[s, d]`` = rows rank ``d`` receives from ranks ``0..s``),
    ``handle[3]`` ``recv_src_idx`` (int32 ``[rows]``, source token of each received row, -1 in
    padding), ``handle[4]`` ``is_token_in_rank`` (bool ``[T, R]``).
    Several nodes: 10 entries (internode); ``handle[0]`` ``is_token_in_rank``, ``handle[4]``
    ``recv_rdma_rank_prefix_sum`` (int32 ``[N]``, tokens this rank's rail peers sent it, prefix
    over nodes), ``handle[6]`` = ``handle[-4]`` ``recv_gbl_rank_prefix_sum`` (int32 ``[R]``, rows
    received from ranks ``0..s``). The other entries (channel matrices, send heads, source
    metadata) describe DeepEP's kernels and have no counterpart: indexing them raises
    ``NotImplementedError``, as does unpacking the handle.

    The handle class provides :meth:`_deepep_num_nodes`, the ``is_token_in_rank`` and
    ``recv_src_token`` attributes every backend's handle keeps, and extends :meth:`_deepep_entry`
    with what else it holds.
    """

    is_token_in_rank: torch.Tensor
    recv_src_token: torch.Tensor

    def _deepep_num_nodes(self) -> int:
        raise NotImplementedError

    def _deepep_entry(self, name: str) -> Optional[torch.Tensor]:
        """The DeepEP entry ``name``, or None when it has no counterpart here (the base serves
        the entries every handle keeps)."""
        if name == "is_token_in_rank":
            return self.is_token_in_rank
        if name == "recv_src_idx":
            return self.recv_src_token
        return None

    def _deepep_names(self) -> Tuple[str, ...]:
        return INTERNODE_HANDLE if self._deepep_num_nodes() > 1 else INTRANODE_HANDLE

    def __len__(self) -> int:
        return len(self._deepep_names())

    def __getitem__(self, index: int) -> torch.Tensor:
        names = self._deepep_names()
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"a dispatch handle is indexed by an int, got {type(index).__name__}")
        if not -len(names) <= index < len(names):
            raise IndexError(f"handle index {index} out of range: DeepEP's "
                             f"{'internode' if len(names) == len(INTERNODE_HANDLE) else 'intranode'} "
                             f"handle has {len(names)} entries")
        name = names[index]
        value = self._deepep_entry(name)
        if value is None:
            shared = [f"[{i}] {n}" for i, n in enumerate(names) if n in SHARED_HANDLE_ENTRIES]
            raise NotImplementedError(f"handle[{index}] is DeepEP's {name}, which describes DeepEP's kernels and has "
                                      f"no counterpart in dispatch; shared entries: {', '.join(shared)}")
        return value

    def __iter__(self):
        raise TypeError("a dispatch handle cannot be unpacked like DeepEP's tuple (most entries describe "
                        "DeepEP's kernels); index the shared entries instead, see docs/deepep.md")


class CountedHandleView(DeepEPHandleView):
    """``DeepEPHandleView`` for handles that keep every rank's counts (the CPU backend's and the
    CUDA two-hop path's): the internode entries come from the count matrices.

    The handle class keeps ``rank_counts`` (``[R, R]``), ``node_counts`` (``[R, N]``), ``rank``,
    ``num_ranks_per_node``, ``num_recv_tokens`` and ``num_worst_tokens``.
    """

    rank_counts: torch.Tensor
    node_counts: torch.Tensor
    rank: int
    num_ranks_per_node: int
    num_recv_tokens: int
    num_worst_tokens: int

    @property
    def num_recv_rows(self) -> int:
        """Rows of the tensors dispatch returned."""
        return self.num_worst_tokens if self.num_worst_tokens > 0 else self.num_recv_tokens

    def _deepep_num_nodes(self) -> int:
        return self.node_counts.shape[1]

    def _deepep_entry(self, name: str) -> Optional[torch.Tensor]:
        if name == "rank_prefix_matrix":
            return self.rank_counts.cumsum(dim=0).to(torch.int32)
        if name == "recv_gbl_rank_prefix_sum":
            return self.rank_counts[:, self.rank].cumsum(dim=0).to(torch.int32)
        if name == "recv_rdma_rank_prefix_sum":
            # My rail peer on node m is rank m * L + my local index; it sends me its tokens for my node.
            L = self.num_ranks_per_node
            node, local = divmod(self.rank, L)
            peers = torch.arange(self._deepep_num_nodes()) * L + local
            return self.node_counts[peers, node].cumsum(dim=0).to(torch.int32)
        return super()._deepep_entry(name)

"""What every call of the CUDA backend does the same way, one node or several (``CudaBackend``
in ``backend.py``, ``TwoHopBackend`` in ``two_hop.py``): stream ordering at the start of a call,
output allocation, the kernels' wait arguments, and the layout kernel (rank-local, the same for
any number of nodes).

A subclass sets ``mod``, ``device``, ``tensor_device``, ``topo``, ``stream``, ``timeout_s``,
``error`` (mapped error words), ``_profile_pending`` (an empty list: profiled launches whose rows
are not read yet) and implements ``_end`` (calling ``_profile_collect``); it may override
``_before_call`` and ``_launch_layout``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Tuple, Union

import torch

from .. import profile as _profile
from ..backend import CallOptions, LayoutResult
from ..config import Config


class DeviceCalls:
    """The shared half of the CUDA backends (see the module docstring)."""

    def may_read_values(self) -> bool:
        return not self.device.capturing()

    def _before_call(self) -> None:
        """Run first in every call: hands finished profiled launches' rows to dispatch.profile."""
        self._profile_collect(wait=False)

    def _begin(self, options: CallOptions) -> Any:
        """Orders the communication stream after ``previous_event`` (or the compute stream);
        returns the compute stream."""
        self._before_call()
        compute = self.device.compute_stream()
        previous = options.previous_event.event if options.previous_event is not None else None
        self.device.order_after(self.stream, compute, previous)
        return compute

    def _output(self, shape: Tuple[int, ...], dtype: torch.dtype, options: CallOptions,
                fill: Optional[int] = None) -> torch.Tensor:
        """An output tensor, allocated on the communication stream only when asked (DeepEP's
        ``allocate_on_comm_stream``), else on the compute stream; filled on the communication
        stream (after what the call waits for, before its kernels)."""
        scope = self.device.stream_scope(self.stream) if options.allocate_on_comm_stream else contextlib.nullcontext()
        with scope:
            t = torch.empty(shape, dtype=dtype, device=self.tensor_device)
        if fill is not None:
            with self.device.stream_scope(self.stream):
                t.fill_(fill)
        return t

    def _wait_args(self) -> Any:
        """Every spin-wait's deadline and where it reports (the mapped error words)."""
        w = self.mod.WaitArgs()
        w.timeout_ns = int(self.timeout_s * 1e9)
        w.error = self.error.device_address
        return w

    def _launch_layout(self, a: Any, bytes_moved: int) -> None:
        self._launch_profiled("dispatch.layout", self.mod.launch_layout, a, a.num_blocks, bytes_moved)

    # --- SM-usage profiling (dispatch.profile; rows written by csrc/cuda/profile_record.h) -------
    def _launch_profiled(self, kernel: str, launch: Callable[[Any, int], None], a: Any, max_blocks: int,
                         bytes_moved: Union[int, Callable[[], int]]) -> None:
        """Launches ``kernel`` on the communication stream; with profiling on (outside graph
        capture) it gets a zeroed ``[max_blocks, 3]`` int64 buffer (sm id, start ns, end ns per
        block; rows of blocks that did not run stay 0), else ``a.profile`` is 0.

        Args:
            max_blocks: at least the kernel's grid size.
            bytes_moved: what the kernel moved (or a function giving it once the kernel ran).
        """
        rows = None
        if _profile.is_enabled() and not self.device.capturing():
            with self.device.stream_scope(self.stream):
                rows = torch.zeros((max(1, max_blocks), 3), dtype=torch.int64, device=self.tensor_device)
        a.profile = rows.data_ptr() if rows is not None else 0
        launch(a, self.device.handle(self.stream))
        if rows is not None:
            self._profile_pending.append((kernel, rows, bytes_moved, self.device.record(self.stream)))

    def _profile_collect(self, wait: bool) -> None:
        """Hands the rows of finished profiled launches to ``dispatch.profile`` (in launch order);
        ``wait``: wait for all of them, else stop at the first still running."""
        while self._profile_pending and not self.device.capturing():
            kernel, rows, bytes_moved, event = self._profile_pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                return
            self._profile_pending.pop(0)
            total = bytes_moved() if callable(bytes_moved) else bytes_moved
            _profile.record_device_buffer(kernel, rows, bytes_moved=total, rank=self.topo.rank)

    def layout(self, topk_idx: torch.Tensor, num_experts: int, config: Config, options: CallOptions) -> LayoutResult:
        """The layout kernel (same rules as ``layout.h``); ``topk_idx`` never leaves the device."""
        topo = self.topo
        R, N = topo.num_ranks, topo.num_nodes
        compute = self._begin(options)
        outs = (self._output((R,), torch.int32, options, 0), self._output((N,), torch.int32, options, 0),
                self._output((num_experts,), torch.int32, options, 0),
                self._output((topk_idx.shape[0], R), torch.bool, options))
        a = self.mod.LayoutArgs()
        a.topk_idx = topk_idx.data_ptr()
        a.num_tokens, a.num_topk = topk_idx.shape
        a.num_ranks, a.num_ranks_per_node, a.num_experts = R, topo.num_ranks_per_node, num_experts
        a.num_blocks = max(1, config.num_sms)
        per_rank, per_node, per_expert, in_rank = outs
        a.per_rank, a.per_node, a.per_expert, a.in_rank = (per_rank.data_ptr(), per_node.data_ptr(),
                                                           per_expert.data_ptr(), in_rank.data_ptr())
        # bytes: the topk ids read and is_token_in_rank written
        self._launch_layout(a, a.num_tokens * (a.num_topk * 8 + R))
        event = self._end(compute, options, (topk_idx,), outs)
        return LayoutResult(per_rank, per_node if N > 1 else None, per_expert, in_rank, event)

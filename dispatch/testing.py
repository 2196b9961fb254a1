"""Loopback harness: L virtual ranks of one node in one process on one GPU.

Each virtual rank has its own staging buffer, its own communication stream and its own compute
stream, and runs in its own thread, so the very kernels of a real node (same planner, same rings,
same barriers) run concurrently and talk through peer pointers that all point into one GPU.

    lb = Loopback(num_ranks=4)
    outs = lb.run(lambda rank, buf: buf.dispatch(xs[rank], topk_idx=idx[rank], num_experts=E))
    lb.destroy()

Every call is collective: ``run`` calls ``fn`` on every rank at once. All virtual ranks'
kernels must be resident together: keep ``L * num_sms`` (blocks of 512 threads) within what the
GPU holds (about 2 blocks per SM), or the waits time out (they never hang).

Two driver settings matter and must be in the environment before CUDA is initialised (this
module sets them as defaults at import, which is too late once the process touched the GPU;
``scripts/test_gpu.sh`` exports them):

* ``CUDA_MODULE_LOADING=EAGER``: a lazily loaded kernel's first launch waits for the whole GPU
  to drain while holding the context lock, so one virtual rank launching a kernel for the first
  time while another rank's kernel spins waiting for it stalls both until the timeout.
* ``CUDA_DEVICE_MAX_CONNECTIONS=32``: streams beyond the default 8 hardware queues share one,
  and a kernel queued behind another rank's dependent work cannot start (false dependency).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, List, Optional

import torch

os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")


class LoopbackComm:
    """``all_gather_object`` among the threads of one loopback."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: List[Any] = [None] * size
        self._barrier = threading.Barrier(size, timeout=120)

    def all_gather_object(self, obj: Any, rank: int) -> List[Any]:
        self._slots[rank] = obj
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out


class _RankComm:
    def __init__(self, shared: LoopbackComm, rank: int) -> None:
        self.shared, self.rank = shared, rank

    def all_gather_object(self, obj: Any) -> List[Any]:
        return self.shared.all_gather_object(obj, self.rank)


class LoopbackGroup:
    """Stands for a process group of one virtual rank (``Buffer``'s ``group`` argument)."""

    is_loopback = True

    def __init__(self, rank: int, size: int, comm: LoopbackComm, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.comm = _RankComm(comm, rank)


class Loopback:
    """L virtual ranks (one node) on one GPU, each a ``CudaBuffer``.

    Args:
        num_ranks: virtual ranks ``L`` (<= 16).
        num_nvl_bytes: staging per virtual rank (0 = the backend default).
        timeout_s: kernel wait limit.
        device: the GPU (default: the current one).
    """

    def __init__(self, num_ranks: int, num_nvl_bytes: int = 64 << 20, timeout_s: float = 20.0,
                 device: Optional[torch.device] = None) -> None:
        from .cuda.buffer import CudaBuffer

        if not torch.cuda.is_available():
            raise RuntimeError("the loopback harness needs a CUDA GPU")
        self.num_ranks = num_ranks
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.comm = LoopbackComm(num_ranks)
        self.compute_streams = [torch.cuda.Stream(self.device) for _ in range(num_ranks)]
        self.buffers: List[Any] = [None] * num_ranks
        self.buffers = self.run(lambda r, _: CudaBuffer(LoopbackGroup(r, num_ranks, self.comm, self.device),
                                                        num_nvl_bytes, timeout_s=timeout_s))

    def run(self, fn: Callable[[int, Any], Any]) -> List[Any]:
        """Calls ``fn(rank, buffer)`` on every virtual rank at once, each in its own thread with
        its own current (compute) stream; returns the results by rank, or re-raises the first error
        (by rank)."""
        results: List[Any] = [None] * self.num_ranks
        errors: List[Optional[BaseException]] = [None] * self.num_ranks

        def body(rank: int) -> None:
            try:
                torch.cuda.set_device(self.device)
                with torch.cuda.stream(self.compute_streams[rank]):
                    results[rank] = fn(rank, self.buffers[rank])
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors[rank] = exc

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.num_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for exc in errors:
            if exc is not None:
                raise exc
        return results

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def destroy(self) -> None:
        self.synchronize()
        for buf in self.buffers:
            if buf is not None:
                buf.destroy()
        self.buffers = [None] * self.num_ranks

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

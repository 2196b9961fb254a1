"""Loopback harness: L virtual ranks of one node in one process on one device.

Each virtual rank is a plain ``dispatch.Buffer`` with its own staging buffer, its own
communication stream and (on a GPU) its own compute stream, and runs in its own thread, so the
very kernels of a real node (same planner, same rings, same barriers) run concurrently and talk
through peer pointers that all point into one device. The device is a GPU (``device="cuda"``) or
the CPU SIMT runtime (``device="simt"``: the same kernel source on host threads, CPU tensors, no
GPU needed).

    lb = Loopback(num_ranks=4, device="simt")
    outs = lb.run(lambda rank, buf: buf.dispatch(xs[rank], topk_idx=idx[rank], num_experts=E))
    lb.destroy()

Every call is collective: ``run`` calls ``fn`` on every rank at once. All virtual ranks'
kernels must be resident together: ``L * num_sms`` blocks of 512 threads must fit on the device
at once (a GPU's occupancy, the SIMT runtime's ``max_resident_blocks``); each call checks this up
front and raises ``ValueError`` instead of letting the waits time out.

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
from typing import Any, Callable, List, Optional, Union

import torch

os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")


class LoopbackComm:
    """``all_gather_object`` among the threads of one loopback."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: List[Any] = [None] * size
        self._barrier = threading.Barrier(size, timeout=120)
        self.rail_fabric: Optional[Any] = None  # several nodes: the loopback rail's wires

    def all_gather_object(self, obj: Any, rank: int) -> List[Any]:
        self._slots[rank] = obj
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out

    def barrier(self, timeout_s: Optional[float] = None) -> bool:
        """Waits for every virtual rank; False if some did not come within ``timeout_s`` (the
        barrier is then broken for the rest of the loopback's life: destroy is its last use)."""
        try:
            self._barrier.wait(timeout_s)
        except threading.BrokenBarrierError:
            return False
        return True


class _RankComm:
    def __init__(self, shared: LoopbackComm, rank: int) -> None:
        self.shared, self.rank = shared, rank

    def all_gather_object(self, obj: Any) -> List[Any]:
        return self.shared.all_gather_object(obj, self.rank)

    def barrier(self, timeout_s: Optional[float] = None) -> bool:
        return self.shared.barrier(timeout_s)


class LoopbackGroup:
    """Stands for the process group of one virtual rank (``Buffer``'s ``group`` argument): it
    brings the set-up exchange and the device.

    Attributes:
        device: the shared ``GpuDevice``/``SimtDevice``.
        device_kind: ``"cuda"`` or ``"simt"`` (``Buffer``'s default ``device``).
    """

    is_loopback = True

    def __init__(self, rank: int, size: int, comm: LoopbackComm, device: Any) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.device_kind = device.kind
        self.comm = _RankComm(comm, rank)


class Loopback:
    """L virtual ranks (one node) on one device, each a plain ``dispatch.Buffer``.

    Args:
        num_ranks: virtual ranks ``L`` (<= 16).
        num_nvl_bytes: staging per virtual rank (0 = the backend default).
        timeout_s: kernel wait limit.
        device: ``"cuda"`` (default when a GPU is present), ``"cuda:<i>"``, ``"simt"`` (default
            otherwise), or a ``torch.device`` of a GPU.
        max_resident_blocks: SIMT only: the runtime's cap on blocks resident at once (0 =
            unlimited), to reproduce a GPU's co-residency limit.
        num_ranks_per_node: ``L`` of a virtual cluster of ``num_ranks / L`` nodes (default: one
            node); across nodes the rail is the loopback rail (``dispatch/cuda/rail_loopback.py``).
        rail_bandwidth_bytes_per_s: the loopback rail's per-link cap (0 = uncapped).
    """

    def __init__(self, num_ranks: int, num_nvl_bytes: int = 64 << 20, timeout_s: float = 20.0,
                 device: Union[None, str, torch.device] = None, max_resident_blocks: int = 0,
                 num_ranks_per_node: Optional[int] = None, rail_bandwidth_bytes_per_s: float = 0.0) -> None:
        from .buffer import Buffer
        from .cuda.device import SimtDevice, gpu_present, make_device

        if device is None:
            device = "cuda" if gpu_present() else "simt"
        if isinstance(device, torch.device):
            kind, index = device.type, device.index
        else:
            kind, _, index_text = str(device).partition(":")
            index = int(index_text) if index_text else None
        if kind == "cuda" and not gpu_present():
            raise RuntimeError("the loopback harness on device='cuda' needs a CUDA GPU (device='simt' needs none)")
        if kind == "simt":
            SimtDevice.configure(max_resident_blocks=max_resident_blocks)  # process-wide, as the runtime is
        elif max_resident_blocks:
            raise ValueError("max_resident_blocks applies to device='simt' only")
        self.num_ranks = num_ranks
        self.device = make_device(kind, index)
        self.comm = LoopbackComm(num_ranks)
        if num_ranks_per_node is not None and num_ranks_per_node != num_ranks:
            from .cuda.rail_loopback import LoopbackFabric
            self.comm.rail_fabric = LoopbackFabric(rail_bandwidth_bytes_per_s)
        self.compute_streams = [self.device.new_stream() if kind == "cuda" else None for _ in range(num_ranks)]
        self.buffers: List[Any] = [None] * num_ranks
        self.buffers = self.run(lambda r, _: Buffer(LoopbackGroup(r, num_ranks, self.comm, self.device),
                                                    num_nvl_bytes, timeout_s=timeout_s,
                                                    num_ranks_per_node=num_ranks_per_node))

    def run(self, fn: Callable[[int, Any], Any]) -> List[Any]:
        """Calls ``fn(rank, buffer)`` on every virtual rank at once, each in its own thread with
        its own compute stream (on a GPU); returns the results by rank, or re-raises the first
        error (by rank)."""
        results: List[Any] = [None] * self.num_ranks
        errors: List[Optional[BaseException]] = [None] * self.num_ranks

        def body(rank: int) -> None:
            try:
                with self.device.thread_scope(self.compute_streams[rank]):
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
        self.device.synchronize()

    def destroy(self) -> None:
        """Destroys every virtual rank's buffer (collectively: ``Buffer.destroy`` waits for all
        ranks of the node)."""
        self.synchronize()
        if any(buf is not None for buf in self.buffers):
            self.run(lambda r, buf: buf.destroy() if buf is not None else None)
        self.buffers = [None] * self.num_ranks

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

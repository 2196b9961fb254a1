"""The device layer under the CUDA backend: one small class per device, so that the very Python
code that drives a GPU (``CudaBackend``, the loopback harness) drives the SIMT device too.

* ``GpuDevice``: a CUDA GPU through ``dispatch._cuda``; streams and events are torch's, tensors
  live on the GPU, the compute stream is torch's current stream.
* ``SimtDevice``: the same kernel source compiled by g++ against the CPU SIMT runtime
  (``dispatch._simt``); "device" memory is host memory, so tensors are CPU tensors and
  ``data_ptr()`` is what the kernels read. Streams and events are the module's. The compute stream
  is the host thread itself: whatever Python wrote before the call is already done, and making
  the compute stream wait for an event means waiting on the host.

No ``torch.cuda`` call lives outside ``GpuDevice``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Any, ContextManager, List, Optional, Tuple

import torch

# Threads per block of the in-node kernels (csrc/cuda/api.h kThreads): a dispatch or combine
# takes ``num_sms`` such blocks (2 per channel), the layout kernel at most as many.
KERNEL_THREADS = 512
# SMs the SIMT device claims (an H200's): bounds num_sms exactly as on that GPU.
SIMT_SM_COUNT = 132


MODULES = {"cuda": "dispatch._cuda", "simt": "dispatch._simt"}


def module_built(kind: str) -> bool:
    """Whether the extension of ``kind`` exists, without loading it."""
    return importlib.util.find_spec(MODULES[kind]) is not None


def load_module(kind: str) -> Optional[Any]:
    """``dispatch._cuda`` (kind ``"cuda"``) or ``dispatch._simt`` (``"simt"``), or None when not
    built. A module that exists but fails to load raises its ImportError (it must not pass for
    "not built")."""
    if not module_built(kind):
        return None
    return importlib.import_module(MODULES[kind])


def gpu_present() -> bool:
    """Whether torch sees a CUDA GPU (the default device of ``Buffer`` and ``Loopback``)."""
    return torch.cuda.is_available()


def simt_available() -> bool:
    """``dispatch._simt`` was built (it is not loaded here)."""
    return module_built("simt")


def gpu_available() -> bool:
    """A GPU and ``dispatch._cuda``: what ``device="cuda"`` needs."""
    return gpu_present() and module_built("cuda")


class GpuDevice:
    """A CUDA GPU (``dispatch._cuda``, torch streams and events).

    Args:
        index: the GPU (default: the current one).
    """

    kind = "cuda"

    def __init__(self, index: Optional[int] = None) -> None:
        mod = load_module("cuda")
        if mod is None:
            raise RuntimeError("dispatch._cuda is not built (nvcc was not found at install time)")
        if not gpu_present():
            raise RuntimeError("device='cuda' needs a CUDA GPU (torch.cuda.is_available() is False)")
        self.mod = mod
        self.torch_device = torch.device("cuda", torch.cuda.current_device() if index is None else index)

    # --- streams and events ----------------------------------------------------------------
    def new_stream(self) -> "torch.cuda.Stream":
        return torch.cuda.Stream(self.torch_device)

    @staticmethod
    def handle(stream: "torch.cuda.Stream") -> int:
        return stream.cuda_stream

    def compute_stream(self) -> "torch.cuda.Stream":
        return torch.cuda.current_stream(self.torch_device)

    def scope(self) -> ContextManager:
        """Makes this GPU current (allocations, module loading)."""
        return torch.cuda.device(self.torch_device)

    @staticmethod
    def stream_scope(stream: "torch.cuda.Stream") -> ContextManager:
        """Makes ``stream`` current: tensors allocated inside belong to it."""
        return torch.cuda.stream(stream)

    def order_after(self, comm: "torch.cuda.Stream", compute: "torch.cuda.Stream", event: Optional[Any]) -> None:
        """``comm`` starts after ``event`` if given, else after ``compute``'s work so far."""
        if event is not None:
            comm.wait_event(event)
        else:
            comm.wait_stream(compute)

    @staticmethod
    def record(stream: "torch.cuda.Stream") -> "torch.cuda.Event":
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @staticmethod
    def compute_wait(compute: Optional["torch.cuda.Stream"], event: Any) -> None:
        """The compute stream (default: the current one) waits for ``event`` (no host wait)."""
        (compute or torch.cuda.current_stream()).wait_event(event)

    @staticmethod
    def keep_alive(comm: "torch.cuda.Stream", compute: "torch.cuda.Stream", event: Any,
                   inputs: Tuple[Any, ...], outputs: Tuple[Any, ...]) -> None:
        """Tells the caching allocator who uses which tensor (not possible while capturing)."""
        if GpuDevice.capturing():
            return
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(comm)
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(compute)

    @staticmethod
    def current_event() -> Optional["torch.cuda.Event"]:
        """An event recorded on torch's current stream where CUDA is in use (initialized), else
        None: no GPU work can be pending (DeepEP's ``Buffer.capture``)."""
        if not (gpu_present() and torch.cuda.is_initialized()):
            return None
        return GpuDevice.record(torch.cuda.current_stream())

    @staticmethod
    def capturing() -> bool:
        try:
            return torch.cuda.is_current_stream_capturing()
        except Exception:
            return False

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    # --- limits ----------------------------------------------------------------------------
    def sm_count(self) -> int:
        return torch.cuda.get_device_properties(self.torch_device).multi_processor_count

    def resident_blocks(self) -> int:
        """Blocks of the kernels' size the GPU holds at once (occupancy API times SMs)."""
        return _resident_blocks(self.mod)

    # --- loopback threads --------------------------------------------------------------------
    def thread_scope(self, compute: "torch.cuda.Stream") -> ContextManager:
        """Entered by each loopback thread: this GPU current and its own compute stream."""
        torch.cuda.set_device(self.torch_device)
        return torch.cuda.stream(compute)


class SimtDevice:
    """The CPU SIMT runtime (``dispatch._simt``): the CUDA kernels' source run on host threads."""

    kind = "simt"

    def __init__(self, index: Optional[int] = None) -> None:
        mod = load_module("simt")
        if mod is None:
            raise RuntimeError("dispatch._simt is not built (see README: 'CUDA backend on the CPU: SIMT')")
        self.mod = mod
        self.torch_device = torch.device("cpu")
        # Inputs of calls still in flight: the caching allocator cannot hold CPU tensors for a
        # stream, so they stay referenced here until their event has completed.
        self._in_flight: List[Tuple[Any, Tuple[Any, ...]]] = []

    @staticmethod
    def configure(**options: Any) -> None:
        """Process-wide SIMT runtime options (``dispatch._simt.configure``): e.g.
        ``max_resident_blocks`` (0 = unlimited), ``yield_seed`` (0 = no random yields)."""
        mod = load_module("simt")
        if mod is None:
            raise RuntimeError("dispatch._simt is not built")
        mod.configure(**options)

    def new_stream(self) -> Any:
        return self.mod.Stream()

    @staticmethod
    def handle(stream: Any) -> int:
        return stream.handle

    @staticmethod
    def compute_stream() -> None:
        return None  # the host thread

    @staticmethod
    def scope() -> ContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def stream_scope(stream: Any) -> ContextManager:
        return contextlib.nullcontext()  # CPU tensors belong to no stream

    @staticmethod
    def order_after(comm: Any, compute: None, event: Optional[Any]) -> None:
        # The host thread's own work is finished by the time it launches: only an event from
        # another stream needs waiting for.
        if event is not None:
            comm.wait_event(event)

    def record(self, stream: Any) -> Any:
        event = self.mod.Event()
        event.record(stream.handle)
        return event

    @staticmethod
    def compute_wait(compute: None, event: Any) -> None:
        event.synchronize()  # the compute stream is the host thread

    def keep_alive(self, comm: Any, compute: None, event: Any, inputs: Tuple[Any, ...],
                   outputs: Tuple[Any, ...]) -> None:
        self._in_flight = [(e, ts) for e, ts in self._in_flight if not e.query()]
        self._in_flight.append((event, tuple(t for t in inputs + outputs if isinstance(t, torch.Tensor))))

    @staticmethod
    def capturing() -> bool:
        return False

    def synchronize(self) -> None:
        self.mod.device_synchronize()
        self._in_flight = []

    @staticmethod
    def sm_count() -> int:
        return SIMT_SM_COUNT

    def resident_blocks(self) -> int:
        """The runtime's cap on resident blocks (``configure``; unlimited by default)."""
        return _resident_blocks(self.mod)

    @staticmethod
    def thread_scope(compute: None) -> ContextManager:
        return contextlib.nullcontext()


Device = Any  # GpuDevice or SimtDevice (same methods)


def _resident_blocks(mod: Any) -> int:
    """Blocks of the in-node kernels' size that can be resident at once (the module knows: the
    occupancy API on a GPU, the runtime's cap on SIMT)."""
    limit = int(mod.resident_block_limit(mod.THREADS_PER_BLOCK))
    return limit if limit > 0 else 1 << 30  # 0: no cap


def make_device(kind: str, index: Optional[int] = None) -> Device:
    """``GpuDevice`` for ``"cuda"``, ``SimtDevice`` for ``"simt"``."""
    if kind == "cuda":
        return GpuDevice(index)
    if kind == "simt":
        return SimtDevice(index)
    raise ValueError(f"device must be 'cuda' or 'simt' here, got {kind!r}")

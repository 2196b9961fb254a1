"""EventOverlap: DeepEP's handle on asynchronous work."""

from __future__ import annotations

from typing import Any, Optional


class EventOverlap:
    """Wraps the event that marks the end of a communication call.

    On the CPU backend calls finish before they return, so the event is already complete and
    every method is immediate; on the CUDA backend it wraps the device's event (a
    ``torch.cuda.Event`` on a GPU, a ``dispatch._simt.Event`` on the SIMT device).

    Args:
        event: the device event, or ``None`` (already finished).
        extra_tensors: tensors kept alive until the event is waited on.
        device: the device layer that made ``event`` (``dispatch.cuda.device``); it knows what
            "the current stream waits" means there. None: ``event.wait()`` (a torch event).
    """

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[tuple] = None,
                 device: Optional[Any] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.device = device

    def current_stream_wait(self) -> None:
        """Makes the current stream wait for the event (no-op when already finished)."""
        if self.event is None:
            return
        if self.device is not None:
            self.device.compute_wait(self.device.compute_stream(), self.event)
        else:
            self.event.wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.current_stream_wait()

"""EventOverlap: DeepEP's handle on asynchronous work."""

from __future__ import annotations

from typing import Any, Optional


class EventOverlap:
    """Wraps the event that marks the end of a communication call.

    On the CPU backend calls finish before they return, so the event is already complete and
    every method is immediate; on the CUDA backend it wraps a ``torch.cuda.Event``.

    Args:
        event: a ``torch.cuda.Event`` or ``None`` (already finished).
        extra_tensors: tensors kept alive until the event is waited on.
    """

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[tuple] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes the current stream wait for the event (no-op when already finished)."""
        if self.event is not None:
            import torch

            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.current_stream_wait()

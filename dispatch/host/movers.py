"""Calling the C++ movers (``dispatch._C``) from the event loops: addresses of optional tensors,
their argument structs, and the per-worker records of ``dispatch.profile``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from .. import _C
from .. import profile as _profile


def ptr(tensor: Optional[torch.Tensor]) -> int:
    """``tensor.data_ptr()``, or 0 (the movers' "absent") for None."""
    return 0 if tensor is None else tensor.data_ptr()


def mover_args(kind: type, **fields: Any) -> Any:
    """An argument struct of a mover (``_C.PackRecordsArgs`` ...) with the given fields set.

    Args:
        kind: the struct's class.
        fields: its fields by name (a wrong name raises AttributeError).

    Returns:
        The struct; the mover checks it (ValueError naming the field) before moving a byte.
    """
    args = kind()
    for name, value in fields.items():
        setattr(args, name, value)
    return args


def timed(kernel: str, num_bytes: Union[int, Callable[[Any], int]], fn: Callable[..., Any], *args: Any) -> Any:
    """Runs a C++ mover; when profiling, records one slice per worker thread that ran it.

    Args:
        kernel: the profile's kernel name ("dispatch.pack_rail", ...).
        num_bytes: bytes the call moves, or a function of its result that gives them.
        fn, args: the mover and its arguments.
    """
    if not _profile.is_enabled():
        return fn(*args)
    _C.set_slice_log(True)
    try:
        result = fn(*args)
    finally:
        _C.set_slice_log(False)
    slices = _C.take_slices()
    total_bytes = num_bytes(result) if callable(num_bytes) else num_bytes
    total_items = sum(items for _, _, _, items in slices) or 1
    for worker, start_ns, end_ns, items in slices:
        _profile.record(kernel, worker, start_ns, end_ns, total_bytes * items // total_items)
    return result

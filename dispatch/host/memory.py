"""Host memory for the tensors calls return: recycled through dispatch._C.BlockPool so a
training loop's steady state takes no page faults (see csrc/host/block_pool.h)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .. import _C

_SMALL_BYTES = 1 << 20
_POOL = _C.BlockPool(int(os.environ.get("DISPATCH_HOST_POOL_BYTES", 1 << 30)))


def host_empty(shape: Sequence[int], dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """A contiguous CPU tensor; large ones come from the recycling pool.

    Args:
        shape: tensor shape.
        dtype: element type.
        zero: fill with zeros.
    """
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if num_bytes < _SMALL_BYTES:
        return (torch.zeros if zero else torch.empty)(tuple(shape), dtype=dtype)
    block = _POOL.acquire(num_bytes)
    tensor = torch.frombuffer(block, dtype=torch.uint8, count=num_bytes).view(dtype).view(tuple(shape))
    if zero:
        tensor.zero_()
    return tensor


def cached_bytes() -> int:
    """Bytes the pool holds for reuse."""
    return _POOL.cached_bytes

"""Argument checks shared by the backends: each raises ``ValueError``/``TypeError`` naming the
argument, before anything is sent."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FP8_BLOCK = 128

XLike = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def check_tensor(name: str, value: object, dtypes: Sequence[torch.dtype], dim: int,
                 rows: Optional[int] = None, cols: Optional[int] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Checks type, dtype, rank, shape and (when ``device`` is given) the device type: a tensor
    on another device than the buffer's raises ``TypeError`` naming the argument."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if device is not None and value.device.type != device.type:
        raise TypeError(f"{name} must be on the buffer's device ({device.type}), got a tensor on {value.device}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(value.shape)}")
    if cols is not None and value.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(value.shape)}")
    return value


def split_x(x: XLike, name: str = "x", allow_fp8: bool = True,
            device: Optional[torch.device] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (rows, FP8 scales or None) after checking dtypes and shapes."""
    if isinstance(x, tuple):
        if not allow_fp8:
            raise TypeError(f"{name} must be a tensor here, not an FP8 pair")
        if len(x) != 2:
            raise TypeError(f"{name} as a tuple must be the FP8 pair (float8_e4m3fn rows, float32 scales)")
        rows = check_tensor(f"{name}[0]", x[0], (torch.float8_e4m3fn,), 2, device=device)
        scale_cols = (rows.shape[1] + FP8_BLOCK - 1) // FP8_BLOCK
        scales = check_tensor(f"{name}[1]", x[1], (torch.float32,), 2, rows.shape[0], scale_cols, device=device)
        return rows, scales
    return check_tensor(name, x, FLOAT_DTYPES, 2, device=device), None


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_topk_idx(topk_idx: object, num_experts: int, num_tokens: Optional[int] = None,
                   device: Optional[torch.device] = None, read_values: bool = True) -> torch.Tensor:
    """Checks ``topk_idx`` and returns it as a contiguous int64 tensor.

    Args:
        read_values: check that every id lies in ``[-1, num_experts)`` (on a GPU this waits for
            the tensor on the host, which CUDA graph capture forbids: False skips it then).
    """
    idx = check_tensor("topk_idx", topk_idx, (torch.int64, torch.int32), 2, num_tokens, device=device)
    if read_values and idx.numel():
        low, high = (int(v) for v in torch.aminmax(idx))
        if low < -1 or high >= num_experts:
            raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), got [{low}, {high}]")
    return idx.to(torch.int64).contiguous()


def check_num_experts(num_experts: object, num_ranks: int) -> int:
    check_int("num_experts", num_experts, 1)
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} must be a multiple of the group size {num_ranks}")
    return num_experts

"""Argument checks shared by the backends: each raises ``ValueError``/``TypeError`` naming the
argument, before anything is sent."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

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


def agree_across_ranks(all_gather_object: Callable[[object], List[object]], error: Optional[BaseException],
                       **settings: object) -> None:
    """Collective: gathers every rank's verdict on its own arguments and its ``settings`` (ints),
    then raises on every rank: a ``ValueError`` naming a setting that differs and two ranks, else
    the rank's own error, else a ``ValueError`` naming the rank that rejected its arguments.

    Used by constructors, before anything else is collective: a rank that disagrees must fail
    as fast as the others, not leave them waiting in the first exchange.

    Args:
        all_gather_object: the group's exchange (one object per rank, in rank order).
        error: this rank's verdict on its own arguments (None: fine).
        settings: ``name=value`` pairs every rank must agree on.
    """
    names = list(settings)
    values = [value if isinstance(value, int) and not isinstance(value, bool) else -1 for value in settings.values()]
    table = [list(row) for row in all_gather_object([1 if error is not None else 0] + values)]
    # A differing setting first: every rank then raises the same message.
    for column, name in enumerate(names, start=1):
        first = table[0][column]
        differ = [rank for rank, row in enumerate(table) if row[column] != first]
        if differ:
            raise ValueError(f"{name} must be the same on every rank: rank 0 has {first}, rank {differ[0]} has "
                             f"{table[differ[0]][column]}")
    if error is not None:
        raise error
    bad = [rank for rank, row in enumerate(table) if row[0]]
    if bad:
        raise ValueError(f"rank {bad[0]} rejected its Buffer arguments (see its error); no Buffer was made")


def check_layout_matches_topk(num_ranks_per_node: int, expected_per_expert: torch.Tensor,
                              expected_in_rank: torch.Tensor, is_token_in_rank: torch.Tensor,
                              num_tokens_per_rdma_rank: Optional[torch.Tensor],
                              num_tokens_per_expert: Optional[torch.Tensor]) -> None:
    """Raises ``ValueError`` when a given layout was not computed from this ``topk_idx`` (a stale
    layout would silently drop or misroute tokens). Cheap: ``O(T * R + E)`` compares, on the
    layout's device.

    Args:
        num_ranks_per_node: ``L``.
        expected_per_expert / expected_in_rank: ``topk_idx``'s layout (the backend's ``layout``).
        is_token_in_rank, num_tokens_per_rdma_rank, num_tokens_per_expert: as given by the caller.
    """
    if not torch.equal(is_token_in_rank, expected_in_rank):
        token, rank = (is_token_in_rank != expected_in_rank).nonzero()[0].tolist()
        raise ValueError(f"is_token_in_rank disagrees with topk_idx (token {token}, rank {rank}): "
                         f"was the layout computed from another routing?")
    if num_tokens_per_expert is not None:
        given = num_tokens_per_expert.to(expected_per_expert.device, torch.int32)
        if not torch.equal(given, expected_per_expert):
            expert = (given != expected_per_expert).nonzero()[0].item()
            raise ValueError(f"num_tokens_per_expert disagrees with topk_idx (expert {expert}: "
                             f"{int(given[expert])} given, {int(expected_per_expert[expert])} in "
                             f"topk_idx): was the layout computed from another routing?")
    if num_tokens_per_rdma_rank is not None:
        T, R = is_token_in_rank.shape
        per_node = is_token_in_rank.view(T, R // num_ranks_per_node, num_ranks_per_node).any(dim=2).sum(dim=0)
        check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, (torch.int32, torch.int64), 1,
                     per_node.numel(), device=per_node.device)
        if not torch.equal(num_tokens_per_rdma_rank.to(torch.int64), per_node):
            raise ValueError("num_tokens_per_rdma_rank disagrees with is_token_in_rank")

"""Argument checks shared by the backends: each raises ``ValueError``/``TypeError`` naming the
argument, before anything is sent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import torch

if TYPE_CHECKING:
    import torch.distributed as dist

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FP8_BLOCK = 128

XLike = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def check_tensor(name: str, value: object, dtypes: Sequence[torch.dtype], dim: int,
                 rows: Optional[int] = None, cols: Optional[int] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(value.shape)}")
    if cols is not None and value.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(value.shape)}")
    return value


def split_x(x: XLike, name: str = "x", allow_fp8: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (rows, FP8 scales or None) after checking dtypes and shapes."""
    if isinstance(x, tuple):
        if not allow_fp8:
            raise TypeError(f"{name} must be a tensor here, not an FP8 pair")
        if len(x) != 2:
            raise TypeError(f"{name} as a tuple must be the FP8 pair (float8_e4m3fn rows, float32 scales)")
        rows = check_tensor(f"{name}[0]", x[0], (torch.float8_e4m3fn,), 2)
        scale_cols = (rows.shape[1] + FP8_BLOCK - 1) // FP8_BLOCK
        scales = check_tensor(f"{name}[1]", x[1], (torch.float32,), 2, rows.shape[0], scale_cols)
        return rows, scales
    return check_tensor(name, x, FLOAT_DTYPES, 2), None


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_topk_idx(topk_idx: object, num_experts: int, num_tokens: Optional[int] = None) -> torch.Tensor:
    """Checks ``topk_idx`` and returns it as a contiguous int64 tensor."""
    idx = check_tensor("topk_idx", topk_idx, (torch.int64, torch.int32), 2, num_tokens)
    if idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < -1 or high >= num_experts:
            raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), got [{low}, {high}]")
    return idx.to(torch.int64).contiguous()


def check_num_experts(num_experts: object, num_ranks: int) -> int:
    check_int("num_experts", num_experts, 1)
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} must be a multiple of the group size {num_ranks}")
    return num_experts


def agree_across_ranks(group: "dist.ProcessGroup", error: Optional[BaseException], **settings: object) -> None:
    """Collective: all-gathers every rank's verdict on its own arguments and its ``settings``
    (ints), then raises on every rank: a ``ValueError`` naming a setting that differs and two
    ranks, else the rank's own error, else a ``ValueError`` naming the rank that rejected its
    arguments.

    Used by constructors, before anything else is collective: a rank that disagrees must fail
    as fast as the others, not leave them waiting in the first exchange.
    """
    import torch.distributed as dist

    names = list(settings)
    values = [value if isinstance(value, int) and not isinstance(value, bool) else -1 for value in settings.values()]
    mine = torch.tensor([1 if error is not None else 0] + values, dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).tolist()
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


def check_layout_matches_topk(num_ranks_per_node: int, topk_layout: Sequence[Optional[torch.Tensor]],
                              is_token_in_rank: torch.Tensor, num_tokens_per_rdma_rank: Optional[torch.Tensor],
                              num_tokens_per_expert: Optional[torch.Tensor]) -> None:
    """Raises ``ValueError`` when a given layout was not computed from this ``topk_idx`` (a stale
    layout would silently drop or misroute tokens). Cheap: ``O(T * R + E)`` compares.

    Args:
        num_ranks_per_node: ``L``.
        topk_layout: ``get_dispatch_layout(topk_idx, E)``'s first four outputs.
        is_token_in_rank, num_tokens_per_rdma_rank, num_tokens_per_expert: as given by the caller.
    """
    _, _, expected_per_expert, expected_in_rank = topk_layout[:4]
    if not torch.equal(is_token_in_rank, expected_in_rank):
        token, rank = (is_token_in_rank != expected_in_rank).nonzero()[0].tolist()
        raise ValueError(f"is_token_in_rank disagrees with topk_idx (token {token}, rank {rank}): "
                         f"was the layout computed from another routing?")
    if num_tokens_per_expert is not None and not torch.equal(num_tokens_per_expert.to(torch.int32).cpu(),
                                                             expected_per_expert):
        expert = (num_tokens_per_expert.to(torch.int32).cpu() != expected_per_expert).nonzero()[0].item()
        raise ValueError(f"num_tokens_per_expert disagrees with topk_idx (expert {expert}: "
                         f"{int(num_tokens_per_expert[expert])} given, {int(expected_per_expert[expert])} in "
                         f"topk_idx): was the layout computed from another routing?")
    if num_tokens_per_rdma_rank is not None:
        T, R = is_token_in_rank.shape
        per_node = is_token_in_rank.view(T, R // num_ranks_per_node, num_ranks_per_node).any(dim=2).sum(dim=0)
        check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, (torch.int32, torch.int64), 1,
                     per_node.numel())
        if not torch.equal(num_tokens_per_rdma_rank.to(torch.int64).cpu(), per_node):
            raise ValueError("num_tokens_per_rdma_rank disagrees with is_token_in_rank")

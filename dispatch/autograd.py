"""Autograd support for dispatch and combine, so that both can sit inside a model that trains.

Dispatch copies rows (``recv_x[i]`` is a bit copy of one source row), so its adjoint sums the
copies back: the backward of a dispatch is a *combine* of the gradients along the same handle.
Combine sums rows, so its adjoint copies the gradient of each sum to every row that went into it:
the backward of a combine is a *cached dispatch* of the gradient along the same handle.

``recv_topk_weights[i, j]`` is a copy of ``topk_weights[t, j]`` where ``recv_topk_idx[i, j] != -1``
(and a constant 0 elsewhere), so its adjoint is combine's ``combined_topk_weights`` path applied to
the gradient with the ``-1`` entries zeroed. That is how a loss reaches the router through the
weights the experts apply on the receiving side.

Collectives: every call of the :class:`dispatch.Buffer` is collective, and so are the backward
passes here. Each backward runs the same fixed sequence of buffer calls whatever the local data
(zero received tokens included), and autograd materializes missing output gradients as zeros, so
all ranks stay in step as long as they run the same model code (same ``requires_grad`` settings,
same dtypes) on their own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

__all__ = [
    "DispatchOutput",
    "count_recv_tokens_per_expert",
    "DispatchFunction",
    "CombineFunction",
    "differentiable_dispatch",
    "differentiable_combine",
]


@dataclass
class DispatchOutput:
    """What :func:`differentiable_dispatch` returns (the tensors of ``Buffer.dispatch``, no event).

    Attributes:
        recv_x: ``[n, H]`` received rows, differentiable w.r.t. ``x``.
        recv_topk_idx: ``[n, k]`` int64 local expert ids, ``-1`` where the expert is not on this rank.
        recv_topk_weights: ``[n, k]`` weights (0 where ``recv_topk_idx == -1``), differentiable
            w.r.t. ``topk_weights``; ``None`` when no weights were given.
        num_recv_tokens_per_expert_list: received tokens per local expert, rounded up to
            ``expert_alignment``. After a ``num_worst_tokens`` dispatch (where ``Buffer.dispatch``
            returns ``[]``, as DeepEP does) they are counted here from ``recv_topk_idx``.
        handle: the communication handle, for :func:`differentiable_combine` or a cached dispatch.
    """

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: List[int]
    handle: Any


class _Side:
    """Carries the non-tensor results of a forward (handle, per-expert counts) out of a Function."""

    handle: Any = None
    num_recv_tokens_per_expert_list: Optional[List[int]] = None


def _fit_rows(t: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``t`` with exactly ``num_rows`` rows: extra rows (only ever padding) dropped, missing ones zero."""
    if t.size(0) == num_rows:
        return t
    if t.size(0) > num_rows:
        return t[:num_rows]
    pad = t.new_zeros((num_rows - t.size(0),) + tuple(t.shape[1:]))
    return torch.cat([t, pad], dim=0)


class DispatchFunction(torch.autograd.Function):
    """``(x, topk_weights) -> (recv_x, recv_topk_idx, recv_topk_weights)`` with a combine as backward.

    Use :func:`differentiable_dispatch` rather than calling ``apply`` directly.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: Optional[torch.Tensor], buffer: Any,
                topk_idx: torch.Tensor, layout: Tuple[Any, ...], num_experts: int,
                expert_alignment: int, num_worst_tokens: int, config: Any, side: _Side):
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank = layout
        has_weights = topk_weights is not None
        # The native weight path is float32; any other dtype (float64 for gradcheck) rides exactly
        # as the rows of an extra cached dispatch below, so no precision is lost.
        native_weights = has_weights and topk_weights.dtype == torch.float32
        send_weights = None
        if has_weights:
            send_weights = topk_weights.detach().contiguous() if native_weights \
                else topk_weights.detach().float().contiguous()
        recv_x, recv_topk_idx, recv_topk_weights, num_recv_list, handle, _ = buffer.dispatch(
            x.detach().contiguous(), num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=send_weights,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
            num_experts=num_experts, config=config)
        if has_weights and not native_weights:
            recv_w = buffer.dispatch(topk_weights.detach().contiguous(), handle=handle, config=config)[0]
            recv_w = _fit_rows(recv_w, recv_x.size(0))
            recv_topk_weights = recv_w.masked_fill(recv_topk_idx < 0, 0)

        side.handle = handle
        if num_worst_tokens > 0:
            num_recv_list = count_recv_tokens_per_expert(recv_topk_idx, num_experts // buffer.group_size,
                                                         expert_alignment)
        side.num_recv_tokens_per_expert_list = list(num_recv_list)
        ctx.buffer = buffer
        ctx.handle = handle
        ctx.config = config
        ctx.has_weights = has_weights
        ctx.native_weights = native_weights
        ctx.num_tokens = x.size(0)
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx)
        if has_weights:
            return recv_x, recv_topk_idx, recv_topk_weights
        return recv_x, recv_topk_idx

    @staticmethod
    def backward(ctx: Any, grad_recv_x: torch.Tensor, _grad_recv_topk_idx: Any, *rest: torch.Tensor):
        (recv_topk_idx,) = ctx.saved_tensors
        buffer, handle, config = ctx.buffer, ctx.handle, ctx.config
        grad_recv_x = grad_recv_x.contiguous()
        grad_x, grad_topk_weights = None, None
        if not ctx.has_weights:
            grad_x = buffer.combine(grad_recv_x, handle, config=config)[0]
        else:
            # Entries with recv_topk_idx == -1 are constants (0), not copies: they carry no gradient.
            grad_recv_w = rest[0].masked_fill(recv_topk_idx < 0, 0).contiguous()
            if ctx.native_weights:
                grad_x, grad_topk_weights, _ = buffer.combine(
                    grad_recv_x, handle, topk_weights=grad_recv_w, config=config)
            else:
                grad_x = buffer.combine(grad_recv_x, handle, config=config)[0]
                grad_topk_weights = buffer.combine(grad_recv_w, handle, config=config)[0]
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_topk_weights if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, None)


class CombineFunction(torch.autograd.Function):
    """``(x, bias) -> combined_x`` with a cached dispatch as backward.

    Use :func:`differentiable_combine` rather than calling ``apply`` directly.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: Optional[torch.Tensor], buffer: Any, handle: Any,
                config: Any) -> torch.Tensor:
        combined_x, _, _ = buffer.combine(
            x.detach().contiguous(), handle, bias=None if bias is None else bias.detach(), config=config)
        ctx.buffer = buffer
        ctx.handle = handle
        ctx.config = config
        ctx.num_rows = x.size(0)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return combined_x

    @staticmethod
    def backward(ctx: Any, grad_combined_x: torch.Tensor):
        grad_x = ctx.buffer.dispatch(grad_combined_x.contiguous(), handle=ctx.handle, config=ctx.config)[0]
        # After a num_worst_tokens dispatch, x may have padding rows: they are ignored, so 0 gradient.
        grad_x = _fit_rows(grad_x, ctx.num_rows)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_combined_x.to(ctx.bias_dtype)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_bias, None, None, None)


def count_recv_tokens_per_expert(recv_topk_idx: torch.Tensor, num_local_experts: int,
                                 expert_alignment: int = 1) -> List[int]:
    """``num_recv_tokens_per_expert_list`` from the received ids (e.g. after a ``num_worst_tokens``
    dispatch, which returns ``[]``). Waits for the tensor on the host.

    Args:
        recv_topk_idx: ``[n, k]`` local expert ids, ``-1`` for none (padding rows are all ``-1``).
        num_local_experts: experts on this rank.
        expert_alignment: each count is rounded up to a multiple of this.

    Returns:
        Received tokens (rows naming the expert at least once) per local expert, aligned.
    """
    experts = torch.arange(num_local_experts, device=recv_topk_idx.device)
    rows_with_expert = (recv_topk_idx.unsqueeze(-1) == experts).any(dim=1)
    counts = rows_with_expert.sum(dim=0).tolist()
    return [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts]


def differentiable_dispatch(buffer: Any, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: Optional[torch.Tensor], num_experts: int, *,
                            expert_alignment: int = 1, num_worst_tokens: int = 0,
                            config: Any = None) -> DispatchOutput:
    """Layout + dispatch, differentiable w.r.t. ``x`` and ``topk_weights``. Collective.

    Args:
        buffer: a :class:`dispatch.Buffer` (any backend).
        x: ``[T, H]`` tokens (float32, bfloat16, float16 or float64; not the FP8 pair, which has no
            gradient).
        topk_idx: ``[T, k]`` int64 global expert ids, ``-1`` for none.
        topk_weights: ``[T, k]`` router weights or ``None``. float32 uses the buffer's weight path;
            other dtypes (float64 for gradcheck) travel exactly through an extra cached dispatch.
        num_experts: ``E``, the total number of experts (a multiple of the group size).
        expert_alignment: round each ``num_recv_tokens_per_expert_list`` entry up to this.
        num_worst_tokens: if ``> 0``, receive exactly this many rows (zero padded).
        config: passed on to the buffer.

    Returns:
        A :class:`DispatchOutput`. Its backward (when a loss depends on ``recv_x`` or
        ``recv_topk_weights``) runs one combine along the handle (two for non-float32 weights).
    """
    if isinstance(x, (tuple, list)):
        raise TypeError("differentiable_dispatch: x must be a tensor; the FP8 pair has no gradient, "
                        "use Buffer.dispatch directly")
    with torch.no_grad():
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(topk_idx, num_experts)
    side = _Side()
    layout = (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)
    outs = DispatchFunction.apply(x, topk_weights, buffer, topk_idx, layout, num_experts,
                                  expert_alignment, num_worst_tokens, config, side)
    recv_topk_weights = outs[2] if topk_weights is not None else None
    return DispatchOutput(recv_x=outs[0], recv_topk_idx=outs[1], recv_topk_weights=recv_topk_weights,
                          num_recv_tokens_per_expert_list=side.num_recv_tokens_per_expert_list,
                          handle=side.handle)


def differentiable_combine(buffer: Any, x: torch.Tensor, handle: Any, *,
                           bias: Optional[torch.Tensor] = None, config: Any = None) -> torch.Tensor:
    """Combine, differentiable w.r.t. ``x`` (and ``bias``). Collective.

    Args:
        buffer: the :class:`dispatch.Buffer` that made ``handle``.
        x: rows in the order of the dispatch's ``recv_x`` (``W`` rows after a ``num_worst_tokens``
            dispatch; padding rows are ignored and get zero gradient). float64 accumulates in float64.
        handle: from the dispatch (e.g. :attr:`DispatchOutput.handle`).
        bias: optional ``[T, H]`` tensor added to every combined token.
        config: passed on to the buffer.

    Returns:
        ``combined_x`` ``[T, H]`` in ``x.dtype``; its backward is one cached dispatch of the gradient.
    """
    return CombineFunction.apply(x, bias, buffer, handle, config)

"""A Megatron-core style DeepEP wrapper running on dispatch: only the import differs.

Megatron-core's MoE token dispatcher drives DeepEP's normal mode through a module-level buffer
sized by the configs' hints and two autograd functions: dispatch (backward: combine of the
gradients, weights included) and combine (backward: cached dispatch). This file writes that
pattern against ``import dispatch as deep_ep`` and checks one MoE block, forward and backward,
against the same block computed densely on every rank:

    python examples/megatron_style.py                     # 2 emulated nodes x 2 ranks
    python examples/megatron_style.py --nodes 1 --ranks-per-node 4

See docs/deepep.md for what maps to what.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dispatch as deep_ep  # noqa: E402  (the one line that differs from a DeepEP version)
from examples.train_moe import free_port  # noqa: E402

_buffer: Optional[deep_ep.Buffer] = None


def get_hidden_bytes(x: torch.Tensor) -> int:
    """Bytes of one token row as DeepEP's size hints count them (at least 2 per element)."""
    return x.size(1) * max(x.element_size(), 2)


def get_buffer(group: dist.ProcessGroup, hidden_bytes: int) -> deep_ep.Buffer:
    """The shared buffer, (re)built when the group changes or a larger one is needed."""
    global _buffer
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (deep_ep.Buffer.get_dispatch_config(group.size()), deep_ep.Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(num_nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, group.size()))
        num_rdma_bytes = max(num_rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, group.size()))
    if (_buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes
            or _buffer.num_rdma_bytes < num_rdma_bytes):
        if _buffer is not None:
            _buffer.destroy()
        _buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _buffer


class FusedDispatch(torch.autograd.Function):
    """Layout + dispatch; backward combines the gradients of the rows and of the weights."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, token_indices: torch.Tensor, token_probs: torch.Tensor, num_experts: int,
                group: dist.ProcessGroup, async_finish: bool = False) -> Tuple[Any, ...]:
        previous_event = deep_ep.Buffer.capture() if async_finish else None
        buffer = get_buffer(group, get_hidden_bytes(x))
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
            buffer.get_dispatch_layout(token_indices, num_experts, previous_event=previous_event,
                                       async_finish=async_finish, allocate_on_comm_stream=async_finish)
        recv_x, recv_indices, recv_probs, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
            x, topk_idx=token_indices, topk_weights=token_probs.float(), num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=async_finish,
            allocate_on_comm_stream=async_finish)
        if async_finish:
            event.current_stream_wait()
        ctx.group = group
        ctx.handle = handle
        ctx.mark_non_differentiable(recv_indices)
        tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
        return recv_x, recv_indices, recv_probs, tokens_per_expert, handle

    @staticmethod
    def backward(ctx: Any, grad_recv_x: torch.Tensor, grad_indices: Any, grad_recv_probs: torch.Tensor,
                 grad_tokens_per_expert: Any, grad_handle: Any) -> Tuple[Any, ...]:
        buffer = get_buffer(ctx.group, get_hidden_bytes(grad_recv_x))
        grad_x, grad_probs, _ = buffer.combine(grad_recv_x.contiguous(), ctx.handle,
                                               topk_weights=grad_recv_probs.float().contiguous())
        return grad_x, None, grad_probs, None, None, None


class FusedCombine(torch.autograd.Function):
    """Combine; backward is a cached dispatch of the gradient along the same handle."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, handle: Any) -> torch.Tensor:
        buffer = get_buffer(group, get_hidden_bytes(x))
        combined_x, _, _ = buffer.combine(x, handle=handle)
        ctx.group = group
        ctx.handle = handle
        return combined_x

    @staticmethod
    def backward(ctx: Any, grad_combined: torch.Tensor) -> Tuple[Any, ...]:
        buffer = get_buffer(ctx.group, get_hidden_bytes(grad_combined))
        grad_x = buffer.dispatch(grad_combined.contiguous(), handle=ctx.handle)[0]
        return grad_x, None, None


def moe_block(x: torch.Tensor, topk_idx: torch.Tensor, topk_probs: torch.Tensor, local_experts: torch.Tensor,
              group: dist.ProcessGroup) -> torch.Tensor:
    """``y[t] = sum_j probs[t, j] * x[t] @ W[topk_idx[t, j]]`` with the experts spread over the group.

    Args:
        x: ``[T, H]`` this rank's tokens.
        topk_idx: ``[T, k]`` global expert ids (-1: none).
        topk_probs: ``[T, k]`` router probabilities.
        local_experts: ``[E / R, H, H]`` this rank's expert matrices.
        group: the expert-parallel group.
    """
    num_experts = local_experts.size(0) * group.size()
    recv_x, recv_idx, recv_probs, _, handle = FusedDispatch.apply(x, topk_idx, topk_probs, num_experts, group)
    out = recv_x.new_zeros(recv_x.shape)
    for j in range(recv_idx.size(1)):
        valid = recv_idx[:, j] >= 0
        rows = valid.nonzero().flatten()
        expert_out = torch.bmm(recv_x[rows].unsqueeze(1), local_experts[recv_idx[rows, j]]).squeeze(1)
        out = out.index_add(0, rows, expert_out * recv_probs[rows, j].unsqueeze(1))
    return FusedCombine.apply(out, group, handle)


def check_moe_block(group: dist.ProcessGroup, seed: int = 0, hidden: int = 32, experts_per_rank: int = 2,
                    num_topk: int = 3) -> List[float]:
    """Runs :func:`moe_block` forward and backward and returns the largest relative errors of
    ``y``, ``dx`` and ``dprobs`` against the dense computation. Collective over ``group``."""
    rank, world = group.rank(), group.size()
    num_experts = experts_per_rank * world
    g = torch.Generator().manual_seed(seed)
    experts = torch.randn(num_experts, hidden, hidden, generator=g) / hidden ** 0.5
    for _ in range(rank + 1):  # every rank its own tokens
        num_tokens = int(torch.randint(8, 40, (1,), generator=g))
        x = torch.randn(num_tokens, hidden, generator=g)
        topk_idx = torch.rand(num_tokens, num_experts, generator=g).topk(num_topk, dim=1).indices
        topk_idx[torch.rand(num_tokens, num_topk, generator=g) < 0.2] = -1
        probs = torch.rand(num_tokens, num_topk, generator=g)
    local = experts[rank * experts_per_rank:(rank + 1) * experts_per_rank]

    x_moe, probs_moe = x.clone().requires_grad_(), probs.clone().requires_grad_()
    y = moe_block(x_moe, topk_idx, probs_moe, local, group)
    y.square().sum().backward()

    x_dense, probs_dense = x.clone().requires_grad_(), probs.clone().requires_grad_()
    valid = (topk_idx >= 0).unsqueeze(-1)
    outs = torch.einsum("th,tkhg->tkg", x_dense, experts[topk_idx.clamp(min=0)])
    y_dense = (outs * probs_dense.unsqueeze(-1) * valid).sum(dim=1)
    y_dense.square().sum().backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0

    return [rel(y.detach(), y_dense.detach()), rel(x_moe.grad, x_dense.grad), rel(probs_moe.grad, probs_dense.grad)]


def _worker(rank: int, world_size: int, ranks_per_node: int, port: int) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_node)  # what torchrun sets on real nodes
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        errors = check_moe_block(dist.group.WORLD)
        if rank == 0:
            print(f"max relative error vs dense: y {errors[0]:.1e}, dx {errors[1]:.1e}, dprobs {errors[2]:.1e}")
        if max(errors) > 1e-5:
            raise SystemExit(f"rank {rank}: MoE block disagrees with the dense computation: {errors}")
    finally:
        if _buffer is not None:
            _buffer.destroy()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    args = parser.parse_args()
    world_size = args.nodes * args.ranks_per_node
    mp.spawn(_worker, args=(world_size, args.ranks_per_node, free_port()), nprocs=world_size)


if __name__ == "__main__":
    main()

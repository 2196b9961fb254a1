"""Train a small expert-parallel MoE model on an emulated CPU cluster and print the loss.

Spawns ``nodes * ranks_per_node`` processes on this machine (gloo), groups them into emulated nodes
with ``Buffer(group, num_ranks_per_node=L)`` and trains, for a few steps, a regression model built
around a stack of :class:`dispatch.moe.MoELayer` blocks with node-limited routing. Every rank feeds
its own tokens; dispatch and combine (and their backward passes) move them to and from the experts.

The dense parts (input/output projections, norm, router) are replicated, so their gradients are
summed over the ranks; each expert lives on one rank and receives its full gradient through the
combine/dispatch backward, so it needs no reduction.

    python examples/train_moe.py                     # 2 nodes x 2 ranks, 2 MoE layers, 40 steps
    python examples/train_moe.py --nodes 2 --ranks-per-node 4 --steps 60
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dispatch import Buffer  # noqa: E402
from dispatch.moe import MoELayer  # noqa: E402


class TinyMoEModel(nn.Module):
    """``x -> Linear -> num_layers x (+ MoE(LayerNorm)) -> Linear``.

    Args:
        buffer: the communication buffer.
        in_features: input size.
        hidden: ``H``, the token size inside the model.
        ffn_hidden: inner size of each expert.
        num_experts: ``E`` over all ranks.
        num_topk: ``k``.
        num_topk_groups: nodes each token may reach (node-limited routing).
        num_layers: MoE blocks (they share the buffer: their collectives run one after the other).
    """

    def __init__(self, buffer: Buffer, in_features: int, hidden: int, ffn_hidden: int, num_experts: int,
                 num_topk: int, num_topk_groups: int, num_layers: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_layers))
        self.moes = nn.ModuleList(
            MoELayer(buffer, hidden, ffn_hidden, num_experts, num_topk, num_topk_groups=num_topk_groups)
            for _ in range(num_layers))
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.out(h).squeeze(-1)


def make_batch(rank: int, step: int, num_tokens: int, in_features: int) -> List[torch.Tensor]:
    """A rank's batch of a fixed nonlinear target (a mixture of regimes an MoE can split)."""
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(num_tokens, in_features, generator=gen)
    teacher = torch.Generator().manual_seed(7)
    centers = torch.randn(8, in_features, generator=teacher)
    slopes = torch.randn(8, in_features, generator=teacher)
    regime = (x @ centers.T).argmax(dim=-1)  # which of 8 regions the point is in
    y = (x * slopes[regime]).sum(-1) / in_features ** 0.5  # piecewise linear, unit variance
    return [x, y]


def worker(rank: int, world_size: int, ranks_per_node: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    group = dist.group.WORLD
    buffer = Buffer(group, num_ranks_per_node=ranks_per_node, device="cpu")
    try:
        torch.manual_seed(0)  # replicated parameters start identical on every rank
        model = TinyMoEModel(buffer, args.in_features, args.hidden, args.ffn_hidden, args.num_experts,
                             args.topk, num_topk_groups=1, num_layers=args.layers)
        torch.manual_seed(1000 + rank)  # but the experts of different ranks differ
        with torch.no_grad():
            for moe in model.moes:
                for p in moe.experts.parameters():
                    p.normal_(std=p.size(1) ** -0.5)
        replicated = [p for n, p in model.named_parameters() if ".experts." not in n]
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        total_tokens = args.tokens * world_size

        for step in range(args.steps):
            x, y = make_batch(rank, step, args.tokens, args.in_features)
            # Sum over my tokens / all tokens: the sum over ranks is the global mean loss.
            loss = F.mse_loss(model(x), y, reduction="sum") / total_tokens
            opt.zero_grad()
            loss.backward()
            for p in replicated:
                dist.all_reduce(p.grad, group=group)
            opt.step()

            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss, group=group)
            if rank == 0 and (step % args.print_every == 0 or step == args.steps - 1):
                print(f"step {step:3d}  loss {global_loss.item():.4f}", flush=True)
    finally:
        buffer.destroy()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank per step")
    parser.add_argument("--in-features", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--ffn-hidden", type=int, default=64)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--print-every", type=int, default=5)
    args = parser.parse_args()
    world_size = args.nodes * args.ranks_per_node
    print(f"training on an emulated {args.nodes}x{args.ranks_per_node} cluster ({world_size} processes), "
          f"{args.layers} MoE layers of {args.num_experts} experts, top-{args.topk}, "
          f"node-limited to 1 node per token", flush=True)
    mp.spawn(worker, args=(world_size, args.ranks_per_node, free_port(), args), nprocs=world_size)


if __name__ == "__main__":
    main()

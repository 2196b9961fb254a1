"""The planner on its own, in one process: send plans and chunk schedules against brute force.

The executors only move what the planner says, so the planner is checked exhaustively here,
over many small topologies and routings, without any process cluster.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dispatch.host.plan import outbox_schedule, plan_sends, stream_chunks
from dispatch.reference import reference_is_token_in_rank
from dispatch.topology import Topology

TOPOLOGIES = [(1, 1), (1, 3), (2, 1), (2, 2), (2, 3), (3, 2), (4, 2)]


def _routing(num_ranks: int, num_tokens: int, seed: int) -> list:
    """Membership matrices of every rank for a random top-2 routing over 2 experts per rank."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = 2 * num_ranks
    out = []
    for _ in range(num_ranks):
        idx = torch.randint(-1, num_experts, (num_tokens, 2), generator=gen)
        out.append(reference_is_token_in_rank(idx, num_experts, num_ranks))
    return out


@pytest.mark.parametrize("nodes,per_node", TOPOLOGIES)
@pytest.mark.parametrize("seed", range(3))
def test_send_plan_matches_brute_force(nodes: int, per_node: int, seed: int) -> None:
    R = nodes * per_node
    membership = _routing(R, 13, seed)
    counts = torch.stack([m.sum(dim=0) for m in membership]).to(torch.int64)  # [src, dst]
    for me in range(R):
        topo = Topology(R, per_node, me)
        plan = plan_sends(topo, membership[me], counts)
        for m in range(nodes):
            # Brute force: tokens of `me` reaching node m in order; row at (m, j) = copies of
            # earlier sources at that rank + earlier tokens of `me` for it.
            want_tokens, want_rows = [], []
            for t in range(membership[me].shape[0]):
                ranks = [m * per_node + j for j in range(per_node)]
                if not any(bool(membership[me][t, r]) for r in ranks):
                    continue
                want_tokens.append(t)
                want_rows.append([
                    int(counts[:me, r].sum()) + int(membership[me][:t, r].sum()) if membership[me][t, r] else -1
                    for r in ranks])
            assert plan.tokens(m).tolist() == want_tokens
            assert plan.dst_rows(m).tolist() == (want_rows if want_rows else [])


@pytest.mark.parametrize("nodes,per_node", TOPOLOGIES)
def test_rows_at_each_receiver_are_a_permutation(nodes: int, per_node: int) -> None:
    """Every receiver's rows [0, n) are filled exactly once by all sources together."""
    R = nodes * per_node
    membership = _routing(R, 17, 7)
    counts = torch.stack([m.sum(dim=0) for m in membership]).to(torch.int64)
    filled = {d: [] for d in range(R)}
    for me in range(R):
        plan = plan_sends(Topology(R, per_node, me), membership[me], counts)
        for m in range(nodes):
            for j, rows in enumerate(plan.dst_rows(m).t().tolist() if plan.tokens(m).numel() else []):
                filled[m * per_node + j] += [r for r in rows if r >= 0]
    for d in range(R):
        assert sorted(filled[d]) == list(range(int(counts[:, d].sum())))


@pytest.mark.parametrize("nodes,per_node", TOPOLOGIES)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_outbox_schedule_covers_every_stream_in_order(nodes: int, per_node: int, chunk: int) -> None:
    R = nodes * per_node
    gen = torch.Generator().manual_seed(nodes * 10 + per_node)
    node_counts = torch.randint(0, 9, (R, nodes), generator=gen)
    for producer in range(R):
        topo = Topology(R, per_node, producer)
        schedule = outbox_schedule(topo, producer, node_counts, chunk)
        node, local = topo.node, topo.local_rank
        # Own chunks first, then only rail peers, each stream complete and in chunk order.
        own = [c for c in schedule if c[0] == producer]
        assert schedule[:len(own)] == own
        for src in [topo.rank_of(m, local) for m in range(nodes)]:
            got = [(c, n) for s, c, n in schedule if s == src]
            want = list(enumerate(stream_chunks(int(node_counts[src, node]), chunk)))
            assert got == want
        assert all(topo.local_of(s) == local for s, _, _ in schedule)
        assert all(n == min(chunk, n) and n > 0 for _, _, n in schedule)


def test_stream_chunks() -> None:
    for total, chunk in itertools.product(range(12), range(1, 5)):
        parts = stream_chunks(total, chunk)
        assert sum(parts) == total and all(0 < p <= chunk for p in parts)
        assert all(p == chunk for p in parts[:-1])

"""Plain-PyTorch reference of the dispatch/combine contract (``docs/semantics.md``).

Everything here is written for clarity, not speed: it works on the *all-gathered* inputs of every
rank (Python lists indexed by rank) and computes what one rank must see. It shares no code with
the backends, so tests can compare the two bit for bit.

Notation: ``R`` ranks, ``L = num_ranks_per_node``, ``N = R / L`` nodes,
``rank = node * L + local_rank``, ``E`` experts, expert ``e`` lives on rank ``e // (E / R)``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

# One rank's hidden states: a tensor ``[T, H]``, or the FP8 pair
# ``(float8_e4m3fn [T, H], float32 scales [T, ceil(H / 128)])``.
XType = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "reference_layout",
    "reference_dispatch",
    "reference_combine",
    "reference_traffic",
    "reference_is_token_in_rank",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _check_topology(num_experts: int, num_ranks: int, num_ranks_per_node: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    if num_ranks_per_node < 1 or num_ranks % num_ranks_per_node != 0:
        raise ValueError(f"num_ranks_per_node={num_ranks_per_node} must divide num_ranks={num_ranks}")
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} must be a multiple of num_ranks={num_ranks}")


def _rows(x: XType) -> int:
    return (x[0] if isinstance(x, (tuple, list)) else x).shape[0]


def _select_rows(x: XType, rows: List[int]) -> XType:
    """Bit copy of the given rows of ``x`` (a tensor or the FP8 pair)."""
    index = torch.tensor(rows, dtype=torch.long)
    if isinstance(x, (tuple, list)):
        return tuple(part.index_select(0, index) for part in x)
    return x.index_select(0, index)


def _concat_rows(parts: List[XType], like: XType) -> XType:
    """Concatenate row blocks; ``like`` gives shapes/dtypes when ``parts`` is empty."""
    if isinstance(like, (tuple, list)):
        if not parts:
            return tuple(p.new_empty((0,) + tuple(p.shape[1:])) for p in like)
        return tuple(torch.cat([p[i] for p in parts], dim=0) for i in range(len(like)))
    if not parts:
        return like.new_empty((0,) + tuple(like.shape[1:]))
    return torch.cat(parts, dim=0)


def reference_is_token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``is_token_in_rank[t, r]``: some valid entry ``e`` of ``topk_idx[t]`` has ``e // (E/R) == r``.

    Args:
        topk_idx: ``[T, k]`` integer tensor, ``-1`` means "no expert".
        num_experts: ``E``, a multiple of ``num_ranks``.
        num_ranks: ``R``.

    Returns:
        is_token_in_rank: ``torch.bool [T, R]``.
    """
    experts_per_rank = num_experts // num_ranks
    topk_idx = topk_idx.to(torch.int64)
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"topk_idx entries must lie in [-1, {num_experts})")
    result = torch.zeros(topk_idx.shape[0], num_ranks, dtype=torch.bool)
    token, slot = (topk_idx >= 0).nonzero(as_tuple=True)       # every valid (token, k) entry
    result[token, topk_idx[token, slot] // experts_per_rank] = True  # marks the expert's rank
    return result


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------

def reference_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    num_ranks_per_node: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Reference of ``Buffer.get_dispatch_layout`` for one rank.

    Args:
        topk_idx: ``[T, k]`` (int64 or int32) expert ids of this rank's tokens, ``-1`` = none.
        num_experts: ``E``, a multiple of ``num_ranks``.
        num_ranks: ``R``, the group size.
        num_ranks_per_node: ``L``, dividing ``R``.

    Returns:
        num_tokens_per_rank: ``int32 [R]``, tokens sent to each rank.
        num_tokens_per_rdma_rank: ``int32 [N]``, tokens sent to at least one rank of each node;
            ``None`` when there is a single node.
        num_tokens_per_expert: ``int32 [E]``, tokens whose top-k row contains each expert.
        is_token_in_rank: ``bool [T, R]``.
    """
    _check_topology(num_experts, num_ranks, num_ranks_per_node)
    num_nodes = num_ranks // num_ranks_per_node
    is_token_in_rank = reference_is_token_in_rank(topk_idx, num_experts, num_ranks)
    num_tokens = topk_idx.shape[0]

    num_tokens_per_rank = torch.zeros(num_ranks, dtype=torch.int32)
    for r in range(num_ranks):
        num_tokens_per_rank[r] = int(is_token_in_rank[:, r].sum())

    num_tokens_per_rdma_rank: Optional[torch.Tensor] = None
    if num_nodes > 1:
        num_tokens_per_rdma_rank = torch.zeros(num_nodes, dtype=torch.int32)
        for m in range(num_nodes):
            node_ranks = slice(m * num_ranks_per_node, (m + 1) * num_ranks_per_node)
            num_tokens_per_rdma_rank[m] = int(is_token_in_rank[:, node_ranks].any(dim=1).sum())

    num_tokens_per_expert = torch.zeros(num_experts, dtype=torch.int32)
    for t in range(num_tokens):
        for e in set(topk_idx[t].tolist()):  # a token counts once per expert
            if e >= 0:
                num_tokens_per_expert[e] += 1

    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------

def reference_dispatch(
    xs: Sequence[XType],
    topk_idxs: Sequence[torch.Tensor],
    topk_weights_list: Optional[Sequence[torch.Tensor]],
    num_experts: int,
    num_ranks_per_node: int,
    rank: int,
    expert_alignment: int = 1,
) -> Dict[str, object]:
    """What rank ``rank`` must receive from a dispatch.

    Rank ``d`` receives token ``t`` of source ``s`` once if ``is_token_in_rank_s[t, d]``; rows are
    ordered by source rank ascending, then source token index ascending.

    Args:
        xs: per source rank, ``[T_s, H]`` tensor or the FP8 pair
            ``(float8_e4m3fn [T_s, H], float32 [T_s, ceil(H/128)])``.
        topk_idxs: per source rank, ``[T_s, k]`` expert ids (``-1`` = none).
        topk_weights_list: per source rank, ``float32 [T_s, k]``, or ``None``.
        num_experts: ``E``, a multiple of ``R = len(xs)``.
        num_ranks_per_node: ``L``.
        rank: the receiving rank ``d``.
        expert_alignment: the per-expert counts are rounded up to a multiple of this.

    Returns:
        A dict with
        ``recv_x`` (``[n, H]``, or the pair, bit copies of the source rows),
        ``recv_topk_idx`` (``int64 [n, k]``, expert id local to ``d`` or ``-1``),
        ``recv_topk_weights`` (``float32 [n, k]``, ``0`` where ``recv_topk_idx == -1``; ``None``
        without weights),
        ``num_recv_tokens_per_expert_list`` (``list[int]`` of length ``E / R``),
        ``recv_src_rank`` and ``recv_src_token`` (``int64 [n]``: where each row came from).
    """
    num_ranks = len(xs)
    _check_topology(num_experts, num_ranks, num_ranks_per_node)
    if len(topk_idxs) != num_ranks:
        raise ValueError("topk_idxs must have one entry per rank")
    if expert_alignment < 1:
        raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
    experts_per_rank = num_experts // num_ranks
    first_expert = rank * experts_per_rank
    num_topk = topk_idxs[0].shape[1]

    x_blocks: List[XType] = []
    idx_rows: List[List[int]] = []
    weight_rows: List[torch.Tensor] = []
    src_rank: List[int] = []
    src_token: List[int] = []
    num_recv_tokens_per_expert = [0] * experts_per_rank

    for s in range(num_ranks):
        is_token_in_rank = reference_is_token_in_rank(topk_idxs[s], num_experts, num_ranks)
        tokens = [t for t in range(is_token_in_rank.shape[0]) if bool(is_token_in_rank[t, rank])]
        if tokens:
            x_blocks.append(_select_rows(xs[s], tokens))
        for t in tokens:
            src_rank.append(s)
            src_token.append(t)
            experts = topk_idxs[s][t].tolist()
            local_ids = [e - first_expert if first_expert <= e < first_expert + experts_per_rank else -1
                         for e in experts]
            idx_rows.append(local_ids)
            if topk_weights_list is not None:
                # bit copy of the float32 weight where the expert is local, exactly 0 elsewhere
                w = topk_weights_list[s][t].to(torch.float32)
                weight_rows.append(torch.where(torch.tensor(local_ids) >= 0, w,
                                               torch.zeros_like(w)))
            for e_local in set(local_ids):
                if e_local >= 0:
                    num_recv_tokens_per_expert[e_local] += 1

    def align(n: int) -> int:
        return (n + expert_alignment - 1) // expert_alignment * expert_alignment

    recv_topk_weights: Optional[torch.Tensor] = None
    if topk_weights_list is not None:
        recv_topk_weights = (torch.stack(weight_rows) if weight_rows
                             else torch.zeros(0, num_topk, dtype=torch.float32))

    return {
        "recv_x": _concat_rows(x_blocks, xs[rank]),
        "recv_topk_idx": torch.tensor(idx_rows, dtype=torch.int64).reshape(len(idx_rows), num_topk),
        "recv_topk_weights": recv_topk_weights,
        "num_recv_tokens_per_expert_list": [align(n) for n in num_recv_tokens_per_expert],
        "recv_src_rank": torch.tensor(src_rank, dtype=torch.int64),
        "recv_src_token": torch.tensor(src_token, dtype=torch.int64),
    }


# ----------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The NaN every 16-bit result holds: torch's casts give 0xffff or 0x7fc0 (bf16) depending on
# whether the vectorised or the scalar path ran; the library and this reference write these.
CANONICAL_NAN_BITS = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


def cast_canonical_nan(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, every NaN of a 16-bit result being the positive quiet NaN."""
    out = tensor.to(dtype)
    bits = CANONICAL_NAN_BITS.get(dtype)
    if bits is not None:
        nan = torch.tensor(bits, dtype=torch.int16).view(dtype)
        out = torch.where(out.isnan(), nan, out)
    return out


def _node_order(num_nodes: int, own_node: int) -> List[int]:
    """Own node first, then the other nodes ascending."""
    return [own_node] + [m for m in range(num_nodes) if m != own_node]


def reference_combine(
    recv_xs: Sequence[torch.Tensor],
    recv_topk_weights_list: Optional[Sequence[Optional[torch.Tensor]]],
    recv_src_ranks: Sequence[torch.Tensor],
    recv_src_tokens: Sequence[torch.Tensor],
    num_ranks_per_node: int,
    rank: int,
    num_tokens: int,
    bias: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
    round_rail_partials: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What ``combine`` returns on source rank ``rank``: the exact accumulation loop.

    For every token ``t`` of ``rank`` (``acc_t`` = ``float32``, or ``float64`` for ``float64`` x)::

        acc = 0
        for node m in [own node] + [other nodes ascending]:
            if no rank of node m received t: continue
            part = 0
            for local j ascending with rank (m, j) having received t:
                part += acc_t(row of rank (m, j) for (rank, t))
            if round_rail_partials and m is not the own node and x is bfloat16/float16:
                part = acc_t(part cast to x.dtype)     # the rail carries it rounded
            acc += part
        acc += acc_t(bias)            # a pair: acc += acc_t(bias[0]); acc += acc_t(bias[1])
        out[t] = acc cast to x.dtype

    The loop runs over all tokens at once (one vector add per (node, local rank)): every
    element still sees exactly the scalar float adds above, in that order, so a backend doing
    the same scalar adds matches bit for bit.

    Args:
        recv_xs: per rank ``d``, the ``[n_d (or more), H]`` combine input of that rank (its rows
            follow ``recv_x``'s order; rows past ``n_d``, e.g. ``num_worst_tokens`` padding, are
            ignored). All the same dtype.
        recv_topk_weights_list: per rank, ``float32 [n_d (or more), k]`` weights to reduce the same
            way, or ``None``.
        recv_src_ranks: per rank ``d``, ``int64 [n_d]`` source rank of each received row.
        recv_src_tokens: per rank ``d``, ``int64 [n_d]`` source token index of each row.
        num_ranks_per_node: ``L``.
        rank: the source rank whose tokens are combined.
        num_tokens: ``T`` of that rank.
        bias: ``[T, H]`` tensor or a pair of them, added after the sum; or ``None``.
        round_rail_partials: ``Config.round_rail_partials`` (weights stay float32).

    Returns:
        combined_x: ``[T, H]`` in the dtype of ``recv_xs``.
        combined_topk_weights: ``float32 [T, k]``, or ``None`` without weights.
    """
    num_ranks = len(recv_xs)
    if num_ranks % num_ranks_per_node != 0:
        raise ValueError(f"num_ranks_per_node={num_ranks_per_node} must divide {num_ranks}")
    num_nodes = num_ranks // num_ranks_per_node
    own_node = rank // num_ranks_per_node
    dtype = recv_xs[rank].dtype
    hidden = recv_xs[rank].shape[1]
    acc_dtype = _accumulation_dtype(dtype)
    with_weights = recv_topk_weights_list is not None
    num_topk = 0
    if with_weights:
        num_topk = recv_topk_weights_list[rank].shape[1]

    # rows_for[d] = (token indices of `rank` that d received, the row of d holding each)
    rows_for: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for d in range(num_ranks):
        mine = (recv_src_ranks[d] == rank).nonzero().flatten()
        rows_for.append((recv_src_tokens[d][mine].to(torch.long), mine.to(torch.long)))

    acc = torch.zeros(num_tokens, hidden, dtype=acc_dtype)
    acc_w = torch.zeros(num_tokens, num_topk, dtype=torch.float32)
    for m in _node_order(num_nodes, own_node):
        node_ranks = [m * num_ranks_per_node + j for j in range(num_ranks_per_node)]  # ascending
        received = torch.zeros(num_tokens, dtype=torch.bool)
        part = torch.zeros(num_tokens, hidden, dtype=acc_dtype)
        part_w = torch.zeros(num_tokens, num_topk, dtype=torch.float32)
        for d in node_ranks:
            tokens, rows = rows_for[d]
            if tokens.numel() == 0:
                continue
            received[tokens] = True
            # each token reaches a rank at most once, so `tokens` holds no duplicates
            part[tokens] = part[tokens] + recv_xs[d][rows].to(acc_dtype)
            if with_weights:
                part_w[tokens] = part_w[tokens] + recv_topk_weights_list[d][rows].to(torch.float32)
        tokens = received.nonzero().flatten()  # "if no rank of node m received t: continue"
        if round_rail_partials and m != own_node and dtype in (torch.bfloat16, torch.float16):
            part = cast_canonical_nan(part, dtype).to(acc_dtype)
        acc[tokens] = acc[tokens] + part[tokens]
        if with_weights:
            acc_w[tokens] = acc_w[tokens] + part_w[tokens]

    if bias is not None:
        for b in (bias if isinstance(bias, (tuple, list)) else (bias,)):
            acc = acc + b.to(acc_dtype)

    return cast_canonical_nan(acc, dtype), (acc_w if with_weights else None)


# ----------------------------------------------------------------------------------------------
# traffic counters
# ----------------------------------------------------------------------------------------------

def reference_traffic(
    topk_idxs: Sequence[torch.Tensor],
    num_experts: int,
    num_ranks_per_node: int,
    rank: int,
) -> Dict[str, Dict[str, int]]:
    """Token-copy counters of ``Buffer.get_traffic_stats()`` for rank ``rank``.

    Args:
        topk_idxs: per rank, ``[T_s, k]`` expert ids (``-1`` = none), the routing of the dispatch.
        num_experts: ``E``.
        num_ranks_per_node: ``L``.
        rank: the rank ``(n, l)`` whose counters are computed.

    Returns:
        ``{"dispatch": counters, "combine": counters}`` where ``counters`` has the keys
        ``rail_token_copies``, ``flat_rail_token_copies`` and ``node_token_copies`` (ints), for
        the dispatch with this routing and for the combine along its handle.
    """
    num_ranks = len(topk_idxs)
    _check_topology(num_experts, num_ranks, num_ranks_per_node)
    L = num_ranks_per_node
    num_nodes = num_ranks // L
    my_node, my_local = rank // L, rank % L
    in_rank = [reference_is_token_in_rank(ti, num_experts, num_ranks) for ti in topk_idxs]

    def node_of(r: int) -> int:
        return r // L

    def local_of(r: int) -> int:
        return r % L

    def reaches_node(s: int, t: int, m: int) -> bool:
        return any(bool(in_rank[s][t, m * L + j]) for j in range(L))

    # ---- dispatch
    d_rail = 0  # distinct (my token, remote node)
    d_flat = 0  # distinct (my token, remote rank)
    for t in range(in_rank[rank].shape[0]):
        for m in range(num_nodes):
            if m != my_node and reaches_node(rank, t, m):
                d_rail += 1
        for r in range(num_ranks):
            if node_of(r) != my_node and bool(in_rank[rank][t, r]):
                d_flat += 1
    d_node = 0  # copies in my node outbox read by the other local ranks
    for s in range(num_ranks):
        if local_of(s) != my_local:
            continue
        for t in range(in_rank[s].shape[0]):
            if not reaches_node(s, t, my_node):
                continue
            for j in range(L):
                if j != my_local and bool(in_rank[s][t, my_node * L + j]):
                    d_node += 1

    # ---- combine
    c_rail = 0  # partial rows I send back over the rail
    for s in range(num_ranks):
        if local_of(s) != my_local or node_of(s) == my_node:
            continue
        for t in range(in_rank[s].shape[0]):
            if reaches_node(s, t, my_node):
                c_rail += 1
    c_flat = 0  # my received rows whose source is on another node
    c_node = 0  # my received rows whose source has another local index
    for s in range(num_ranks):
        received = int(in_rank[s][:, rank].sum())
        if node_of(s) != my_node:
            c_flat += received
        if local_of(s) != my_local:
            c_node += received

    return {
        "dispatch": {"rail_token_copies": d_rail, "flat_rail_token_copies": d_flat,
                     "node_token_copies": d_node},
        "combine": {"rail_token_copies": c_rail, "flat_rail_token_copies": c_flat,
                    "node_token_copies": c_node},
    }

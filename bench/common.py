"""Shared pieces of the benchmarks and the cost model.

* :func:`gen_topk_idx` - routings (uniform or DeepSeek-V3 style node-limited), reproducible.
* :func:`traffic_counts` - from a *full* routing (every rank's ``topk_idx``), the exact per-rank
  token-copy counts on the rail and inside the node for the two-hop design (the numbers
  ``Buffer.get_traffic_stats()`` reports, see ``docs/semantics.md``), for a flat all-to-all and
  for a Tutel-style hierarchical all-to-all. Pure torch, no ``dispatch._C`` needed.
* record sizes mirroring ``csrc/common/record.h``.
* :func:`launch` - run ``fn(rank, world_size, *args)`` on ``world_size`` local processes with a
  gloo group (emulated cluster), or in place under ``torchrun``.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

# ----------------------------------------------------------------------------- dtypes

DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
}
FP8_BLOCK = 128  # one float32 scale per 128 elements (DeepEP / DeepSeek-V3 convention)


def elem_bytes(dtype: str) -> int:
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


def scale_bytes(dtype: str, hidden: int) -> int:
    return 4 * math.ceil(hidden / FP8_BLOCK) if dtype == "fp8" else 0


def combine_dtype(dtype: str) -> str:
    """Combine sends expert outputs; FP8 dispatch is combined in bf16 (as in DeepEP)."""
    return "bf16" if dtype == "fp8" else dtype


def acc_bytes(dtype: str) -> int:
    return 8 if dtype == "fp64" else 4


# ----------------------------------------------------------------------------- record sizes

def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def dispatch_record_bytes(ranks_per_node: int, topk: int, hidden_bytes: int, scale_nbytes: int = 0) -> int:
    """Bytes of one dispatch record (rail and node outbox), as in ``csrc/common/record.h``."""
    off = 4 * ranks_per_node + 8            # dst_row[L], src_token, src_rank
    off = _align(off, 8) + 8 * topk + 4 * topk
    off = _align(off, 16) + hidden_bytes + scale_nbytes
    return _align(off, 16)


def return_row_bytes(hidden_bytes: int, topk: int) -> int:
    """Bytes of one combine row sent in the node to the reducer (``ReturnRowLayout``)."""
    return _align(hidden_bytes + 4 * topk, 16)


def partial_row_bytes(hidden: int, acc_elem_bytes: int, topk: int) -> int:
    """Bytes of one combine partial sum on the rail (``PartialRowLayout``)."""
    return _align(hidden * acc_elem_bytes + 4 * topk, 16)


@dataclass(frozen=True)
class BytesPerToken:
    """Bytes one token copy takes on each link, per op."""

    dispatch_rail: int
    dispatch_node: int
    combine_rail: int
    combine_node: int
    payload_dispatch: int   # the row alone (x + fp8 scales): what an all-to-all moves
    payload_combine: int


def bytes_per_token(hidden: int, topk: int, dtype: str, ranks_per_node: int,
                    with_topk: bool = True, round_rail_partials: bool = False) -> BytesPerToken:
    """Bytes of one token copy per link and op; ``round_rail_partials``: combine partials cross the
    rail in the combine dtype when it is 16-bit (``Config.round_rail_partials``)."""
    k = topk if with_topk else 0
    hb = hidden * elem_bytes(dtype)
    sb = scale_bytes(dtype, hidden)
    rec = dispatch_record_bytes(ranks_per_node, k, hb, sb)
    cdt = combine_dtype(dtype)
    chb = hidden * elem_bytes(cdt)
    return BytesPerToken(
        dispatch_rail=rec, dispatch_node=rec,
        combine_rail=partial_row_bytes(hidden, 2 if round_rail_partials and elem_bytes(cdt) == 2 else acc_bytes(cdt), k),
        combine_node=return_row_bytes(chb, k),
        payload_dispatch=hb + sb, payload_combine=chb)


# ----------------------------------------------------------------------------- routing

def gen_topk_idx(num_tokens: int, num_experts: int, topk: int, num_ranks: int,
                 ranks_per_node: int, node_limit: Optional[int] = None, seed: int = 0,
                 rank: int = 0, skew: float = 0.0, drop_prob: float = 0.0) -> torch.Tensor:
    """``topk_idx [num_tokens, topk]`` (int64) for one rank.

    Scores are random (``skew > 0`` adds a per-expert bias shared by all ranks, making some
    experts hot). With ``node_limit = M`` each token first keeps the ``M`` nodes with the highest
    sum of their two best expert scores (DeepSeek-V3 group-limited routing), then picks its
    top-k experts among them. ``drop_prob`` sets entries to ``-1``.
    """
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} not divisible by num_ranks={num_ranks}")
    num_nodes = num_ranks // ranks_per_node
    g = torch.Generator().manual_seed(seed * 1000003 + rank)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if skew > 0:
        gb = torch.Generator().manual_seed(seed * 7919 + 17)
        scores = scores + skew * torch.rand(num_experts, generator=gb)
    if node_limit is not None and 0 < node_limit < num_nodes:
        per_node = num_experts // num_nodes
        grouped = scores.view(num_tokens, num_nodes, per_node)
        top2 = grouped.topk(min(2, per_node), dim=-1).values.sum(-1)        # [T, N]
        keep = top2.topk(node_limit, dim=-1).indices                          # [T, M]
        mask = torch.zeros(num_tokens, num_nodes, dtype=torch.bool)
        mask.scatter_(1, keep, True)
        scores = grouped.masked_fill(~mask[:, :, None], -1.0).view(num_tokens, num_experts)
    k = min(topk, num_experts)
    idx = scores.topk(k, dim=-1).indices.to(torch.int64)
    if k < topk:
        idx = torch.cat([idx, torch.full((num_tokens, topk - k), -1, dtype=torch.int64)], 1)
    if drop_prob > 0:
        drop = torch.rand(num_tokens, topk, generator=g) < drop_prob
        idx = idx.masked_fill(drop, -1)
    return idx


def gen_routing(num_tokens: int, num_experts: int, topk: int, num_ranks: int,
                ranks_per_node: int, node_limit: Optional[int] = None, seed: int = 0,
                **kw: Any) -> List[torch.Tensor]:
    """The full routing: every rank's ``topk_idx`` (as each rank of the benchmark generates it)."""
    return [gen_topk_idx(num_tokens, num_experts, topk, num_ranks, ranks_per_node, node_limit,
                         seed, r, **kw) for r in range(num_ranks)]


def token_rank_counts(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``is_token_in_rank`` as bool ``[T, R]``."""
    per_rank = num_experts // num_ranks
    T = topk_idx.shape[0]
    valid = topk_idx >= 0
    dst = torch.where(valid, topk_idx // per_rank, torch.zeros_like(topk_idx))
    cnt = torch.zeros(T, num_ranks, dtype=torch.int32)
    cnt.scatter_add_(1, dst, valid.to(torch.int32))
    out = cnt > 0
    return out


# ----------------------------------------------------------------------------- exact traffic

@dataclass
class Traffic:
    """Per-rank token-copy counts (int64 tensors ``[R]``) of one routing.

    Two-hop (the library): ``dispatch_*`` / ``combine_*`` with ``rail_send`` / ``rail_recv`` /
    ``node_send`` / ``node_recv``. ``dispatch_rail_send`` is the semantics' dispatch
    ``rail_token_copies``; ``dispatch_node_send`` its ``node_token_copies``; ``combine_rail_send``
    and ``combine_node_send`` the combine ones. ``flat_*``: a flat all-to-all (one copy per
    (token, destination rank)); ``flat_rail_send`` is dispatch's ``flat_rail_token_copies`` and
    ``flat_rail_recv`` combine's. ``hier_*``: Tutel-style hierarchical all-to-all (phase 1 inside
    the node to the rank with the destination's local index, phase 2 over the rail; no dedup).
    ``recv_rows``: rows each rank receives in dispatch. ``lower_bound_rail``: distinct
    (token, remote node) pairs per source rank (= ``dispatch_rail_send``: the two-hop bound).
    """

    num_ranks: int
    ranks_per_node: int
    num_tokens: List[int]
    recv_rows: torch.Tensor
    dispatch_rail_send: torch.Tensor
    dispatch_rail_recv: torch.Tensor
    dispatch_node_send: torch.Tensor
    dispatch_node_recv: torch.Tensor
    flat_rail_send: torch.Tensor
    flat_rail_recv: torch.Tensor
    flat_node_send: torch.Tensor
    flat_node_recv: torch.Tensor
    hier_node_send: torch.Tensor
    hier_node_recv: torch.Tensor
    hier_rail_send: torch.Tensor
    hier_rail_recv: torch.Tensor
    max_rail_tokens_per_peer: torch.Tensor   # per rank: most records it sends to one remote node
    own_node_tokens: Optional[torch.Tensor] = None   # per rank: its tokens reaching its own node

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    # combine runs the dispatch paths backwards
    @property
    def combine_rail_send(self) -> torch.Tensor:
        return self.dispatch_rail_recv

    @property
    def combine_rail_recv(self) -> torch.Tensor:
        return self.dispatch_rail_send

    @property
    def combine_node_send(self) -> torch.Tensor:
        return self.dispatch_node_recv

    @property
    def combine_node_recv(self) -> torch.Tensor:
        return self.dispatch_node_send

    def expected_stats(self, rank: int, op: str) -> Dict[str, int]:
        """The token-copy counters ``Buffer.get_traffic_stats()`` must report at ``rank``."""
        if op == "dispatch":
            return {"rail_token_copies": int(self.dispatch_rail_send[rank]),
                    "flat_rail_token_copies": int(self.flat_rail_send[rank]),
                    "node_token_copies": int(self.dispatch_node_send[rank])}
        if op == "combine":
            return {"rail_token_copies": int(self.combine_rail_send[rank]),
                    "flat_rail_token_copies": int(self.flat_rail_recv[rank]),
                    "node_token_copies": int(self.combine_node_send[rank])}
        raise ValueError(op)


def traffic_counts(topk_idx_all: Sequence[torch.Tensor], num_experts: int,
                   ranks_per_node: int) -> Traffic:
    """Exact per-rank copy counts of a full routing (``topk_idx_all[s]`` = rank ``s``'s ``topk_idx``)."""
    R = len(topk_idx_all)
    L = ranks_per_node
    if R % L:
        raise ValueError(f"ranks_per_node={L} must divide {R}")
    N = R // L
    z = lambda: torch.zeros(R, dtype=torch.int64)  # noqa: E731
    recv_rows = z()
    d_rs, d_rr, d_ns, d_nr = z(), z(), z(), z()
    f_rs, f_rr, f_ns, f_nr = z(), z(), z(), z()
    h_ns, h_nr, h_rs, h_rr = z(), z(), z(), z()
    max_peer = z()
    own = z()
    for s, idx in enumerate(topk_idx_all):
        n_s, l_s = divmod(s, L)
        in_rank = token_rank_counts(idx, num_experts, R).view(-1, N, L)   # [T, N, L]
        cnt = in_rank.sum(0).to(torch.int64)                              # [N, L] tokens to rank (m, j)
        reach = in_rank.any(-1).sum(0).to(torch.int64)                    # [N] tokens reaching node m
        remote = torch.ones(N, dtype=torch.bool)
        remote[n_s] = False
        recv_rows += cnt.view(R)
        # two-hop dispatch: rail once per (token, remote node), to the rail peer (m, l_s)
        d_rs[s] += reach[remote].sum()
        own[s] += reach[n_s]
        for m in range(N):
            if m != n_s:
                d_rr[m * L + l_s] += reach[m]
            # forwarder (m, l_s) copies every token of s reaching m to the other local ranks
            d_ns[m * L + l_s] += cnt[m].sum() - cnt[m, l_s]
        notl = torch.ones(L, dtype=torch.bool)
        notl[l_s] = False
        # receivers (m, j), j != l_s, get s's rows from the forwarder (m, l_s) in the node
        d_nr.view(N, L)[:, notl] += cnt[:, notl]
        max_peer[s] = int(reach[remote].max()) if N > 1 else 0
        # flat all-to-all: one copy per (token, destination rank)
        f_rs[s] += cnt[remote].sum()
        f_rr.view(N, L)[remote] += cnt[remote]
        f_ns[s] += cnt[n_s, notl].sum()
        f_nr.view(N, L)[n_s, notl] += cnt[n_s, notl]
        # hierarchical: phase 1 to (n_s, j) for every destination (m, j), j != l_s; phase 2 rail
        h_ns[s] += cnt[:, notl].sum()
        h_nr.view(N, L)[n_s, notl] += cnt[:, notl].sum(0)
        h_rs.view(N, L)[n_s] += cnt[remote].sum(0)
        h_rr.view(N, L)[remote] += cnt[remote]
    return Traffic(R, L, [int(t.shape[0]) for t in topk_idx_all], recv_rows,
                   d_rs, d_rr, d_ns, d_nr, f_rs, f_rr, f_ns, f_nr, h_ns, h_nr, h_rs, h_rr, max_peer, own)


# ----------------------------------------------------------------------------- statistics

def percentile(xs: Sequence[float], q: float) -> float:
    ys = sorted(xs)
    if not ys:
        return float("nan")
    pos = (len(ys) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def time_stats(seconds: Sequence[float]) -> Dict[str, float]:
    """Median and spread (min, p10, p90, max) in microseconds."""
    us = [s * 1e6 for s in seconds]
    return {"median_us": percentile(us, 0.5), "p10_us": percentile(us, 0.1),
            "p90_us": percentile(us, 0.9), "min_us": min(us), "max_us": max(us), "n": len(us)}


def median_seconds(fn: Callable[[], Any], reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median of ``reps`` timings of ``fn`` on ``clock`` (wall time, or ``time.thread_time`` for
    CPU time), after one untimed warm-up call."""
    fn()
    samples = []
    for _ in range(max(1, reps)):
        start = clock()
        fn()
        samples.append(clock() - start)
    return sorted(samples)[len(samples) // 2]


# ----------------------------------------------------------------------------- launcher

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _worker(rank: int, world: int, port: int, threads: int, fn: Callable, args: tuple, q: Any) -> None:
    import torch.distributed as dist
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        res = fn(rank, world, *args)
        q.put((rank, "ok", res))
    except BaseException as e:  # noqa: BLE001 - report every failure to the parent
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def launch(fn: Callable, world_size: int, *args: Any, threads_per_rank: int = 1,
           timeout_s: float = 900.0) -> List[Any]:
    """Run module-level ``fn(rank, world_size, *args)`` on ``world_size`` local processes (spawn,
    gloo over loopback) and return the per-rank results. Under ``torchrun`` run ``fn`` on this
    process only and return ``[result]``."""
    if under_torchrun():
        import torch.distributed as dist
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        return [fn(dist.get_rank(), dist.get_world_size(), *args)]
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads_per_rank, fn, args, q),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    errors: List[str] = []
    import queue as _queue
    import time as _time
    deadline = _time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - _time.monotonic()
            if left <= 0:
                errors.append(f"timeout after {timeout_s:.0f} s")
                break
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(results) + len(errors) < world_size:
                    # give queued messages a moment, then report
                    _time.sleep(0.5)
                    while True:
                        try:
                            rank, status, payload = q.get_nowait()
                        except _queue.Empty:
                            break
                        (results.__setitem__(rank, payload) if status == "ok"
                         else errors.append(f"rank {rank}: {payload}"))
                    if len(results) + len(errors) < world_size:
                        errors.append("process(es) died: " + ", ".join(
                            f"pid {p.pid} exit {p.exitcode}" for p in dead))
                        break
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}: {payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("benchmark failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]

"""Dispatch / combine bandwidth benchmark, against ``torch.distributed.all_to_all_single``.

Emulated cluster (processes spawned here, gloo over loopback, CPU backend)::

    python -m bench.all_to_all --nodes 2 --ranks-per-node 4 --tokens 4096 --hidden 2048 \\
        --topk 8 --experts 64 --dtype bf16

Real cluster: ``torchrun --nnodes N --nproc-per-node L -m bench.all_to_all ...`` (the node
layout then comes from torchrun; ``--nodes``/``--ranks-per-node`` are ignored).

For dispatch and for combine it reports, as DeepEP's tests do: time per call (median and
p10-p90 spread of the slowest rank per iteration), bytes over the rail and over the in-node link
(from ``Buffer.get_traffic_stats()``, checked against the planner's exact counts of the same
routing), the bottleneck bandwidth of each link (busiest rank's bytes / median time), the
algorithm bandwidth (routed payload rows x row bytes per rank / time), and the same routed rows
moved by ``torch.distributed.all_to_all_single`` in the same run (pack + all-to-all; for
combine the reverse all-to-all + sum per token), with the speed ratio.

``--model-check`` also measures this cluster's own link speeds (rail: point-to-point between two
rail peers; node: the library's movers on shared memory, all ranks at once, see
``bench.calibrate``), the CPU cost of a chunk (tiny-row runs at two chunk sizes) and the fixed
per-call cost (a one-token call), feeds them to ``bench.cost_model`` and prints predicted vs
measured time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from bench.common import (DTYPES, FP8_BLOCK, bytes_per_token, combine_dtype, gen_topk_idx, launch,
                          median_seconds, time_stats, traffic_counts, under_torchrun)

OPS = ("dispatch", "combine")


# ----------------------------------------------------------------------------- inputs

def make_inputs(rank: int, cfg: Dict[str, Any]):
    R, L = cfg["world_size"], cfg["ranks_per_node"]
    T, H, k, E = cfg["tokens"], cfg["hidden"], cfg["topk"], cfg["experts"]
    topk_idx = gen_topk_idx(T, E, k, R, L, cfg.get("node_limit") or None, cfg.get("seed", 0), rank)
    g = torch.Generator().manual_seed(cfg.get("seed", 0) * 31 + rank)
    topk_weights = torch.rand(T, k, generator=g).to(torch.float32)
    base = torch.randn(T, H, generator=g)
    if cfg["dtype"] == "fp8":
        nb = math.ceil(H / FP8_BLOCK)
        pad = torch.zeros(T, nb * FP8_BLOCK)
        pad[:, :H] = base
        amax = pad.view(T, nb, FP8_BLOCK).abs().amax(-1).clamp(min=1e-4)
        scales = (amax / 448.0).to(torch.float32)
        q = (pad.view(T, nb, FP8_BLOCK) / scales[:, :, None]).view(T, -1)[:, :H]
        x = (q.to(torch.float8_e4m3fn).contiguous(), scales.contiguous())
    else:
        x = base.to(DTYPES[cfg["dtype"]])
    return topk_idx, topk_weights, x


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    # Explicit row width: with zero rows (--tokens 0) a -1 would be ambiguous.
    return t.contiguous().view(torch.uint8).view(t.shape[0], t.shape[1] * t.element_size())


# ----------------------------------------------------------------------------- calibration

def calibrate_links(rank: int, world: int, L: int, cfg: Dict[str, Any], chunk_records: int,
                    rail_sizes=(1 << 16, 1 << 22), reps: int = 3) -> Dict[str, float]:
    """Measures this emulated cluster's links the way the CPU backend uses them, for
    ``bench.cost_model.predict_emulated``. Collective; every rank gets the same numbers:

    * rail: rank 0 and its rail peer exchange one message each way over gloo, the others idle
      (alpha and bytes/s fitted from a small and a large message);
    * movers: every rank at once runs ``bench.calibrate.mover_speeds`` for this run's row
      layout (so with the contention of all ranks sharing the cores); the median over ranks.
    """
    from bench.calibrate import mover_speeds

    N = world // L
    out = torch.zeros(3, dtype=torch.float64)   # rail_bw, rail_alpha, has_rail

    def pair(peer: int, sizes) -> List[float]:
        res = []
        for size in sizes:
            send = torch.ones(size, dtype=torch.uint8)
            recv = torch.empty(size, dtype=torch.uint8)

            def step() -> None:
                for work in [dist.isend(send, peer), dist.irecv(recv, peer)]:
                    work.wait()
            res.append(median_seconds(step, reps))
        return res

    dist.barrier()
    if N > 1 and rank in (0, L):
        t0, t1 = pair(L if rank == 0 else 0, rail_sizes)
        if rank == 0:
            bw = (rail_sizes[1] - rail_sizes[0]) / max(t1 - t0, 1e-9)
            out[0], out[1], out[2] = bw, max(0.0, t0 - rail_sizes[0] / bw), 1.0
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    dist.barrier()
    mine = mover_speeds(cfg["hidden"], cfg["topk"], L, cfg["dtype"], chunk_records, num_tokens=cfg["tokens"],
                        reps=1, working_set_bytes=64 << 20, seed=rank)
    names = sorted(mine)
    speeds = torch.tensor([mine[k] for k in names], dtype=torch.float64)
    every = [torch.empty_like(speeds) for _ in range(world)]
    dist.all_gather(every, speeds)
    median = torch.stack(every).median(dim=0).values
    res = {"cores": float(os.cpu_count() or 1)}
    res.update({"mover_" + k: float(v) for k, v in zip(names, median)})
    if out[2] > 0:
        res["rail_bw"], res["rail_alpha"] = float(out[0]), float(out[1])
    return res


def chunk_cost_runs(buf, topk_idx: torch.Tensor, topk_weights: torch.Tensor, cfg: Dict[str, Any],
                    chunk_sizes=(32, 1024), hidden: int = 64, reps: int = 3) -> Dict[str, List[float]]:
    """Times dispatch and combine of this run's routing with tiny rows (``hidden``) at two chunk
    sizes: the bytes are the same, so the difference is what chunks cost. Collective; returns,
    per op, the slowest rank's median seconds for each chunk size."""
    from dispatch import Config

    x = torch.randn(topk_idx.shape[0], hidden).to(torch.bfloat16)
    E = cfg["experts"]
    out = {"dispatch": [], "combine": []}
    for chunk in chunk_sizes:
        config = Config(num_sms=cfg["num_sms"], chunk_tokens=chunk)
        samples = {"dispatch": [], "combine": []}
        for rep in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            rx, _, rw, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=E,
                                                   config=config)
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            buf.combine(rx, handle, topk_weights=rw, config=config)
            t3 = time.perf_counter()
            if rep:  # the first pair warms the pools up
                samples["dispatch"].append(t1 - t0)
                samples["combine"].append(t3 - t2)
        for op in out:
            median = torch.tensor(sorted(samples[op])[len(samples[op]) // 2], dtype=torch.float64)
            dist.all_reduce(median, op=dist.ReduceOp.MAX)
            out[op].append(float(median))
    return out


# ----------------------------------------------------------------------------- one rank

def run_rank(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    from dispatch import Buffer, Config

    L = cfg["ranks_per_node"] if not under_torchrun() else int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cfg = dict(cfg, world_size=world, ranks_per_node=L)
    group = dist.group.WORLD
    show = rank == 0 and cfg.get("progress", True) and sys.stderr.isatty()  # no bars in logs
    pbar = None
    if show:
        try:
            from tqdm import tqdm
            total = (cfg["warmup"] + cfg["iters"]) * 3
            pbar = tqdm(total=total, desc="setup", file=sys.stderr, leave=False)
        except ImportError:  # pragma: no cover
            pbar = None

    def tick(desc: str) -> None:
        if pbar is not None:
            pbar.set_description(desc)
            pbar.update(1)

    buf = Buffer(group, cfg.get("num_nvl_bytes", 0), cfg.get("num_rdma_bytes", 0), num_ranks_per_node=L, device="cpu")
    config = Config(num_sms=cfg["num_sms"], chunk_tokens=cfg.get("chunk_tokens"),
                    round_rail_partials=bool(cfg.get("round_rail_partials")))
    topk_idx, topk_weights, x = make_inputs(rank, cfg)
    E = cfg["experts"]

    layout = buf.get_dispatch_layout(topk_idx, E)
    per_rank, per_rdma, per_expert, in_rank, _ = layout

    def do_dispatch():
        return buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                            topk_idx=topk_idx, topk_weights=topk_weights, num_experts=E, config=config)

    recv_x, recv_idx, recv_w, _, handle, _ = do_dispatch()
    d_stats = buf.get_traffic_stats()
    comb_dt = DTYPES[combine_dtype(cfg["dtype"])]
    recv_rows = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    y = recv_rows.to(torch.float32).to(comb_dt) if cfg["dtype"] != "fp8" else \
        torch.randn(recv_rows.shape[0], cfg["hidden"]).to(comb_dt)
    n_recv = y.shape[0]

    def do_combine():
        return buf.combine(y, handle, topk_weights=recv_w, config=config)

    do_combine()
    c_stats = buf.get_traffic_stats()

    # all-to-all baseline of the same routed rows: rows for rank d = tokens with is_token_in_rank[:, d]
    if isinstance(x, tuple):
        xb = torch.cat([_bytes_view(x[0]), _bytes_view(x[1])], 1)
    else:
        xb = _bytes_view(x)
    order_tok = torch.nonzero(in_rank.t(), as_tuple=True)     # (dest rank, token) sorted by rank
    send_tok = order_tok[1]
    send_splits = per_rank.tolist()
    split_t = torch.tensor(send_splits, dtype=torch.int64)
    recv_split_t = torch.empty_like(split_t)
    dist.all_to_all_single(recv_split_t, split_t)
    recv_splits = recv_split_t.tolist()
    a2a_recv = torch.empty(sum(recv_splits), xb.shape[1], dtype=torch.uint8)
    # combine baseline: send y rows back (by source), sum into the token rows
    yb_width = _bytes_view(y[:1]).shape[1] if n_recv else cfg["hidden"] * y.element_size()
    back_recv = torch.empty(len(send_tok), yb_width, dtype=torch.uint8)

    def a2a_dispatch() -> float:
        """A complete flat dispatch; returns the seconds of the collective call alone."""
        send = xb.index_select(0, send_tok)
        t0 = time.perf_counter()
        dist.all_to_all_single(a2a_recv, send, recv_splits, send_splits)
        return time.perf_counter() - t0

    y_rows = _bytes_view(y) if n_recv else torch.empty(0, yb_width, dtype=torch.uint8)
    y_rows = y_rows[:sum(recv_splits)] if y_rows.shape[0] >= sum(recv_splits) else \
        torch.cat([y_rows, torch.zeros(sum(recv_splits) - y_rows.shape[0], yb_width, dtype=torch.uint8)])

    def a2a_combine() -> float:
        """A complete flat combine; returns the seconds of the collective call alone."""
        t0 = time.perf_counter()
        dist.all_to_all_single(back_recv, y_rows, send_splits, recv_splits)
        collective_s = time.perf_counter() - t0
        acc = torch.zeros(cfg["tokens"], cfg["hidden"], dtype=torch.float32)
        acc.index_add_(0, send_tok, back_recv.view(comb_dt).to(torch.float32))
        acc.to(comb_dt)
        return collective_s

    a2a_dispatch()
    a2a_combine()

    t_idx = torch.full((1, 1), rank * (E // world), dtype=torch.int64)
    t_x = torch.zeros(1, cfg["hidden"], dtype=comb_dt)

    def tiny_calls() -> Dict[str, float]:
        """The library's fixed per-call cost: one token routed to this rank's first expert."""
        dist.barrier()
        t0 = time.perf_counter()
        rx, _, rw, _, h, _ = buf.dispatch(t_x, topk_idx=t_idx, topk_weights=torch.ones(1, 1), num_experts=E,
                                         config=config)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        buf.combine(rx, h, topk_weights=rw, config=config)
        return {"dispatch": t1 - t0, "combine": time.perf_counter() - t2}

    times: Dict[str, List[float]] = {"dispatch": [], "combine": [], "a2a_dispatch": [], "a2a_combine": [],
                                     "collective_dispatch": [], "collective_combine": []}
    calib: Optional[List[Dict[str, float]]] = [] if cfg.get("model_check") else None
    tiny_times: Optional[List[Dict[str, float]]] = [] if cfg.get("model_check") else None
    fns = [("dispatch", do_dispatch), ("combine", do_combine)]
    chunk_runs = chunk_cost_runs(buf, topk_idx, topk_weights, cfg) if cfg.get("model_check") else None
    for it in range(cfg["warmup"] + cfg["iters"]):
        warm = it < cfg["warmup"]
        for name, fn in fns:
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if not warm:
                times[name].append(dt)
        tick(("warmup" if warm else "timing") + " dispatch/combine")
        dist.barrier()
        t0 = time.perf_counter()
        collective_s = a2a_dispatch()
        dt = time.perf_counter() - t0
        if not warm:
            times["a2a_dispatch"].append(dt)
            times["collective_dispatch"].append(collective_s)
        dist.barrier()
        t0 = time.perf_counter()
        collective_s = a2a_combine()
        dt = time.perf_counter() - t0
        if not warm:
            times["a2a_combine"].append(dt)
            times["collective_combine"].append(collective_s)
        tick(("warmup" if warm else "timing") + " all_to_all_single")
        if calib is not None and not warm:
            # measured next to every timed call, so model and measurement see the same machine load
            calib.append(calibrate_links(rank, world, L, cfg, getattr(handle, "chunk_records", 1024), reps=1))
            tiny_times.append(tiny_calls())
        tick(("warmup" if warm else "timing") + (" link calibration" if calib is not None else " all_to_all_single"))

    if pbar is not None:
        pbar.close()

    # gather everything to every rank (rank 0 reports)
    mine = {"rank": rank, "times": times, "dispatch_stats": d_stats, "combine_stats": c_stats,
            "chunk_records": getattr(handle, "chunk_records", None),
            "recv_rows": n_recv, "calib": calib, "tiny_times": tiny_times, "chunk_runs": chunk_runs}
    allr: List[Any] = [None] * world
    dist.all_gather_object(allr, mine)
    idx_all: List[Any] = [None] * world
    dist.all_gather_object(idx_all, topk_idx)
    buf.destroy()
    if rank != 0:
        return None
    return summarize(cfg, allr, idx_all)


# ----------------------------------------------------------------------------- report

def summarize(cfg: Dict[str, Any], allr: List[Dict[str, Any]], idx_all: List[torch.Tensor]) -> Dict[str, Any]:
    R, L = cfg["world_size"], cfg["ranks_per_node"]
    traffic = traffic_counts(idx_all, cfg["experts"], L)
    bpt = bytes_per_token(cfg["hidden"], cfg["topk"], cfg["dtype"], L,
                          round_rail_partials=bool(cfg.get("round_rail_partials")))
    result: Dict[str, Any] = {"config": {k: v for k, v in cfg.items() if k != "progress"},
                              "num_nodes": R // L, "ops": {}}
    mismatches = []
    for op in OPS:
        stats = [r[f"{op}_stats"] for r in allr]
        for rk in range(R):
            exp = traffic.expected_stats(rk, op)
            for key, val in exp.items():
                if int(stats[rk].get(key, -1)) != val:
                    mismatches.append(f"{op} rank {rk} {key}: counter {stats[rk].get(key)} planner {val}")
        iters = len(allr[0]["times"][op])
        per_iter = [max(r["times"][op][i] for r in allr) for i in range(iters)]
        a2a_iter = [max(r["times"]["a2a_" + op][i] for r in allr) for i in range(iters)]
        coll_iter = [max(r["times"]["collective_" + op][i] for r in allr) for i in range(iters)]
        ts, ta, tc = time_stats(per_iter), time_stats(a2a_iter), time_stats(coll_iter)
        t = ts["median_us"] / 1e6
        rail = [int(s["rail_bytes"]) for s in stats]
        node = [int(s["node_bytes"]) for s in stats]
        flat_rail = [int(s["flat_rail_token_copies"]) * int(s["rail_bytes_per_token"]) for s in stats]
        payload = bpt.payload_dispatch if op == "dispatch" else bpt.payload_combine
        routed = [int(v) for v in traffic.recv_rows]     # rows each rank receives (dispatch) / returns (combine)
        alg_bytes = sum(routed) * payload / R
        result["ops"][op] = {
            "time": ts, "a2a_time": ta, "collective_time": tc,
            "rail_bytes_total": sum(rail), "rail_bytes_max": max(rail),
            "node_bytes_total": sum(node), "node_bytes_max": max(node),
            "flat_rail_bytes_total": sum(flat_rail),
            "rail_bytes_per_token": int(stats[0]["rail_bytes_per_token"]),
            "node_bytes_per_token": int(stats[0]["node_bytes_per_token"]),
            "rail_gbps": max(rail) / t / 1e9 if t > 0 else 0.0,
            "node_gbps": max(node) / t / 1e9 if t > 0 else 0.0,
            "algbw_gbps": alg_bytes / t / 1e9 if t > 0 else 0.0,
            "a2a_algbw_gbps": alg_bytes / (ta["median_us"] / 1e6) / 1e9,
            "speedup_vs_a2a": ta["median_us"] / ts["median_us"] if ts["median_us"] > 0 else 0.0,
            "speedup_vs_collective": tc["median_us"] / ts["median_us"] if ts["median_us"] > 0 else 0.0,
            "rail_token_copies": [int(s["rail_token_copies"]) for s in stats],
            "node_token_copies": [int(s["node_token_copies"]) for s in stats],
            "flat_rail_token_copies": [int(s["flat_rail_token_copies"]) for s in stats],
        }
    result["counters_match_planner"] = not mismatches
    result["counter_mismatches"] = mismatches[:20]
    if allr[0].get("calib"):
        result["model_check"] = model_check(cfg, allr, traffic, result)
    return result


def model_check(cfg: Dict[str, Any], allr: List[Dict[str, Any]], traffic, result) -> Dict[str, Any]:
    """Predict this run's times with ``bench.cost_model.predict_emulated`` fed with the link speeds
    measured on this cluster next to every timed iteration (the host may be shared: the link
    speeds and the call times are taken under the same load). Compares the median prediction with
    the median measured time."""
    from bench.cost_model import HostLinks, Link, Movers, chunk_events, predict_emulated
    from bench.common import acc_bytes, percentile
    # the records per chunk the backend chose (its handle says), else what was asked for
    chunk = allr[0].get("chunk_records") or cfg.get("chunk_tokens") or 256
    bpt = bytes_per_token(cfg["hidden"], cfg["topk"], cfg["dtype"], cfg["ranks_per_node"],
                          round_rail_partials=bool(cfg.get("round_rail_partials")))
    acc = acc_bytes(combine_dtype(cfg["dtype"]))
    # CPU seconds per chunk event: the tiny-row runs at two chunk sizes differ only in chunks
    runs = allr[0]["chunk_runs"]
    cores = int(allr[0]["calib"][0].get("cores", 1))
    small, large = (32, 1024)
    extra_events = float(chunk_events(traffic, small).sum() - chunk_events(traffic, large).sum())
    chunk_s = {op: max(0.0, (runs[op][0] - runs[op][1]) * cores / max(extra_events, 1.0)) for op in OPS}
    preds = {op: [] for op in OPS}
    stages = {op: [] for op in OPS}
    cals = allr[0]["calib"]
    for i, cal in enumerate(cals):
        fixed = {op: max(r["tiny_times"][i][op] for r in allr) for op in OPS}
        movers = Movers(**{k[len("mover_"):]: v for k, v in cal.items() if k.startswith("mover_")})
        links = HostLinks(rail=Link(cal.get("rail_alpha", 0.0), cal.get("rail_bw", 1e12)), movers=movers,
                          chunk_dispatch_s=chunk_s["dispatch"], chunk_combine_s=chunk_s["combine"],
                          fixed_dispatch=fixed["dispatch"], fixed_combine=fixed["combine"],
                          cores=int(cal.get("cores", 1)))
        p = predict_emulated(links, traffic, bpt, cfg["hidden"], acc, chunk)
        for op in OPS:
            preds[op].append(p[op])
            stages[op].append(dict(p[op + "_stages"], fixed=fixed[op]))
    med_links = {k: percentile([c[k] for c in cals], 0.5) for k in cals[0]}
    out: Dict[str, Any] = {"links": med_links, "links_per_iter": cals, "chunk_tokens": chunk,
                           "chunk_cpu_s": chunk_s, "chunk_runs_s": runs}
    for op in OPS:
        meas = result["ops"][op]["time"]["median_us"] / 1e6
        pred = percentile(preds[op], 0.5)
        out[op] = {"predicted_us": pred * 1e6, "predicted_per_iter_us": [p * 1e6 for p in preds[op]],
                   "fixed_cost_us": percentile([s["fixed"] for s in stages[op]], 0.5) * 1e6,
                   "stages_us": {k: percentile([s[k] for s in stages[op]], 0.5) * 1e6 for k in stages[op][0]
                                 if k != "fixed"},
                   "measured_us": meas * 1e6, "error": (pred - meas) / meas}
    return out


def format_report(res: Dict[str, Any]) -> str:
    c = res["config"]
    lines = [f"dispatch benchmark: {res['num_nodes']} nodes x {c['ranks_per_node']} ranks, "
             f"T={c['tokens']} tokens/rank, H={c['hidden']}, top-{c['topk']} of {c['experts']} experts, "
             f"{c['dtype']}, node limit {c.get('node_limit') or 'none'}, num_sms={c['num_sms']}, "
             f"{c['iters']} iters",
             ""]
    head = (f"{'op':<9} {'time us (med)':>13} {'p10-p90 us':>17} {'rail MB':>9} {'node MB':>9} "
            f"{'rail GB/s':>9} {'node GB/s':>9} {'algbw GB/s':>10} | {'a2a us':>10} {'a2a algbw':>9} "
            f"{'speedup':>7}")
    lines += [head, "-" * len(head)]
    for op in OPS:
        o = res["ops"][op]
        t, ta = o["time"], o["a2a_time"]
        lines.append(
            f"{op:<9} {t['median_us']:>13.1f} {t['p10_us']:>8.0f}-{t['p90_us']:<8.0f} "
            f"{o['rail_bytes_total'] / 1e6:>9.2f} {o['node_bytes_total'] / 1e6:>9.2f} "
            f"{o['rail_gbps']:>9.3f} {o['node_gbps']:>9.3f} {o['algbw_gbps']:>10.3f} | "
            f"{ta['median_us']:>10.1f} {o['a2a_algbw_gbps']:>9.3f} {o['speedup_vs_a2a']:>6.2f}x")
    lines.append("")
    lines.append("rail/node MB: all ranks' bytes on that link (traffic counters); GB/s per link: the busiest "
                 "rank's bytes / median time;")
    lines.append("algbw: routed payload bytes per rank / time; a2a: torch.distributed.all_to_all_single of the "
                 "same routed rows (pack + a2a; combine: reverse a2a + sum); speedup = a2a time / time")
    total = sum(res["ops"][op]["time"]["median_us"] for op in OPS)
    flat = sum(res["ops"][op]["a2a_time"]["median_us"] for op in OPS)
    coll = sum(res["ops"][op]["collective_time"]["median_us"] for op in OPS)
    lines.append(f"dispatch+combine: {total / 1e3:.1f} ms; flat (pack + a2a, a2a + sum): {flat / 1e3:.1f} ms "
                 f"= {flat / total:.2f}x; the all_to_all_single calls alone: {coll / 1e3:.1f} ms "
                 f"= {coll / total:.2f}x")
    d = res["ops"]["dispatch"]
    if d["flat_rail_bytes_total"]:
        lines.append(f"dispatch rail bytes vs a flat all-to-all of the same records: "
                     f"{d['rail_bytes_total'] / d['flat_rail_bytes_total']:.3f}x")
    lines.append("traffic counters equal the planner's exact counts: "
                 + ("yes" if res["counters_match_planner"] else "NO\n  " + "\n  ".join(res["counter_mismatches"])))
    mc = res.get("model_check")
    if mc:
        ln = mc["links"]
        lines.append("")
        movers = ", ".join(f"{k[len('mover_'):]} {v / 1e9:.2f}" for k, v in sorted(ln.items())
                           if k.startswith("mover_"))
        lines.append("cost model check (bench.cost_model.predict_emulated; links measured on this cluster, shared by "
                     f"{int(ln.get('cores', 1))} cores: rail "
                     + (f"{ln['rail_bw'] / 1e9:.3f} GB/s + {ln['rail_alpha'] * 1e6:.0f} us; " if "rail_bw" in ln else "none; ")
                     + f"movers GB/s per CPU-second: {movers}; CPU per chunk: dispatch "
                     f"{mc['chunk_cpu_s']['dispatch'] * 1e6:.0f} us, combine {mc['chunk_cpu_s']['combine'] * 1e6:.0f} us; "
                     f"chunk {mc['chunk_tokens']} tokens):")
        for op in OPS:
            m = mc[op]
            st = ", ".join(f"{k} {v:.0f}" for k, v in m["stages_us"].items())
            lines.append(f"  {op:<9} predicted {m['predicted_us']:>10.1f} us (fixed {m['fixed_cost_us']:.0f}; {st})"
                         f"  measured {m['measured_us']:>10.1f} us  error {m['error'] * 100:+.1f}%")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.all_to_all",
                                 description="dispatch/combine bandwidth vs all_to_all_single",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2, help="emulated nodes (ignored under torchrun)")
    ap.add_argument("--ranks-per-node", type=int, default=2, help="ranks per emulated node")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank (0: only the fixed cost of a call)")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size H")
    ap.add_argument("--topk", type=int, default=8, help="experts per token (at most --experts)")
    ap.add_argument("--experts", type=int, default=32, help="experts in all, a multiple of the ranks")
    ap.add_argument("--node-limit", type=int, default=0,
                    help="at most this many nodes per token (0: none; at most --nodes)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="x's dtype")
    ap.add_argument("--num-sms", type=int, default=20, help="SM budget (CPU backend: thread budget)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="records per chunk (default: backend's)")
    ap.add_argument("--round-rail-partials", action="store_true",
                    help="Config(round_rail_partials=True): combine partials cross the rail in x's 16-bit dtype")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--seed", type=int, default=0, help="routing and data seed")
    ap.add_argument("--model-check", action="store_true",
                    help="measure link speeds and compare the cost model's prediction with the measurement")
    ap.add_argument("--json", default=None, help="write the raw numbers to this path")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses arguments the benchmark would otherwise have to adjust silently."""
    world = args.nodes * args.ranks_per_node
    for name in ("nodes", "ranks_per_node", "hidden", "topk", "experts", "num_sms", "iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("tokens", "warmup", "node_limit"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.topk > args.experts:
        ap.error(f"--topk {args.topk} exceeds --experts {args.experts}: a token picks distinct experts")
    if not under_torchrun():
        if args.experts % world:
            ap.error(f"--experts {args.experts} must be a multiple of the {world} ranks")
        if args.node_limit > args.nodes:
            ap.error(f"--node-limit {args.node_limit} exceeds --nodes {args.nodes} (use 0 for no limit)")


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    cfg = {"ranks_per_node": args.ranks_per_node, "tokens": args.tokens, "hidden": args.hidden,
           "topk": args.topk, "experts": args.experts, "node_limit": args.node_limit or None,
           "dtype": args.dtype, "num_sms": args.num_sms, "chunk_tokens": args.chunk_tokens,
           "round_rail_partials": args.round_rail_partials, "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
           "model_check": args.model_check, "progress": not args.no_progress}
    world = args.nodes * args.ranks_per_node
    results = launch(run_rank, world, cfg)
    return results[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    res = run(args)
    if res is None:   # a non-zero rank under torchrun
        return 0
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["counters_match_planner"] else 1


if __name__ == "__main__":
    sys.exit(main())

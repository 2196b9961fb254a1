"""SM sweep: dispatch / combine bandwidth against the SM budget ``num_sms``, plus an SM-usage
profile.

    python -m bench.sm_sweep --nodes 2 --ranks-per-node 2 --max-sms 24 --step 2 --plot sm_sweep.png \\
        --timeline timeline.png

For every ``num_sms`` in ``2, 2+step, ..., max`` it times dispatch and combine (median of the
slowest rank per iteration) and plots, against ``num_sms``, the algorithm bandwidth and the
bottleneck link bandwidth, and the GB/s per SM. The last setting is also run under
:mod:`dispatch.profile`: the table gives the SMs (CPU backend: worker threads) each kernel
occupied, their busy time and SM-microseconds per GB; ``--timeline`` draws one bar per block.

On the CPU backend ``num_sms`` bounds the worker threads of each rank (never more than the
cores per rank), so the curve flattens where the cores run out; the table shows the threads
actually used (``units``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from bench.all_to_all import make_inputs
from bench.common import (DTYPES, bytes_per_token, combine_dtype, launch, time_stats, traffic_counts,
                          under_torchrun)


def sweep_rank(rank: int, world: int, cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    from dispatch import Buffer, Config
    import dispatch.profile as dprof

    L = cfg["ranks_per_node"] if not under_torchrun() else int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cfg = dict(cfg, world_size=world, ranks_per_node=L)
    buf = Buffer(dist.group.WORLD, 0, 0, num_ranks_per_node=L, device="cpu")
    topk_idx, topk_weights, x = make_inputs(rank, cfg)
    E = cfg["experts"]
    sms = list(range(2, cfg["max_sms"] + 1, cfg["step"]))
    if sms[-1] != cfg["max_sms"]:
        sms.append(cfg["max_sms"])
    comb_dt = DTYPES[combine_dtype(cfg["dtype"])]

    pbar = None
    if rank == 0 and cfg.get("progress", True) and sys.stderr.isatty():  # no bars in logs
        try:
            from tqdm import tqdm
            pbar = tqdm(total=len(sms) * (cfg["iters"] + cfg["warmup"]) + 1, desc="sm sweep", file=sys.stderr,
                        leave=False)
        except ImportError:  # pragma: no cover
            pass

    rows: List[Dict[str, Any]] = []
    stats: Dict[str, Any] = {}
    y = w = handle = None
    for n in sms:
        config = Config(num_sms=n, chunk_tokens=cfg.get("chunk_tokens"))
        td, tc = [], []
        for it in range(cfg["warmup"] + cfg["iters"]):
            dist.barrier()
            t0 = time.perf_counter()
            recv_x, _, w, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                      num_experts=E, config=config)
            t1 = time.perf_counter()
            stats["dispatch"] = buf.get_traffic_stats()
            if y is None:
                rr = recv_x[0] if isinstance(recv_x, tuple) else recv_x
                y = torch.randn(rr.shape[0], cfg["hidden"]).to(comb_dt)
            dist.barrier()
            t2 = time.perf_counter()
            buf.combine(y, handle, topk_weights=w, config=config)
            t3 = time.perf_counter()
            stats["combine"] = buf.get_traffic_stats()
            if it >= cfg["warmup"]:
                td.append(t1 - t0)
                tc.append(t3 - t2)
            if pbar is not None:
                pbar.set_description(f"num_sms={n}")
                pbar.update(1)
        rows.append({"num_sms": n, "threads": config.cpu_threads(L), "dispatch_s": td, "combine_s": tc})

    # profile the last setting
    config = Config(num_sms=sms[-1], chunk_tokens=cfg.get("chunk_tokens"))
    dist.barrier()
    with dprof.profile() as prof:
        recv_x, _, w, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                  num_experts=E, config=config)
        buf.combine(y, handle, topk_weights=w, config=config)
    prof.gather()
    if pbar is not None:
        pbar.update(1)
        pbar.close()

    mine = {"rows": rows, "stats": stats}
    allr: List[Any] = [None] * world
    dist.all_gather_object(allr, mine)
    idx_all: List[Any] = [None] * world
    dist.all_gather_object(idx_all, topk_idx)
    buf.destroy()
    if rank != 0:
        return None
    return summarize_sweep(cfg, allr, idx_all, prof)


def summarize_sweep(cfg, allr, idx_all, prof) -> Dict[str, Any]:
    R, L = cfg["world_size"], cfg["ranks_per_node"]
    traffic = traffic_counts(idx_all, cfg["experts"], L)
    bpt = bytes_per_token(cfg["hidden"], cfg["topk"], cfg["dtype"], L)
    out_rows = []
    for i, row in enumerate(allr[0]["rows"]):
        entry = {"num_sms": row["num_sms"], "threads": row["threads"]}
        for op in ("dispatch", "combine"):
            iters = len(row[f"{op}_s"])
            per_iter = [max(r["rows"][i][f"{op}_s"][j] for r in allr) for j in range(iters)]
            ts = time_stats(per_iter)
            t = ts["median_us"] / 1e6
            st = [r["stats"][op] for r in allr]
            payload = bpt.payload_dispatch if op == "dispatch" else bpt.payload_combine
            alg = int(traffic.recv_rows.sum()) * payload / R / t / 1e9
            rail = max(int(s["rail_bytes"]) for s in st) / t / 1e9
            node = max(int(s["node_bytes"]) for s in st) / t / 1e9
            entry[op] = {"time": ts, "algbw_gbps": alg, "rail_gbps": rail, "node_gbps": node,
                         "algbw_gbps_per_sm": alg / row["num_sms"]}
        out_rows.append(entry)
    summary = {k: s.as_dict() for k, s in prof.summary().items()}
    config = {k: v for k, v in cfg.items() if k != "progress"}
    config.setdefault("cores", os.cpu_count() or 1)
    return {"config": config, "rows": out_rows,
            "profile": summary, "profile_table": prof.table(),
            "records": [r.__dict__ for r in prof.records]}


def cores_note(config: Dict[str, Any]) -> Optional[str]:
    """A warning when the machine has fewer cores than ranks x 2 threads: every rank's threads
    then share the same few cores and the curve shows scheduling noise, not the SM budget."""
    cores = int(config.get("cores") or os.cpu_count() or 1)
    ranks = int(config["world_size"])
    if cores >= 2 * ranks:
        return None
    return (f"{cores} cores for {ranks} ranks: each num_sms gets about {max(1, cores // ranks)} core per rank, "
            f"so the differences between points are mostly noise")


def plot_sweep(res: Dict[str, Any], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    xs = [r["num_sms"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for op, st, col in (("dispatch", "o", "tab:blue"), ("combine", "s", "tab:orange")):
        a1.plot(xs, [r[op]["algbw_gbps"] for r in rows], st + "-", color=col, label=f"{op} algbw")
        a1.plot(xs, [r[op]["rail_gbps"] for r in rows], st + "--", color=col, alpha=0.7,
                label=f"{op} rail (busiest rank)")
        a1.plot(xs, [r[op]["node_gbps"] for r in rows], st + ":", color=col, alpha=0.7,
                label=f"{op} node (busiest rank)")
        a2.plot(xs, [r[op]["algbw_gbps_per_sm"] for r in rows], st + "-", color=col, label=op)
    a1.set_xlabel("num_sms (CPU backend: thread budget)")
    a1.set_ylabel("GB/s per rank")
    a1.set_title("bandwidth vs SMs")
    a2.set_xlabel("num_sms")
    a2.set_ylabel("algbw GB/s per SM")
    a2.set_title("GB/s per SM")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    c = res["config"]
    fig.suptitle(f"{c['world_size'] // c['ranks_per_node']}x{c['ranks_per_node']} ranks, T={c['tokens']}, "
                 f"H={c['hidden']}, top-{c['topk']}/{c['experts']}, {c['dtype']}", fontsize=9)
    note = cores_note(c)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, color="tab:red")
    fig.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_sweep(res: Dict[str, Any]) -> str:
    head = (f"{'num_sms':>7} {'threads':>7} | {'dispatch us':>11} {'algbw':>7} {'GB/s/SM':>8} | "
            f"{'combine us':>10} {'algbw':>7} {'GB/s/SM':>8}")
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        d, c = r["dispatch"], r["combine"]
        lines.append(f"{r['num_sms']:>7} {r['threads']:>7} | {d['time']['median_us']:>11.1f} {d['algbw_gbps']:>7.3f} "
                     f"{d['algbw_gbps_per_sm']:>8.4f} | {c['time']['median_us']:>10.1f} {c['algbw_gbps']:>7.3f} "
                     f"{c['algbw_gbps_per_sm']:>8.4f}")
    note = cores_note(res["config"])
    if note:
        lines += ["", "note: " + note]
    lines += ["", f"profile at num_sms={res['rows'][-1]['num_sms']} (all ranks):", res["profile_table"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sm_sweep", description="bandwidth vs num_sms")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--node-limit", type=int, default=0)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--max-sms", type=int, default=8, help="largest num_sms (GPU: e.g. 132 on an H100)")
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="sm_sweep.png", help="PNG of bandwidth and GB/s per SM vs num_sms")
    ap.add_argument("--timeline", default=None, help="PNG timeline of the profiled run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.max_sms < 2:
        ap.error("--max-sms must be >= 2")
    cfg = {"ranks_per_node": args.ranks_per_node, "tokens": args.tokens, "hidden": args.hidden,
           "topk": args.topk, "experts": args.experts, "node_limit": args.node_limit or None,
           "dtype": args.dtype, "chunk_tokens": args.chunk_tokens, "max_sms": args.max_sms,
           "step": max(1, args.step), "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
           "progress": not args.no_progress}
    res = launch(sweep_rank, args.nodes * args.ranks_per_node, cfg)[0]
    if res is None:
        return 0
    print(format_sweep(res))
    if args.plot:
        plot_sweep(res, args.plot)
        print(f"\nplot: {args.plot}")
    if args.timeline:
        from dispatch.profile import Profiler, Record
        p = Profiler()
        p.add(Record(**r) for r in res["records"])
        p.timeline(args.timeline, title=f"dispatch + combine, num_sms={res['rows'][-1]['num_sms']}")
        print(f"timeline: {args.timeline}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

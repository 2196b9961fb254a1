"""Cluster cost model: predicted dispatch / combine time on clusters that are not at hand.

Inputs: the exact per-rank copy counts of a routing (:func:`bench.common.traffic_counts`, from
real ``topk_idx`` or a generated routing), the bytes one copy takes on each link
(:func:`bench.common.bytes_per_token`, the library's record sizes), and an alpha-beta model
per link (``alpha``: fixed cost per message round, ``bw``: bytes/s per rank and direction,
full duplex).

The model (per rank ``r``; the collective ends with the slowest rank)::

    link time      t_link(r) = max(send(r), recv(r)) * bytes_per_copy / bw_link
    two-hop        C = max(1, ceil(max records one rank sends to one remote node / chunk_tokens))
                   a(r) = t_rail(r) / C + alpha_rail      one chunk crossing the rail
                   b(r) = t_node(r) / C + alpha_node      one chunk forwarded in the node
                   T = notify + max_r [ a + b + (C - 1) * max(a, b) ]     (chunk pipeline)
                   notify = alpha_rail [N > 1] + alpha_node [L > 1] for dispatch (count exchange),
                   0 for combine (the handle has the counts)
    flat a2a       T = alpha_rail + max_r max(alpha_rail + t_rail(r), alpha_node + t_node(r))
                   (rail and node traffic run concurrently; one count exchange first)
    hierarchical   T = alpha_rail + max_r (alpha_node + t_node1(r)) + max_r (alpha_rail + t_rail2(r))
                   (Tutel: phase 1 in the node, then phase 2 over the rail, one after the other)

A stage whose counts are zero on every rank (no rail with one node) costs nothing, alpha
included. Dispatch copies carry the dispatch record (row + metadata); two-hop combine sends
partial sums in the accumulation type over the rail and ``x``-dtype rows in the node; the flat
and hierarchical combines send ``x``-dtype rows (+ weights) on both links.

CLI: ``python -m bench.cost_model`` prints a table per preset and draws predicted time against
node count for the three designs (``bench/out/cost_model.png``; ``--plot PATH``, ``--no-plot``).
The default sweep is quick (up to 8 nodes and 128 ranks, ~30 s); ``--full`` sweeps up to 16
nodes and 512 ranks (minutes: generating routings for hundreds of ranks dominates).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from bench.common import (BytesPerToken, Traffic, bytes_per_token, gen_routing, traffic_counts)

GB = 1e9


@dataclass(frozen=True)
class Link:
    """alpha-beta model of one link: ``alpha_s`` per message round, ``bw`` bytes/s per rank and
    direction."""

    alpha_s: float
    bw: float

    def time(self, nbytes: float) -> float:
        return nbytes / self.bw


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    ranks_per_node: int
    rail: Link
    node: Link
    chunk_tokens: int = 256     # records per rail chunk per remote node


PRESETS: Dict[str, ClusterSpec] = {
    # DeepSeek-V3 training cluster: 8 x H800 per node, one 400 Gb/s CX-7 IB NIC per GPU,
    # NVLink ~160 GB/s achievable per GPU (DeepEP's figures).
    "h800": ClusterSpec("8xH800, 400Gb/s IB, 160GB/s NVLink", 8,
                        rail=Link(5e-6, 50 * GB), node=Link(2e-6, 160 * GB)),
    # the same GPUs and NICs, 4 GPUs per node
    "h800x4": ClusterSpec("4xH800, 400Gb/s IB, 160GB/s NVLink", 4,
                          rail=Link(5e-6, 50 * GB), node=Link(2e-6, 160 * GB)),
    # GB200 NVL72-like: 72 GPUs in one NVLink domain (~900 GB/s per GPU and direction),
    # 400 Gb/s NIC per GPU between domains
    "nvl72": ClusterSpec("GB200 NVL72-like, 400Gb/s IB, 900GB/s NVLink", 72,
                         rail=Link(5e-6, 50 * GB), node=Link(2e-6, 900 * GB)),
}


def _stage(send: torch.Tensor, recv: torch.Tensor, nbytes: int, link: Link) -> torch.Tensor:
    """Per-rank seconds to push this rank's copies over one link (no alpha)."""
    return torch.maximum(send, recv).to(torch.float64) * nbytes / link.bw


def _active(*counts: torch.Tensor) -> bool:
    return any(int(c.sum()) > 0 for c in counts)


def pipeline_time(t_rail: torch.Tensor, t_node: torch.Tensor, chunks: int, rail: Link, node: Link,
                  rail_active: bool = True, node_active: bool = True) -> torch.Tensor:
    """Per-rank time of a ``chunks``-deep two-stage pipeline (rail stage then node stage)."""
    c = max(1, int(chunks))
    a = t_rail / c + (rail.alpha_s if rail_active else 0.0)
    b = t_node / c + (node.alpha_s if node_active else 0.0)
    if not rail_active:
        a = torch.zeros_like(a)
    if not node_active:
        b = torch.zeros_like(b)
    return a + b + (c - 1) * torch.maximum(a, b)


def num_chunks(traffic: Traffic, chunk_tokens: int) -> int:
    return max(1, math.ceil(int(traffic.max_rail_tokens_per_peer.max()) / max(1, chunk_tokens)))


def predict(spec: ClusterSpec, traffic: Traffic, bpt: BytesPerToken,
            chunk_tokens: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Predicted seconds for ``{"two_hop", "flat", "hierarchical"} x {"dispatch", "combine"}``,
    plus the bottleneck bytes per link (``*_rail_bytes`` / ``*_node_bytes``: the busiest rank's
    max(send, recv))."""
    if traffic.ranks_per_node != spec.ranks_per_node:
        raise ValueError(f"routing has {traffic.ranks_per_node} ranks per node, "
                         f"cluster {spec.ranks_per_node}")
    rail, node = spec.rail, spec.node
    C = num_chunks(traffic, spec.chunk_tokens if chunk_tokens is None else chunk_tokens)
    out: Dict[str, Dict[str, float]] = {"two_hop": {}, "flat": {}, "hierarchical": {}}
    out["two_hop"]["chunks"] = C

    for op in ("dispatch", "combine"):
        if op == "dispatch":
            rs, rr = traffic.dispatch_rail_send, traffic.dispatch_rail_recv
            ns, nr = traffic.dispatch_node_send, traffic.dispatch_node_recv
            b_rail, b_node = bpt.dispatch_rail, bpt.dispatch_node
            b_flat = bpt.dispatch_rail
        else:
            rs, rr = traffic.combine_rail_send, traffic.combine_rail_recv
            ns, nr = traffic.combine_node_send, traffic.combine_node_recv
            b_rail, b_node = bpt.combine_rail, bpt.combine_node
            b_flat = bpt.combine_node
        ra, na = _active(rs, rr), _active(ns, nr)
        # two-hop
        t_r = _stage(rs, rr, b_rail, rail)
        t_n = _stage(ns, nr, b_node, node)
        notify = 0.0
        if op == "dispatch":   # count exchange: over the rail (N > 1) and in the node (L > 1)
            notify = ((rail.alpha_s if traffic.num_nodes > 1 else 0.0)
                      + (node.alpha_s if traffic.ranks_per_node > 1 else 0.0))
        per_rank = pipeline_time(t_r, t_n, C, rail, node, ra, na)
        out["two_hop"][op] = notify + float(per_rank.max())
        out["two_hop"][op + "_rail_bytes"] = float(torch.maximum(rs, rr).max()) * b_rail
        out["two_hop"][op + "_node_bytes"] = float(torch.maximum(ns, nr).max()) * b_node
        # flat all-to-all (combine: the reverse all-to-all, send/recv swapped)
        frs, frr = traffic.flat_rail_send, traffic.flat_rail_recv
        fns, fnr = traffic.flat_node_send, traffic.flat_node_recv
        fra, fna = _active(frs, frr), _active(fns, fnr)
        t_fr = _stage(frs, frr, b_flat, rail) + (rail.alpha_s if fra else 0.0)
        t_fn = _stage(fns, fnr, b_flat, node) + (node.alpha_s if fna else 0.0)
        out["flat"][op] = (rail.alpha_s if fra else 0.0) + float(torch.maximum(t_fr, t_fn).max())
        out["flat"][op + "_rail_bytes"] = float(torch.maximum(frs, frr).max()) * b_flat
        out["flat"][op + "_node_bytes"] = float(torch.maximum(fns, fnr).max()) * b_flat
        # hierarchical all-to-all
        hns, hnr = traffic.hier_node_send, traffic.hier_node_recv
        hrs, hrr = traffic.hier_rail_send, traffic.hier_rail_recv
        hra, hna = _active(hrs, hrr), _active(hns, hnr)
        t1 = _stage(hns, hnr, b_flat, node) + (node.alpha_s if hna else 0.0)
        t2 = _stage(hrs, hrr, b_flat, rail) + (rail.alpha_s if hra else 0.0)
        out["hierarchical"][op] = (rail.alpha_s if hra else 0.0) + float(t1.max()) + float(t2.max())
        out["hierarchical"][op + "_rail_bytes"] = float(torch.maximum(hrs, hrr).max()) * b_flat
        out["hierarchical"][op + "_node_bytes"] = float(torch.maximum(hns, hnr).max()) * b_flat
    return out


# ----------------------------------------------------------------------------- emulated cluster

@dataclass(frozen=True)
class Movers:
    """Bytes per CPU-second of the CPU backend's movers (``bench.calibrate.mover_speeds``): the
    in-node link of an emulated cluster is these C++ loops on shared memory."""

    pack: float           # dispatch records gathered from x (record bytes)
    unpack: float         # records placed into receive rows (record bytes)
    gather: float         # combine rows copied to their reducer (return-row bytes)
    reduce_first: float   # a record's first returned row read into its partial (return-row bytes)
    reduce_more: float    # each further returned row summed into it (return-row bytes)
    accumulate: float     # one remote partial added at the source (partial bytes)


@dataclass(frozen=True)
class HostLinks:
    """Link speeds of an *emulated* cluster (CPU backend, ranks = processes of one host), measured
    on that cluster the way the backend uses them:

    * ``rail``: gloo point-to-point between two rail peers exchanging both ways (alpha per
      message; bw: bytes per second each way, which is also the CPU each end spends per byte);
    * ``movers``: the in-node movers' speeds, measured on all ranks at once (so with the
      contention of ranks sharing cores and memory);
    * ``chunk_dispatch_s`` / ``chunk_combine_s``: CPU seconds one chunk costs beyond its bytes
      (a pass of the event loop, a hand-off, a rail waiter), from two runs of the library that
      differ only in chunk size;
    * ``fixed_dispatch`` / ``fixed_combine``: seconds of a one-token call (handshake, Python);
    * ``cores``: cores of the host, shared by all ranks.
    """

    rail: Link
    movers: Movers
    chunk_dispatch_s: float = 0.0
    chunk_combine_s: float = 0.0
    fixed_dispatch: float = 0.0
    fixed_combine: float = 0.0
    cores: int = 1


def chunk_events(traffic: Traffic, chunk_tokens: int) -> torch.Tensor:
    """Per rank, the chunks it handles in one call: its outbox chunks (own tokens for its node,
    then rail arrivals) plus its rail sends: ``ceil(own/C) + ceil(rail_recv/C) + ceil(rail_send/C)``."""
    own = traffic.own_node_tokens if traffic.own_node_tokens is not None else torch.zeros_like(traffic.recv_rows)
    c = max(1, chunk_tokens)
    ceil = lambda t: torch.div(t + c - 1, c, rounding_mode="floor")  # noqa: E731
    return ceil(own) + ceil(traffic.dispatch_rail_recv) + ceil(traffic.dispatch_rail_send)


def predict_emulated(links: HostLinks, traffic: Traffic, bpt: BytesPerToken, hidden: int,
                     acc_elem_bytes: int = 4, chunk_tokens: int = 256) -> Dict[str, Any]:
    """Predicted dispatch / combine seconds of the CPU backend on an emulated cluster.

    On one host every rank's work is CPU time on the same ``cores``, so the call takes::

        T = fixed + max( sum over ranks and stages of work / cores,        (cores saturated)
                         max over ranks of (its own work + rail latency) )  (one rank's path)

    Per rank, with ``rs``/``rr`` its dispatch-direction rail records sent/received, ``own`` its
    tokens for its own node, ``recv`` the rows it receives in dispatch, ``ns`` the rows it
    returns to other reducers in combine, ``E`` its chunk events (:func:`chunk_events`)::

        dispatch  pack    (rs + own) * record / pack
                  rail    max(rs, rr) * record / rail.bw
                  unpack  recv * record / unpack
                  chunks  E * chunk_dispatch_s
        combine   gather  ns * return_row / gather
                  reduce  (rr + own) * return_row / reduce_first
                          + max(0, recv - rr - own) * return_row / reduce_more
                  rail    max(rs, rr) * partial / rail.bw
                  accum.  rs * partial / accumulate
                  chunks  E * chunk_combine_s

    The rail latency (``C * rail.alpha``, ``C`` = :func:`num_chunks`) counts on the path only.
    """
    own = traffic.own_node_tokens if traffic.own_node_tokens is not None else torch.zeros_like(traffic.recv_rows)
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    mv = links.movers
    has_rail = traffic.num_nodes > 1
    C = num_chunks(traffic, chunk_tokens) if has_rail else 0
    rs, rr, own = f64(traffic.dispatch_rail_send), f64(traffic.dispatch_rail_recv), f64(own)
    recv = f64(traffic.recv_rows)
    events = f64(chunk_events(traffic, chunk_tokens))
    rec = bpt.dispatch_rail
    work_d = {
        "pack": (rs + own) * rec / mv.pack,
        "rail": torch.maximum(rs, rr) * rec / links.rail.bw,
        "unpack": recv * rec / mv.unpack,
        "chunks": events * links.chunk_dispatch_s,
    }
    rrb, pb = bpt.combine_node, bpt.combine_rail
    records = rr + own
    work_c = {
        "gather": f64(traffic.combine_node_send) * rrb / mv.gather,
        "reduce": records * rrb / mv.reduce_first + torch.clamp(recv - records, min=0) * rrb / mv.reduce_more,
        "rail": torch.maximum(rs, rr) * pb / links.rail.bw,
        "accumulate": rs * pb / mv.accumulate,
        "chunks": events * links.chunk_combine_s,
    }
    rail_lat = torch.full_like(rs, C * links.rail.alpha_s)
    out: Dict[str, Any] = {"chunks": C}
    for op, work, fixed in (("dispatch", work_d, links.fixed_dispatch), ("combine", work_c, links.fixed_combine)):
        per_rank = sum(work.values())
        cpu_bound = float(per_rank.sum()) / max(1, links.cores)
        path_bound = float((per_rank + rail_lat).max())
        out[op] = fixed + max(cpu_bound, path_bound)
        stages = {k: float(v.sum()) / max(1, links.cores) for k, v in work.items()}
        stages.update(cores_total=cpu_bound, path=path_bound)
        out[op + "_stages"] = stages
    return out


# ----------------------------------------------------------------------------- sweeps / CLI

def load_routing(path: str) -> List[torch.Tensor]:
    """``torch.save``d routing: a list of per-rank ``topk_idx`` or a tensor ``[R, T, k]``."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = obj.get("topk_idx_all", obj.get("topk_idx"))
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 3:
            raise ValueError(f"routing tensor must be [R, T, k], got {tuple(obj.shape)}")
        return list(obj.unbind(0))
    return [torch.as_tensor(t) for t in obj]


def sweep(spec: ClusterSpec, nodes: Sequence[int], tokens: int, hidden: int, topk: int,
          experts: int, dtype: str, node_limit: Optional[int], seed: int = 0,
          progress: bool = False, round_rail_partials: bool = False) -> List[Dict[str, Any]]:
    rows = []
    it = nodes
    if progress:
        try:
            from tqdm import tqdm
            it = tqdm(nodes, desc=f"cost model {spec.name}", file=sys.stderr, disable=not sys.stderr.isatty())
        except ImportError:  # pragma: no cover
            pass
    for n in it:
        R = n * spec.ranks_per_node
        E = experts if experts % R == 0 else math.ceil(experts / R) * R
        routing = gen_routing(tokens, E, topk, R, spec.ranks_per_node,
                              node_limit if node_limit and node_limit < n else None, seed)
        tr = traffic_counts(routing, E, spec.ranks_per_node)
        bpt = bytes_per_token(hidden, topk, dtype, spec.ranks_per_node, round_rail_partials=round_rail_partials)
        p = predict(spec, tr, bpt)
        rows.append({"nodes": n, "ranks": R, "experts": E, **{
            f"{m}_{op}_us": p[m][op] * 1e6 for m in p for op in ("dispatch", "combine")},
            "chunks": p["two_hop"]["chunks"],
            "two_hop_rail_copies": int(tr.dispatch_rail_send.sum()),
            "flat_rail_copies": int(tr.flat_rail_send.sum())})
    return rows


def plot_sweeps(results: Dict[str, List[Dict[str, Any]]], path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    styles = {"two_hop": ("two-hop (this library)", "o-"), "flat": ("flat all-to-all", "s--"),
              "hierarchical": ("hierarchical a2a (Tutel)", "^:")}
    for i, (name, rows) in enumerate(results.items()):
        xs = [r["nodes"] for r in rows]
        for j, op in enumerate(("dispatch", "combine")):
            ax = axes[i][j]
            for m, (label, st) in styles.items():
                ax.plot(xs, [r[f"{m}_{op}_us"] for r in rows], st, label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.set_xlabel("nodes")
            ax.set_ylabel(f"{op} time (us)")
            ax.set_title(f"{name}: {op}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_rows(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'nodes':>5} {'ranks':>5} {'E':>5} {'chunks':>6} | {'dispatch us: 2hop':>17} {'flat':>9} "
            f"{'hier':>9} | {'combine us: 2hop':>16} {'flat':>9} {'hier':>9} | {'rail copies 2hop/flat':>21}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['nodes']:>5} {r['ranks']:>5} {r['experts']:>5} {r['chunks']:>6} | "
            f"{r['two_hop_dispatch_us']:>17.1f} {r['flat_dispatch_us']:>9.1f} {r['hierarchical_dispatch_us']:>9.1f} | "
            f"{r['two_hop_combine_us']:>16.1f} {r['flat_combine_us']:>9.1f} {r['hierarchical_combine_us']:>9.1f} | "
            f"{r['two_hop_rail_copies'] / max(1, r['flat_rail_copies']):>21.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost_model", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="h800,h800x4,nvl72",
                    help=f"comma-separated cluster presets: {', '.join(PRESETS)}")
    ap.add_argument("--nodes", default=None, help="node counts to sweep (default 1,2,4,8; --full: 1,2,4,8,16)")
    ap.add_argument("--full", action="store_true", help="the wide sweep: up to 16 nodes and 512 ranks (minutes)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256,
                    help="routed experts (rounded up to a multiple of the rank count)")
    ap.add_argument("--node-limit", type=int, default=4, help="max nodes per token (0: none)")
    ap.add_argument("--dtype", default="fp8", choices=["bf16", "fp16", "fp32", "fp8"])
    ap.add_argument("--chunk-tokens", type=int, default=None, help="override the preset's chunk size")
    ap.add_argument("--rail-gbps", type=float, default=None, help="override rail GB/s per rank")
    ap.add_argument("--node-gbps", type=float, default=None, help="override in-node GB/s per rank")
    ap.add_argument("--routing", default=None,
                    help="torch.save'd real routing (list of per-rank topk_idx or [R,T,k]); "
                         "predicts that one routing instead of sweeping")
    ap.add_argument("--ranks-per-node", type=int, default=None, help="with --routing")
    ap.add_argument("--max-ranks", type=int, default=None,
                    help="skip node counts with more ranks than this (generation cost; default 128, --full: 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-rail-partials", action="store_true",
                    help="two-hop combine partials on the rail in the 16-bit combine dtype (Config.round_rail_partials)")
    ap.add_argument("--plot", default="bench/out/cost_model.png", help="PNG path for time vs node count")
    ap.add_argument("--no-plot", action="store_true", help="draw nothing")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args(argv)
    if args.nodes is None:
        args.nodes = "1,2,4,8,16" if args.full else "1,2,4,8"
    if args.max_ranks is None:
        args.max_ranks = 512 if args.full else 128
    if args.no_plot:
        args.plot = None

    specs = []
    for name in args.preset.split(","):
        spec = PRESETS[name.strip()]
        if args.chunk_tokens:
            spec = replace(spec, chunk_tokens=args.chunk_tokens)
        if args.rail_gbps:
            spec = replace(spec, rail=Link(spec.rail.alpha_s, args.rail_gbps * GB))
        if args.node_gbps:
            spec = replace(spec, node=Link(spec.node.alpha_s, args.node_gbps * GB))
        specs.append((name.strip(), spec))

    if args.routing:
        routing = load_routing(args.routing)
        L = args.ranks_per_node or specs[0][1].ranks_per_node
        E = args.experts
        tr = traffic_counts(routing, E, L)
        bpt = bytes_per_token(args.hidden, int(routing[0].shape[1]), args.dtype, L,
                              round_rail_partials=args.round_rail_partials)
        out = {}
        for name, spec in specs:
            if spec.ranks_per_node != L:
                spec = replace(spec, ranks_per_node=L)
            p = predict(spec, tr, bpt)
            out[name] = p
            print(f"{spec.name} ({tr.num_nodes} nodes x {L}):")
            for m in p:
                print(f"  {m:<13} dispatch {p[m]['dispatch'] * 1e6:10.1f} us   combine {p[m]['combine'] * 1e6:10.1f} us")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0

    nodes = [int(x) for x in args.nodes.split(",")]
    results: Dict[str, List[Dict[str, Any]]] = {}
    for name, spec in specs:
        nodes_here = [n for n in nodes if n * spec.ranks_per_node <= args.max_ranks]
        if len(nodes_here) < len(nodes):
            print(f"({spec.name}: skipping node counts above {args.max_ranks} ranks; see --max-ranks)",
                  file=sys.stderr)
        rows = sweep(spec, nodes_here, args.tokens, args.hidden, args.topk, args.experts, args.dtype,
                     args.node_limit or None, args.seed, progress=True,
                     round_rail_partials=args.round_rail_partials)
        results[spec.name] = rows
        print(f"\n{spec.name}  (T={args.tokens}/rank, H={args.hidden}, k={args.topk}, "
              f"{args.dtype}, node limit {args.node_limit or 'none'}, chunk {spec.chunk_tokens} tokens"
              + (", combine partials rounded on the rail)" if args.round_rail_partials else ")"))
        print(format_rows(rows))
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_sweeps(results, args.plot, f"predicted time per call, T={args.tokens} tokens/rank, "
                    f"H={args.hidden}, top-{args.topk}, {args.dtype}")
        print(f"\nplot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "presets": {n: asdict(s) for n, s in specs},
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

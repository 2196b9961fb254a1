"""GPU benchmark of the CUDA backend's in-node path on one GPU (a loopback of L virtual ranks).

  python -m bench.gpu_loopback --json gpu_loopback.json --plot gpu_loopback.png --profile
  python -m bench.gpu_loopback --ranks 8 --tokens 4096 --hidden 7168
  python -m bench.gpu_loopback --device simt --ranks 2 --tokens 64 --hidden 128 --max-sms 4   # logic check, no GPU

Measures, in one run:

* the layout kernel alone (``T=4096, k=8, E=256, R=64`` by default; goal: under 20 us): outputs
  allocated once, CUDA events recorded on the stream right before and after each launch, median
  over ``--layout-iters``; its result is checked against ``dispatch.reference``;
* a device-to-device copy of the bytes a dispatch delivers (``torch`` ``copy_``, CUDA events): the
  ceiling to read the GB/s against;
* dispatch and combine for ``num_sms`` = 2, 4, 8, 16, 24, 32 and all SMs: delivered GB/s (payload
  bytes every rank receives, summed over the virtual ranks, over the wall time of a call of all
  ranks, median over ``--iters``) and GB/s per SM (divided by ``L * num_sms``: the virtual ranks
  share one GPU). "All SMs" is the device's SMs shared out over the L ranks (``SMs // L``, even);
  ``--max-sms`` caps the sweep.
* with ``--profile``: one more call per ``num_sms`` under ``dispatch.profile``: the table (SMs
  occupied per kernel, SM-us per GB) and each kernel's span from the blocks' own timers (the
  kernel time without host work), plus ``--timeline`` PNG of the last one.

Writes the JSON (``--json``) and a PNG of GB/s and GB/s per SM against ``num_sms`` (``--plot``).
On ``--device cuda`` (the default) without a GPU it says so and exits 0. ``--device simt`` runs
the same code on the CPU SIMT runtime (``tests/test_gpu_loopback_bench.py``): its timings say
nothing about a GPU. Another benchmark may cover the two-hop path (``bench/gpu_two_hop.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence

# before CUDA starts: see dispatch/testing.py (eager kernel loading, one hardware queue per stream)
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

SWEEP_SMS = (2, 4, 8, 16, 24, 32)
LAYOUT_CASE = {"tokens": 4096, "topk": 8, "experts": 256, "ranks": 64, "ranks_per_node": 8}
LAYOUT_GOAL_US = 20.0


# ----------------------------------------------------------------------------- sweep and timing

def all_sms(device_sms: int, ranks: int, max_channels: int) -> int:
    """The "all SMs" point of a loopback: the device's SMs shared out over the virtual ranks, even,
    at most the kernels' channel limit (``num_sms / 2`` channels)."""
    return max(2, min(device_sms // max(1, ranks), 2 * max_channels) // 2 * 2)


def sms_sweep(limit: int) -> List[int]:
    """``num_sms`` values: those of 2, 4, 8, 16, 24, 32 up to ``limit``, then ``limit`` itself (the
    "all SMs" point, or the cap), each once and even."""
    if limit < 2:
        raise ValueError(f"the num_sms limit must be >= 2, got {limit}")
    limit = limit // 2 * 2
    out = [n for n in SWEEP_SMS if n <= limit]
    if not out or out[-1] != limit:
        out.append(limit)
    return out


def median_us(samples_s: Sequence[float]) -> float:
    return statistics.median(samples_s) * 1e6


def gbps(nbytes: int, seconds: float) -> float:
    """GB/s (1e9 bytes per second); 0 for a zero time."""
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


class StreamTimer:
    """Times work enqueued on a stream: CUDA events right before and after it on a GPU; on SIMT
    the host clock around it and a stream synchronize (its kernels run on host threads)."""

    def __init__(self, device: Any, stream: Any) -> None:
        self.device, self.stream = device, stream

    def time(self, enqueue: Callable[[], None], iters: int, before: Optional[Callable[[], None]] = None) -> List[float]:
        """Seconds of each of ``iters`` runs of ``enqueue`` (``before`` runs first, untimed)."""
        out = []
        if self.device.kind == "cuda":
            import torch
            for _ in range(iters):
                if before is not None:
                    before()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                enqueue()
                end.record(self.stream)
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(iters):
                if before is not None:
                    before()
                self.stream.synchronize()
                t0 = time.perf_counter()
                enqueue()
                self.stream.synchronize()
                out.append(time.perf_counter() - t0)
        return out


# ----------------------------------------------------------------------------- measurements

def measure_layout(device: Any, case: Dict[str, int], iters: int, seed: int = 0) -> Dict[str, Any]:
    """The layout kernel alone (``launch_layout`` on a stream of its own, outputs allocated once),
    checked against ``dispatch.reference.reference_layout``."""
    import torch

    from dispatch.reference import reference_layout
    mod = device.mod
    T, k, E, R, L = (case[n] for n in ("tokens", "topk", "experts", "ranks", "ranks_per_node"))
    g = torch.Generator().manual_seed(seed)
    idx_cpu = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    dev = device.torch_device
    idx = idx_cpu.to(dev)
    counts = [torch.zeros(n, dtype=torch.int32, device=dev) for n in (R, R // L, E)]
    in_rank = torch.zeros(T, R, dtype=torch.bool, device=dev)
    a = mod.LayoutArgs()
    a.topk_idx, a.num_tokens, a.num_topk = idx.data_ptr(), T, k
    a.num_ranks, a.num_ranks_per_node, a.num_experts = R, L, E
    a.num_blocks = all_sms(device.sm_count(), 1, mod.MAX_CHANNELS)  # as a call with all SMs would
    a.per_rank, a.per_node, a.per_expert = (t.data_ptr() for t in counts)
    a.in_rank = in_rank.data_ptr()
    stream = device.new_stream()
    handle = device.handle(stream)
    device.synchronize()  # inputs and outputs are ready before the stream reads them

    def zero() -> None:  # the caller zeroes the counts (api.h); outside the timed span
        with device.stream_scope(stream):
            for t in counts:
                t.zero_()

    timer = StreamTimer(device, stream)
    timer.time(lambda: mod.launch_layout(a, handle), 3, zero)  # warm-up
    samples = timer.time(lambda: mod.launch_layout(a, handle), iters, zero)
    ref = reference_layout(idx_cpu, E, R, L)
    got = (counts[0].cpu(), counts[1].cpu(), counts[2].cpu(), in_rank.cpu())
    matches = all(w is None or torch.equal(gt, w) for gt, w in zip(got, ref))
    return {**case, "blocks": a.num_blocks, "median_us": median_us(samples), "min_us": min(samples) * 1e6,
            "iters": iters, "goal_us": LAYOUT_GOAL_US, "matches_reference": bool(matches)}


def measure_copy(device: Any, nbytes: int, iters: int) -> Dict[str, Any]:
    """A device-to-device copy of ``nbytes`` (the bytes a dispatch delivers), on a stream of its own."""
    import torch
    dev = device.torch_device
    src = torch.ones(max(1, nbytes), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    stream = device.new_stream()
    device.synchronize()

    def copy() -> None:
        with device.stream_scope(stream):
            dst.copy_(src)

    timer = StreamTimer(device, stream)
    timer.time(copy, 2)
    samples = timer.time(copy, iters)
    t = statistics.median(samples)
    return {"bytes": nbytes, "median_us": t * 1e6, "gbps": gbps(nbytes, t), "iters": iters}


def _kernel_spans_us(prof: Any) -> Dict[str, float]:
    """Per kernel: the longest span (first block start to last block end) of any rank."""
    return {name: s.span_us for name, s in prof.summary().items()}


def measure_sweep(lb: Any, inputs: Dict[str, Any], num_sms_list: Sequence[int], iters: int, warmup: int,
                  profile: bool) -> List[Dict[str, Any]]:
    """Dispatch and combine of every virtual rank per ``num_sms``: wall time of a call of all ranks
    (each rank's call returns after its kernels finished), median over ``iters``."""
    import dispatch.profile as dprof
    from dispatch import Config
    L, E = lb.num_ranks, inputs["experts"]
    xs, idxs, layouts = inputs["xs"], inputs["idxs"], inputs["layouts"]
    payload = inputs["payload_bytes"]
    rows = []
    for num_sms in num_sms_list:
        cfg = Config(num_sms=num_sms)

        def run_dispatch(r: int, b: Any) -> Any:
            recv, _, _, _, handle, _ = b.dispatch(xs[r], num_tokens_per_rank=layouts[r][0],
                                                  is_token_in_rank=layouts[r][3],
                                                  num_tokens_per_expert=layouts[r][2], topk_idx=idxs[r],
                                                  num_experts=E, config=cfg)
            return recv, handle

        outs: List[Any] = []

        def dispatch_all() -> None:
            outs[:] = lb.run(run_dispatch)

        def combine_all() -> None:
            lb.run(lambda r, b: b.combine(outs[r][0], outs[r][1], config=cfg))

        times: Dict[str, List[float]] = {"dispatch": [], "combine": []}
        for i in range(warmup + iters):
            for op, fn in (("dispatch", dispatch_all), ("combine", combine_all)):
                lb.synchronize()
                t0 = time.perf_counter()
                fn()
                lb.synchronize()
                if i >= warmup:
                    times[op].append(time.perf_counter() - t0)
        row: Dict[str, Any] = {"num_sms": num_sms, "sms_all_ranks": L * num_sms}
        for op in ("dispatch", "combine"):
            t = statistics.median(times[op])
            row[op] = {"median_us": t * 1e6, "gbps": gbps(payload, t), "gbps_per_sm": gbps(payload, t) / (L * num_sms)}
        if profile:
            with dprof.profile() as prof:
                dispatch_all()
                combine_all()
                lb.synchronize()
                # the last call's rows are read at its end (calls without async_finish wait)
            spans = _kernel_spans_us(prof)
            row["profile"] = {"table": prof.table(), "summary": {k: s.as_dict() for k, s in prof.summary().items()},
                              "kernel_span_us": spans, "records": [asdict(r) for r in prof.records]}
            for op in ("dispatch", "combine"):
                span = spans.get(f"{op}.node_copy", 0.0)
                row[op]["kernel_span_us"] = span
                row[op]["kernel_gbps"] = gbps(payload, span / 1e6)
        rows.append(row)
    return rows


def make_inputs(lb: Any, tokens: int, hidden: int, topk: int, experts: int, seed: int) -> Dict[str, Any]:
    """Per virtual rank: bf16 ``x`` and uniform top-k routing, on the device; their layouts, and
    the payload bytes a dispatch delivers (received rows x hidden x 2, all ranks)."""
    import torch
    dev = lb.device.torch_device
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(dev) for _ in range(lb.num_ranks)]
    idxs = [torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices.to(dev) for _ in range(lb.num_ranks)]
    layouts = lb.run(lambda r, b: b.get_dispatch_layout(idxs[r], experts))
    recv_rows = sum(int(lay[0].sum()) for lay in layouts)
    return {"xs": xs, "idxs": idxs, "layouts": layouts, "experts": experts, "recv_rows": recv_rows,
            "payload_bytes": recv_rows * hidden * 2}


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The whole benchmark; None (after saying why) where the device is missing."""
    import torch

    from dispatch.cuda.device import gpu_present, load_module, make_device
    kind = args.device
    if kind == "cuda" and not gpu_present():
        print("gpu_loopback: no CUDA GPU here; nothing to measure (--device simt checks the logic on the CPU)")
        return None
    if load_module(kind) is None:
        print(f"gpu_loopback: dispatch._{kind} is not built (pip install --no-build-isolation -e .)")
        return None
    from dispatch.testing import Loopback
    device = make_device(kind)
    name = torch.cuda.get_device_properties(0).name if kind == "cuda" else "SIMT runtime (CPU)"
    device_sms = device.sm_count()
    L = args.ranks
    limit = all_sms(device_sms, L, device.mod.MAX_CHANNELS)
    if args.max_sms:
        limit = min(limit, args.max_sms)
    num_sms_list = sms_sweep(limit)
    config = {"device": kind, "device_name": name, "device_sms": device_sms, "ranks": L, "tokens": args.tokens,
              "hidden": args.hidden, "topk": args.topk, "experts": args.experts, "dtype": "bf16",
              "iters": args.iters, "warmup": args.warmup, "num_sms": num_sms_list, "seed": args.seed,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(f"device: {name}, {device_sms} SMs; loopback of {L} virtual ranks; num_sms {num_sms_list}")

    layout_case = dict(LAYOUT_CASE, tokens=args.layout_tokens)
    layout = measure_layout(device, layout_case, args.layout_iters, args.seed)
    print(f"layout T={layout['tokens']} k={layout['topk']} E={layout['experts']} R={layout['ranks']}: "
          f"{layout['median_us']:.1f} us median, {layout['min_us']:.1f} us min (kernel alone; goal < "
          f"{LAYOUT_GOAL_US:g} us); matches reference: {layout['matches_reference']}")

    with Loopback(L, num_nvl_bytes=args.nvl_bytes, timeout_s=60.0, device=kind) as lb:
        inputs = make_inputs(lb, args.tokens, args.hidden, args.topk, args.experts, args.seed)
        copy = measure_copy(device, inputs["payload_bytes"], max(3, args.iters))
        print(f"L={L} T={args.tokens} H={args.hidden} k={args.topk} E={args.experts}: {inputs['recv_rows']} received "
              f"rows, {inputs['payload_bytes'] / 1e9:.3f} GB per dispatch; device copy of those bytes: "
              f"{copy['gbps']:.1f} GB/s")
        rows = measure_sweep(lb, inputs, num_sms_list, args.iters, args.warmup, args.profile)
    return {"config": config, "layout": layout, "copy": copy, "recv_rows": inputs["recv_rows"],
            "payload_bytes": inputs["payload_bytes"], "rows": rows}


# ----------------------------------------------------------------------------- report

def format_report(res: Dict[str, Any]) -> str:
    copy = res["copy"]["gbps"]
    head = (f"{'num_sms':>7} {'SMs (L x)':>9} | {'dispatch us':>11} {'GB/s':>8} {'GB/s/SM':>8} {'of copy':>7} | "
            f"{'combine us':>10} {'GB/s':>8} {'GB/s/SM':>8} {'of copy':>7}")
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        d, c = r["dispatch"], r["combine"]
        lines.append(f"{r['num_sms']:>7} {r['sms_all_ranks']:>9} | {d['median_us']:>11.1f} {d['gbps']:>8.2f} "
                     f"{d['gbps_per_sm']:>8.3f} {d['gbps'] / copy if copy else 0:>7.1%} | {c['median_us']:>10.1f} "
                     f"{c['gbps']:>8.2f} {c['gbps_per_sm']:>8.3f} {c['gbps'] / copy if copy else 0:>7.1%}")
    lines.append(f"(device-to-device copy of the same {res['payload_bytes'] / 1e6:.2f} MB: {copy:.1f} GB/s; times are "
                 "the wall time of one call of all virtual ranks, host launches and the count wait included)")
    lay = res["layout"]
    lines.append(f"layout kernel (T={lay['tokens']}, k={lay['topk']}, E={lay['experts']}, R={lay['ranks']}): "
                 f"{lay['median_us']:.1f} us median (goal < {lay['goal_us']:g} us), reference match: "
                 f"{lay['matches_reference']}")
    for r in res["rows"]:
        if "profile" in r:
            lines += ["", f"profile at num_sms={r['num_sms']} (one dispatch + combine of every rank):",
                      r["profile"]["table"]]
    if res["config"]["device"] != "cuda":
        lines += ["", "note: SIMT runtime on the CPU: a check of the benchmark's logic, not a measurement of a GPU"]
    return "\n".join(lines)


def plot_report(res: Dict[str, Any], path: str) -> str:
    """GB/s (with the copy's line) and GB/s per SM against num_sms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    xs = [r["num_sms"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for op, style in (("dispatch", "o-"), ("combine", "s-")):
        a1.plot(xs, [r[op]["gbps"] for r in rows], style, label=op)
        a2.plot(xs, [r[op]["gbps_per_sm"] for r in rows], style, label=op)
    a1.axhline(res["copy"]["gbps"], color="gray", linestyle="--", label="device copy, same bytes")
    a1.set_ylabel("delivered GB/s (all virtual ranks)")
    a2.set_ylabel("GB/s per SM")
    for a in (a1, a2):
        a.set_xscale("log", base=2)  # 2 ... all SMs
        a.set_xticks(xs, [str(x) for x in xs])
        a.set_xlabel("num_sms per rank")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    c = res["config"]
    fig.suptitle(f"{c['device_name']}: loopback of {c['ranks']} ranks, T={c['tokens']}, H={c['hidden']}, "
                 f"top-{c['topk']}/{c['experts']}, bf16", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_loopback", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "simt"))
    ap.add_argument("--ranks", type=int, default=4, help="virtual ranks L of the loopback")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-sms", type=int, default=0, help="cap on num_sms (0: all SMs, SMs // ranks)")
    ap.add_argument("--nvl-bytes", type=int, default=256 << 20, help="staging per virtual rank")
    ap.add_argument("--layout-tokens", type=int, default=LAYOUT_CASE["tokens"])
    ap.add_argument("--layout-iters", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="profile one call per num_sms (SMs per kernel)")
    ap.add_argument("--timeline", default=None, help="PNG timeline of the last profiled call (with --profile)")
    ap.add_argument("--json", default="gpu_loopback.json")
    ap.add_argument("--plot", default="gpu_loopback.png")
    args = ap.parse_args(argv)
    for name in ("ranks", "tokens", "hidden", "topk", "experts", "iters", "layout_tokens", "layout_iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_sms and args.max_sms < 2:
        ap.error("--max-sms must be >= 2 (or 0: all SMs)")
    if args.timeline and not args.profile:
        ap.error("--timeline needs --profile")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    res = run(args)
    if res is None:
        return 0
    print(format_report(res))
    if args.plot:
        print(f"plot: {plot_report(res, args.plot)}")
    if args.timeline:
        from dispatch.profile import Profiler, Record
        p = Profiler()
        p.add(Record(**r) for r in res["rows"][-1]["profile"]["records"])
        p.timeline(args.timeline, title=f"dispatch + combine, num_sms={res['rows'][-1]['num_sms']}")
        print(f"timeline: {args.timeline}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

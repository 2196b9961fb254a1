"""Two-hop benchmark of the CUDA backend: N nodes x L virtual ranks on one GPU through the
loopback rail (``dispatch/cuda/rail_loopback.py``) with the rail capped, per-hop GB/s.

  python -m bench.gpu_two_hop --nodes 2 --ranks-per-node 4 --rail-gbps 50
  python -m bench.gpu_two_hop --device simt --tokens 32 --hidden 64 --iters 2   # smoke run, no GPU

Per configuration, wall time per call (slowest virtual rank, median over iterations) of:
  * the pipelined dispatch (rail capped);
  * the rail hop alone: the same dispatch's rail chunks through the same capped loopback rail,
    no kernels (bytes = the rail bytes of the traffic counters);
  * the NVLink hop alone: the same dispatch with the rail uncapped (its copies then take the
    copy engine's time only, the forwarders and receivers dominate);
and ratio = pipelined / max(rail alone, NVLink alone) (target: at most 1.15). Then combine the
same way. GB/s = bytes summed over the virtual ranks / time. Exits cleanly without a GPU (unless
--device simt). Records nothing by itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

# before CUDA starts: see dispatch/testing.py (eager kernel loading, one hardware queue per stream)
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")


def _timed_calls(lb: Any, fn: Callable[[int, Any], Any], iters: int) -> float:
    """Median over ``iters`` of the slowest virtual rank's wall time of ``fn`` (seconds)."""
    walls: List[float] = []
    for _ in range(iters):
        def body(rank: int, buf: Any) -> float:
            start = time.perf_counter()
            fn(rank, buf)
            lb.device.synchronize() if lb.device.kind == "cuda" else None
            return time.perf_counter() - start
        walls.append(max(lb.run(body)))
    return statistics.median(walls)


def _rail_alone(lb: Any, node_counts: List[List[int]], record_bytes: int,
                chunk_records: int, iters: int) -> float:
    """The dispatch's rail chunks alone through each rank's loopback rail (same sizes, same cap)."""
    import torch


    def body(rank: int, buf: Any) -> None:
        backend = buf._backend
        topo = backend.topo
        dev = backend.tensor_device
        sends, recvs, keep = [], [], []
        arrival = torch.zeros(topo.num_nodes, dtype=torch.int64, device=dev)
        for m in range(topo.num_nodes):
            if m == topo.node:
                continue
            out_records = node_counts[rank][m]
            in_records = node_counts[topo.rail_peer(m)][topo.node]
            src = torch.empty(max(out_records * record_bytes, 16), dtype=torch.uint8, device=dev)
            dst = torch.empty(max(in_records * record_bytes, 16), dtype=torch.uint8, device=dev)
            keep += [src, dst]
            sends += backend._chunks(m, src.data_ptr(), out_records, record_bytes, chunk_records)
            recvs += backend._chunks(m, dst.data_ptr(), in_records, record_bytes, chunk_records, arrival.data_ptr())
        backend.rail.post(sends, recvs, backend.device.handle(backend.rail_stream))
        backend.rail_stream.synchronize()
        backend.comm.barrier()  # every peer's copies into my regions are done before they are freed

    return _timed_calls(lb, body, iters)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--rail-gbps", type=float, default=50.0, help="loopback rail cap per link, GB/s")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="records per rail chunk")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=["cuda", "simt"])
    args = parser.parse_args(argv)

    import torch
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_two_hop: no CUDA GPU here; nothing to measure")
            return 0
        try:
            from dispatch import _cuda  # noqa: F401
        except ImportError:
            print("gpu_two_hop: dispatch._cuda is not built (nvcc needed)")
            return 0
    from dispatch import Config
    from dispatch.testing import Loopback

    N, L = args.nodes, args.ranks_per_node
    R = N * L
    dev = torch.device("cuda") if args.device == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(args.tokens, args.hidden, generator=g).to(torch.bfloat16).to(dev) for _ in range(R)]
    idxs = [torch.rand(args.tokens, args.experts, generator=g).topk(args.topk, dim=1).indices.to(dev) for _ in range(R)]
    config = Config(num_sms=2, chunk_tokens=args.chunk_tokens)
    print(f"two-hop loopback: {N} nodes x {L} ranks on {args.device}, T={args.tokens} H={args.hidden} "
          f"k={args.topk} E={args.experts}, rail cap {args.rail_gbps:g} GB/s per link, chunks of {args.chunk_tokens}")
    results: Dict[str, Dict[str, float]] = {}
    for capped in (True, False):
        cap = args.rail_gbps * 1e9 if capped else 0.0
        with Loopback(R, device=args.device, num_ranks_per_node=L, rail_bandwidth_bytes_per_s=cap,
                      num_nvl_bytes=256 << 20, timeout_s=120.0) as lb:
            handles: List[Any] = [None] * R
            recvs: List[Any] = [None] * R
            stats: List[Any] = [None] * R

            def dispatch(rank: int, buf: Any) -> None:
                recv, _, _, _, handles[rank], _ = buf.dispatch(xs[rank], topk_idx=idxs[rank],
                                                                  num_experts=args.experts, config=config)
                recvs[rank] = recv

            def combine(rank: int, buf: Any) -> None:
                buf.combine(recvs[rank], handles[rank], config=config)

            lb.run(dispatch)  # warm-up, and the handles
            stats = lb.run(lambda r, b: b.get_traffic_stats())
            key = "capped" if capped else "uncapped"
            results[key] = {"dispatch_s": _timed_calls(lb, dispatch, args.iters),
                            "combine_s": _timed_calls(lb, combine, args.iters)}
            results[key]["rail_bytes"] = sum(s["rail_bytes"] for s in stats)
            results[key]["node_bytes"] = sum(s["node_bytes"] for s in stats)
            if capped:
                nc = handles[0].node_counts.tolist()
                rb = stats[0]["rail_bytes_per_token"]
                results[key]["rail_alone_s"] = _rail_alone(lb, nc, rb, args.chunk_tokens, args.iters)
    cap, unc = results["capped"], results["uncapped"]
    gb = 1e9
    pipelined, rail_s, node_s = cap["dispatch_s"], cap["rail_alone_s"], unc["dispatch_s"]
    print(f"dispatch pipelined: {pipelined * 1e3:.3f} ms  rail {cap['rail_bytes'] / pipelined / gb:.4g} GB/s  "
          f"node {cap['node_bytes'] / pipelined / gb:.4g} GB/s")
    print(f"rail hop alone:     {rail_s * 1e3:.3f} ms  {cap['rail_bytes'] / rail_s / gb:.4g} GB/s")
    print(f"NVLink hop alone:   {node_s * 1e3:.3f} ms  {unc['node_bytes'] / node_s / gb:.4g} GB/s (rail uncapped)")
    print(f"ratio pipelined / slower hop: {pipelined / max(rail_s, node_s):.3f} (target <= 1.15)")
    print(f"combine: capped {cap['combine_s'] * 1e3:.3f} ms, uncapped {unc['combine_s'] * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

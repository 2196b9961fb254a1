"""GPU benchmarks of the CUDA backend on one GPU (loopback of L virtual ranks of one node).

  python -m bench.gpu_loopback                 # layout kernel + dispatch/combine num_sms sweep
  python -m bench.gpu_loopback --ranks 8 --tokens 4096 --hidden 7168

Reports, per num_sms = 2, 4, ... : dispatch and combine GB/s (bytes every rank receives/sends,
summed over the virtual ranks, over wall time) and GB/s per SM (divided by L * num_sms, as all
virtual ranks share one GPU); and the layout kernel time for T=4096, k=8, E=256, R=64 (target:
under 20 us). Exits cleanly with a message when there is no GPU. Records nothing by itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# before CUDA starts: see dispatch/testing.py (eager kernel loading, one hardware queue per stream)
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-sms", type=int, default=0, help="largest num_sms (default: SMs / ranks, even)")
    args = parser.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("gpu_loopback: no CUDA GPU here; nothing to measure")
        return 0
    try:
        from dispatch import _cuda  # noqa: F401
    except ImportError:
        print("gpu_loopback: dispatch._cuda is not built (pip install --no-build-isolation -e . with nvcc)")
        return 0
    from dispatch import Config
    from dispatch.testing import Loopback

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs")

    # --- layout kernel: T=4096, k=8, E=256, R=64 ------------------------------------------------
    with Loopback(1, num_nvl_bytes=4 << 20) as lb:
        buf = lb.buffers[0]
        buf.topology = type(buf.topology)(64, 8, 0)
        idx = torch.rand(4096, 256, device="cuda").topk(8, dim=1).indices
        for _ in range(5):
            buf.get_dispatch_layout(idx, 256)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 100
        start.record(buf._backend.stream)
        for _ in range(n):
            buf.get_dispatch_layout(idx, 256)
        end.record(buf._backend.stream)
        torch.cuda.synchronize()
        print(f"layout T=4096 k=8 E=256 R=64: {start.elapsed_time(end) / n * 1000:.1f} us per call "
              f"(includes output allocation and zeroing; target < 20 us)")

    # --- dispatch / combine sweep ---------------------------------------------------------------
    L, T, H, k, E = args.ranks, args.tokens, args.hidden, args.topk, args.experts
    max_sms = args.max_sms or max(2, (props.multi_processor_count // L) // 2 * 2)
    max_sms = min(max_sms, 2 * _cuda.MAX_CHANNELS)  # num_sms / 2 channels, at most MAX_CHANNELS
    xs = [torch.randn(T, H, device="cuda").to(torch.bfloat16) for _ in range(L)]
    idxs = [torch.rand(T, E, device="cuda").topk(k, dim=1).indices for _ in range(L)]
    with Loopback(L, num_nvl_bytes=256 << 20, timeout_s=30.0) as lb:
        layouts = lb.run(lambda r, b: b.get_dispatch_layout(idxs[r], E))
        recv_rows = sum(int(l[0].sum()) for l in layouts)
        row_bytes = H * 2
        print(f"L={L} T={T} H={H} k={k} E={E}: {recv_rows} received rows in all, {recv_rows * row_bytes / 1e9:.3f} GB")
        num_sms = 2
        while num_sms <= max_sms:
            cfg = Config(num_sms=num_sms)

            def run_dispatch(r, b):
                recv, _, _, _, handle, _ = b.dispatch(xs[r], num_tokens_per_rank=layouts[r][0],
                                                      is_token_in_rank=layouts[r][3],
                                                      num_tokens_per_expert=layouts[r][2], topk_idx=idxs[r],
                                                      num_experts=E, config=cfg)
                return recv, handle

            outs = lb.run(run_dispatch)
            lb.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                outs = lb.run(run_dispatch)
            lb.synchronize()
            t_dispatch = (time.perf_counter() - t0) / args.iters
            t0 = time.perf_counter()
            for _ in range(args.iters):
                lb.run(lambda r, b: b.combine(outs[r][0], outs[r][1], config=cfg))
            lb.synchronize()
            t_combine = (time.perf_counter() - t0) / args.iters
            gb = recv_rows * row_bytes / 1e9
            sms = L * num_sms
            print(f"num_sms={num_sms:3d} (x{L} ranks = {sms} SMs): dispatch {gb / t_dispatch:7.1f} GB/s "
                  f"({gb / t_dispatch / sms:5.2f} GB/s/SM), combine {gb / t_combine:7.1f} GB/s "
                  f"({gb / t_combine / sms:5.2f} GB/s/SM)  [wall time incl. host launch and the count wait]")
            num_sms += 2 if num_sms < 8 else 4
    return 0


if __name__ == "__main__":
    sys.exit(main())

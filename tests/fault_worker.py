"""One rank of a fault scenario, run as a real program (``python tests/fault_worker.py MODE``)
with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set, so that what happens at
interpreter exit is part of the test (tests/cluster.py workers leave through ``os._exit``).

Modes:
    sleep-destroy / sleep-keep: on a 2x2 cluster rank 3 sleeps instead of making the second
        dispatch; the others catch the ``PeerTimeoutError`` (printing ``BLAMED <rank>``),
        destroy the buffer (``-keep``: leave it to the exit hook), stay ``STAY_S`` and exit 0.
    kill-1 / kill-3: on a 2x2 cluster that rank SIGKILLs itself in the middle of a stream of
        dispatches and combines; the others print ``BLAMED <rank>`` for the error they get and
        exit at once, as a real job would (so some survivors see a messenger leave too).
    uneven-agents: ``LOCAL_WORLD_SIZE`` is 3 on ranks 0-2 and 1 on rank 3 (two torchrun agents
        of 3 + 1 processes); ``Buffer()`` must raise ``ValueError`` on every rank (printing
        ``VALUEERROR <seconds> <message>``).
    group-first: on a 2x2 cluster, after a dispatch, the program destroys the process groups
        while its Buffer is alive (its rail has the abort channel's receives posted) and exits,
        printing ``DONE <seconds>``; the exit hook must still close the rail cleanly.

torch 2.13 itself aborts now and then when a process exits right after a gloo collective: its
gloo worker thread frees the finished all-gather (``AsyncAllgatherWork``'s tensors), which takes
the GIL while the interpreter finalizes ("terminate called without an active exception", thread
``pt_gloo_runloop``, seen in gdb; 14 of 256 exits of a bare 4-rank all-gather program here,
2026-12-04). ``uneven-agents`` exits right after the constructor's all-gather, so it waits a
moment first; that abort would otherwise read as a fault of ours.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dispatch  # noqa: E402

STAY_S = 1.0
TORCH_EXIT_PAUSE_S = 0.5  # see the module docstring
TIMEOUT_S = 2.0


def _inputs(rank: int, num_experts: int):
    g = torch.Generator().manual_seed(rank)
    topk_idx = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(16)])
    return torch.randn(16, 32, generator=g), topk_idx


def sleep_instead_of_dispatch(rank: int, destroy: bool) -> None:
    buf = dispatch.Buffer(dist.group.WORLD, num_ranks_per_node=2, timeout_s=TIMEOUT_S)
    x, topk_idx = _inputs(rank, 8)
    buf.dispatch(x, topk_idx=topk_idx, num_experts=8)
    if rank == 3:
        time.sleep(2 * TIMEOUT_S)
        buf.destroy()
        return
    try:
        buf.dispatch(x, topk_idx=topk_idx, num_experts=8)
        print("NO-ERROR", flush=True)
    except dispatch.PeerTimeoutError as error:
        print(f"BLAMED {error.rank}", flush=True)
    if destroy:
        buf.destroy()
    time.sleep(STAY_S)


def kill_mid_stream(rank: int, victim: int) -> None:
    buf = dispatch.Buffer(dist.group.WORLD, num_ranks_per_node=2, timeout_s=4 * TIMEOUT_S)
    g = torch.Generator().manual_seed(rank)
    topk_idx = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(2048)])
    x = torch.randn(2048, 512, generator=g)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, num_experts=8)
    dist.barrier()
    if rank == victim:  # from another thread: the kill lands anywhere, mostly while data moves
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
    try:
        for _ in range(1000):
            recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, num_experts=8)
            buf.combine(recv_x, handle)
        print("NO-ERROR", flush=True)
    except dispatch.PeerTimeoutError as error:
        print(f"BLAMED {error.rank} {error}", flush=True)
    buf.destroy()


def uneven_agents(rank: int) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = "3" if rank < 3 else "1"
    start = time.monotonic()
    try:
        dispatch.Buffer(dist.group.WORLD, timeout_s=30.0)
        print("NO-ERROR", flush=True)
    except ValueError as error:
        print(f"VALUEERROR {time.monotonic() - start:.2f} {error}", flush=True)
    time.sleep(TORCH_EXIT_PAUSE_S)


def destroy_group_first(rank: int) -> None:
    buf = dispatch.Buffer(dist.group.WORLD, num_ranks_per_node=2, timeout_s=TIMEOUT_S)
    x, topk_idx = _inputs(rank, 8)
    buf.dispatch(x, topk_idx=topk_idx, num_experts=8)
    start = time.monotonic()
    dist.destroy_process_group()
    print(f"DONE {time.monotonic() - start:.2f}", flush=True)


def main() -> None:
    mode = sys.argv[1]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if mode in ("sleep-destroy", "sleep-keep"):
        sleep_instead_of_dispatch(rank, mode == "sleep-destroy")
    elif mode.startswith("kill-"):
        kill_mid_stream(rank, int(mode.split("-")[1]))
    elif mode == "uneven-agents":
        uneven_agents(rank)
    elif mode == "group-first":
        destroy_group_first(rank)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()

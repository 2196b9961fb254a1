"""One rank on an emulated host of tests/test_netns.py (its own network namespace, host name and
/dev/shm). ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` come from the test; there is no
``LOCAL_WORLD_SIZE``, so ``Buffer`` groups the ranks by host name.

Prints ``R<rank> NODES <num_ranks_per_node>``, then ``R<rank> EXACT <rounds>`` after bit-exact
dispatch + combine rounds (and, with ``READY_DIR``, creates the file ``R<rank>`` there); with
``KEEP_GOING`` it goes on calling until an error and prints
``R<rank> BLAMED <rank> <seconds since the last good call> <message>``, then ``R<rank> EXITING``
once ``destroy()`` returned.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dispatch  # noqa: E402

TIMEOUT_S = 10.0


def say(line: str) -> None:
    """One write per line: the host's ranks share a pipe, and print() may split a line."""
    os.write(1, (line + "\n").encode())


def main() -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    buf = dispatch.Buffer(dist.group.WORLD, timeout_s=TIMEOUT_S)
    say(f"R{rank} NODES {buf.topology.num_ranks_per_node}")
    R, E, T, H = dist.get_world_size(), 16, 256, 64
    g = torch.Generator().manual_seed(rank)
    topk_idx = torch.stack([torch.randperm(E, generator=g)[:4] for _ in range(T)])
    # Small integers: every sum is exact, so combine(dispatch(x)) must equal x * copies exactly.
    x = torch.randint(-8, 8, (T, H), generator=g).to(torch.float32)
    copies = buf.get_dispatch_layout(topk_idx, E)[3].sum(dim=1).to(torch.float32)
    expected = x * copies[:, None]
    rounds = int(os.environ.get("ROUNDS", "3"))
    last_good = time.monotonic()
    try:
        i = 0
        while i < rounds or os.environ.get("KEEP_GOING"):
            recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, num_experts=E)
            combined, _, _ = buf.combine(recv_x, handle)
            if not torch.equal(combined, expected):
                say(f"R{rank} MISMATCH")
                break
            last_good = time.monotonic()
            i += 1
            if i == rounds:
                say(f"R{rank} EXACT {i}")
                if os.environ.get("READY_DIR"):  # the test cuts the link once every rank is here
                    open(os.path.join(os.environ["READY_DIR"], f"R{rank}"), "w").close()
    except dispatch.PeerTimeoutError as error:
        say(f"R{rank} BLAMED {error.rank} {time.monotonic() - last_good:.1f} {error}")
    buf.destroy()
    say(f"R{rank} EXITING")


if __name__ == "__main__":
    main()

"""The backend follows the tensors' device, not the group's backend: a gloo group gets the CUDA
backend for ``device="cuda"`` (the default with a GPU) or ``"simt"``, the group then serving only
the set-up exchange (IPC handles, staging sizes). Runs in a fresh process (one-rank gloo world)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.dispatch_utils import cuda_device_params

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from dispatch import Buffer, Config
    from dispatch.reference import reference_combine, reference_dispatch

    device, store = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    kind = None if device == "cuda" else device  # None: CUDA when torch sees a GPU
    tensors_on = torch.device("cuda") if device == "cuda" else torch.device("cpu")
    buf = Buffer(dist.group.WORLD, 8 << 20, device=kind)
    assert type(buf._backend).__name__ == "CudaBackend", type(buf._backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g)
    idx = torch.randint(-1, 8, (37, 2), generator=g)
    w = torch.rand(37, 2, generator=g)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x.to(tensors_on), topk_idx=idx.to(tensors_on), topk_weights=w.to(tensors_on), num_experts=8,
        config=Config(num_sms=2))
    ref = reference_dispatch([x], [idx], [w], 8, 1, 0)
    assert torch.equal(recv_x.cpu(), ref["recv_x"]) and counts == ref["num_recv_tokens_per_expert_list"]
    out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=Config(num_sms=2))
    want, want_w = reference_combine([recv_x.cpu()], [recv_w.cpu()], [handle.recv_src_rank.cpu().long()],
                                     [handle.recv_src_token.cpu().long()], 1, 0, 37)
    assert torch.equal(out.cpu(), want) and torch.equal(out_w.cpu(), want_w)
    try:  # a tensor the kernels cannot read: a TypeError naming the argument
        buf.dispatch(torch.empty(4, 64, device="meta"), topk_idx=idx[:4].to(tensors_on), num_experts=8,
                     config=Config(num_sms=2))
        raise AssertionError("a meta tensor was accepted")
    except TypeError as exc:
        assert str(exc).startswith("x must be on the buffer's device"), exc
    buf.destroy()
    if not torch.cuda.is_available():
        cpu = Buffer(dist.group.WORLD)  # the default without a GPU: the CPU backend
        assert type(cpu._backend).__name__ == "HostBackend"
        cpu.destroy()
    dist.destroy_process_group()
    print("ok")
""")


@pytest.mark.parametrize("device", cuda_device_params())
def test_gloo_group_gets_the_device_backend(device, tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, device, str(tmp_path / "store")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr

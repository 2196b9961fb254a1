"""NaN payloads: combine writes the positive quiet NaN of 16-bit types (bf16 0x7fc0, fp16 0x7e00)
whatever NaN went in, and so does dispatch.reference (torch's own casts disagree with each
other: its vectorised bf16 cast gives 0xffff, its scalar one 0x7fc0). Dispatch copies bits."""

from __future__ import annotations

import pytest
import torch

from dispatch.reference import CANONICAL_NAN_BITS, cast_canonical_nan, reference_combine
from tests.dispatch_utils import gen, make_routing

DTYPES = [torch.bfloat16, torch.float16]
# NaNs of every sign and payload: float32 bit patterns
NAN_BITS_F32 = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF]


def _nans_f32() -> torch.Tensor:
    return torch.tensor(NAN_BITS_F32, dtype=torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_writes_canonical_nan(dtype):
    acc = torch.randn(3, 1024)  # long rows: torch takes its vectorised cast path
    acc[1, ::7] = _nans_f32().repeat(1024)[: acc[1, ::7].numel()]
    out = cast_canonical_nan(acc, dtype)
    bits = out.view(torch.int16).to(torch.int64) & 0xFFFF
    assert (bits[acc.isnan()] == CANONICAL_NAN_BITS[dtype]).all()
    assert torch.equal(out[~acc.isnan()], acc[~acc.isnan()].to(dtype))
    # and through reference_combine (one rank holding one copy of each token)
    x = acc.to(dtype)
    src = torch.zeros(3, dtype=torch.int64)
    combined, _ = reference_combine([x], None, [src], [torch.arange(3)], 1, 0, 3)
    cbits = combined.view(torch.int16).to(torch.int64) & 0xFFFF
    assert (cbits[combined.isnan()] == CANONICAL_NAN_BITS[dtype]).all() and combined.isnan().any()


def _job_nan_combine(ctx, dtype):
    import dispatch

    R, L, me = ctx.world_size, ctx.ranks_per_node, ctx.rank
    E, T, H = 2 * R, 24, 256
    g = gen(3, me)
    topk = make_routing(g, T, E, 2, R, L, "random", 0.0)
    x = torch.randn(T, H, generator=g)
    x[::3, ::5] = _nans_f32().repeat(H)[: x[::3, ::5].numel()].view(x[::3, ::5].shape)
    x = x.to(dtype)
    nan_f16 = torch.tensor([0xFFFF, 0xFE01, 0x7C01], dtype=torch.int32).to(torch.int16).view(dtype)
    x[1, :3] = nan_f16  # 16-bit NaNs with sign and payload, as they may arrive from a model
    buf = dispatch.Buffer(ctx.group, num_ranks_per_node=L, timeout_s=20.0)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, num_experts=E)
    combined, _, _ = buf.combine(recv_x, handle)
    rounded, _, _ = buf.combine(recv_x, handle, config=dispatch.Config(round_rail_partials=True))
    buf.destroy()
    sent = topk.ge(0).any(dim=1)
    # the expected: x summed over its copies (1 or 2 ranks), in the reference's canonical form
    expected_nan = x.isnan() & sent[:, None]
    fails = []
    for name, out in (("combine", combined), ("combine rounded", rounded)):
        bits = out.view(torch.int16).to(torch.int64) & 0xFFFF
        if not torch.equal(out.isnan(), expected_nan):
            fails.append(f"rank {me} {name}: NaN positions differ")
        wrong = bits[out.isnan()] != CANONICAL_NAN_BITS[dtype]
        if wrong.any():
            fails.append(f"rank {me} {name}: NaN bits {sorted(set(bits[out.isnan()][wrong].tolist()))[:4]}")
    return fails


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_writes_canonical_nan(cluster_factory, dtype):
    results = cluster_factory(2, 2).run(_job_nan_combine, dtype, timeout_s=120)
    fails = [f for res in results for f in res]
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simt_combine_writes_canonical_nan(dtype):
    """The CUDA kernels (on SIMT) follow the same rule: csrc/common/round16.h is the one place."""
    from dispatch.cuda.device import simt_available
    from tests.dispatch_utils import make_loopback

    assert simt_available(), "dispatch._simt was not built"
    L, E, H = 2, 4, 64
    g = torch.Generator().manual_seed(5)
    xs = []
    for _ in range(L):
        x = torch.randn(6, H, generator=g)
        x[::2, ::3] = _nans_f32().repeat(H)[: x[::2, ::3].numel()].view(x[::2, ::3].shape)
        x = x.to(dtype)
        x[1, :3] = torch.tensor([0xFFFF, 0xFE01, 0x7C01], dtype=torch.int32).to(torch.int16).view(dtype)
        xs.append(x)
    idx = torch.tensor([[0, 2]] * 6)  # every token to both ranks: sums of two copies

    def step(rank, buf):
        recv_x, _, _, _, handle, _ = buf.dispatch(xs[rank], topk_idx=idx, num_experts=E)
        return buf.combine(recv_x, handle)[0]

    with make_loopback("simt", L) as lb:
        outs = lb.run(step)
    for r in range(L):
        bits = outs[r].view(torch.int16).to(torch.int64) & 0xFFFF
        assert outs[r].isnan().any()
        assert (bits[outs[r].isnan()] == CANONICAL_NAN_BITS[dtype]).all()

"""The CUDA backend on the SIMT runtime with seeded random yields: lanes and blocks are switched at
random points (``dispatch._simt.configure(yield_seed=...)``), so ring hand-offs, barriers and the
notify handshake run under interleavings a plain run does not produce; results must not change
(dispatch bit for bit, combine by the fixed-order fp32 rule), and the resident-block cap still
lets the loopback run when it holds every virtual rank's blocks."""

from __future__ import annotations

import pytest
import torch

from dispatch.cuda.device import SimtDevice, simt_available
from dispatch.reference import reference_combine, reference_dispatch
from tests.dispatch_utils import loopback_inputs, make_loopback

pytestmark = pytest.mark.skipif(not simt_available(), reason="dispatch._simt was not built")


@pytest.mark.parametrize("seed,cap", [(1, 0), (2, 12), (3, 0)])
def test_random_yields_change_nothing(seed, cap):
    from dispatch import Config
    L, E, k, H = 3, 12, 3, 48
    xs, idxs, ws = loopback_inputs(L, E, k, H, torch.bfloat16, seed=seed, max_tokens=50)
    cfg = Config(num_sms=4)
    try:
        with make_loopback("simt", L, num_nvl_bytes=(512 << 10) + (16 << 10), max_resident_blocks=cap) as lb:
            SimtDevice.configure(max_resident_blocks=cap, yield_seed=seed)

            def step(r, buf):
                recv_x, _, recv_w, _, handle, _ = buf.dispatch(xs[r], topk_idx=idxs[r], topk_weights=ws[r],
                                                               num_experts=E, config=cfg)
                again = buf.dispatch(xs[r], handle=handle, config=cfg)[0]
                y = (recv_x.float() * 0.5).to(torch.bfloat16)
                out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w, config=cfg)
                return recv_x, again, y, recv_w, handle.recv_src_rank.long(), handle.recv_src_token.long(), out, out_w
            res = lb.run(step)
    finally:
        SimtDevice.configure()  # back to the defaults: no cap, no random yields
    for d in range(L):
        ref = reference_dispatch(xs, idxs, ws, E, L, d)
        assert torch.equal(res[d][0], ref["recv_x"]) and torch.equal(res[d][1], ref["recv_x"])
    for s in range(L):
        out, out_w = reference_combine([res[d][2] for d in range(L)], [res[d][3] for d in range(L)],
                                       [res[d][4] for d in range(L)], [res[d][5] for d in range(L)], L, s,
                                       xs[s].shape[0])
        assert torch.equal(res[s][6], out) and torch.equal(res[s][7], out_w)

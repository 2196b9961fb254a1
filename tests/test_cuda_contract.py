"""The CUDA backend's contract (issue #10, item 6), on the SIMT device (and a GPU where present):
a bad argument on any rank raises on every rank before data moves and leaves the buffer usable;
num_worst_tokens too small raises on every rank; a stalled peer fails the call it stalls in;
destroy waits for the node; the loopback refuses what cannot be resident; num_sms limits."""

from __future__ import annotations

import time

import pytest
import torch

from dispatch.reference import reference_dispatch
from tests.dispatch_utils import cuda_device_params as device_params
from tests.dispatch_utils import loopback_inputs as inputs
from tests.dispatch_utils import make_loopback as loopback
from tests.dispatch_utils import to_device

DEVICES = device_params()
L, E, K, H = 2, 8, 2, 32


def _bad_cases(device):
    """(name, argument named, error type, call(rank, buf, x, idx, w, bad)) - ``bad`` is True on
    the rank that passes the bad argument."""
    from dispatch import Config

    def dispatch(buf, x, idx, **kw):
        return buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=2), **kw)

    def out_of_range(idx):
        idx = idx.clone()
        idx[0, 0] = E
        return idx

    def on_other_device(t):
        # a tensor where this buffer's kernels cannot read it: CPU on a GPU buffer; on SIMT
        # (CPU tensors) the meta device stands for "not host memory"
        return t.cpu() if device == "cuda" else torch.empty_like(t, device="meta")

    return [
        ("x dtype", "x", TypeError, lambda buf, x, idx, w, bad: dispatch(buf, x.to(torch.int32) if bad else x, idx)),
        ("x 1-D", "x", ValueError, lambda buf, x, idx, w, bad: dispatch(buf, x[:, 0] if bad else x, idx)),
        ("topk_idx >= E", "topk_idx", ValueError,
         lambda buf, x, idx, w, bad: dispatch(buf, x, out_of_range(idx) if bad else idx)),
        ("topk_weights shape", "topk_weights", ValueError,
         lambda buf, x, idx, w, bad: dispatch(buf, x, idx, topk_weights=w[:, :1] if bad else w)),
        ("x on another device", "x", TypeError,
         lambda buf, x, idx, w, bad: dispatch(buf, on_other_device(x) if bad else x, idx)),
        ("num_sms odd", "num_sms", ValueError,
         lambda buf, x, idx, w, bad: buf.dispatch(x, topk_idx=idx, num_experts=E,
                                                  config=Config(num_sms=3 if bad else 2))),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_argument_raises_on_every_rank_and_buffer_stays_usable(device):
    from dispatch import Config
    xs, idxs, ws = inputs(L, E, K, H, torch.float32, seed=3, tokens=[12, 9])
    cases = _bad_cases(device)
    with loopback(device, L, timeout_s=5.0) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            seen = []
            for name, argument, kind, call in cases:
                bad = r == 1  # the last rank is the bad one: rank 0 must still raise
                with pytest.raises(kind) as info:
                    call(buf, x, idx, w, bad)
                seen.append((name, type(info.value), str(info.value)))
            # combine rows not matching the handle, bad on rank 0 this time
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                           config=Config(num_sms=2))
            one_row_too_many = torch.cat([recv_x, recv_x.new_zeros((1, recv_x.shape[1]))])
            with pytest.raises(ValueError) as info:
                buf.combine(one_row_too_many if r == 0 else recv_x, handle, config=Config(num_sms=2))
            seen.append(("combine rows", type(info.value), str(info.value)))
            # afterwards the buffer works: a full dispatch and combine
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                           config=Config(num_sms=2))
            out, _, _ = buf.combine(recv_x, handle, config=Config(num_sms=2))
            return seen, recv_x.cpu()
        res = lb.run(step)
    for i, (name, argument, kind, _) in enumerate(cases):
        peer_name, peer_kind, peer_message = res[0][0][i]
        assert peer_kind is kind, name
        assert "rank 1" in peer_message and argument in peer_message, (name, peer_message)
        own_message = res[1][0][i][2]
        assert argument in own_message, (name, own_message)
    combine_peer = res[1][0][-1][2]
    assert "rank 0" in combine_peer and "'x'" in combine_peer
    for d in range(L):
        assert torch.equal(res[d][1], reference_dispatch(xs, idxs, ws, E, L, d)["recv_x"])


@pytest.mark.parametrize("device", DEVICES)
def test_facts_differing_across_ranks_raise_on_every_rank(device):
    """hidden size, num_sms (channels) and topk width must agree across ranks: each mismatch is a
    ValueError naming it on every rank, in the call where it happens; the buffer stays usable."""
    from dispatch import Config
    xs, idxs, ws = inputs(L, E, K, H, torch.float32, seed=4, tokens=[10, 7])
    with loopback(device, L, timeout_s=5.0) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            cfg = Config(num_sms=2)
            messages = []
            # a good call first: the facts are agreed, later calls differ from them on one rank
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, config=cfg)
            calls = [
                lambda: buf.dispatch(torch.cat([x, x[:, :8]], dim=1) if r == 1 else x, topk_idx=idx, num_experts=E,
                                     config=cfg),
                lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=4) if r == 0 else cfg),
                lambda: buf.combine(recv_x, handle, topk_weights=recv_w if r == 0 else None, config=cfg),
            ]
            for call in calls:
                with pytest.raises(ValueError) as info:
                    call()
                messages.append(str(info.value))
            out = buf.dispatch(x, topk_idx=idx, num_experts=E, config=cfg)[0]
            return messages, out.cpu()
        res = lb.run(step)
    for d in range(L):
        hidden, sms, width = res[d][0]
        assert "hidden size" in hidden and "num_sms" in sms and "topk width" in width, res[d][0]
        assert torch.equal(res[d][1], reference_dispatch(xs, idxs, None, E, L, d)["recv_x"])


@pytest.mark.parametrize("device", DEVICES)
def test_staging_size_differing_across_ranks_raises_on_every_rank(device):
    from dispatch import Buffer
    from dispatch.testing import LoopbackComm, LoopbackGroup
    with loopback(device, L) as lb:
        comm = LoopbackComm(L)

        def step(r, _):
            with pytest.raises(ValueError) as info:
                Buffer(LoopbackGroup(r, L, comm, lb.device), (4 << 20) + r * (1 << 20))
            return str(info.value)
        res = lb.run(step)
    assert all("num_nvl_bytes" in m and "rank 1" in m for m in res)


@pytest.mark.parametrize("device", DEVICES)
def test_worst_tokens_too_small_raises_on_every_rank(device):
    from dispatch import Config
    xs, idxs, ws = inputs(L, E, K, H, torch.float32, seed=5, tokens=[20, 3])
    with loopback(device, L, timeout_s=5.0) as lb:
        def step(r, buf):
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            with pytest.raises(ValueError) as info:  # rank 0's receive tensors are too small, rank 1's are not
                buf.dispatch(x, topk_idx=idx, num_experts=E, num_worst_tokens=2 if r == 0 else 64,
                             config=Config(num_sms=2))
            # still usable
            recv = buf.dispatch(x, topk_idx=idx, num_experts=E, num_worst_tokens=64, config=Config(num_sms=2))[0]
            return str(info.value), recv.cpu()
        res = lb.run(step)
    assert "rank 0" in res[1][0]
    for d in range(L):
        assert "num_worst_tokens" in res[d][0]
        ref = reference_dispatch(xs, idxs, None, E, L, d)["recv_x"]
        assert torch.equal(res[d][1][:ref.shape[0]], ref)


@pytest.mark.parametrize("device", DEVICES)
def test_stalled_peer_fails_the_combine_it_stalls_in(device):
    from dispatch import Config, PeerTimeoutError
    xs, idxs, ws = inputs(L, E, K, H, torch.float32, seed=9, tokens=[10, 10])
    with loopback(device, L, timeout_s=1.0) as lb:
        def step(r, buf):
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=2))
            if r == 1:
                return None  # rank 1 never joins the combine
            start = time.monotonic()
            with pytest.raises(PeerTimeoutError) as info:
                buf.combine(recv_x, handle, config=Config(num_sms=2))
            return info.value.rank, time.monotonic() - start
        rank, seconds = lb.run(step)[0]
    assert rank == 1 and seconds < 30


@pytest.mark.parametrize("device", DEVICES)
def test_destroy_waits_for_the_node(device):
    with loopback(device, L) as lb:
        def step(r, buf):
            if r == 1:
                time.sleep(0.5)
            start = time.monotonic()
            buf.destroy()
            return time.monotonic() - start
        waited = lb.run(step)
        lb.buffers = [None] * L
    assert waited[0] >= 0.4


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values[0] == "simt"])
def test_loopback_refuses_blocks_that_cannot_be_resident(device):
    from dispatch import Config
    xs, idxs, _ = inputs(L, E, K, H, torch.float32, seed=1, tokens=[6, 6])
    with loopback(device, L, max_resident_blocks=4) as lb:
        def step(r, buf):
            with pytest.raises(ValueError) as info:  # 2 ranks x 4 blocks > 4
                buf.dispatch(xs[r], topk_idx=idxs[r], num_experts=E, config=Config(num_sms=4))
            recv = buf.dispatch(xs[r], topk_idx=idxs[r], num_experts=E, config=Config(num_sms=2))[0]
            return str(info.value), recv
        res = lb.run(step)
    from dispatch.cuda.device import SimtDevice
    SimtDevice.configure(max_resident_blocks=0)
    for d in range(L):
        assert "resident" in res[d][0]
        assert torch.equal(res[d][1], reference_dispatch(xs, idxs, None, E, L, d)["recv_x"])


@pytest.mark.parametrize("device", DEVICES)
def test_num_sms_limits_and_set_num_sms(device):
    """num_sms up to the device's SMs (beyond: a named error); Buffer.set_num_sms reaches the
    CUDA backend (an odd default is rejected there)."""
    from dispatch import Buffer, Config
    xs, idxs, _ = inputs(L, E, K, H, torch.float32, seed=2, tokens=[4, 4])
    with loopback(device, L) as lb:
        sms = lb.device.sm_count()

        def step(r, buf):
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            messages = []
            for cfg in (Config(num_sms=sms + 2), None):
                with pytest.raises(ValueError) as info:
                    buf.dispatch(x, topk_idx=idx, num_experts=E, config=cfg)
                messages.append(str(info.value))
            return messages
        old = Buffer.num_sms
        Buffer.set_num_sms(3)
        try:
            res = lb.run(step)
        finally:
            Buffer.set_num_sms(old)
    for d in range(L):
        assert "num_sms" in res[d][0] and "num_sms" in res[d][1]


@pytest.mark.parametrize("device", DEVICES)
def test_foreign_handle_and_stale_layout_refused_on_every_rank(device):
    """The front's checks (issue #12) serve this backend too: another buffer's handle and a
    layout from another routing raise ValueError on every rank before anything moves, naming
    ``handle`` / the layout argument; the buffer stays usable."""
    from dispatch import Config
    xs, idxs, ws = inputs(L, E, K, H, torch.float32, seed=6, tokens=[11, 8])
    _, other_idxs, _ = inputs(L, E, K, H, torch.float32, seed=7, tokens=[11, 8])
    cfg = Config(num_sms=2)

    def first_dispatch(r, buf):
        x, idx = to_device(xs[r], device), to_device(idxs[r], device)
        return buf.dispatch(x, topk_idx=idx, num_experts=E, config=cfg)

    with loopback(device, L, timeout_s=5.0) as other:
        foreign = other.run(first_dispatch)
    with loopback(device, L, timeout_s=5.0) as lb:
        def step(r, buf):
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            recv_x, _, _, _, handle, _ = first_dispatch(r, buf)
            seen = {}
            calls = {
                "combine": lambda: buf.combine(recv_x, foreign[r][4] if r == 1 else handle, config=cfg),
                "cached dispatch": lambda: buf.dispatch(x, handle=foreign[r][4] if r == 1 else handle, config=cfg),
                "stale layout": lambda: buf.dispatch(
                    x, topk_idx=idx, num_experts=E, config=cfg,
                    is_token_in_rank=buf.get_dispatch_layout(to_device(other_idxs[r], device) if r == 1 else idx,
                                                             E)[3]),
            }
            for name, call in calls.items():
                with pytest.raises(ValueError) as info:
                    call()
                seen[name] = str(info.value)
            out, _, _ = buf.combine(recv_x, handle, config=cfg)
            return seen, recv_x.cpu()
        res = lb.run(step)
    assert "handle" in res[1][0]["combine"] and "another Buffer" in res[1][0]["combine"]
    assert "handle" in res[1][0]["cached dispatch"] and "another Buffer" in res[1][0]["cached dispatch"]
    assert "is_token_in_rank" in res[1][0]["stale layout"] and "topk_idx" in res[1][0]["stale layout"]
    for name in ("combine", "cached dispatch"):
        assert "rank 1" in res[0][0][name] and "handle" in res[0][0][name], res[0][0][name]
    assert "rank 1" in res[0][0]["stale layout"] and "is_token_in_rank" in res[0][0]["stale layout"]
    for d in range(L):
        assert torch.equal(res[d][1], reference_dispatch(xs, idxs, None, E, L, d)["recv_x"])

"""CUDA backend: L virtual ranks of one node (dispatch.testing.Loopback) on a GPU and on the CPU
SIMT runtime (the same kernel source), every result compared with the plain-PyTorch reference
(the contract the CPU backend is tested against): dispatch bit-identical, combine bit-identical
too (same fixed fp32 order)."""

from __future__ import annotations

import threading

import pytest
import torch

from dispatch.reference import reference_combine, reference_dispatch, reference_layout
from tests.dispatch_utils import bit_equal, sync, to_cpu, to_device
from tests.dispatch_utils import cuda_device_params as device_params
from tests.dispatch_utils import loopback_inputs as inputs
from tests.dispatch_utils import make_loopback as loopback

DEVICES = device_params()


@pytest.mark.parametrize("device", DEVICES)
def test_layout_matches_reference(device):
    cases = ((8, 8, 64, 300, 4), (16, 4, 32, 1, 2), (4, 4, 8, 0, 2), (64, 8, 256, 4096, 8))
    with loopback(device, 1) as lb:
        for R, L, E, T, k in cases:
            idx = torch.randint(-1, E, (T, k))
            buf = lb.buffers[0]
            # the layout kernel is rank-local: any R/L works, not only this loopback's node
            buf.topology = type(buf.topology)(R, L, 0)
            buf._backend.topo = buf.topology
            out = lb.run(lambda r, b: tuple(t.cpu() if isinstance(t, torch.Tensor) else t
                                            for t in b.get_dispatch_layout(to_device(idx, device), E)[:4]))[0]
            ref = reference_layout(idx, E, R, L)
            for got, want in zip(out, ref):
                assert (got is None) == (want is None)
                if got is not None:
                    assert torch.equal(got, want)


CASES = [
    # L, E, k, H, dtype, num_sms, nvl_bytes (small: rings wrap many times)
    (1, 8, 2, 64, torch.bfloat16, 2, 0),
    (2, 16, 4, 128, torch.float32, 2, 0),
    (4, 32, 4, 256, torch.bfloat16, 6, 0),
    (4, 32, 8, 96, torch.float16, 4, (512 << 10) + 64 * 1024),
    (8, 64, 8, 512, torch.bfloat16, 8, 0),
    (8, 16, 3, 40, torch.float64, 2, 0),
]


def _case_params():
    out = []
    for case in CASES:
        for dev in DEVICES:
            out.append(pytest.param(dev.values[0], *case, marks=dev.marks))
    return out


@pytest.mark.parametrize("device,L,E,k,H,dtype,num_sms,nvl", _case_params())
def test_dispatch_combine_matches_reference(device, L, E, k, H, dtype, num_sms, nvl):
    from dispatch import Config
    xs, idxs, ws = inputs(L, E, k, H, dtype, seed=L * 100 + H)
    config = Config(num_sms=num_sms)
    kw = {"num_nvl_bytes": nvl} if nvl else {}
    with loopback(device, L, **kw) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
                x, topk_idx=idx, topk_weights=w, num_experts=E, expert_alignment=4, config=config)
            y = (recv_x.to(torch.float32) * 1.5).to(dtype)
            bias = to_device(torch.randn(x.shape[0], H), device).to(dtype)
            out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias, config=config)
            sync(device)
            return dict(recv_x=recv_x.cpu(), recv_idx=recv_idx.cpu(), recv_w=recv_w.cpu(), per_expert=per_expert,
                        src_rank=handle.recv_src_rank.cpu(), src_token=handle.recv_src_token.cpu(), y=y.cpu(),
                        bias=bias.cpu(), out=out.cpu(), out_w=out_w.cpu(), stats=buf.get_traffic_stats())
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, ws, E, L, d, expert_alignment=4)
        got = res[d]
        assert bit_equal(got["recv_x"], ref["recv_x"])
        assert torch.equal(got["recv_idx"], ref["recv_topk_idx"])
        assert torch.equal(got["recv_w"], ref["recv_topk_weights"])
        assert got["per_expert"] == ref["num_recv_tokens_per_expert_list"]
        assert torch.equal(got["src_rank"].long(), ref["recv_src_rank"])
        assert torch.equal(got["src_token"].long(), ref["recv_src_token"])
    for s in range(L):
        out, out_w = reference_combine([res[d]["y"] for d in range(L)], [res[d]["recv_w"] for d in range(L)],
                                       [res[d]["src_rank"].long() for d in range(L)],
                                       [res[d]["src_token"].long() for d in range(L)], L, s, xs[s].shape[0],
                                       bias=res[s]["bias"])
        assert torch.equal(res[s]["out"], out)
        assert torch.equal(res[s]["out_w"], out_w)
        assert res[s]["stats"]["op"] == "combine"


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_and_cached_dispatch(device):
    from dispatch import Config
    L, E, k, H = 4, 16, 4, 300
    xs, idxs, ws = inputs(L, E, k, H, None, seed=7, fp8=True)
    with loopback(device, L) as lb:
        def step(r, buf):
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            recv, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=4))
            again, a, b, c, h2, _ = buf.dispatch(x, handle=handle, config=Config(num_sms=4))
            assert a is None and b is None and c is None and h2 is handle
            return to_cpu(recv), to_cpu(again)
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, None, E, L, d)
        assert bit_equal(res[d][0], ref["recv_x"])
        assert bit_equal(res[d][1], ref["recv_x"])


@pytest.mark.parametrize("device", DEVICES)
def test_worst_tokens_and_async(device):
    """num_worst_tokens pads with zeros / -1; async_finish returns a real event the caller
    waits on (and a later call may start after, previous_event); allocate_on_comm_stream gives
    the same results."""
    from dispatch import Config
    L, E, k, H, W = 4, 16, 4, 64, 160
    xs, idxs, ws = inputs(L, E, k, H, torch.bfloat16, seed=11, tokens=[50, 17, 0, 60])
    with loopback(device, L) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            # an async layout; the dispatch is ordered after its event (previous_event)
            layout = buf.get_dispatch_layout(idx, E, async_finish=True)
            cfg = Config(num_sms=4)
            recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                topk_idx=idx, topk_weights=w, num_worst_tokens=W, config=cfg, previous_event=layout[4])
            out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=cfg)
            a_x, _, _, _, _, event = buf.dispatch(x, topk_idx=idx, num_experts=E, config=cfg, async_finish=True,
                                                  allocate_on_comm_stream=True)
            assert event.event is not None
            event.current_stream_wait()
            return recv_x.cpu(), recv_idx.cpu(), a_x.cpu()
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, ws, E, L, d)
        n = ref["recv_x"].shape[0]
        recv_x, recv_idx, async_x = res[d]
        assert recv_x.shape[0] == W
        assert torch.equal(recv_x[:n], ref["recv_x"]) and not recv_x[n:].any()
        assert torch.equal(recv_idx[:n], ref["recv_topk_idx"]) and (recv_idx[n:] == -1).all()
        assert torch.equal(async_x, ref["recv_x"])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=DEVICES[1].marks)])
def test_worst_tokens_cuda_graph(device):
    """Graph capture (needs a CUDA GPU): a captured worst-token dispatch + combine replays to the
    eager results."""
    from dispatch import Config
    L, E, k, H, W = 4, 16, 4, 128, 1024
    xs, idxs, ws = inputs(L, E, k, H, torch.bfloat16, seed=11, tokens=[100, 37, 0, 150])
    barrier = threading.Barrier(L)
    capture_lock = threading.Lock()
    with loopback(device, L) as lb:
        def step(r, buf):
            x, idx, w = xs[r].cuda(), idxs[r].cuda(), ws[r].cuda()
            layout = buf.get_dispatch_layout(idx, E)
            torch.cuda.current_stream().synchronize()
            cfg = Config(num_sms=4)

            def once():
                recv_x, recv_idx, recv_w, lst, handle, _ = buf.dispatch(
                    x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                    topk_idx=idx, topk_weights=w, num_worst_tokens=W, config=cfg)
                out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=cfg)
                return recv_x, recv_idx, out, out_w
            eager = [t.clone() for t in once()]
            graph = torch.cuda.CUDAGraph()
            barrier.wait()
            with capture_lock:  # capture records only: one rank at a time, thread-local capture mode
                with torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
                    captured = once()
            barrier.wait()
            graph.replay()
            torch.cuda.current_stream().synchronize()
            return [t.cpu() for t in eager], [t.cpu() for t in captured]
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, ws, E, L, d)
        n = ref["recv_x"].shape[0]
        eager, captured = res[d]
        assert eager[0].shape[0] == W
        assert torch.equal(eager[0][:n], ref["recv_x"]) and not eager[0][n:].any()
        for a, b in zip(eager, captured):
            assert torch.equal(a, b)


@pytest.mark.parametrize("worst", [0, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_timeout_names_missing_rank(device, worst):
    """A peer that never joins fails this very call (a full or a worst-token dispatch)."""
    from dispatch import Config, PeerTimeoutError
    L = 2
    with loopback(device, L, timeout_s=1.0) as lb:
        def step(r, buf):
            if r == 1:
                return None  # rank 1 never joins
            x = to_device(torch.randn(10, 64), device)
            idx = to_device(torch.randint(0, 4, (10, 2)), device)
            with pytest.raises(PeerTimeoutError) as info:
                buf.dispatch(x, topk_idx=idx, num_experts=4, num_worst_tokens=worst, config=Config(num_sms=2))
            return info.value.rank, str(info.value)
        rank, message = lb.run(step)[0]
    assert rank == 1 and "rank 1" in message and "barrier" in message


@pytest.mark.parametrize("device,num_sms", [pytest.param(d.values[0], n, marks=d.marks)
                                            for d in DEVICES for n in (2, 4, 10, 20)])
def test_any_even_num_sms(device, num_sms):
    from dispatch import Config
    L, E, k, H = 2, 8, 2, 64
    tokens = [333, 5]
    xs, idxs, ws = inputs(L, E, k, H, torch.float32, seed=num_sms, tokens=tokens)
    with loopback(device, L) as lb:
        res = lb.run(lambda r, b: b.dispatch(to_device(xs[r], device), topk_idx=to_device(idxs[r], device),
                                             num_experts=E, config=Config(num_sms=num_sms))[0].cpu())
    for d in range(L):
        assert torch.equal(res[d], reference_dispatch(xs, idxs, None, E, L, d)["recv_x"])

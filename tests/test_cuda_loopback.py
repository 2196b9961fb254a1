"""CUDA backend on one GPU: L virtual ranks of one node (dispatch.testing.Loopback), every result
compared with the plain-PyTorch reference (the contract the CPU backend is tested against):
dispatch bit-identical, combine bit-identical too (same fixed fp32 order)."""

from __future__ import annotations

import os

# Before CUDA is initialised (see dispatch/testing.py): every kernel loaded up front (a lazy load
# waits for the GPU to drain while another virtual rank's kernel spins) and one hardware queue per
# stream (streams sharing a queue serialise, and the virtual ranks' kernels must run together).
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import pytest  # noqa: E402
import torch  # noqa: E402

from dispatch.reference import reference_combine, reference_dispatch, reference_layout

try:
    from dispatch import _cuda  # noqa: F401
    HAVE_MODULE = True
except ImportError:
    HAVE_MODULE = False

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAVE_MODULE, reason="dispatch._cuda was not built (no nvcc at install time)"),
]


def _loopback(L, **kw):
    from dispatch.testing import Loopback
    return Loopback(L, **kw)


def _inputs(L, E, k, H, dtype, seed, tokens=None, fp8=False):
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(L):
        T = tokens[r] if tokens is not None else int(torch.randint(0, 200, (1,), generator=g))
        scores = torch.rand(T, E, generator=g)
        idx = scores.topk(k, dim=1).indices
        idx[torch.rand(T, k, generator=g) < 0.1] = -1
        if fp8:
            x = (torch.randn(T, H, generator=g) * 4).to(torch.float8_e4m3fn)
            s = torch.rand(T, (H + 127) // 128, generator=g)
            xs.append((x, s))
        else:
            xs.append(torch.randn(T, H, generator=g).to(dtype))
        idxs.append(idx)
        ws.append(torch.rand(T, k, generator=g))
    return xs, idxs, ws


def _cuda(x):
    if isinstance(x, tuple):
        return tuple(t.cuda() for t in x)
    return x.cuda()


def _cpu(x):
    if isinstance(x, tuple):
        return tuple(t.cpu() for t in x)
    return x.cpu()


def _equal(a, b):
    if isinstance(a, tuple):
        return all(_equal(p, q) for p, q in zip(a, b))
    return torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                       b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_layout_matches_reference():
    from dispatch import Config  # noqa: F401
    with _loopback(1) as lb:
        for R, L, E, T, k in ((8, 8, 64, 300, 4), (64, 8, 256, 4096, 8), (16, 4, 32, 1, 2), (4, 4, 8, 0, 2)):
            idx = torch.randint(-1, E, (T, k))
            buf = lb.buffers[0]
            # the layout kernel is rank-local: any R/L works, not only this loopback's node
            buf.topology = type(buf.topology)(R, L, 0)
            out = lb.run(lambda r, b: tuple(t.cpu() if isinstance(t, torch.Tensor) else t
                                            for t in b.get_dispatch_layout(idx.cuda(), E)[:4]))[0]
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


@pytest.mark.parametrize("L,E,k,H,dtype,num_sms,nvl", CASES)
def test_dispatch_combine_matches_reference(L, E, k, H, dtype, num_sms, nvl):
    from dispatch import Config
    xs, idxs, ws = _inputs(L, E, k, H, dtype, seed=L * 100 + H)
    config = Config(num_sms=num_sms)
    kw = {"num_nvl_bytes": nvl} if nvl else {}
    with _loopback(L, **kw) as lb:
        def step(r, buf):
            x, idx, w = _cuda(xs[r]), idxs[r].cuda(), ws[r].cuda()
            recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
                x, topk_idx=idx, topk_weights=w, num_experts=E, expert_alignment=4, config=config)
            y = (recv_x.to(torch.float32) * 1.5).to(dtype)
            bias = torch.randn(x.shape[0], H, device="cuda").to(dtype)
            out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias, config=config)
            torch.cuda.current_stream().synchronize()
            return dict(recv_x=recv_x.cpu(), recv_idx=recv_idx.cpu(), recv_w=recv_w.cpu(), per_expert=per_expert,
                        src_rank=handle.recv_src_rank.cpu(), src_token=handle.recv_src_token.cpu(), y=y.cpu(),
                        bias=bias.cpu(), out=out.cpu(), out_w=out_w.cpu(), stats=buf.get_traffic_stats())
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, ws, E, L, d, expert_alignment=4)
        got = res[d]
        assert _equal(got["recv_x"], ref["recv_x"])
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


def test_fp8_and_cached_dispatch():
    from dispatch import Config
    L, E, k, H = 4, 16, 4, 300
    xs, idxs, ws = _inputs(L, E, k, H, None, seed=7, fp8=True)
    with _loopback(L) as lb:
        def step(r, buf):
            x, idx = _cuda(xs[r]), idxs[r].cuda()
            recv, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=4))
            again, a, b, c, h2, _ = buf.dispatch(x, handle=handle, config=Config(num_sms=4))
            assert a is None and b is None and c is None and h2 is handle
            return _cpu(recv), _cpu(again)
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, None, E, L, d)
        assert _equal(res[d][0], ref["recv_x"])
        assert _equal(res[d][1], ref["recv_x"])


def test_worst_tokens_cuda_graph_and_async():
    from dispatch import Config
    L, E, k, H, W = 4, 16, 4, 128, 1024
    xs, idxs, ws = _inputs(L, E, k, H, torch.bfloat16, seed=11, tokens=[100, 37, 0, 150])
    with _loopback(L) as lb:
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
            lb_barrier(r)
            with capture_lock:  # capture records only: one rank at a time, thread-local capture mode
                with torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
                    captured = once()
            lb_barrier(r)
            graph.replay()
            torch.cuda.current_stream().synchronize()
            # async_finish: a real event the caller waits on
            recv_x, _, _, _, handle, event = buf.dispatch(x, topk_idx=idx, num_experts=E, config=cfg,
                                                          async_finish=True)
            assert event.event is not None
            event.current_stream_wait()
            return [t.cpu() for t in eager], [t.cpu() for t in captured], recv_x.cpu()

        barrier = __import__("threading").Barrier(L)
        capture_lock = __import__("threading").Lock()

        def lb_barrier(_):
            barrier.wait()
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, ws, E, L, d)
        n = ref["recv_x"].shape[0]
        eager, captured, async_x = res[d]
        assert eager[0].shape[0] == W
        assert torch.equal(eager[0][:n], ref["recv_x"]) and not eager[0][n:].any()
        assert torch.equal(eager[1][:n], ref["recv_topk_idx"]) and (eager[1][n:] == -1).all()
        for a, b in zip(eager, captured):
            assert torch.equal(a, b)
        assert torch.equal(async_x, ref["recv_x"])


def test_timeout_names_missing_rank():
    from dispatch import Config, PeerTimeoutError
    L = 2
    with _loopback(L, timeout_s=1.0) as lb:
        def step(r, buf):
            if r == 1:
                return None  # rank 1 never joins
            x = torch.randn(10, 64, device="cuda")
            idx = torch.randint(0, 4, (10, 2), device="cuda")
            with pytest.raises(PeerTimeoutError) as info:
                buf.dispatch(x, topk_idx=idx, num_experts=4, config=Config(num_sms=2))
            return info.value.rank
        assert lb.run(step)[0] == 1


@pytest.mark.parametrize("num_sms", [2, 4, 10, 20])
def test_any_even_num_sms(num_sms):
    from dispatch import Config
    L, E, k, H = 2, 8, 2, 64
    xs, idxs, ws = _inputs(L, E, k, H, torch.float32, seed=num_sms, tokens=[333, 5])
    with _loopback(L) as lb:
        res = lb.run(lambda r, b: b.dispatch(xs[r].cuda(), topk_idx=idxs[r].cuda(), num_experts=E,
                                             config=Config(num_sms=num_sms))[0].cpu())
    for d in range(L):
        assert torch.equal(res[d], reference_dispatch(xs, idxs, None, E, L, d)["recv_x"])

"""CUDA backend across nodes (the two-hop path, dispatch/cuda/two_hop.py): virtual clusters of
N nodes x L ranks (dispatch.testing.Loopback with num_ranks_per_node) through the loopback rail,
on the SIMT runtime (and on a GPU when there is one). Dispatch is bit-identical to the reference
(the CPU backend's contract), combine follows the fixed order bit for bit, traffic counters are
the reference's (the CPU backend's definitions)."""

from __future__ import annotations

import pytest
import torch

from bench.common import bytes_per_token
from dispatch import Config
from dispatch.errors import PeerTimeoutError
from dispatch.reference import reference_combine, reference_dispatch, reference_traffic
from tests.dispatch_utils import bit_equal, sync, to_cpu, to_device
from tests.dispatch_utils import cuda_device_params as device_params
from tests.dispatch_utils import loopback_inputs as inputs
from tests.dispatch_utils import make_loopback

DEVICES = device_params()


def cluster(device, N, L, **kwargs):
    return make_loopback(device, N * L, num_ranks_per_node=L, **kwargs)


CASES = [
    # N, L, E/R, k, H, dtype, nvl_bytes (small: rings wrap), chunk_tokens (small: many rail chunks),
    # num_sms (below 2 N: a forwarder/receiver block pair serves several source nodes)
    (2, 2, 2, 3, 40, torch.bfloat16, 0, None, 2),
    (2, 4, 2, 4, 24, torch.float32, 0, 4, 2),
    (4, 2, 2, 3, 33, torch.float16, (512 << 10) + 4096, 3, 2),
    (2, 2, 3, 2, 16, torch.float64, 0, 5, 2),
    (4, 2, 2, 2, 24, torch.bfloat16, (512 << 10) + 4096, 2, 4),  # 2 nodes per block pair
    (2, 4, 2, 3, 32, torch.float32, 0, 3, 6),  # a block pair per node (S = N)
    (2, 2, 2, 3, 40, torch.bfloat16, (512 << 10) + 4096, 2, 4),  # S = N, 2 warps per (node, rank) pair on SIMT
]


def _params():
    return [pytest.param(dev.values[0], *case, marks=dev.marks) for case in CASES for dev in DEVICES]


@pytest.mark.parametrize("device,N,L,epr,k,H,dtype,nvl,chunk,num_sms", _params())
def test_two_hop_matches_reference(device, N, L, epr, k, H, dtype, nvl, chunk, num_sms):
    R = N * L
    E = epr * R
    tokens = [int(t) for t in torch.randint(0, 40, (R,), generator=torch.Generator().manual_seed(R + H))]
    tokens[1] = 0  # a rank with no tokens
    xs, idxs, ws = inputs(R, E, k, H, dtype, seed=R * 10 + H, tokens=tokens)
    config = Config(num_sms=num_sms, chunk_tokens=chunk)
    kw = {"num_nvl_bytes": nvl} if nvl else {}
    with cluster(device, N, L, **kw) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
                x, topk_idx=idx, topk_weights=w, num_experts=E, expert_alignment=4, config=config)
            d_stats = buf.get_traffic_stats()
            y = (recv_x.to(torch.float32) * 1.5).to(dtype)
            bias = to_device(torch.randn(x.shape[0], H), device).to(dtype)
            out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias, config=config)
            sync(device)
            return dict(recv_x=recv_x.cpu(), recv_idx=recv_idx.cpu(), recv_w=recv_w.cpu(), per_expert=per_expert,
                        src_rank=handle.recv_src_rank.cpu(), src_token=handle.recv_src_token.cpu(), y=y.cpu(),
                        bias=bias.cpu(), out=out.cpu(), out_w=out_w.cpu(), d_stats=d_stats,
                        c_stats=buf.get_traffic_stats())
        res = lb.run(step)
    for d in range(R):
        ref = reference_dispatch(xs, idxs, ws, E, L, d, expert_alignment=4)
        got = res[d]
        assert bit_equal(got["recv_x"], ref["recv_x"]), d
        assert torch.equal(got["recv_idx"], ref["recv_topk_idx"])
        assert torch.equal(got["recv_w"], ref["recv_topk_weights"])
        assert got["per_expert"] == ref["num_recv_tokens_per_expert_list"]
        assert torch.equal(got["src_rank"].long(), ref["recv_src_rank"])
        assert torch.equal(got["src_token"].long(), ref["recv_src_token"])
    # bench.common's independent row sizes (it has no float64)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype)
    bpt = bytes_per_token(H, k, name, L) if name else None
    for s in range(R):
        out, out_w = reference_combine([res[d]["y"] for d in range(R)], [res[d]["recv_w"] for d in range(R)],
                                       [res[d]["src_rank"].long() for d in range(R)],
                                       [res[d]["src_token"].long() for d in range(R)], L, s, xs[s].shape[0],
                                       bias=res[s]["bias"])
        assert torch.equal(res[s]["out"], out), s
        assert torch.equal(res[s]["out_w"], out_w)
        want = reference_traffic(idxs, E, L, s)
        for op, key in (("dispatch", "d_stats"), ("combine", "c_stats")):
            stats = res[s][key]
            assert stats["op"] == op
            for name, value in want[op].items():
                assert stats[name] == value, (s, op, name)
            if bpt is not None:  # the CPU backend's row sizes
                assert stats["rail_bytes_per_token"] == getattr(bpt, f"{op}_rail")
                assert stats["node_bytes_per_token"] == getattr(bpt, f"{op}_node")
            assert stats["rail_bytes"] == stats["rail_token_copies"] * stats["rail_bytes_per_token"]
            assert stats["node_bytes"] == stats["node_token_copies"] * stats["node_bytes_per_token"]
    assert any(res[s]["d_stats"]["rail_token_copies"] > 0 for s in range(R))  # the rail was used


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_cached_worst_and_rounded_partials(device):
    """FP8 pairs and a cached dispatch along the handle; num_worst_tokens pads with zeros / -1;
    round_rail_partials sends remote partials rounded to bfloat16, as the reference says."""
    N, L, E, k, H, W = 2, 2, 8, 2, 130, 90
    R = N * L
    xs, idxs, ws = inputs(R, E, k, H, None, seed=3, fp8=True, tokens=[20, 0, 17, 25])
    bx, _, _ = inputs(R, E, k, H, torch.bfloat16, seed=4, tokens=[20, 0, 17, 25])
    with cluster(device, N, L) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            cfg = Config(num_sms=2, chunk_tokens=4)
            recv, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=E, config=cfg)
            again, a, b, c, h2, _ = buf.dispatch(x, handle=handle, config=cfg)
            assert a is None and b is None and c is None and h2 is handle
            wx, widx, ww, wlist, wh, _ = buf.dispatch(to_device(bx[r], device), topk_idx=idx, topk_weights=w,
                                                    num_experts=E, num_worst_tokens=W, config=cfg)
            assert wlist == []
            rounded = Config(num_sms=2, round_rail_partials=True)
            out, _, _ = buf.combine(wx, wh, config=rounded)
            sync(device)
            return to_cpu(recv), to_cpu(again), wx.cpu(), widx.cpu(), ww.cpu(), wh.num_recv_tokens, out.cpu(), \
                wh.recv_src_rank.cpu(), wh.recv_src_token.cpu()
        res = lb.run(step)
    for d in range(R):
        ref = reference_dispatch(xs, idxs, None, E, L, d)
        assert bit_equal(res[d][0], ref["recv_x"])
        assert bit_equal(res[d][1], ref["recv_x"])
        bref = reference_dispatch(bx, idxs, ws, E, L, d)
        n = res[d][5]
        assert res[d][2].shape[0] == W and n == bref["recv_x"].shape[0]
        assert bit_equal(res[d][2][:n], bref["recv_x"]) and not res[d][2][n:].any()
        assert torch.equal(res[d][3][:n], bref["recv_topk_idx"]) and (res[d][3][n:] == -1).all()
        assert torch.equal(res[d][4][:n], bref["recv_topk_weights"]) and not res[d][4][n:].any()
    for s in range(R):
        n_of = [res[d][5] for d in range(R)]
        want, _ = reference_combine([res[d][2][:n_of[d]] for d in range(R)], None,
                                    [res[d][7][:n_of[d]].long() for d in range(R)],
                                    [res[d][8][:n_of[d]].long() for d in range(R)], L, s, bx[s].shape[0],
                                    round_rail_partials=True)
        assert torch.equal(res[s][6], want), s


def _with_a_silent_rail_peer(device, before, after):
    """2x2 virtual ranks where rank 2 (node 1, local 0) drops its rail sends; each rank runs
    ``before(r, buf)``, one dispatch, ``after(r, buf)``. Returns each rank's PeerTimeoutError or None."""
    N, L, E, k, H = 2, 2, 8, 2, 16
    xs, idxs, _ = inputs(N * L, E, k, H, torch.bfloat16, seed=9, tokens=[12, 12, 12, 12])
    with cluster(device, N, L, timeout_s=1.5) as lb:
        lb.comm.rail_fabric.silent_ranks.add(2)

        def step(r, buf):
            before(r, buf)
            error = None
            try:
                buf.dispatch(to_device(xs[r], device), topk_idx=to_device(idxs[r], device), num_experts=E,
                             config=Config(num_sms=2))
            except PeerTimeoutError as exc:
                error = exc
            after(r, buf)
            return error
        return lb.run(step)


@pytest.mark.parametrize("device", DEVICES)
def test_silent_rail_peer_is_named(device):
    """A rail peer that never sends: its peer's forwarder times out and the call fails naming it."""
    res = _with_a_silent_rail_peer(device, lambda r, buf: None, lambda r, buf: None)
    assert isinstance(res[0], PeerTimeoutError), res[0]  # rank 0's rail peer on node 1 is rank 2
    assert res[0].rank == 2 and "rank 2" in str(res[0]) and "rail" in str(res[0])


@pytest.mark.parametrize("device", DEVICES)
def test_destroy_after_a_failure_aborts_the_rail_first(device):
    """After a failed call, destroy() aborts each failed rank's rail transport before draining
    its streams (NCCL: a round waiting on a dead peer would hold the rail stream forever); a
    buffer that never failed only closes it."""
    seen = {}

    def spy(r, buf):
        rail, calls = buf._backend.rail, seen.setdefault(r, [])
        for name in ("abort", "close"):
            original = getattr(rail, name)
            setattr(rail, name, lambda original=original, name=name: (calls.append(name), original())[1])

    res = _with_a_silent_rail_peer(device, spy, lambda r, buf: buf.destroy())
    failed = [isinstance(error, PeerTimeoutError) for error in res]
    assert failed[0], "rank 0 waited on its silent rail peer"
    for r in range(len(res)):
        want = ["abort", "close"] if failed[r] else ["close"]
        assert seen[r] == want, (r, failed[r], seen[r])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_argument_raises_everywhere(device):
    N, L, E, k, H = 2, 2, 8, 2, 16
    R = N * L
    xs, idxs, _ = inputs(R, E, k, H, torch.bfloat16, seed=2, tokens=[5, 5, 5, 5])
    with cluster(device, N, L) as lb:
        def step(r, buf):
            idx = idxs[r].clone()
            if r == 3:
                idx[0, 0] = E  # out of range on rank 3 only
            try:
                buf.dispatch(to_device(xs[r], device), topk_idx=to_device(idx, device), num_experts=E,
                             config=Config(num_sms=2))
            except ValueError as error:
                return str(error)
            return None
        res = lb.run(step)
        assert "topk_idx" in res[3]
        assert all(res[r] is not None and "rank 3" in res[r] for r in range(3))
        # the buffer stays usable
        out = lb.run(lambda r, buf: buf.dispatch(to_device(xs[r], device), topk_idx=to_device(idxs[r], device),
                                                 num_experts=E, config=Config(num_sms=2))[0].cpu())
    for d in range(R):
        assert bit_equal(out[d], reference_dispatch(xs, idxs, None, E, L, d)["recv_x"])


@pytest.mark.parametrize("device", DEVICES)
def test_async_finish_and_handle_entries(device):
    """async_finish returns a real event (a later call ordered after it by previous_event); the
    handle's DeepEP entries for several nodes describe this dispatch."""
    N, L, E, k, H = 2, 2, 8, 2, 16
    R = N * L
    xs, idxs, _ = inputs(R, E, k, H, torch.float32, seed=13, tokens=[9, 14, 0, 11])
    with cluster(device, N, L) as lb:
        def step(r, buf):
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            recv, _, _, _, handle, event = buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=2),
                                                        async_finish=True)
            assert event.event is not None
            out, _, _ = buf.combine(recv, handle, config=Config(num_sms=2), previous_event=event)
            sync(device)
            return recv.cpu(), out.cpu(), handle[0].cpu(), handle[4].cpu(), handle[6].cpu()
        res = lb.run(step)
    for d in range(R):
        ref = reference_dispatch(xs, idxs, None, E, L, d)
        assert bit_equal(res[d][0], ref["recv_x"])
        node, local = divmod(d, L)
        in_rank = [torch.zeros(xs[s].shape[0], R, dtype=torch.bool) for s in range(R)]
        for s in range(R):
            for t in range(xs[s].shape[0]):
                for e in idxs[s][t].tolist():
                    if e >= 0:
                        in_rank[s][t, e // (E // R)] = True
        assert torch.equal(res[d][2], in_rank[d])
        from_peers = [int(in_rank[m * L + local][:, node * L:(node + 1) * L].any(dim=1).sum()) for m in range(N)]
        assert res[d][3].tolist() == torch.tensor(from_peers).cumsum(0).tolist()
        assert res[d][4].tolist() == torch.tensor([int(in_rank[s][:, d].sum()) for s in range(R)]).cumsum(0).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_rank_that_never_joins_is_named(device):
    N, L, E, k, H = 2, 2, 8, 2, 16
    R = N * L
    xs, idxs, _ = inputs(R, E, k, H, torch.bfloat16, seed=6, tokens=[4, 4, 4, 4])
    with cluster(device, N, L, timeout_s=1.0) as lb:
        def step(r, buf):
            if r == 3:
                return None  # never calls dispatch
            with pytest.raises(PeerTimeoutError) as info:
                buf.dispatch(to_device(xs[r], device), topk_idx=to_device(idxs[r], device), num_experts=E,
                             config=Config(num_sms=2))
            return info.value
        res = lb.run(step)
    assert all(res[r].rank == 3 and "rank 3" in str(res[r]) for r in range(3))


@pytest.mark.parametrize("device", [pytest.param(d.values[0], marks=d.marks) for d in DEVICES])
def test_rail_buffers_persist_across_calls(device, monkeypatch):
    """Two calls of one shape: the first allocates the rail buffers, the second allocates none
    (a spy on the backend's device allocator) and reuses the same addresses, bit for bit alike."""
    from dispatch.cuda.two_hop import TwoHopBackend
    calls = []
    real_empty = TwoHopBackend._empty

    def spy(self, num_bytes):
        calls.append((id(self), num_bytes))
        return real_empty(self, num_bytes)

    monkeypatch.setattr(TwoHopBackend, "_empty", spy)
    N, L, E, k, H = 2, 2, 8, 2, 32
    xs, idxs, ws = inputs(N * L, E, k, H, torch.bfloat16, seed=7, tokens=[9, 0, 13, 5])
    config = Config(num_sms=2, chunk_tokens=4)
    with cluster(device, N, L) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            got = []
            for _ in range(2):
                mine = id(buf._backend)
                before = sum(1 for who, _ in calls if who == mine)
                recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                               config=config)
                out, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=config)
                sync(device)
                ptrs = {role: t.data_ptr() for role, t in buf._backend._rail_buffers.items()}
                got.append((sum(1 for who, _ in calls if who == mine) - before, ptrs, recv_x.cpu(), out.cpu()))
            return got
        res = lb.run(step)
    for r in range(N * L):
        (new0, ptrs0, rx0, out0), (new1, ptrs1, rx1, out1) = res[r]
        assert new0 > 0 and new1 == 0, (r, new0, new1)
        assert set(ptrs0) >= {"dispatch_send", "dispatch_recv", "combine_partials", "combine_recv"}, r
        assert ptrs0 == ptrs1, r
        assert bit_equal(rx0, rx1) and bit_equal(out0, out1), r


TWO_HOP_KERNELS = ("dispatch.rail_pack", "dispatch.rail_forward", "combine.rail_reduce", "combine.rail_final")


@pytest.mark.parametrize("device,N,L,num_sms", [pytest.param(d.values[0], N, L, sms, marks=d.marks)
                                                for N, L, sms in ((4, 2, 2), (2, 4, 2), (4, 2, 4)) for d in DEVICES])
def test_blocks_within_num_sms(device, N, L, num_sms):
    """dispatch.profile's rows (one per block that ran): every two-hop kernel of every rank ran
    on at most num_sms distinct blocks; forward and reduce on exactly 2 min(num_sms / 2, N)."""
    import dispatch.profile as dprof
    R = N * L
    E = 2 * R
    xs, idxs, ws = inputs(R, E, 2, 24, torch.bfloat16, seed=N * 7 + L, tokens=[30] * R)
    config = Config(num_sms=num_sms, chunk_tokens=4)
    with cluster(device, N, L) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                           config=config)
            out, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=config)
            sync(device)
            return recv_x.cpu()
        with dprof.profile() as prof:
            res = lb.run(step)
    for d in range(R):
        assert bit_equal(res[d], reference_dispatch(xs, idxs, ws, E, L, d)["recv_x"]), d
    pair_blocks = 2 * min(num_sms // 2, N)
    for rank in range(R):
        for kernel in TWO_HOP_KERNELS:
            blocks = {rec.worker for rec in prof.records if rec.rank == rank and rec.kernel == kernel}
            assert blocks, (rank, kernel)
            assert max(blocks) < num_sms and len(blocks) <= num_sms, (rank, kernel, sorted(blocks))
            if kernel in ("dispatch.rail_forward", "combine.rail_reduce"):
                assert blocks == set(range(pair_blocks)), (rank, kernel, sorted(blocks))


@pytest.mark.parametrize("device", DEVICES)
def test_odd_num_sms_is_refused(device):
    """A forwarder needs its receiver block: num_sms must be even and >= 2, named in the error."""
    N, L, E = 2, 2, 8
    xs, idxs, _ = inputs(N * L, E, 2, 16, torch.bfloat16, seed=5, tokens=[4] * 4)
    with cluster(device, N, L) as lb:
        def step(r, buf):
            with pytest.raises(ValueError, match="num_sms"):
                buf.dispatch(to_device(xs[r], device), topk_idx=to_device(idxs[r], device), num_experts=E,
                             config=Config(num_sms=3))
            return True
        assert lb.run(step) == [True] * (N * L)


def test_loopback_resident_blocks_follow_num_sms():
    """In a loopback every virtual rank's forward (reduce) blocks must be resident at once:
    R x 2 min(num_sms / 2, N) of them. Capped at 8 resident blocks, a 2x2 cluster fits num_sms 2
    (8 blocks) and refuses num_sms 4 (16), naming num_sms."""
    from dispatch.cuda.device import SimtDevice, simt_available
    if not simt_available():
        pytest.skip("dispatch._simt was not built")
    with cluster("simt", 2, 2) as lb:
        backend = lb.buffers[0]._backend
        SimtDevice.configure(max_resident_blocks=8)
        try:
            backend.check_config(Config(num_sms=2))
            with pytest.raises(ValueError, match="num_sms=4.*16 resident blocks"):
                backend.check_config(Config(num_sms=4))
        finally:
            SimtDevice.configure(max_resident_blocks=0)

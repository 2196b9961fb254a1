"""DeepEP drop-in (issue #11) on the CUDA backend, on the SIMT device (and a GPU where present):
DeepEP's constructor keywords and helpers, the per-expert list rules (a list without
``topk_idx`` when the layout is given, ``[]`` with ``num_worst_tokens``), the indexable handle,
and DeepEP's receive windows in ``Config`` sizing the rings. Small sizes: SIMT runs take seconds."""

from __future__ import annotations

import pytest
import torch

from dispatch.reference import reference_combine, reference_dispatch, reference_layout
from tests.dispatch_utils import cuda_device_params as device_params
from tests.dispatch_utils import loopback_inputs as inputs
from tests.dispatch_utils import make_loopback as loopback
from tests.dispatch_utils import sync, to_device

DEVICES = device_params()
L, E, K, H = 2, 8, 2, 32


def _layout(idxs, r):
    """The reference layout of rank ``r``'s ids: (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)."""
    per_rank, _, per_expert, in_rank = reference_layout(idxs[r], E, L, L)
    return per_rank, in_rank, per_expert


@pytest.mark.parametrize("device", DEVICES)
def test_constructor_keywords_and_helpers(device):
    """DeepEP's keywords are accepted or refused (before any exchange) on the CUDA backend too;
    the helpers answer for it."""
    import dispatch as deep_ep
    from dispatch.testing import LoopbackGroup
    with loopback(device, L) as lb:
        with pytest.raises(NotImplementedError, match="low_latency_mode"):
            deep_ep.Buffer(LoopbackGroup(0, L, lb.comm, lb.device), low_latency_mode=True)
        with pytest.raises(ValueError, match="num_qps_per_rank"):
            deep_ep.Buffer(LoopbackGroup(0, L, lb.comm, lb.device), num_qps_per_rank=0)
        with pytest.raises(TypeError, match="explicitly_destroy"):
            deep_ep.Buffer(LoopbackGroup(0, L, lb.comm, lb.device), explicitly_destroy=1)
        extra = lb.run(lambda r, _: deep_ep.Buffer(LoopbackGroup(r, L, lb.comm, lb.device), 1 << 20,
                                                   low_latency_mode=False, num_qps_per_rank=8,
                                                   allow_nvlink_for_low_latency_mode=False,
                                                   explicitly_destroy=True))
        try:
            for r, buf in enumerate(extra):
                assert buf.explicitly_destroy and not buf.low_latency_mode
                assert buf.get_num_rdma_ranks() == 1 and buf.get_rdma_rank() == 0
                assert buf.get_root_rdma_rank(True) == r
                assert buf.get_comm_stream() is buf._backend.stream
                want_id = lb.device.torch_device.index if device == "cuda" else -1
                assert buf.get_local_device_id() == want_id
            if device == "simt":
                assert deep_ep.Buffer.capture().event is None  # the host's work is done
            with pytest.raises(NotImplementedError, match="low-latency"):
                extra[0].low_latency_dispatch()
        finally:
            lb.run(lambda r, _: extra[r].destroy())


@pytest.mark.parametrize("device", DEVICES)
def test_per_expert_list_without_topk_idx_and_worst_tokens(device):
    """Without ``topk_idx`` the list comes from ``num_tokens_per_expert`` (None when no rank gives
    it); with ``num_worst_tokens`` it is ``[]`` (as DeepEP), with or without ``topk_idx``."""
    from dispatch import Config
    xs, idxs, _ = inputs(L, E, K, H, torch.float32, seed=11, tokens=[9, 14])
    cfg = Config(num_sms=2)
    with loopback(device, L) as lb:
        def step(r, buf):
            per_rank, in_rank, per_expert = (to_device(t, device) for t in _layout(idxs, r))
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            out = {}
            recv_x, recv_idx, _, lst, _, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                          num_tokens_per_expert=per_expert, expert_alignment=2,
                                                          config=cfg)
            out["explicit"] = (recv_x.cpu(), recv_idx, lst)
            out["no_counts"] = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                            num_experts=E, config=cfg)[3]
            out["worst"] = buf.dispatch(x, topk_idx=idx, num_experts=E, num_worst_tokens=40, config=cfg)[3]
            out["worst_no_topk"] = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                num_tokens_per_expert=per_expert, num_worst_tokens=40, config=cfg)[3]
            out["topk"] = buf.dispatch(x, topk_idx=idx, num_experts=E, expert_alignment=2, config=cfg)[3]
            sync(device)
            return out
        res = lb.run(step)
    for d in range(L):
        ref = reference_dispatch(xs, idxs, None, E, L, d, expert_alignment=2)
        recv_x, recv_idx, lst = res[d]["explicit"]
        assert recv_idx is None and torch.equal(recv_x, ref["recv_x"])
        assert lst == ref["num_recv_tokens_per_expert_list"] == res[d]["topk"]
        assert res[d]["no_counts"] is None
        assert res[d]["worst"] == [] and res[d]["worst_no_topk"] == []


@pytest.mark.parametrize("device", DEVICES)
def test_per_expert_counts_given_on_one_rank_only_raise_on_every_rank(device):
    """Whether ``num_tokens_per_expert`` is given is a call fact: one rank without it would sum
    a partial list, so every rank raises, naming it."""
    from dispatch import Config
    xs, idxs, _ = inputs(L, E, K, H, torch.float32, seed=12, tokens=[6, 5])
    with loopback(device, L, timeout_s=5.0) as lb:
        def step(r, buf):
            per_rank, in_rank, per_expert = (to_device(t, device) for t in _layout(idxs, r))
            with pytest.raises(ValueError) as info:
                buf.dispatch(to_device(xs[r], device), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                             num_tokens_per_expert=per_expert if r == 0 else None, num_experts=E,
                             config=Config(num_sms=2))
            return str(info.value)
        messages = lb.run(step)
    assert all("num_tokens_per_expert" in m for m in messages), messages


@pytest.mark.parametrize("device", DEVICES)
def test_handle_indexable_like_deepeps_intranode_handle(device):
    """``handle[3]`` is ``recv_src_idx``, ``handle[4]`` ``is_token_in_rank``; ``handle[0]``
    (rank_prefix_matrix, not kept here) and DeepEP's kernel entries raise saying so."""
    from dispatch import Config
    xs, idxs, ws = inputs(L, E, K, H, torch.float32, seed=13, tokens=[12, 8])
    with loopback(device, L) as lb:
        def step(r, buf):
            x, idx = to_device(xs[r], device), to_device(idxs[r], device)
            handle = buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(num_sms=2))[4]
            sync(device)
            errors = []
            for i in (0, 1, 5):
                with pytest.raises(NotImplementedError) as info:
                    handle[i]
                errors.append(str(info.value))
            with pytest.raises(IndexError):
                handle[6]
            with pytest.raises(TypeError):
                tuple(handle)
            return len(handle), handle[3].cpu(), handle[-2].cpu(), errors
        res = lb.run(step)
    for d in range(L):
        n, src_idx, in_rank, errors = res[d]
        ref = reference_dispatch(xs, idxs, None, E, L, d)
        assert n == 6
        assert src_idx.dtype == torch.int32 and torch.equal(src_idx.long(), ref["recv_src_token"].long())
        assert torch.equal(in_rank, reference_layout(idxs[d], E, L, L)[3])
        assert "rank_prefix_matrix" in errors[0] and "[3] recv_src_idx" in errors[0]
        assert "channel_prefix_matrix" in errors[1] and "send_head" in errors[2]


@pytest.mark.parametrize("device", DEVICES)
def test_deepep_windows_size_the_rings(device, monkeypatch):
    """DeepEP's ``num_max_nvl_chunked_recv_tokens`` (or ``chunk_tokens`` over the channels) caps
    the rows per ring; tiny rings still match the reference; ranks that disagree raise."""
    from dispatch import Config
    from dispatch.cuda.backend import CudaBackend
    slots_seen = []
    ring_slots = CudaBackend._ring_slots

    def spy(self, num_channels, row_bytes, window):
        slots = ring_slots(self, num_channels, row_bytes, window)
        slots_seen.append(slots)
        return slots

    monkeypatch.setattr(CudaBackend, "_ring_slots", spy)
    xs, idxs, ws = inputs(L, E, K, H, torch.float32, seed=14, tokens=[30, 21])
    with loopback(device, L, timeout_s=5.0) as lb:
        def step(r, buf):
            x, idx, w = to_device(xs[r], device), to_device(idxs[r], device), to_device(ws[r], device)
            deepep = Config(4, 1, 3, 1, 4)  # DeepEP's positional form: 2 channels, rings of 3 rows
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                           config=deepep)
            out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=Config(num_sms=2, chunk_tokens=4))
            sync(device)
            with pytest.raises(ValueError) as info:
                buf.dispatch(x, topk_idx=idx, num_experts=E, config=Config(2, 1, 2 if r == 0 else 5))
            return dict(recv_x=recv_x.cpu(), recv_w=recv_w.cpu(), src_rank=handle.recv_src_rank.cpu().long(),
                        src_token=handle.recv_src_token.cpu().long(), out=out.cpu(), out_w=out_w.cpu(),
                        message=str(info.value))
        res = lb.run(step)
    # dispatch: rings of 3 rows (the DeepEP window); combine: chunk_tokens=4 over the handle's 2 channels
    assert set(slots_seen[:L]) == {3} and set(slots_seen[L:2 * L]) == {2}, slots_seen
    for d in range(L):
        assert torch.equal(res[d]["recv_x"], reference_dispatch(xs, idxs, ws, E, L, d)["recv_x"])
        assert "chunk window" in res[d]["message"]
    for s in range(L):
        out, out_w = reference_combine([res[d]["recv_x"] for d in range(L)], [res[d]["recv_w"] for d in range(L)],
                                       [res[d]["src_rank"] for d in range(L)], [res[d]["src_token"] for d in range(L)],
                                       L, s, xs[s].shape[0])
        assert torch.equal(res[s]["out"], out) and torch.equal(res[s]["out_w"], out_w)

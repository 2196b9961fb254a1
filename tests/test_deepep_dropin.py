"""DeepEP drop-in: client code written against DeepEP's normal-mode API runs on ``dispatch``
after ``import dispatch as deep_ep`` (issue #11).

The cluster job below is DeepEP-style client code written here from DeepEP's documented API
(positional ``Config``, size hints on the recommended configs, constructor keywords, ``capture()``,
``previous_event``/``async_finish`` plumbing, handle indexing, layout -> dispatch -> combine with
and without top-k, cached dispatch, worst-token mode). Each step is checked the way DeepEP's own
tests check (rows of source ``i`` hold ``i`` between the handle's prefix sums) and against
``dispatch.reference`` bit for bit, on emulated 1x4 and 2x2 clusters of the CPU backend.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
import torch

from dispatch.reference import reference_combine, reference_dispatch, reference_layout
from tests.dispatch_utils import diff, gen, make_routing, pad_rows

DROPIN_SHAPES = [(1, 4), (2, 2)]
HIDDEN = 256
TOPK = 4
EXPERTS_PER_RANK = 4


# ----------------------------------------------------------------------------------------------
# local checks: Config, hints, recommended configs, constructor keywords, static helpers
# ----------------------------------------------------------------------------------------------

def test_config_takes_deepeps_positional_arguments():
    import dispatch as deep_ep

    intranode = deep_ep.Config(24, 8, 256)
    assert (intranode.num_sms, intranode.num_max_nvl_chunked_send_tokens,
            intranode.num_max_nvl_chunked_recv_tokens) == (24, 8, 256)
    internode = deep_ep.Config(24, 8, 512, 16, 128)
    assert (internode.num_max_rdma_chunked_send_tokens, internode.num_max_rdma_chunked_recv_tokens) == (16, 128)
    by_name = deep_ep.Config(num_sms=24, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=512,
                             num_max_rdma_chunked_send_tokens=16, num_max_rdma_chunked_recv_tokens=128)
    assert by_name == internode
    # Our own options are keyword-only: a sixth positional is an error, not a silent chunk size.
    with pytest.raises(TypeError):
        deep_ep.Config(24, 8, 512, 16, 128, 64)
    own = deep_ep.Config(24, chunk_tokens=64, round_rail_partials=True)
    assert own.chunk_tokens == 64 and own.round_rail_partials


def test_config_maps_deepep_windows_onto_chunks():
    import dispatch as deep_ep

    # num_sms // 2 channels of the receive window each; across nodes the smaller window counts.
    assert deep_ep.Config(24, 8, 256).chunk_records(1) == 12 * 256
    assert deep_ep.Config(24, 8, 512, 16, 128).chunk_records(1) == 12 * 512
    assert deep_ep.Config(24, 8, 512, 16, 128).chunk_records(2) == 12 * 128
    assert deep_ep.Config(24, 8, 512, 16, 128, chunk_tokens=100).chunk_records(2) == 100
    assert deep_ep.Config(24).chunk_records(2) is None  # nothing set: the staging budget decides
    # DeepEP rounds the rail window up to whole send steps.
    assert deep_ep.Config(24, 8, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132


def test_host_backend_chunks_from_deepep_windows():
    """The CPU backend runs a dispatch with ``Config.chunk_records`` of its node count (the
    rail window counts across nodes)."""
    import dispatch as deep_ep
    from dispatch.backend import DispatchArgs
    from dispatch.host.backend import HostBackend
    backend = object.__new__(HostBackend)  # no links: full_dispatch is replaced
    backend.topo = deep_ep.Topology(4, 2, 0)
    seen: List[Any] = []
    backend.full_dispatch = lambda *args: seen.append(args[10]) or (None,) * 6
    for config in (deep_ep.Config(4, 1, 8, 2, 4), deep_ep.Config(4, 1, 8), deep_ep.Config(4)):
        backend.dispatch(DispatchArgs(None, None, None, None, None, None, None, 4, 1, 0, config))
    assert seen == [2 * 4, 2 * 8, None]


@pytest.mark.parametrize("args, name", [
    ((24, 256, 8), "num_max_nvl_chunked_send_tokens"),
    ((24, 8, 256, 100, 50), "num_max_rdma_chunked_send_tokens"),
    ((24, 0, 256), "num_max_nvl_chunked_send_tokens"),
    ((24, 8, -1), "num_max_nvl_chunked_recv_tokens"),
    ((24, 8, 256, 6, 2.5), "num_max_rdma_chunked_recv_tokens"),
    ((0,), "num_sms"),
])
def test_config_rejects_bad_deepep_arguments(args, name):
    import dispatch as deep_ep

    with pytest.raises(ValueError, match=name):
        deep_ep.Config(*args)


def test_size_hints_on_recommended_configs(monkeypatch):
    import dispatch as deep_ep

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    deep_ep.Buffer.set_num_sms(24)
    try:
        configs = [deep_ep.Buffer.get_dispatch_config(8), deep_ep.Buffer.get_combine_config(8)]
    finally:
        deep_ep.Buffer.set_num_sms(20)
    for config in configs:
        assert isinstance(config, deep_ep.Config) and config.num_sms == 24
        assert config.chunk_records(2) is not None
        small = config.get_nvl_buffer_size_hint(512, 8)
        assert 0 < small < config.get_nvl_buffer_size_hint(4096, 8)
        assert config.get_rdma_buffer_size_hint(512, 8) > 0  # 8 ranks of 4 per node: 2 nodes
        assert config.get_rdma_buffer_size_hint(512, 4) == 0  # one node: no rail
    with pytest.raises(ValueError, match="num_ranks"):
        deep_ep.Buffer.get_dispatch_config(0)
    with pytest.raises(ValueError, match="hidden_bytes"):
        configs[0].get_nvl_buffer_size_hint(0, 8)
    with pytest.raises(ValueError, match="num_ranks"):
        configs[0].get_rdma_buffer_size_hint(512, 6)  # not whole nodes of 4


@pytest.mark.parametrize("keyword, value, error", [
    ("low_latency_mode", True, NotImplementedError),
    ("allow_mnnvl", True, NotImplementedError),
    ("use_fabric", True, NotImplementedError),
    ("enable_shrink", True, NotImplementedError),
    ("comm", object(), NotImplementedError),
    ("num_qps_per_rank", 0, ValueError),
    ("low_latency_mode", 1, TypeError),
])
def test_buffer_refuses_what_it_does_not_have(keyword, value, error):
    import dispatch as deep_ep

    # Refused before anything collective happens: no process group is needed to see it.
    with pytest.raises(error, match=keyword if keyword != "comm" else "mpi4py"):
        deep_ep.Buffer(None, 0, 0, **{keyword: value})


def test_static_helpers():
    import dispatch as deep_ep

    event = deep_ep.Buffer.capture()
    assert isinstance(event, deep_ep.EventOverlap) and event.event is None  # CPU: already finished
    event.current_stream_wait()
    assert deep_ep.Buffer.is_sm90_compiled() is True
    assert deep_ep.topk_idx_t == torch.int64
    with pytest.raises(NotImplementedError, match="low-latency"):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)


# ----------------------------------------------------------------------------------------------
# the client code, on a cluster
# ----------------------------------------------------------------------------------------------

def _inputs(seed: int, s: int, R: int, L: int) -> Dict[str, Any]:
    g = gen(seed, "deepep", s)
    T = int(torch.randint(24, 72, (1,), generator=g))
    E = EXPERTS_PER_RANK * R
    topk_idx = make_routing(g, T, E, TOPK, R, L, "random", 0.15)
    topk_weights = torch.rand(T, TOPK, generator=g) + 0.5
    x = torch.randn(T, HIDDEN, generator=g).to(torch.bfloat16)
    return dict(T=T, E=E, topk_idx=topk_idx, topk_weights=topk_weights, x=x)


def _get_buffer(deep_ep: Any, group: Any, hidden_bytes: int, low_latency: bool = False) -> Any:
    """Megatron-core's ``get_buffer``, as written against DeepEP."""
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (deep_ep.Buffer.get_dispatch_config(group.size()), deep_ep.Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    return deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=low_latency,
                          num_qps_per_rank=12, allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)


def _check_rows_by_source(recv_x: torch.Tensor, prefix: torch.Tensor, R: int) -> List[str]:
    """DeepEP's check: the rows from source ``i`` (between the prefix sums) all hold ``i``."""
    fails = []
    if not torch.equal(recv_x.amin(dim=1), recv_x.amax(dim=1)):
        fails.append("rank-valued rows are not constant")
    start = 0
    for i in range(R):
        end = int(prefix[i])
        if not bool((recv_x[start:end].float() == i).all()):
            fails.append(f"rows [{start}, {end}) should come from rank {i}")
        start = end
    if start != recv_x.shape[0]:
        fails.append(f"prefix sums end at {start}, but {recv_x.shape[0]} rows were received")
    return fails


def _as_launched(ctx: Any, client: Any, *args: Any) -> Any:
    """Runs ``client(ctx, *args)`` with ``LOCAL_WORLD_SIZE`` set, as a launcher does on real nodes,
    so that the client code finds the emulated nodes without our ``num_ranks_per_node``."""
    saved = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(ctx.ranks_per_node)
    try:
        return client(ctx, *args)
    finally:
        if saved is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = saved


def _client_job(ctx: Any, seed: int) -> List[str]:
    return _as_launched(ctx, _client_code, seed)


def _megatron_example(ctx: Any, seed: int) -> List[float]:
    from examples import megatron_style

    try:
        return megatron_style.check_moe_block(ctx.group, seed)
    finally:
        if megatron_style._buffer is not None:
            megatron_style._buffer.destroy()
            megatron_style._buffer = None


def _megatron_job(ctx: Any, seed: int) -> List[float]:
    return _as_launched(ctx, _megatron_example, seed)


def _client_code(ctx: Any, seed: int) -> List[str]:
    import dispatch as deep_ep

    R, L, rank, group = ctx.world_size, ctx.ranks_per_node, ctx.rank, ctx.group
    N, node, local = R // L, rank // L, rank % L
    fails: List[str] = []

    def check(what: str, message: Any) -> None:
        if message:
            fails.append(f"{what}: {message}")

    inputs = [_inputs(seed, s, R, L) for s in range(R)]
    mine = inputs[rank]
    E, T = mine["E"], mine["T"]
    topk_idx, topk_weights, x = mine["topk_idx"].to(deep_ep.topk_idx_t), mine["topk_weights"], mine["x"]
    refs = [reference_dispatch([i["x"] for i in inputs], [i["topk_idx"] for i in inputs],
                               [i["topk_weights"] for i in inputs], E, L, d) for d in range(R)]
    ref = refs[rank]

    # ---- buffer, Megatron-style, and the small helpers
    deep_ep.Buffer.set_num_sms(24)
    hidden_bytes = x.size(1) * max(x.element_size(), 2)
    buffer = _get_buffer(deep_ep, group, hidden_bytes)
    rdma_hint = deep_ep.Buffer.get_dispatch_config(R).get_rdma_buffer_size_hint(hidden_bytes, R)
    check("rdma size hint", (rdma_hint > 0) != (N > 1) and f"{rdma_hint} on {N} node(s)")
    check("get_num_rdma_ranks", buffer.get_num_rdma_ranks() != N and buffer.get_num_rdma_ranks())
    check("get_rdma_rank", buffer.get_rdma_rank() != node and buffer.get_rdma_rank())
    check("get_root_rdma_rank", (buffer.get_root_rdma_rank(True), buffer.get_root_rdma_rank(False)) != (local, 0)
          and (buffer.get_root_rdma_rank(True), buffer.get_root_rdma_rank(False)))
    check("get_local_device_id", buffer.get_local_device_id() != -1 and buffer.get_local_device_id())
    check("get_comm_stream", buffer.get_comm_stream() is None and "None")
    try:
        buffer.get_local_buffer_tensor(torch.bfloat16)
        fails.append("get_local_buffer_tensor did not raise")
    except NotImplementedError:
        pass

    # ---- layout, ordered after a captured event, on the "comm stream", asynchronously
    previous_event = deep_ep.Buffer.capture()
    per_rank, per_rdma_rank, per_expert, in_rank, event = buffer.get_dispatch_layout(
        topk_idx, E, previous_event=previous_event, async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    for name, got, want in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                                "is_token_in_rank"), (per_rank, per_rdma_rank, per_expert, in_rank),
                               reference_layout(topk_idx, E, R, L)):
        check("layout", diff(name, got, want))

    # ---- dispatch with top-k, tiny DeepEP chunk windows so that chunks are many
    config = deep_ep.Config(2, 4, 16) if N == 1 else deep_ep.Config(2, 4, 16, 4, 16)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        config=config, previous_event=event, async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    check("dispatch", diff("recv_x", recv_x, ref["recv_x"]))
    check("dispatch", diff("recv_topk_idx", recv_topk_idx, ref["recv_topk_idx"]))
    check("dispatch", diff("recv_topk_weights", recv_topk_weights, ref["recv_topk_weights"]))
    check("dispatch", diff("num_recv_tokens_per_expert_list", per_expert_list,
                           ref["num_recv_tokens_per_expert_list"]))
    fails += _check_handle(handle, inputs, ref, R, L, rank)

    # DeepEP's own data check, with rank-valued rows, through the prefix entry of the handle.
    rank_x = torch.full((T, HIDDEN), float(rank), dtype=torch.bfloat16)
    rank_recv, _, _, _, rank_handle, _ = buffer.dispatch(
        rank_x, topk_idx=topk_idx, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    prefix = rank_handle[0][:, rank] if N == 1 else rank_handle[-4]
    fails += ["data check: " + f for f in _check_rows_by_source(rank_recv, prefix, R)]

    # ---- combine of the received rows (DeepEP's test: x times the ranks each token reached)
    combined_x, combined_weights, event = buffer.combine(
        recv_x, handle, topk_weights=recv_topk_weights, config=deep_ep.Buffer.get_combine_config(R),
        previous_event=deep_ep.Buffer.capture(), async_finish=True)
    event.current_stream_wait()
    src_ranks = [r["recv_src_rank"] for r in refs]
    src_tokens = [r["recv_src_token"] for r in refs]
    want_x, want_w = reference_combine([r["recv_x"] for r in refs], [r["recv_topk_weights"] for r in refs],
                                       src_ranks, src_tokens, L, rank, T)
    check("combine", diff("combined_x", combined_x, want_x))
    check("combine", diff("combined_topk_weights", combined_weights, want_w))
    reached = in_rank.sum(dim=1, keepdim=True).float()
    rank_combined, _, _ = buffer.combine(rank_recv, rank_handle)
    check("combine", not bool((rank_combined.float() == rank * reached).all())
          and "rank-valued rows are not multiplied by the ranks they reached")

    # ---- dispatch without top-k (layout only): the per-expert counts still come back
    recv_plain, no_idx, no_weights, plain_list, plain_handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, config=deep_ep.Buffer.get_dispatch_config(R))
    check("no top-k", diff("recv_x", recv_plain, ref["recv_x"]))
    check("no top-k", (no_idx is not None or no_weights is not None) and "recv_topk_idx/weights not None")
    check("no top-k", diff("num_recv_tokens_per_expert_list", plain_list, ref["num_recv_tokens_per_expert_list"]))
    plain_combined, plain_weights, _ = buffer.combine(recv_plain, plain_handle)
    want_plain, _ = reference_combine([r["recv_x"] for r in refs], None, src_ranks, src_tokens, L, rank, T)
    check("no top-k", diff("combined_x", plain_combined, want_plain))
    check("no top-k", plain_weights is not None and "combined_topk_weights not None")

    # ---- cached dispatch: new x along the same routes
    x2 = [(i["x"].float() * 3 - 1).to(torch.bfloat16) for i in inputs]
    want_cached = reference_dispatch(x2, [i["topk_idx"] for i in inputs], None, E, L, rank)["recv_x"]
    cached = buffer.dispatch(x2[rank], handle=handle)
    check("cached", diff("recv_x", cached[0], want_cached))
    check("cached", (cached[1:4] != (None, None, None) or cached[4] is not handle) and "want (None, None, None, handle)")

    # ---- worst-token mode: fixed row count, and an empty per-expert list as in DeepEP
    W = max(r["recv_x"].shape[0] for r in refs) + 5
    worst = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
                            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, num_worst_tokens=W)
    worst_x, worst_idx, _, worst_list, worst_handle, _ = worst
    check("worst", diff("recv_x", worst_x, pad_rows(ref["recv_x"], W)))
    check("worst", diff("recv_topk_idx", worst_idx, pad_rows(ref["recv_topk_idx"], W, -1)))
    check("worst", worst_list != [] and f"num_recv_tokens_per_expert_list={worst_list}, want []")
    check("worst", diff("handle prefix", worst_handle[0 if N == 1 else -4], handle[0 if N == 1 else -4]))
    worst_combined, _, _ = buffer.combine(worst_x, worst_handle)
    check("worst", diff("combined_x", worst_combined, want_plain))

    # ---- counts on some ranks only: every rank refuses, and the buffer stays usable
    try:
        buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert if rank == 0 else None, num_experts=E)
        fails.append("num_tokens_per_expert on rank 0 only did not raise")
    except ValueError as exc:
        check("partial counts", "num_tokens_per_expert" not in str(exc) and str(exc))
    again = buffer.dispatch(x, handle=handle)[0]
    check("after error", diff("recv_x", again, ref["recv_x"]))

    buffer.destroy()
    deep_ep.Buffer.set_num_sms(20)
    return fails


def _check_handle(handle: Any, inputs: List[Dict[str, Any]], ref: Dict[str, Any], R: int, L: int,
                  rank: int) -> List[str]:
    """The handle entries both libraries share, with DeepEP's shapes and dtypes; errors for the rest."""
    fails: List[str] = []
    N, node, local = R // L, rank // L, rank % L
    layouts = [reference_layout(i["topk_idx"], i["E"], R, L) for i in inputs]
    counts = torch.stack([lay[0] for lay in layouts]).to(torch.int64)  # [src, dst]
    recv_prefix = counts[:, rank].cumsum(0).to(torch.int32)
    if N == 1:
        expected = {0: counts.cumsum(0).to(torch.int32), 3: ref["recv_src_token"].to(torch.int32),
                    4: layouts[rank][3]}
        missing = [1, 2, 5, -1]
    else:
        to_my_node = [bool_rows[:, node * L:(node + 1) * L].any(dim=1).sum() for bool_rows in
                      (layouts[m * L + local][3] for m in range(N))]
        expected = {0: layouts[rank][3], 4: torch.stack(to_my_node).cumsum(0).to(torch.int32),
                    6: recv_prefix, -4: recv_prefix}
        missing = [1, 2, 3, 5, 7, 8, 9, -1]
    if len(handle) != (6 if N == 1 else 10):
        fails.append(f"len(handle) = {len(handle)}")
    for index, want in expected.items():
        message = diff(f"handle[{index}]", handle[index], want)
        if message:
            fails.append(message)
    for index in missing:
        try:
            handle[index]
            fails.append(f"handle[{index}] did not raise")
        except NotImplementedError as exc:
            if "no counterpart" not in str(exc):
                fails.append(f"handle[{index}]: unclear error {exc}")
    for bad, error in ((len(handle), IndexError), ("0", TypeError)):
        try:
            handle[bad]
            fails.append(f"handle[{bad!r}] did not raise")
        except error:
            pass
    try:
        _ = tuple(handle)
        fails.append("unpacking the handle did not raise")
    except TypeError:
        pass
    return fails


@pytest.mark.parametrize("shape", DROPIN_SHAPES, ids=[f"{n}x{l}" for n, l in DROPIN_SHAPES])
def test_deepep_client_code(cluster_factory, shape):
    cluster = cluster_factory(*shape)
    results = cluster.run(_client_job, 11, timeout_s=300)
    fails = [f"rank {r}: {f}" for r, rank_fails in enumerate(results) for f in rank_fails]
    assert not fails, "\n".join(fails[:40])


@pytest.mark.parametrize("shape", DROPIN_SHAPES, ids=[f"{n}x{l}" for n, l in DROPIN_SHAPES])
def test_megatron_style_example(cluster_factory, shape):
    """examples/megatron_style.py: an MoE block through Megatron-style fused dispatch/combine
    autograd functions matches the dense block, forward and backward, on every rank."""
    errors = cluster_factory(*shape).run(_megatron_job, 5, timeout_s=300)
    worst = max(max(e) for e in errors)
    assert worst < 1e-5, f"relative errors (y, dx, dprobs) per rank: {errors}"

"""The cost model and the exact traffic counts it is fed with (bench/common.py, bench/cost_model.py)."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch

from bench.common import (BytesPerToken, bytes_per_token, dispatch_record_bytes, gen_routing, gen_topk_idx,
                          partial_row_bytes, return_row_bytes, traffic_counts)
from bench.cost_model import ClusterSpec, Link, load_routing, predict
from bench import cost_model

# A hand-made routing: R = 4 ranks, L = 2 per node (N = 2), E = 4 (expert e on rank e).
HAND = [
    torch.tensor([[1, 2], [2, 3], [-1, -1]]),   # rank 0 (node 0, local 0)
    torch.tensor([[0, -1]]),                    # rank 1 (node 0, local 1)
    torch.tensor([[0, 1]]),                     # rank 2 (node 1, local 0)
    torch.tensor([[3, -1]]),                    # rank 3 (node 1, local 1)
]


def test_hand_traffic_counts():
    tr = traffic_counts(HAND, 4, 2)
    as_list = lambda t: [int(v) for v in t]  # noqa: E731
    assert as_list(tr.recv_rows) == [2, 2, 2, 2]
    # two-hop dispatch, worked out by hand (see the docstring of Traffic / docs/semantics.md)
    assert as_list(tr.dispatch_rail_send) == [2, 0, 1, 0]
    assert as_list(tr.dispatch_rail_recv) == [1, 0, 2, 0]
    assert as_list(tr.dispatch_node_send) == [2, 1, 1, 0]
    assert as_list(tr.dispatch_node_recv) == [1, 2, 0, 1]
    assert as_list(tr.combine_rail_send) == [1, 0, 2, 0]
    assert as_list(tr.combine_node_send) == [1, 2, 0, 1]
    # flat all-to-all
    assert as_list(tr.flat_rail_send) == [3, 0, 2, 0]
    assert as_list(tr.flat_rail_recv) == [1, 1, 2, 1]
    assert as_list(tr.flat_node_send) == [1, 1, 0, 0]
    assert as_list(tr.flat_node_recv) == [1, 1, 0, 0]
    # Tutel-style hierarchical all-to-all
    assert as_list(tr.hier_node_send) == [2, 1, 1, 0]
    assert as_list(tr.hier_node_recv) == [1, 2, 0, 1]
    assert as_list(tr.hier_rail_send) == [2, 1, 1, 1]
    assert as_list(tr.hier_rail_recv) == [1, 1, 2, 1]
    assert as_list(tr.max_rail_tokens_per_peer) == [2, 0, 1, 0]
    assert tr.expected_stats(0, "dispatch") == {"rail_token_copies": 2, "flat_rail_token_copies": 3,
                                                "node_token_copies": 2}
    assert tr.expected_stats(2, "combine") == {"rail_token_copies": 2, "flat_rail_token_copies": 2,
                                               "node_token_copies": 0}


def test_hand_cost_model_exact():
    """Every number below is worked out by hand from the formulas in bench/cost_model.py."""
    tr = traffic_counts(HAND, 4, 2)
    bpt = BytesPerToken(dispatch_rail=100, dispatch_node=100, combine_rail=200, combine_node=50,
                        payload_dispatch=64, payload_combine=32)
    # rail: 1 us + 100 bytes per us; node: 0.5 us + 1000 bytes per us; one record per chunk
    spec = ClusterSpec("hand", 2, rail=Link(1e-6, 1e8), node=Link(0.5e-6, 1e9), chunk_tokens=1)
    p = predict(spec, tr, bpt)
    us = lambda v: round(v * 1e6, 9)  # noqa: E731
    assert p["two_hop"]["chunks"] == 2
    # dispatch: rank 0 has rail max(2,1)*100 B = 2 us, node max(2,1)*100 B = 0.2 us;
    # per chunk a = 1 + 1 = 2, b = 0.1 + 0.5 = 0.6 -> 2 + 0.6 + 2 = 4.6; notify 1 + 0.5
    assert us(p["two_hop"]["dispatch"]) == pytest.approx(6.1, abs=1e-9)
    # combine: rank 0 rail max(1,2)*200 B = 4 us, node max(1,2)*50 B = 0.1 us;
    # a = 2 + 1 = 3, b = 0.05 + 0.5 = 0.55 -> 3 + 0.55 + 3 = 6.55 (no notify)
    assert us(p["two_hop"]["combine"]) == pytest.approx(6.55, abs=1e-9)
    # flat dispatch: rank 0 rail 3*100 B = 3 us + 1, node 0.1 + 0.5 -> 4; + count exchange 1
    assert us(p["flat"]["dispatch"]) == pytest.approx(5.0, abs=1e-9)
    # flat combine (50 B rows): rail 3*50 B = 1.5 us + 1 = 2.5; + 1
    assert us(p["flat"]["combine"]) == pytest.approx(3.5, abs=1e-9)
    # hierarchical dispatch: 1 + (0.2 + 0.5) + (2 + 1)
    assert us(p["hierarchical"]["dispatch"]) == pytest.approx(4.7, abs=1e-9)
    # hierarchical combine: 1 + (0.1 + 0.5) + (1 + 1)
    assert us(p["hierarchical"]["combine"]) == pytest.approx(3.6, abs=1e-9)
    assert p["two_hop"]["dispatch_rail_bytes"] == 200
    assert p["flat"]["dispatch_rail_bytes"] == 300


def _brute_force(routing, E, L):
    """Per-token loops straight from the definitions in docs/semantics.md."""
    R = len(routing)
    per = E // R
    dests = [[sorted({int(e) // per for e in row if e >= 0}) for row in idx.tolist()] for idx in routing]
    rail_send = [0] * R
    node_send = [0] * R
    flat_send = [0] * R
    flat_recv = [0] * R
    comb_node = [0] * R
    comb_rail = [0] * R
    for s in range(R):
        n_s, l_s = divmod(s, L)
        for ds in dests[s]:
            nodes = {d // L for d in ds}
            rail_send[s] += len([m for m in nodes if m != n_s])
            flat_send[s] += len([d for d in ds if d // L != n_s])
            for m in nodes:
                node_send[m * L + l_s] += len([d for d in ds if d // L == m and d % L != l_s])
                if m != n_s:
                    comb_rail[m * L + l_s] += 1
            for d in ds:
                if d // L != n_s:
                    flat_recv[d] += 1
                if d % L != l_s:
                    comb_node[d] += 1
    return rail_send, node_send, flat_send, flat_recv, comb_node, comb_rail


@pytest.mark.parametrize("N,L,E,k,limit", [(2, 2, 8, 3, None), (3, 2, 12, 4, 2), (2, 4, 16, 8, 1),
                                           (1, 4, 8, 2, None), (4, 1, 8, 3, None)])
def test_traffic_counts_match_brute_force(N, L, E, k, limit):
    R = N * L
    routing = gen_routing(37, E, k, R, L, limit, seed=5, drop_prob=0.2)
    tr = traffic_counts(routing, E, L)
    rail_send, node_send, flat_send, flat_recv, comb_node, comb_rail = _brute_force(routing, E, L)
    assert tr.dispatch_rail_send.tolist() == rail_send
    assert tr.dispatch_node_send.tolist() == node_send
    assert tr.flat_rail_send.tolist() == flat_send
    assert tr.flat_rail_recv.tolist() == flat_recv
    assert tr.combine_node_send.tolist() == comb_node
    assert tr.combine_rail_send.tolist() == comb_rail
    # conservation: what is sent on a link is received on it
    for a, b in [(tr.dispatch_rail_send, tr.dispatch_rail_recv), (tr.dispatch_node_send, tr.dispatch_node_recv),
                 (tr.flat_rail_send, tr.flat_rail_recv), (tr.flat_node_send, tr.flat_node_recv),
                 (tr.hier_node_send, tr.hier_node_recv), (tr.hier_rail_send, tr.hier_rail_recv)]:
        assert int(a.sum()) == int(b.sum())
    # two-hop never puts more on the rail than a flat all-to-all; hierarchical moves as much as flat
    assert bool((tr.dispatch_rail_send <= tr.flat_rail_send).all())
    assert int(tr.hier_rail_send.sum()) == int(tr.flat_rail_send.sum())


def test_node_limit_generator():
    R, L, E = 16, 4, 64
    idx = gen_topk_idx(500, E, 8, R, L, node_limit=2, seed=3, rank=1)
    nodes = (idx // (E // R)) // L
    assert all(len(set(row)) <= 2 for row in nodes.tolist())
    assert ((idx >= 0) & (idx < E)).all()
    # distinct experts per token
    assert all(len(set(row)) == 8 for row in idx.tolist())
    # reproducible per (seed, rank), different across ranks
    assert torch.equal(idx, gen_topk_idx(500, E, 8, R, L, node_limit=2, seed=3, rank=1))
    assert not torch.equal(idx, gen_topk_idx(500, E, 8, R, L, node_limit=2, seed=3, rank=2))


def test_record_sizes_match_the_library():
    _C = pytest.importorskip("dispatch._C")
    for L, k, hb, sb in itertools.product([1, 2, 8], [0, 1, 8], [256, 4096, 7168], [0, 224]):
        assert dispatch_record_bytes(L, k, hb, sb) == _C.RecordLayout(L, k, hb, sb).bytes
    assert return_row_bytes(4096, 8) == 4128
    assert partial_row_bytes(2048, 4, 8) == 8224
    bpt = bytes_per_token(7168, 8, "fp8", 8)
    assert bpt.payload_dispatch == 7168 + 4 * 56
    assert bpt.combine_node == return_row_bytes(7168 * 2, 8)   # fp8 dispatch combines in bf16
    # rounded rail partials (Config.round_rail_partials): 16-bit rows, as the library lays them out
    for hidden, k, row_dtype in itertools.product([200, 2048], [0, 8], [1, 2]):
        assert partial_row_bytes(hidden, 2, k) == _C.PartialRowLayout(hidden, 4, k, row_dtype).bytes
    assert bytes_per_token(2048, 8, "bf16", 4, round_rail_partials=True).combine_rail == 4128
    assert bytes_per_token(2048, 8, "fp32", 4, round_rail_partials=True).combine_rail == 8224   # fp32: no effect


def test_two_hop_beats_flat_on_rail_heavy_cluster():
    """With the rail the bottleneck, the model must favour two-hop dispatch over a flat a2a."""
    spec = cost_model.PRESETS["h800"]
    routing = gen_routing(256, 64, 8, 16, 8, None, seed=1)
    tr = traffic_counts(routing, 64, 8)
    p = predict(spec, tr, bytes_per_token(4096, 8, "bf16", 8))
    assert p["two_hop"]["dispatch"] < p["flat"]["dispatch"]
    assert p["two_hop"]["dispatch_rail_bytes"] < p["flat"]["dispatch_rail_bytes"]


def test_cli_sweep_and_plot(tmp_path, capsys):
    png, js = tmp_path / "cost.png", tmp_path / "cost.json"
    assert cost_model.main(["--preset", "h800x4", "--nodes", "1,2,4", "--tokens", "64", "--hidden", "256",
                            "--experts", "64", "--plot", str(png), "--json", str(js)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    rows = data["results"][cost_model.PRESETS["h800x4"].name]
    assert [r["nodes"] for r in rows] == [1, 2, 4]
    assert all(r["two_hop_dispatch_us"] > 0 for r in rows)
    assert "two-hop" not in capsys.readouterr().err  # the table goes to stdout


def test_cli_real_routing_file(tmp_path, capsys):
    path = tmp_path / "routing.pt"
    torch.save(torch.stack(gen_routing(32, 16, 4, 8, 4, None, seed=2)), path)
    assert len(load_routing(str(path))) == 8
    assert cost_model.main(["--preset", "h800x4", "--routing", str(path), "--experts", "16",
                            "--hidden", "256", "--ranks-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "two_hop" in out and "flat" in out and "hierarchical" in out


def test_hand_emulated_model_exact():
    """bench.cost_model.predict_emulated (the CPU-backend model checked by the benchmark) by hand."""
    from bench.cost_model import HostLinks, Movers, chunk_events, predict_emulated
    tr = traffic_counts(HAND, 4, 2)
    assert tr.own_node_tokens.tolist() == [1, 1, 0, 1]
    assert chunk_events(tr, 1).tolist() == [4, 1, 3, 1]       # own + rail recv + rail send chunks
    assert chunk_events(tr, 2).tolist() == [3, 1, 2, 1]
    bpt = BytesPerToken(dispatch_rail=100, dispatch_node=100, combine_rail=200, combine_node=50,
                        payload_dispatch=64, payload_combine=32)
    movers = Movers(pack=1e9, unpack=5e8, gather=1e9, reduce_first=5e8, reduce_more=1e9, accumulate=2e9)
    links = HostLinks(rail=Link(1e-6, 1e8), movers=movers, chunk_dispatch_s=1e-6, chunk_combine_s=2e-6,
                      fixed_dispatch=10e-6, fixed_combine=20e-6, cores=1)
    p = predict_emulated(links, tr, bpt, hidden=4, acc_elem_bytes=4, chunk_tokens=1)
    assert p["chunks"] == 2
    # dispatch per rank (us): pack (rail_send + own) * .1 = [.3, .1, .1, .1]; rail max(send, recv) * 1
    # = [2, 0, 2, 0]; unpack 2 rows * 100 B / 5e8 = .4; chunks [4, 1, 3, 1] * 1
    # -> [6.7, 1.5, 5.5, 1.5], 15.2 on 1 core; rank 0's path 6.7 + 2 chunks * 1 us rail latency = 8.7
    assert p["dispatch"] * 1e6 == pytest.approx(10 + 15.2, abs=1e-9)
    assert p["dispatch_stages"]["rail"] * 1e6 == pytest.approx(4.0, abs=1e-9)
    assert p["dispatch_stages"]["path"] * 1e6 == pytest.approx(8.7, abs=1e-9)
    # combine per rank: gather returned rows [1, 2, 0, 1] * .05; reduce records [2, 1, 2, 1] * .1 plus
    # further rows [0, 1, 0, 1] * .05; rail [2, 0, 2, 0] * 2; accumulate rail_send [2, 0, 1, 0] * .1;
    # chunks [4, 1, 3, 1] * 2 -> [12.45, 2.25, 10.3, 2.2], 27.2 in all
    assert p["combine"] * 1e6 == pytest.approx(20 + 27.2, abs=1e-9)
    assert p["combine_stages"]["cores_total"] * 1e6 == pytest.approx(27.2, abs=1e-9)
    assert p["combine_stages"]["chunks"] * 1e6 == pytest.approx(18.0, abs=1e-9)
    # two cores: the cores bound falls to 7.6, below rank 0's path of 8.7
    two = HostLinks(rail=Link(1e-6, 1e8), movers=movers, chunk_dispatch_s=1e-6, fixed_dispatch=10e-6, cores=2)
    assert predict_emulated(two, tr, bpt, 4, 4, 1)["dispatch"] * 1e6 == pytest.approx(10 + 8.7, abs=1e-9)


def test_mover_calibration_is_well_formed():
    """bench.calibrate measures every mover the emulated model needs, with positive speeds."""
    from bench.calibrate import mover_speeds
    from bench.cost_model import Movers
    speeds = mover_speeds(hidden=256, topk=4, ranks_per_node=2, dtype="bf16", chunk_records=64, num_tokens=128,
                          reps=1, working_set_bytes=1 << 20)
    movers = Movers(**speeds)
    assert all(v > 0 for v in speeds.values())
    assert movers.pack == speeds["pack"]


def test_cli_default_is_quick_and_draws(tmp_path, monkeypatch):
    """The default sweep stops at 8 nodes and 128 ranks, and draws bench/out/cost_model.png."""
    monkeypatch.chdir(tmp_path)
    js = tmp_path / "cost.json"
    start = time.monotonic()
    assert cost_model.main(["--tokens", "128", "--json", str(js)]) == 0
    seconds = time.monotonic() - start
    png = tmp_path / "bench" / "out" / "cost_model.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(js.read_text())["results"]
    assert results and all(r["ranks"] <= 128 and r["nodes"] <= 8 for rows in results.values() for r in rows)
    assert seconds < 120, f"the default sweep took {seconds:.0f} s"

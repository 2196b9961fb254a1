"""bench/: the bandwidth benchmark and the SM sweep run on the CPU backend, and the bytes they
report equal the planner's exact counts."""

from __future__ import annotations

import json

import pytest

from bench import all_to_all, sm_sweep
from bench.common import bytes_per_token, gen_routing, traffic_counts


def _cfg(**kw):
    cfg = {"ranks_per_node": 2, "tokens": 96, "hidden": 256, "topk": 4, "experts": 16, "node_limit": None,
           "dtype": "bf16", "num_sms": 4, "chunk_tokens": 32, "iters": 2, "warmup": 1, "seed": 3,
           "model_check": False, "progress": False}
    cfg.update(kw)
    return cfg


def _bench_job(ctx, cfg):
    return all_to_all.run_rank(ctx.rank, ctx.world_size, dict(cfg, ranks_per_node=ctx.ranks_per_node))


def _check_bytes(res, cfg, R, L):
    """The reported bytes equal the planner's counts of the same (regenerated) routing."""
    routing = gen_routing(cfg["tokens"], cfg["experts"], cfg["topk"], R, L, cfg["node_limit"], cfg["seed"])
    tr = traffic_counts(routing, cfg["experts"], L)
    bpt = bytes_per_token(cfg["hidden"], cfg["topk"], cfg["dtype"], L,
                          round_rail_partials=bool(cfg.get("round_rail_partials")))
    assert res["counters_match_planner"], res["counter_mismatches"]
    d, c = res["ops"]["dispatch"], res["ops"]["combine"]
    assert d["rail_bytes_per_token"] == bpt.dispatch_rail
    assert d["node_bytes_per_token"] == bpt.dispatch_node
    assert c["rail_bytes_per_token"] == bpt.combine_rail
    assert c["node_bytes_per_token"] == bpt.combine_node
    assert d["rail_token_copies"] == tr.dispatch_rail_send.tolist()
    assert d["node_token_copies"] == tr.dispatch_node_send.tolist()
    assert d["flat_rail_token_copies"] == tr.flat_rail_send.tolist()
    assert c["rail_token_copies"] == tr.combine_rail_send.tolist()
    assert c["node_token_copies"] == tr.combine_node_send.tolist()
    assert c["flat_rail_token_copies"] == tr.flat_rail_recv.tolist()
    assert d["rail_bytes_total"] == int(tr.dispatch_rail_send.sum()) * bpt.dispatch_rail
    assert d["node_bytes_total"] == int(tr.dispatch_node_send.sum()) * bpt.dispatch_node
    assert c["rail_bytes_total"] == int(tr.combine_rail_send.sum()) * bpt.combine_rail
    assert c["node_bytes_total"] == int(tr.combine_node_send.sum()) * bpt.combine_node
    for op in (d, c):
        t = op["time"]
        assert t["n"] == cfg["iters"] and 0 < t["min_us"] <= t["median_us"] <= t["max_us"]
        assert op["a2a_time"]["median_us"] > 0
        assert op["algbw_gbps"] > 0 and op["speedup_vs_a2a"] > 0
        if R > L:
            assert op["rail_gbps"] > 0


@pytest.mark.parametrize("dtype,node_limit", [("bf16", None), ("fp8", 1)])
def test_benchmark_bytes_equal_planner(cluster_factory, dtype, node_limit):
    cluster = cluster_factory(2, 2)
    cfg = _cfg(dtype=dtype, node_limit=node_limit)
    res = cluster.run(_bench_job, cfg, timeout_s=240)[0]
    _check_bytes(res, res["config"], 4, 2)
    text = all_to_all.format_report(res)
    assert "dispatch" in text and "combine" in text and "equal the planner's exact counts: yes" in text


def test_benchmark_cli_own_launcher(tmp_path, capsys):
    """``python -m bench.all_to_all`` spawns its own emulated cluster and writes --json."""
    out = tmp_path / "res.json"
    rc = all_to_all.main(["--nodes", "2", "--ranks-per-node", "1", "--tokens", "64", "--hidden", "128",
                          "--topk", "2", "--experts", "8", "--iters", "2", "--warmup", "1", "--no-progress",
                          "--model-check", "--round-rail-partials", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    _check_bytes(res, res["config"], 2, 1)
    mc = res["model_check"]
    for op in ("dispatch", "combine"):
        assert mc[op]["predicted_us"] > 0 and mc[op]["measured_us"] > 0
    text = capsys.readouterr().out
    assert "a2a" in text and "cost model check" in text


def _sweep_job(ctx, cfg):
    return sm_sweep.sweep_rank(ctx.rank, ctx.world_size, dict(cfg, ranks_per_node=ctx.ranks_per_node))


def test_sm_sweep_and_plots(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 2)
    cfg = _cfg(max_sms=4, step=2, iters=1, warmup=0)
    res = cluster.run(_sweep_job, cfg, timeout_s=240)[0]
    assert [r["num_sms"] for r in res["rows"]] == [2, 4]
    for r in res["rows"]:
        assert r["threads"] >= 1
        for op in ("dispatch", "combine"):
            assert r[op]["algbw_gbps"] > 0
            assert r[op]["algbw_gbps_per_sm"] == pytest.approx(r[op]["algbw_gbps"] / r["num_sms"])
    assert res["profile"] and res["records"]
    assert {rec["rank"] for rec in res["records"]} == {0, 1, 2, 3}
    png = sm_sweep.plot_sweep(res, str(tmp_path / "sweep.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "num_sms" in sm_sweep.format_sweep(res)


@pytest.mark.parametrize("argv,words", [
    (["--node-limit", "3"], ["--node-limit 3", "--nodes 2"]),
    (["--topk", "20", "--experts", "16"], ["--topk 20", "--experts 16"]),
    (["--experts", "30"], ["--experts 30", "multiple"]),
    (["--tokens", "-1"], ["--tokens"]),
])
def test_benchmark_cli_refuses_adjustments(capsys, argv, words):
    """Arguments the benchmark would have to adjust silently are refused, saying why."""
    with pytest.raises(SystemExit) as exit_info:
        all_to_all.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


def test_benchmark_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        all_to_all.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 512)" in out and "(default: bf16)" in out


def test_benchmark_zero_tokens(cluster_factory):
    """--tokens 0 measures the fixed cost of a call: no rows move, the report is well formed."""
    cluster = cluster_factory(2, 2)
    cfg = _cfg(tokens=0, iters=1, warmup=0)
    res = cluster.run(_bench_job, cfg, timeout_s=240)[0]
    assert res["counters_match_planner"], res["counter_mismatches"]
    for op in ("dispatch", "combine"):
        assert res["ops"][op]["rail_bytes_total"] == 0 and res["ops"][op]["time"]["median_us"] > 0
    assert "equal the planner's exact counts: yes" in all_to_all.format_report(res)


def test_sm_sweep_says_when_cores_are_too_few():
    few = {"world_size": 4, "cores": 2}
    assert "2 cores for 4 ranks" in sm_sweep.cores_note(few)
    assert sm_sweep.cores_note({"world_size": 4, "cores": 64}) is None

"""bench/gpu_loopback.py: its sweep and report logic, its no-GPU exit, and a tiny run of the whole
benchmark on the SIMT runtime (the same code a GPU run takes; its timings mean nothing)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_loopback as gl


def test_sms_sweep_and_all_sms():
    assert gl.sms_sweep(132) == [2, 4, 8, 16, 24, 32, 132]
    assert gl.sms_sweep(32) == [2, 4, 8, 16, 24, 32]
    assert gl.sms_sweep(7) == [2, 4, 6]
    assert gl.sms_sweep(2) == [2]
    with pytest.raises(ValueError, match="limit"):
        gl.sms_sweep(1)
    assert gl.all_sms(132, 4, 128) == 32   # 33 SMs per virtual rank, even
    assert gl.all_sms(132, 1, 128) == 132
    assert gl.all_sms(132, 1, 32) == 64    # at most 2 blocks per channel
    assert gl.all_sms(132, 100, 128) == 2
    assert gl.gbps(2_000_000_000, 0.5) == pytest.approx(4.0) and gl.gbps(1, 0.0) == 0.0


def test_arguments_are_checked():
    for argv in (["--ranks", "0"], ["--max-sms", "1"], ["--timeline", "x.png"]):
        with pytest.raises(SystemExit):
            gl.parse_args(argv)


def test_exits_cleanly_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU exit cannot be exercised here")
    out = tmp_path / "r.json"
    assert gl.main(["--device", "cuda", "--json", str(out), "--plot", str(tmp_path / "r.png")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not out.exists()


def test_tiny_run_on_simt(tmp_path, capsys):
    from dispatch import _C
    from dispatch.cuda.device import simt_available
    if not simt_available():
        pytest.fail("dispatch._simt is not built: the benchmark's logic check needs it")
    paths = {n: tmp_path / f"gl.{n}" for n in ("json", "png")}
    timeline = tmp_path / "timeline.png"
    H, k = 64, 2
    argv = ["--device", "simt", "--ranks", "2", "--tokens", "48", "--hidden", str(H), "--topk", str(k),
            "--experts", "8", "--iters", "2", "--warmup", "1", "--max-sms", "4", "--nvl-bytes", str(8 << 20),
            "--layout-tokens", "300", "--layout-iters", "2", "--profile", "--timeline", str(timeline),
            "--json", str(paths["json"]), "--plot", str(paths["png"])]
    assert gl.main(argv) == 0
    printed = capsys.readouterr().out
    assert "GB/s/SM" in printed and "SM-us/GB" in printed and "not a measurement of a GPU" in printed
    res = json.loads(paths["json"].read_text())
    assert res["config"]["num_sms"] == [2, 4] and [r["num_sms"] for r in res["rows"]] == [2, 4]
    lay = res["layout"]
    assert lay["matches_reference"] and lay["tokens"] == 300 and lay["ranks"] == 64 and lay["median_us"] > 0
    assert res["recv_rows"] > 0 and res["payload_bytes"] == res["recv_rows"] * H * 2
    assert res["copy"]["bytes"] == res["payload_bytes"] and res["copy"]["gbps"] > 0
    record_bytes = _C.RecordLayout(1, k, H * 2, 0).bytes
    return_bytes = _C.ReturnRowLayout(H * 2, 0).bytes
    for row in res["rows"]:
        for op in ("dispatch", "combine"):
            d = row[op]
            assert d["gbps"] == pytest.approx(res["payload_bytes"] / (d["median_us"] / 1e6) / 1e9)
            assert d["gbps_per_sm"] == pytest.approx(d["gbps"] / (2 * row["num_sms"]))
            assert d["kernel_span_us"] > 0
        prof = row["profile"]
        assert "SM-us/GB" in prof["table"] and "dispatch.node_copy" in prof["table"]
        s = prof["summary"]
        # one profiled dispatch + combine of both ranks: every block recorded, bytes as moved
        assert s["dispatch.node_copy"]["records"] == 2 * row["num_sms"]
        assert s["combine.node_copy"]["records"] == 2 * row["num_sms"]
        assert s["dispatch.node_copy"]["bytes_moved"] == res["recv_rows"] * record_bytes
        assert s["combine.node_copy"]["bytes_moved"] == res["recv_rows"] * return_bytes
        assert s["dispatch.node_copy"]["on_sm"] and s["dispatch.node_copy"]["units"] >= row["num_sms"]
    for path in (paths["png"], timeline):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

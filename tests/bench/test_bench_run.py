"""bench/run.py --quick runs every op and writes sane JSON; a peer that cannot run is a skipped row."""

import json
import os
import subprocess
import sys

import pytest

from nested_learning import ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quick_benchmark_table_and_json(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--repeat", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert {row["op"] for row in data["rows"]} >= set(ops.OPS) | {"step:hope", "step:titans", "step:transformer",
                                                                 "decode:hope", "decode:titans", "decode:transformer"}
    for row in data["rows"]:
        if row.get("skipped"):  # a peer not installed, or unable to run here (fla's Triton on CPU)
            assert row["peer"] and row["median_ms"] is None and row["skipped"] in r.stdout, row
            continue
        if row["op"].startswith("step:"):
            assert row["median_ms"] > 0 and row["parameters"] > 0
            # MFU: the counted FLOPs per token at the achieved tokens/s, over the GEMM peak of this run
            assert row["flops_per_s"] == row["tokens_per_s"] * row["flops_per_token"] and row["gemm_peak_flops"] > 0
            assert row["mfu"] == row["flops_per_s"] / row["gemm_peak_flops"] and "MFU" in r.stdout
            continue
        if row["op"].startswith("decode:"):  # generate beside the forward over the same tokens
            assert row["median_ms"] > 0 and row["forward_same_tokens_ms"] > 0
            assert row["decode_vs_forward"] == row["median_ms"] / row["forward_same_tokens_ms"]
            assert f"{row['op']:22} auto" in r.stdout and "x the forward per token" in r.stdout
            per_step = row["median_ms"] / int(row["shape"].split("new=")[1])
            assert row["ms_per_step"] == per_step and row["step_vs_floor"] == per_step / row["read_floor_ms"]
            # the floor reads at least every weight once (the embedding as the head)
            assert row["bytes_per_step"] >= 4 * row["parameters"] and row["read_floor_ms"] > 0
            if "ragged" in row["shape"]:
                assert row["stream_ms"] is None
            else:  # the same tokens one at a time through forward: generate's path before the decode step
                assert row["stream_ms"] > 0 and "one token at a time through forward" in r.stdout
            continue
        assert row["median_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["rel_err_vs_fp64_reference"] < 1e-4, row  # float32 against float64
        assert f"{row['op']:22} {row['backend']:10}" in r.stdout
    assert data["meta"]["build"]["extension"] == "loaded"


def test_bad_arguments_are_refused():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--ops", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown ops" in r.stderr


def test_peer_that_cannot_run_is_a_skipped_row_with_its_reason(tmp_path, monkeypatch, capsys):
    import bench.run as bench_run  # the repository root is on sys.path (pytest's pythonpath)
    from bench.cases import ce_case

    case = ce_case(64, 16, 128)

    def make_broken(dev, dtype):
        def run():
            raise RuntimeError("0 active drivers ([]). There should only be one.")
        return run

    def make_bad_build(dev, dtype):
        raise ImportError("no module named peer_kernels")

    def make_working(dev, dtype):  # a peer that runs: timed and compared, not skipped
        run = case.make(dev, dtype)
        return lambda: run("reference")[:1]

    case.peers = {"broken": (lambda: True, make_broken), "badbuild": (lambda: True, make_bad_build),
                  "absent": (lambda: False, make_working), "working": (lambda: True, make_working)}
    monkeypatch.setattr(bench_run, "cases", lambda quick, device: [case])
    out = tmp_path / "p.json"
    assert bench_run.main(["--quick", "--ops", case.op, "--repeat", "1", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"] if r.get("peer")}
    assert set(rows) == {"broken", "badbuild", "absent", "working"}
    assert rows["broken"]["skipped"] == "fails on cpu: RuntimeError: 0 active drivers ([]). There should only be one."
    assert rows["badbuild"]["skipped"] == "fails on cpu: ImportError: no module named peer_kernels"
    assert rows["absent"]["skipped"].startswith("not installed")
    for name in ("broken", "badbuild", "absent"):
        assert rows[name]["median_ms"] is None and rows[name]["rel_err_vs_fp64_reference"] is None
        assert f"{name:10}" in stdout and f"skipped: {rows[name]['skipped']}" in stdout
    ok = rows["working"]
    assert "skipped" not in ok and ok["median_ms"] > 0 and ok["rel_err_vs_fp64_reference"] < 1e-4


def test_time_limit_bounds_the_run_naming_each_row_it_left_out(tmp_path, capsys):
    import bench.run as bench_run  # the repository root is on sys.path (pytest's pythonpath)

    """--time-limit 0: no op, step or decode row starts; each is printed and recorded as skipped,
    and the JSON is complete."""
    out = tmp_path / "t.json"
    assert bench_run.main(["--quick", "--ops", "dgd_update", "step", "--repeat", "1", "--time-limit", "0",
                           "--json", str(out)]) == 0
    said = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r.get("time_limit") for r in rows)
    assert {r["op"] for r in rows} >= {"dgd_update", "step:hope", "step:titans", "step:transformer"}
    assert f"{len(rows)} rows skipped for --time-limit" in said and "[1/" in said

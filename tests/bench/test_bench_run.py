"""bench/run.py --quick runs every op and writes sane JSON."""

import json
import os
import subprocess
import sys

from nested_learning import ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_benchmark_table_and_json(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--repeat", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert {row["op"] for row in data["rows"]} >= set(ops.OPS) | {"step:hope", "step:titans", "step:transformer"}
    for row in data["rows"]:
        if row["op"].startswith("step:"):
            assert row["median_ms"] > 0 and row["parameters"] > 0
            continue
        assert row["median_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["rel_err_vs_fp64_reference"] < 1e-4, row  # float32 against float64
        assert f"{row['op']:22} {row['backend']:10}" in r.stdout
    assert data["meta"]["build"]["extension"] == "loaded"


def test_bad_arguments_are_refused():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--ops", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown ops" in r.stderr

"""The profiling and comparison scripts of bench/ run end to end on tiny shapes."""

import json
import os
import re

import pytest

from tests.helpers import ROOT, run_python


def script(name, *args, timeout=600):
    r = run_python(os.path.join(ROOT, "bench", name), *args, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
def test_profile_step_reports_updates_on_and_off():
    out = script("profile_step.py", "--size", "tiny", "--batch", "1", "--seq", "64", "--repeat", "1", "--rows", "3")
    assert "step with in-context updates" in out and "ratio" in out and "Self CPU time total" in out


@pytest.mark.slow
def test_profile_step_builds_the_model_with_its_overrides():
    # deep momentum's update pass runs its reference, whose MLP memory reads tanh(K): gd's has no tanh
    args = ("--size", "tiny", "--batch", "1", "--seq", "32", "--repeat", "1", "--rows", "1000", "--profile", "update")
    deep = script("profile_step.py", *args, "--override", "cms_optimizer=deep_momentum")
    plain = script("profile_step.py", *args, "--override", "cms_optimizer=gd")
    assert deep.startswith("hope cms_optimizer=deep_momentum tiny") and "aten::tanh" in deep
    assert plain.startswith("hope cms_optimizer=gd tiny") and "aten::tanh" not in plain

@pytest.mark.slow
def test_profile_step_diff_names_the_update_ops():
    # every row of the difference (not the top few: their order is timing noise): the update op
    # is called only with the updates on, so its row has calls on and none off, and costs more on
    out = script("profile_step.py", "--size", "tiny", "--batch", "1", "--seq", "64", "--repeat", "1", "--rows", "0",
                 "--diff", "10000")
    row = re.compile(r"^\s*(-?[\d.]+)\s+([\d.]+) \(\s*(\d+)\)\s+([\d.]+) \(\s*(\d+)\)\s+(\S+)")
    rows = [m.groups() for m in map(row.match, out[out.index("on - off"):].splitlines()[1:]) if m]
    cms = [r for r in rows if "cms_update" in r[5]]
    assert len(rows) > 10 and cms
    assert all(int(r[2]) > 0 and int(r[4]) == 0 and float(r[0]) == float(r[1]) for r in cms)


def test_peer_titans_runs_or_says_it_is_missing(tmp_path):
    out = script("peer_titans.py", "--seq", "64", "--heads", "2", "--head-dim", "16", "--repeat", "1",
                 "--json", str(tmp_path / "p.json"))
    if "not installed" in out:
        return
    data = json.loads((tmp_path / "p.json").read_text())
    assert all(ms > 0 for ms in data["median_ms"].values()) and len(data["peer_time_over_ours"]) == 2


def test_ce_memory_json(tmp_path):
    script("ce_memory.py", "--tokens", "256", "--dim", "32", "--vocab", "1024", "--repeat", "1",
           "--json", str(tmp_path / "c.json"))
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["naive", "cpu"] and all(r["median_ms"] > 0 for r in rows)

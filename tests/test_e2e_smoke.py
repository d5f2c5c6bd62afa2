"""scripts/run_e2e_smoke.sh, the whole path in one command: prepare the default corpus, train
the smoke model, export it, evaluate the export with the evaluation scripts, report. Run here
with 10 training steps and the script's default zero-shot pack (`--tasks all`: the shipped
BLiMP, 5 pairs of each paradigm, and no BIG-bench without its sdist) plus a three-item local
task."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_e2e_smoke_script_runs_every_stage_and_says_where(tmp_path):
    task = tmp_path / "mini.jsonl"
    task.write_text("".join(json.dumps({"context": f"Q: is the {w} old?\nA:", "choices": [" yes", " no"],
                                        "gold": i % 2}) + "\n" for i, w in enumerate(["king", "queen", "night"])))
    out = tmp_path / "e2e"
    data = os.environ.get("NL_DATA_DIR") or os.path.join(ROOT, "data")  # the script's default data folder
    bigbench_at_hand = any(os.path.exists(os.path.join(data, f)) for f in ("bigbench-1.0.0", "bigbench-1.0.0.tar.gz"))
    env = {**os.environ, "OUT": str(out), "STEPS": "10", "TASKS": f"all,{task}", "LIMIT": "3", "BLIMP_PAIRS": "5",
           "OMP_NUM_THREADS": "2"}
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_e2e_smoke.sh")], capture_output=True, text=True,
                       timeout=1200, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in range(1, 7):
        assert f"== {stage}/6" in r.stdout
    run = out / "run"
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [x["step"] for x in recs] == list(range(1, 11))
    assert sorted(os.listdir(run / "export")) == ["checksums.json", "config.json", "meta.json",
                                                  "model.safetensors", "tokenizer.json"]
    res = out / "results"
    ppl = json.load(open(res / "perplexity.json"))
    zs = json.load(open(res / "zeroshot.json"))
    assert zs["tasks"]["mini"]["n_items"] == 3
    assert zs["tasks"]["blimp"]["n_items"] == 67 * 5 and len(zs["tasks"]["blimp"]["extra"]["terms"]) == 12
    if not bigbench_at_hand:
        assert "BIG-bench tasks skipped" in r.stdout and set(zs["tasks"]) == {"blimp", "mini"}
    assert ppl["run"]["step"] == 10 and ppl["run"]["checkpoint"].endswith("export")  # the export was evaluated
    assert any(f.endswith(".json") for f in os.listdir(res / "niah"))
    assert any(f.endswith(".json") for f in os.listdir(res / "passkey"))
    report = (res / "REPORT.md").read_text()
    assert "| blimp | 335 |" in report and "| **overall** | 67 |" in report
    assert f"results (JSON, PNG) and the report: {res}" in r.stdout

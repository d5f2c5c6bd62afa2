"""The reports are generated from result files: from fixed files the tables hold the
hand-computed means, standard deviations, effects and verdicts, and the committed reports
regenerate identically from the committed result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nested_learning.campaign.report import Report, write_reports
from nested_learning.campaign.spec import Campaign
from nested_learning.cli import make_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _train(loss, model="hope", curve=(6.0, 5.5)):
    return {"model": model, "size": "smoke", "final_val_loss": loss, "parameters": 1000, "non_embedding_parameters": 800,
            "tokens": 2048, "steps": 2, "seconds": 60.0, "tokens_per_s_median": 34.0, "clipped_fraction": 0.5,
            "grad_norm_median": 1.0,
            "val": [{"step": 1, "tokens": 1024, "loss": curve[0]}, {"step": 2, "tokens": 2048, "loss": curve[1]}]}


def _task(value, chance=None, **extra):
    return {"metrics": {"acc": {"value": value, "stderr": 0.01}}, "chance": chance, "extra": extra}


def _niah(acc):
    return {"tasks": {"single": {"metrics": {"rank1": {"value": acc, "stderr": 0.09}}, "chance": 0.1}}}


def fixed_campaign(tmp_path, extra: str = "") -> Campaign:
    spec = tmp_path / "fixed.yaml"
    spec.write_text(extra + """
name: fixed
scale: fixed result files
launcher: ["{python}", "train.py"]
seeds: [0, 1, 2]
models: [hope, transformer]
reference: hope
train: [size=smoke]
ablations: {seeds: [0], confirm_seeds: [1, 2], confirm_sigmas: 2.0, experiments: [hope_cms_depth1, hope_cms_dgd]}
evaluation: {zeroshot: "{python} scripts/eval/zeroshot.py --run {run} --out {out}"}
""")
    c = Campaign.load(str(spec), reports_root=str(tmp_path / "reports"))
    rep = c.reports_dir
    # hope: 5.0, 5.1, 5.2 (mean 5.1, sd 0.1); transformer: 5.3, 5.5, 5.4 (mean 5.4, sd 0.1)
    for seed, (h, t) in enumerate([(5.0, 5.3), (5.1, 5.5), (5.2, 5.4)]):
        _write(f"{rep}/hope-s{seed}/train.json", _train(h))
        _write(f"{rep}/transformer-s{seed}/train.json", _train(t, "transformer"))
        _write(f"{rep}/hope-s{seed}/zeroshot/zeroshot.json", {"tasks": {"blimp": _task([0.6, 0.62, 0.64][seed], 0.5)}})
        _write(f"{rep}/hope-s{seed}/perplexity/perplexity.json", {"tasks": {"val": {"metrics": {}, "extra": {
            "loss_by_position": [{"bucket": "0-1k", "loss": 6.0 + seed / 10}, {"bucket": "1k-2k", "loss": 5.0}]}}}})
    # MQAR over the cells N=2 and N=4: the no-recall level is (1/2 + 1/4) / 2 = 0.375
    recall = lambda acc: {"tasks": {"mqar": _task(acc, 1 / 120, settings={"cells": [[2, 64], [4, 64]]})}}  # noqa: E731
    for seed, acc in enumerate([0.05, 0.06, 0.07]):  # hope: mean 0.06, sd 0.01: below the level
        _write(f"{rep}/hope-s{seed}/recall/recall_hope.json", recall(acc))
    _write(f"{rep}/transformer-s0/recall/recall_transformer.json", recall(0.39))  # within 2 x hope's sd: at
    _write(f"{rep}/hope_cms_depth1-s0/recall/recall_hope.json", recall(0.5))  # above
    # NIAH: hope's three seeds agree exactly (sd 0) on 18 prompts whose standard error is 0.09, so the
    # spread is 0.09, not 0: depth1's -0.074 is within it (2 x 0.09 = 0.18)
    for seed in range(3):
        _write(f"{rep}/hope-s{seed}/niah/niah_hope-s{seed}.json", _niah(1 / 6))
    _write(f"{rep}/hope_cms_depth1-s0/niah/niah_hope_cms_depth1-s0.json", _niah(1 / 6 - 0.074))
    # depth1: +0.4 (beyond 2 sd = 0.2); dgd: +0.05 (within): dgd gets seeds 1 and 2
    _write(f"{rep}/hope_cms_depth1-s0/train.json", _train(5.5))
    _write(f"{rep}/hope_cms_depth1-s0/zeroshot/zeroshot.json", {"tasks": {"blimp": _task(0.55, 0.5)}})
    _write(f"{rep}/hope_cms_dgd-s0/train.json", _train(5.15))
    for e in ("hope-s0", "hope-s1", "hope-s2", "transformer-s0", "hope_cms_depth1-s0"):
        _write(f"{rep}/{e}/stages.json", {"done": {"train": {}, "zeroshot": {}}, "failed": {}})
    return c


def test_the_tables_hold_the_hand_computed_numbers(tmp_path):
    c = fixed_campaign(tmp_path)
    rep = Report(c)
    names = [e.name for e in rep.r.entries]
    assert names[-2:] == ["hope_cms_dgd-s1", "hope_cms_dgd-s2"]  # within the spread: confirmation seeds
    main = "\n".join(rep.main_table())
    assert "| validation loss (nats/token, final) | 5.100 ± 0.100 (3) | 5.400 ± 0.100 (3) | 8.318 | lower |" in main
    assert "| BLiMP accuracy | 0.620 ± 0.020 (3) | not run yet | 0.500 | higher |" in main
    assert "| MQAR accuracy | 0.060 ± 0.010 (3) | 0.390 (1) | 0.008; no-recall 0.375 | higher |" in main
    assert ("MQAR accuracy against its no-recall level (0.375: " in rep.levels(["hope", "transformer"])[0]
            and rep.levels(["hope", "transformer"])[0].endswith(
                "hope 0.060 below, transformer 0.390 at. No model is above it: none recalls at this training budget."))
    assert "+0.440 (exceeds the spread; above the no-recall level)" in "\n".join(rep.ablation_table(keys=["recall"]))
    assert rep.levels(["hope_cms_depth1"])[0].endswith("hope_cms_depth1 0.500 above.")
    assert rep.r.spread("hope", "niah_single") == 0.09 and rep.r.stat("hope", "niah_single")[1] == 0.0
    assert rep.effect("hope_cms_depth1", "niah_single")[3] == "within the spread"
    assert rep.r.spread("hope", "val_loss") == rep.r.stat("hope", "val_loss")[1]  # a loss: its seeds' sd alone
    mqar = {"tasks": {"mqar": _task(0.05, 1 / 120, settings={"cells": [[2, 64], [4, 64]]})}}
    _write(f"{c.reports_dir}/hope_cms_dgd-s0/recall/recall_hope.json", mqar)  # hope-s0's value exactly
    # the same NIAH single-needle value by chance, but another multikey task: not identical
    niah2 = _niah(1 / 6)
    niah2["tasks"]["multikey"] = {"metrics": {"rank1": {"value": 0.5, "stderr": 0.1}}}
    _write(f"{c.reports_dir}/hope_cms_dgd-s0/niah/niah_hope_cms_dgd-s0.json", niah2)
    again = Report(c)
    assert again.r.identical("hope_cms_dgd", "hope", "recall") and not again.r.identical("hope_cms_depth1", "hope", "recall")
    assert not again.r.identical("hope_cms_dgd", "hope", "niah_single")
    assert again.r.seeds("hope_cms_dgd", "niah_single")[0][1].value == again.r.seeds("hope", "niah_single")[0][1].value
    assert "(identical to hope seed by seed: the evaluation does not see this change;" in "\n".join(
        again.ablation_table(keys=["recall"]))
    vals = "\n".join(rep.ablation_table(keys=["val_loss", "blimp"], values=True))
    assert "| hope_cms_depth1 | cms_periods=[16] | 1,000 | 1 | 5.500 (1) | 0.550 (1) |" in vals
    abl = "\n".join(rep.ablation_table(keys=["val_loss", "blimp"]))
    assert "| hope_cms_depth1 | cms_periods=[16] | 1,000 | 1 | +0.400 (exceeds the spread) | -0.070 (exceeds the spread) |" in abl
    assert "| hope_cms_dgd | cms_optimizer=dgd | 1,000 | 1 | +0.050 (within the spread) | not run yet |" in abl
    assert "| hope | no | 6.100 ± 0.100 (3) | 5.000 ± 0.000 (3) |" in "\n".join(rep.position_table())
    assert "Entries finished: 5 of" in rep.progress() and "hope_cms_dgd-s0" in rep.progress()
    out = write_reports(c, str(tmp_path / "e.md"), str(tmp_path / "a.md"), paper=str(tmp_path / "none.md"),
                        progress_md=str(tmp_path / "p.md"))
    progress = open(out["p.md"]).read()
    assert "| hope-s1 | main | done | 2/2 | 5.1000 | 1.0 | `reports/fixed/hope-s1/` | not logged |" in progress
    assert "| hope_cms_dgd-s0 | ablation | not started | 0/2 | 5.1500 |" in progress
    text = open(out["e.md"]).read()
    assert text.startswith("<!-- generated by") and "5.100 ± 0.100 (3)" in text
    assert "Pinned model fields" not in text  # the fixed campaign pins none
    c.model_overrides = {"hope": {"cms_lr": 0.001}}
    assert Report(c).pinned()[0].startswith("Pinned model fields") and "hope: cms_lr=0.001." in Report(c).pinned()[0]
    c.model_overrides = {}
    assert "`reports/fixed/<entry>/zeroshot/zeroshot.json` | `tasks.blimp.metrics.acc.value`" in text
    assert os.path.getsize(out["val_loss"]) > 1000 and os.path.getsize(out["ablations"]) > 1000
    # the same files give the same markdown
    again = write_reports(c, str(tmp_path / "e2.md"), str(tmp_path / "a2.md"), paper=str(tmp_path / "none.md"),
                          figures=False, progress_md=str(tmp_path / "p2.md"))
    assert open(again["e2.md"]).read() == text
    # the write-up's generated section is filled, the text around it kept
    (tmp_path / "w.md").write_text("intro\n<!-- generated:headline -->\nold\n<!-- /generated:headline -->\noutro\n")
    write_reports(c, str(tmp_path / "e3.md"), str(tmp_path / "a3.md"), paper=str(tmp_path / "none.md"), figures=False,
                  progress_md=str(tmp_path / "p3.md"), writeup_in=str(tmp_path / "w.md"))
    w = open(tmp_path / "w.md").read()
    assert w.startswith("intro\n<!-- generated:headline -->\n*Generated") and w.endswith("<!-- /generated:headline -->\noutro\n")
    assert "old" not in w and "| validation loss (nats/token, final) | 5.100 ± 0.100 (3) | 5.400 ± 0.100 (3) | 8.318 |" in w
    assert "exceeds the spread: hope_cms_depth1 +0.400" in w and "within the spread: hope_cms_dgd +0.050" in w


def test_a_metric_no_result_has_is_named_instead_of_an_empty_row(tmp_path):
    c = fixed_campaign(tmp_path)
    main = "\n".join(Report(c).main_table())
    assert "| MQAR accuracy, memorising |" not in main and "| continual BWT" not in main
    assert main.endswith("MQAR accuracy, memorising.") and "In no finished result of this campaign: " in main
    mem = {"tasks": {"mqar": _task(0.04, 1 / 120, settings={"cells": [[2, 64], [4, 64]]})}}
    _write(f"{c.reports_dir}/hope-s0/recall/recall_hope_memorize.json", mem)
    main = "\n".join(Report(Campaign.load(c.path, reports_root=str(tmp_path / "reports"))).main_table())
    assert "| MQAR accuracy, memorising | 0.040 (1) | not run yet | 0.008; no-recall 0.375 | higher |" in main
    assert "MQAR accuracy, memorising." not in main


def test_make_report_writes_where_the_campaign_file_says(tmp_path):
    out = tmp_path / "out"
    c = fixed_campaign(tmp_path, f"reports: {{experiments: {out}/r.md, ablations: {out}/a.md, progress: {out}/p.md, "
                                 "writeup: null}\n")
    args = ["--campaign", c.path, "--reports-dir", str(tmp_path / "reports")]
    made = make_report.main([*args, "--no-figures"])
    assert {"a.md", "p.md", "r.md"} <= set(made) and sorted(os.listdir(out)) == ["a.md", "p.md", "r.md"]
    assert "5.100 ± 0.100 (3)" in (out / "r.md").read_text()
    assert make_report.main([*args, "--check"]) == {}  # and its check reads the same files


@pytest.mark.parametrize("campaign", ["cpu", "cms_lr", "cms_optimizer"])
def test_the_committed_reports_regenerate_from_the_committed_result_files(campaign):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_report.py"), "--campaign", campaign,
                        "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_one_model_campaign_says_it_has_no_ordering():
    from nested_learning.campaign.report import Report
    from nested_learning.campaign.spec import Campaign

    assert "this campaign has one model, so no ordering" in Report(Campaign.load("cms_optimizer")).ordering()
    assert "this campaign has one model" not in Report(Campaign.load("cpu")).ordering()

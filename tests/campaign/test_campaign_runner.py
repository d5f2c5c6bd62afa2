"""The campaign: its entries and ablation overrides are what train.py composes for the
experiment configs, confirmation seeds are added exactly when an effect is within the seed
spread, and the runner can be killed at any point (SIGTERM, SIGKILL) and rerun without losing
or repeating a finished stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nested_learning.campaign.runner import Lock, Runner, render_status
from nested_learning.campaign.spec import Campaign, CampaignError, hydra_value
from nested_learning.train.config import compose_config
from tests.train.conftest import corpus_dir  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "scripts", "run_campaign.py")


def tiny_campaign(tmp_path, corpus: str, steps: int = 6, name: str = "tinytest") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
scale: a test campaign of tiny models
launcher: ["{{python}}", "train.py"]
threads: 1
seeds: [0]
models: [hope, transformer]
reference: hope
train: [size=tiny, data=local, "data.path={corpus}", data.vocab_size=300, "data.data_dir={tmp_path / 'data'}",
        train.steps={steps}, train.batch_size=2, train.seq_len=64, train.context_len=128, train.eval_every=3,
        train.eval_tokens=128, train.save_every=2, train.progress=false, train.device=cpu]
ablations:
  seeds: [0]
  experiments: [hope_cms_depth1]
evaluation:
  perplexity: "{{python}} scripts/eval/perplexity.py --run {{run}} --out {{out}} --max-docs 1 --max-tokens 128 --no-progress"
  recall: >-
    {{python}} scripts/eval/recall.py --models {{recall_model}} {{recall_overrides}} --pairs 2 --lengths 32 --steps 3
    --batch-size 4 --test-sequences 4 --d-model 32 --seeds {{seed}} --out {{out}} --no-progress
""")
    return str(path)


def test_the_cpu_campaign_has_every_ablation_and_matched_main_models():
    c = Campaign.load("cpu")
    names = [e.name for e in c.entries()]
    assert names[:9] == [f"{m}-s{s}" for s in (0, 1, 2) for m in ("hope", "titans", "transformer")]
    have = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs", "experiment"))
                  if f.startswith("hope_"))
    tuning = set(Campaign.load("cms_lr").experiments)  # a setting's value, compared in its own campaign
    assert sorted(c.experiments) == sorted(set(have) - tuning)  # every ablation config is in the campaign
    counts = [c.parameters(e)[0] for e in c.main_entries()[:3]]
    assert (max(counts) - min(counts)) / min(counts) <= 0.05
    pilot = Campaign.load("pilot")
    assert not pilot.execute and pilot.experiments == c.experiments
    assert "torchrun" in pilot.train_command(pilot.main_entries()[0])[0]


@pytest.mark.parametrize("experiment", Campaign.load("cpu").experiments)
def test_an_ablation_entry_composes_the_experiment_configs_model(experiment):
    c = Campaign.load("cpu")
    entry = c.ablation_entry(experiment, 0)
    ours = compose_config([*c.train, *entry.overrides])["model"]
    pins = [f"model.overrides.{k}={hydra_value(v)}" for k, v in entry.pinned]  # HOPE as the campaign ran it
    theirs = compose_config([*c.train, f"experiment={experiment}", *pins])["model"]
    assert ours == theirs and ours["overrides"]["cms_lr"] == 0.001


def test_model_overrides_pin_a_models_fields_in_its_entries_and_their_recall_command():
    c = Campaign.load("cpu")
    hope, titans = c.main_entries()[:2]
    assert compose_config([*c.train, *hope.overrides])["model"]["overrides"] == {"cms_lr": 0.001}
    assert compose_config([*c.train, *titans.overrides])["model"]["overrides"] == {}
    assert "--override cms_lr=0.001" in " ".join(c.eval_command(hope, "recall"))
    assert "--override" not in " ".join(c.eval_command(titans, "recall"))
    side = Campaign.load("cms_lr")
    tuned = side.ablation_entry("hope_cms_lr_tuned", 0)  # the experiment's own value wins over the pin
    assert tuned.pinned == () and "--override cms_lr=0.1" in " ".join(side.eval_command(tuned, "recall"))


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs", "campaign"))
                                         if f.endswith(".yaml")))
def test_every_campaign_file_loads_and_its_entries_compose(name):
    c = Campaign.load(name)
    for entry in c.entries():
        model = compose_config([*c.train, *entry.overrides])["model"]
        assert model["name"] == entry.model
        for k, v in (*entry.pinned, *entry.model_overrides):
            assert model["overrides"][k] == v


def test_the_cms_optimizer_campaign_runs_each_inner_optimizer_at_cms_lr_0_1():
    c = Campaign.load("cms_optimizer")
    assert c.train == Campaign.load("cpu").train and c.evaluation == Campaign.load("cpu").evaluation
    for entry in c.entries():
        over = compose_config([*c.train, *entry.overrides])["model"]["overrides"]
        assert over["cms_lr"] == 0.1 and over.get("cms_optimizer", "gd") == (
            entry.variant.removeprefix("hope_cms_") if entry.group == "ablation" else "gd")


def test_confirmation_seeds_follow_the_seed_spread():
    c = Campaign.load("cpu")
    ref = {"hope-s0": 5.00, "hope-s1": 5.02, "hope-s2": 4.98}  # standard deviation 0.02
    e = "hope_cms_depth1"
    assert not c.needs_confirmation(e, ref)                                  # its seed 0 is not known yet
    assert c.needs_confirmation(e, {**ref, f"{e}-s0": 5.03})                 # +0.03: within 2 sigma (0.04)
    assert not c.needs_confirmation(e, {**ref, f"{e}-s0": 5.10})             # +0.10: outside
    assert not c.needs_confirmation(e, {"hope-s0": 5.0, f"{e}-s0": 5.01})   # the reference's seeds unknown
    names = [x.name for x in c.entries({**ref, f"{e}-s0": 5.03})]
    assert names[-2:] == [f"{e}-s1", f"{e}-s2"] and len(names) == 21 + 2


MINIMAL = "launcher: [python]\nseeds: [0]\nevaluation: {}\n"  # with a name, models and train: a campaign


def _refused(path, text: str, match: str, load=None) -> None:
    """Writing `text` to `path` makes loading `load` (default: `path`) fail with `match`."""
    path.write_text(text)
    with pytest.raises(CampaignError, match=match):
        Campaign.load(str(load or path))


def test_bad_campaign_files_are_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    _refused(bad, "name: x\nmodels: [hope]\ntrain: []\nseed: 3\n" + MINIMAL,
             "unknown key campaign.seed .did you mean campaign.seeds")
    _refused(bad, "name: x\nmodels: [hopee]\ntrain: []\n" + MINIMAL, "unknown model")
    _refused(bad, "name: x\nmodels: [hope]\ntrain: [train.seed=1]\n" + MINIMAL, "sets train.seed")
    with pytest.raises(CampaignError, match="the campaigns are .*cpu"):
        Campaign.load("nonesuch")
    r = subprocess.run([sys.executable, RUNNER, "--campaign", "nonesuch"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no campaign" in r.stderr


def test_a_campaign_that_extends_another_takes_its_settings_and_keeps_its_own_folders_and_reports():
    cpu, c = Campaign.load("cpu"), Campaign.load("cms_lr")
    assert (c.train, c.evaluation, c.seeds, c.threads) == (cpu.train, cpu.evaluation, cpu.seeds, cpu.threads)
    assert c.models == ["hope"] and c.experiments == ["hope_cms_lr_tuned"] and c.ablation_seeds == [0, 1, 2]
    assert c.confirm_seeds == [] and [e.name for e in c.entries()][-1] == "hope_cms_lr_tuned-s2"
    assert c.runs_dir.endswith("campaign-cms_lr") and c.reports_dir.endswith(os.path.join("reports", "cms_lr"))
    assert c.report_path("experiments") == os.path.join(ROOT, "reports", "cms_lr", "report.md")
    assert c.report_path("writeup") is None  # the cpu campaign's write-up is not touched
    assert cpu.report_path("experiments") == os.path.join(ROOT, "docs", "experiments_report.md")
    assert cpu.report_path("ablations") == os.path.join(ROOT, "reports", "ablations.md")
    entry = c.ablation_entry("hope_cms_lr_tuned", 1)
    assert compose_config([*c.train, *entry.overrides])["model"]["overrides"] == {"cms_lr": 0.1}


def test_bad_extends_and_reports_are_refused(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nmodels: [hope]\ntrain: []\n" + MINIMAL)
    child = tmp_path / "child.yaml"
    _refused(child, "extends: base.yaml\nseeds: [1]\n", "needs a name of its own")
    child.write_text("extends: base.yaml\nname: child\nseeds: [1]\n")
    c = Campaign.load(str(child))
    assert (c.name, c.seeds, c.models) == ("child", [1], ["hope"])
    _refused(base, "extends: child.yaml\nname: base\n", "extends itself", load=child)
    base.write_text("name: base\nmodels: [hope]\ntrain: []\n" + MINIMAL)
    _refused(child, "extends: base.yaml\nname: child\nreports: {experiment: x.md}\n",
             "did you mean reports.experiments")
    _refused(child, "extends: base.yaml\nname: child\nreports: {progress: null}\n",
             "only reports.writeup may be null")
    _refused(child, "extends: nonesuch\nname: child\n", "no campaign 'nonesuch'")
    _refused(child, "extends: base.yaml\nname: child\nmodel_overrides: {titans: {chunk: 8}}\n",
             "model_overrides names .'titans'., which are not among the models")


def test_an_entry_claimed_by_a_live_runner_is_not_taken_and_a_dead_ones_claim_is(tmp_path):
    lock = Lock(str(tmp_path / "locks" / "hope-s0.lock"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(tmp_path / "locks")
        (tmp_path / "locks" / "hope-s0.lock").write_text(f"{sleeper.pid}\n")
        assert not lock.try_acquire() and lock.holder() == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock.try_acquire() and lock.holder() == os.getpid()  # its holder died: taken over
    assert lock.try_acquire()  # this process holds it already
    lock.release()
    assert lock.holder() is None


def _headers(log: str) -> int:
    """How often the runner started this stage (one '# <time> <command>' line per start)."""
    if not os.path.exists(log):
        return 0
    with open(log) as f:
        return sum(line.startswith("# 20") for line in f)


def _wait_for(pred, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _metrics_lines(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


@pytest.mark.slow
def test_the_runner_killed_at_any_point_loses_and_repeats_nothing(tmp_path, corpus_dir):  # noqa: F811
    spec = tiny_campaign(tmp_path, corpus_dir, steps=8)
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    cmd = [sys.executable, RUNNER, "--campaign", spec, "--runs-dir", str(runs), "--reports-dir", str(reports)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    c = Campaign.load(spec, runs_root=str(runs), reports_root=str(reports))
    hope, tf, abl = (c.run_dir(e) for e in c.entries())

    # 1. SIGTERM while the first entry trains: the runner passes it on, train.py saves, exit 143
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: _metrics_lines(hope) >= 3)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 143, out
    assert "rerun the same command to continue" in out
    assert not os.path.exists(reports / "tinytest" / "hope-s0" / "train.json")
    assert os.listdir(os.path.join(hope, "checkpoints"))  # the interrupted step was saved

    # 2. SIGKILL while the second entry trains: its training dies with the runner (no orphan)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = os.path.join(runs, "campaign-tinytest", ".running", "transformer-s0.json")
    assert _wait_for(lambda: os.path.exists(running) and _metrics_lines(tf) >= 1)
    child = json.load(open(running))
    pids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    p.kill()
    p.wait()
    assert child["stage"] == "train" and pids
    assert _wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and
                                     open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in pids), 60)

    # 3. two runners at once finish everything: each finished stage ran once, each killed training
    # resumed, and no entry ran in both
    two = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for _ in range(2)]
    outs = [q.communicate(timeout=900)[0] for q in two]
    assert [q.returncode for q in two] == [0, 0], outs
    assert any("3 entries done, 0 left" in o for o in outs)
    for run_dir in (hope, tf, abl):
        assert _headers(os.path.join(run_dir, "logs", "perplexity.log")) == 1
        assert _headers(os.path.join(run_dir, "logs", "recall.log")) == 1
        steps = [json.loads(x)["step"] for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"step"' in x]
        assert sorted(set(steps)) == list(range(1, 9))
    assert _headers(os.path.join(hope, "logs", "train.log")) == 2
    assert _headers(os.path.join(tf, "logs", "train.log")) == 2
    # the SIGTERM'd attempt's time counts (a SIGKILL'd runner could not record its own)
    stages = json.load(open(reports / "tinytest" / "hope-s0" / "stages.json"))
    assert stages["done"]["train"]["attempts"] == 2 and not stages.get("interrupted")
    assert "resum" in open(os.path.join(hope, "logs", "train.log")).read()
    for name in ("hope-s0", "transformer-s0", "hope_cms_depth1-s0"):
        stages = json.load(open(reports / "tinytest" / name / "stages.json"))
        assert sorted(stages["done"]) == ["perplexity", "recall", "train"] and not stages["failed"]
        summary = json.load(open(reports / "tinytest" / name / "train.json"))
        assert summary["steps"] == 8 and summary["tokens"] == 8 * 2 * 64 and summary["final_val_loss"] > 0
        ppl = json.load(open(reports / "tinytest" / name / "perplexity" / "perplexity.json"))
        assert "records" not in json.dumps(ppl["tasks"]) and ppl["source"]["sha256"]
    assert json.load(open(reports / "tinytest" / "hope_cms_depth1-s0" / "recall" / "recall_hope.json")
                     )["tasks"]["mqar"]["extra"]["settings"]["overrides"] == {"cms_periods": [16]}

    # recollecting from the run folders gives the same files
    before = open(reports / "tinytest" / "transformer-s0" / "train.json").read()
    r = subprocess.run(cmd + ["--recollect"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "collected again: 9 stage(s)" in r.stdout, r.stdout + r.stderr
    assert open(reports / "tinytest" / "transformer-s0" / "train.json").read() == before

    # 4. a third run does nothing, and the status view says so
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and _headers(os.path.join(hope, "logs", "train.log")) == 2
    status = render_status(Runner(c))
    assert "3 entries done, 0 left" in status and "no runner is running" in status


def test_an_entry_whose_run_folder_is_gone_is_trained_and_evaluated_again(tmp_path):
    """Evaluations of a checkpoint that is gone describe a model that no longer exists (training
    again is not bit-reproducible across machines), so all of the entry's stages run again and
    their old collected files are removed first."""
    spec = tiny_campaign(tmp_path, "unused")
    c = Campaign.load(spec, runs_root=str(tmp_path / "runs"), reports_root=str(tmp_path / "reports"))
    runner = Runner(c)
    entry = c.entries()[0]
    dest = os.path.join(c.reports_dir, entry.name)
    os.makedirs(os.path.join(dest, "perplexity"))
    open(os.path.join(dest, "train.json"), "w").write("{}")
    open(os.path.join(dest, "perplexity", "perplexity.json"), "w").write("{}")
    log = runner.stage_log(entry)
    for stage in ("train", "perplexity"):
        log.mark(stage, {"command": [], "seconds": 1.0}, ok=True)
    ran, seen_files = [], []

    def fake(e, stage):
        seen_files.append(sorted(os.listdir(dest)))
        ran.append(stage)
        runner.stage_log(e).mark(stage, {"command": [], "seconds": 1.0}, ok=True)
        return True

    runner.run_stage = fake
    said = []
    runner.log = said.append
    assert runner.run_entry(entry) == 0
    assert "running again the evaluations of the old checkpoint (perplexity)" in said[0]
    assert ran == ["train", "perplexity", "recall"]
    assert seen_files[0] == ["stages.json"]  # the old train.json and perplexity files went first
    # a finished entry whose run folder is gone is left alone
    ran.clear()
    assert runner.run_entry(entry) == 0 and ran == []

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_py_with_hydra_overrides(corpus_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "model=titans", "size=tiny", "data=local",
           f"data.path={corpus_dir}", "data.vocab_size=300", f"data.data_dir={tmp_path / 'data'}",
           "model.overrides.chunk_size=4", "train.steps=3", "train.seed=7", f"train.out_dir={out}",
           "train.batch_size=2", "train.seq_len=16", "train.eval_every=3", "train.save_every=3",
           "train.eval_tokens=64", "train.progress=true"]
    # the console as a terminal shows it: the progress bar (stderr) and the lines (stdout) interleaved
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:]
    pieces = [p.strip() for p in r.stdout.replace("\r", "\n").split("\n")]
    assert any(p.startswith("train:") for p in pieces)  # the bar was drawn
    for line in ("step 3: val_loss", "validation loss by step: 3:", "model: titans"):
        assert sum(p.startswith(line) for p in pieces) == 1, r.stdout  # once, on its own line, not glued to the bar
    log = (out / "train.log").read_text()
    assert "step 3: val_loss" in log and "validation loss by step: 3:" in log and "saved" in log
    cfg = json.load(open(out / "config.json"))
    assert cfg["model"]["name"] == "titans" and cfg["train"]["seed"] == 7
    assert (out / ".hydra" / "config.yaml").exists()  # the resolved config
    assert (out / "checkpoints" / "step_00000003" / "model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_train_py_rejects_a_bad_override(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "model=gpt"],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode != 0 and "gpt" in r.stderr

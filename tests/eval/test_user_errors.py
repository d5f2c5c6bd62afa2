"""Every command line reports a user error in one line, without a traceback (NL_TRACEBACK=1 shows
it), and a failed training run creates nothing: the cases a new user meets first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(args, cwd, **env):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def one_line(r, prog: str, *words: str) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: ") or prog == "", lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("script", ["scripts/generate.py", "scripts/eval/perplexity.py", "scripts/eval/zeroshot.py",
                                    "scripts/eval/niah.py", "scripts/export.py"])
@pytest.mark.slow
def test_a_missing_run_directory_is_one_line(tmp_path, script):
    run = str(tmp_path / "no-such-run")
    args = ([os.path.join(ROOT, script), run] if script.endswith("export.py") else
            [os.path.join(ROOT, script), "--run", run, "--prompt", "ROMEO:"] if script.endswith("generate.py") else
            [os.path.join(ROOT, script), "--run", run, "--out", str(tmp_path / "out")])
    r = command(args, tmp_path)
    one_line(r, os.path.basename(script), f"{run} does not exist", "NL_TRACEBACK=1")
    assert os.listdir(tmp_path) == []
    r = command(args, tmp_path, NL_TRACEBACK="1")
    assert "Traceback" in r.stderr  # the variable shows where


def test_a_damaged_checkpoint_is_one_line(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["hope"], run)
    ck = run / "checkpoints" / "step_00000004" / "model.safetensors"
    with open(ck, "r+b") as f:
        f.truncate(os.path.getsize(ck) // 2)
    r = command([os.path.join(ROOT, "scripts/eval/perplexity.py"), "--run", str(run), "--out", str(tmp_path / "o")],
                tmp_path)
    one_line(r, "perplexity.py", "truncated", "step_00000004", "--step N")
    assert not (tmp_path / "o").exists()


def test_a_mistyped_task_is_one_line(tiny_runs, tmp_path):
    r = command([os.path.join(ROOT, "scripts/eval/zeroshot.py"), "--run", tiny_runs["hope"], "--tasks", "blimpp",
                 "--out", str(tmp_path / "o")], tmp_path)
    one_line(r, "", "unknown task 'blimpp'", "blimp")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, said", [("", "no non-empty .txt or .jsonl documents"),
                                        ("One sentence.", "too short to hold out a validation tail")])
@pytest.mark.slow
def test_an_empty_or_tiny_corpus_is_one_line_and_creates_nothing(tmp_path, text, said):
    (tmp_path / "corpus.txt").write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    r = command([os.path.join(ROOT, "train.py"), "data=local", f"data.path={tmp_path / 'corpus.txt'}",
                 "train.out_dir=runs/x"], work, NL_DATA_DIR=str(work / "data"))
    one_line(r, "train.py", said)
    assert r.returncode == 2 and r.stdout == ""  # nothing announced before the corpus was found wanting
    assert os.listdir(work) == []  # no run folder, no corpus cache

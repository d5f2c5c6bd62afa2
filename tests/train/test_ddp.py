import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import read_metrics


def torchrun(cfg, tmp_path, nproc: int = 2, kill_after: int = 0, dump: str = "",
             signal_after: int = 0) -> subprocess.CompletedProcess:
    """Train `cfg` with `nproc` CPU processes (gloo) through tests/train/ddp_worker.py;
    kill_after=N: every rank is SIGKILLed right after step N is logged; dump=PATH: the live
    model and AdamW state after each save in PATH.stepN.pt; signal_after=N: rank 0 alone gets
SIGTERM right after step N is logged."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "NL_TEST_KILL_AFTER_STEP": str(kill_after),
           "NL_TEST_DUMP": dump, "NL_TEST_SIGNAL_AFTER_STEP": str(signal_after)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           worker, str(path)], capture_output=True, text=True, timeout=600, env=env)


def torchrun_two_workers(cfg, tmp_path) -> list[dict]:
    """Train `cfg` with 2 CPU processes (gloo); returns each rank's checksum and final loss.
    What the run prints is printed once (rank 0), on whole lines."""
    r = torchrun(cfg, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    if cfg["train"].get("eval_every"):
        lines = r.stdout.splitlines()
        assert sum(line.startswith("validation loss by step: ") for line in lines) == 1, r.stdout
    out = cfg["train"]["out_dir"]
    return [json.load(open(os.path.join(out, f"worker{i}.json"))) for i in range(2)]


@pytest.mark.slow
def test_two_process_cpu_ddp_ranks_end_with_identical_slow_weights(make_cfg, tmp_path):
    cfg = make_cfg("ddp", train={"steps": 4, "eval_every": 2, "save_every": 2, "eval_tokens": 512})
    w = torchrun_two_workers(cfg, tmp_path)
    out = cfg["train"]["out_dir"]
    assert w[0]["checksum"] == w[1]["checksum"]  # identical slow weights, bit for bit
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and "val_loss" in recs[1]
    # the ranks split the held-out contexts (8 of 64 tokens over 2 x 2 rows) and all-reduce their sums
    assert recs[1]["val_tokens"] == 512 and recs[1]["val_streams"] == 1
    assert recs[0]["tokens_per_s"] > 0
    ck = os.path.join(out, "checkpoints", "step_00000004")
    assert {f"fast_rank{i}.safetensors" for i in range(2)} <= set(os.listdir(ck))  # rank-local fast state


@pytest.mark.slow
def test_two_process_cpu_fsdp2_trains_and_evaluates(make_cfg, tmp_path):
    cfg = make_cfg("fsdp", train={"steps": 3, "eval_every": 3, "save_every": 0, "resume": False, "fsdp": True})
    w = torchrun_two_workers(cfg, tmp_path)
    out = cfg["train"]["out_dir"]
    assert w[0]["final_loss"] == w[1]["final_loss"]  # the logged loss is averaged over ranks
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and "val_loss" in recs[-1]

"""Peak resident memory of `python train.py` over steps: does a run's memory stay flat?

    python bench/train_memory.py                                # hope, titans, transformer at 150 and 600 steps
    python bench/train_memory.py --models hope --steps 150,600 --json bench/out/train_memory.json
    python bench/train_memory.py --max-rss-mb 12000             # stop a leaking run before it swaps

Each run is `python train.py model=M train.steps=N train.eval_every=0 train.save_every=0` in a
fresh temporary out_dir (extra overrides after `--`), measured by `/usr/bin/time -f %M` (peak
RSS of the whole process). A watchdog polls the run's RSS and kills it past --max-rss-mb; the
row then says so, with the last step that reached metrics.jsonl; a run that fails is a row
with its error. The closing column compares
each model's longest run with its shortest: flat memory means a ratio near 1."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb(pid: int) -> float:
    """Resident memory of pid and its children (MB), from /proc."""
    total = 0
    for p in [pid] + _children(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 2**20


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def last_step(out_dir: str) -> int:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def measure(model: str, steps: int, max_rss_mb: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        timing = os.path.join(out, "time.txt")
        cmd = ["/usr/bin/time", "-f", "%M", "-o", timing, sys.executable, "train.py", f"model={model}",
               f"train.steps={steps}", "train.eval_every=0", "train.save_every=0", "train.progress=false",
               f"train.out_dir={out}/run", *extra]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed, watched = False, 0.0
        while proc.poll() is None:
            now = rss_mb(proc.pid)
            watched = max(watched, now)
            if max_rss_mb and now > max_rss_mb:
                for p in _children(proc.pid):  # the python process under /usr/bin/time
                    os.kill(p, 9)
                killed = True
            time.sleep(0.5)
        err = proc.stderr.read()
        row = {"model": model, "steps": steps, "seconds": round(time.time() - t0, 1),
               "reached_step": last_step(os.path.join(out, "run")), "killed_over_mb": max_rss_mb if killed else None}
        if killed:
            row["peak_rss_mb"] = round(watched)
        else:
            with open(timing) as f:  # /usr/bin/time writes the peak on failure too
                row["peak_rss_mb"] = round(int(f.read().split()[-1]) / 1024)
        if proc.returncode != 0 and not killed:  # a failed run is a row too, with its error
            row["error"] = (err.strip().splitlines() or ["?"])[-1] if "Error" not in err else \
                next(ln for ln in reversed(err.splitlines()) if "Error" in ln)
        return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="hope,titans,transformer")
    ap.add_argument("--steps", default="150,600", help="comma-separated step counts")
    ap.add_argument("--max-rss-mb", type=float, default=16000, help="kill a run past this RSS (0: never)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("extra", nargs="*", help="more train.py overrides (after --)")
    a = ap.parse_args(argv)
    steps = [int(s) for s in a.steps.split(",")]
    rows = []
    print(f"{'model':<12} {'steps':>6} {'reached':>7} {'peak RSS MB':>12} {'seconds':>8}  note", flush=True)
    for model in a.models.split(","):
        for n in steps:
            r = measure(model, n, a.max_rss_mb, a.extra)
            rows.append(r)
            note = f"killed past {r['killed_over_mb']:.0f} MB" if r["killed_over_mb"] else r.get("error", "")
            print(f"{model:<12} {n:>6} {r['reached_step']:>7} {r['peak_rss_mb']:>12} {r['seconds']:>8}  {note}",
                  flush=True)
        mine = [r for r in rows if r["model"] == model and not r["killed_over_mb"] and "error" not in r]
        if len(mine) > 1:
            ratio = mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"]
            print(f"{model:<12} peak at {mine[-1]['steps']} steps / at {mine[0]['steps']}: {ratio:.3f}", flush=True)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"command": " ".join(["python", "bench/train_memory.py", *(argv or sys.argv[1:])]),
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

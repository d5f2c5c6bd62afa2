"""Peak resident memory of a NIAH evaluation by prompt length: does it stay flat?

    python bench/niah_memory.py --run runs/hope-smoke --lengths 16k,64k,256k
    python bench/niah_memory.py --run runs/hope-smoke,runs/transformer-smoke --lengths 16k,64k --json bench/out/niah_memory.json

Each row is one process, `python scripts/eval/niah.py --run RUN --lengths L --depths 50
--samples 1 --variants single` (extra niah.py flags after `--`), measured by
`/usr/bin/time -f %M` (peak RSS of the whole process, model and tokenizer included), with its
wall time and the streamed prompt tokens per second that the result file records."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from nested_learning.eval.needle import length_name, parse_lengths
from nested_learning.eval.results import write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(run: str, length: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = ["/usr/bin/time", "-f", "%M %e", sys.executable, os.path.join(ROOT, "scripts/eval/niah.py"), "--run", run,
               "--lengths", str(length), "--depths", "50", "--samples", "1", "--variants", "single", "--out", out,
               "--no-progress", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        row = {"run": os.path.basename(os.path.normpath(run)), "length": length}
        if p.returncode != 0:
            return {**row, "error": p.stderr.strip().splitlines()[-1]}
        kb, wall = p.stderr.strip().splitlines()[-1].split()
        (res,) = [f for f in os.listdir(out) if f.startswith("niah_") and f.endswith(".json")]
        with open(os.path.join(out, res)) as f:
            (entry,) = json.load(f)["tasks"]["single"]["extra"]["by_length"]
        return {**row, "peak_rss_mb": int(kb) / 1024, "wall_s": float(wall), "status": entry["status"],
                "prompt_tokens_per_s": entry.get("prompt_tokens_per_s"), "windowed": entry["windowed"]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directories, comma-separated")
    ap.add_argument("--lengths", default="16k,64k,256k")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs="*", help="niah.py flags (after --)")
    a = ap.parse_args(argv)
    rows = []
    print("| run | prompt tokens | peak RSS (MB) | wall (s) | prompt tokens/s | attention windowed |")
    print("|---|---|---|---|---|---|")
    for run in a.run.split(","):
        for L in parse_lengths(a.lengths):
            r = measure(run, L, a.extra)
            rows.append(r)
            if "error" in r:
                print(f"| {r['run']} | {length_name(L)} | failed: {r['error']} | | | |", flush=True)
            else:
                print(f"| {r['run']} | {length_name(L)} ({L}) | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | "
                      f"{r['prompt_tokens_per_s'] or 0:.0f} | {r['windowed']} |", flush=True)
    if a.json:
        write(rows, a.json)  # atomic, strict JSON
    return rows


if __name__ == "__main__":
    main()

"""Does evaluation hold memory flat? Scores the same items round after round (zero-shot
log-likelihoods, optionally memorising each context) and prints the resident and peak memory
after each round: a leak grows every round, a bounded evaluation settles after the first.

    python bench/eval_memory.py --run runs/hope-smoke --task data/bigbench-1.0.0/social_iqa.jsonl --items 1000:1200 --rounds 8 --memorize
"""

from __future__ import annotations

import argparse
import os
import resource

from nested_learning.eval.tasks import read_jsonl
from nested_learning.eval.zeroshot import score_items
from nested_learning.models.streaming import Memorize, MemorizeTally
from nested_learning.runs import load_run


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--task", required=True, help="a JSONL task file")
    ap.add_argument("--items", default="0:200", help="START:END of the items scored every round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--memorize", action="store_true")
    ap.add_argument("--memory-lr", type=float, default=1e-2)
    a = ap.parse_args(argv)
    model, tok = load_run(a.run, device="cpu")
    lo, hi = (int(x) for x in a.items.split(":"))
    items = read_jsonl(a.task)[lo:hi]
    mem = Memorize(lr=a.memory_lr) if a.memorize else None
    tally, out = MemorizeTally(), []
    for r in range(1, a.rounds + 1):
        score_items(model, tok, items, mem, a.batch_size, tally)
        out.append(rss_mb())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"round {r}: {len(items) * r} items scored, RSS {out[-1]:.0f} MB, peak {peak:.0f} MB", flush=True)
    return out


if __name__ == "__main__":
    main()

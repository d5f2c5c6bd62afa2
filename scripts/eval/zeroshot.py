"""Zero-shot multiple-choice pack of a trained run (offline: BIG-bench tasks from the
`bigbench` sdist, or local JSONL task files).

    python scripts/eval/zeroshot.py --run runs/hope-smoke --tasks all --out results/hope
    python scripts/eval/zeroshot.py --run RUN --tasks social_iqa,my_task.jsonl --limit 200 --out DIR --memorize

Writes DIR/zeroshot.json (and, with --memorize, DIR/zeroshot_memorize.json: the same metrics
after memorising each item's context, with the deltas against the baseline)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nested_learning.eval import load_run  # noqa: E402
from nested_learning.eval import results as R  # noqa: E402
from nested_learning.eval.tasks import read_jsonl, resolve_tasks  # noqa: E402
from nested_learning.eval.zeroshot import score_items  # noqa: E402
from nested_learning.train.data import data_dir_of  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(ap)
    ap.add_argument("--tasks", default="all", help="all, BIG-bench pack task names, or JSONL paths (comma-separated)")
    ap.add_argument("--limit", type=int, default=None, help="the first N items of each task")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="contexts per batch (peak memory grows with it: each row carries its own fast state)")
    ap.add_argument("--data-dir", default=None, help="cache of the task files (default: $NL_DATA_DIR or ./data)")
    a = ap.parse_args(argv)
    R.memorize_settings(a)  # bad flags fail before the model loads
    model, tok = load_run(a.run, a.step, a.device)
    tasks = {n: read_jsonl(p)[: a.limit] for n, p in
             resolve_tasks(a.tasks, a.data_dir or data_dir_of({}), log=print).items()}

    def evaluate(setting, reports):
        blocks = {}
        for name, items in tasks.items():
            bar = R.progress_bar(len(items), f"{name}{' (memorised)' if setting else ''}", "item", a.no_progress)
            blocks[name] = score_items(model, tok, items, setting, a.batch_size, reports, bar)
            if bar is not None:
                bar.close()
        return blocks

    out = R.baseline_and_memorised("zeroshot", model, a, evaluate)
    print_table(out)
    return out


def print_table(out: dict) -> None:
    base = out["zeroshot"]
    mem = out.get("zeroshot_memorize")
    print(f"{'task':<22} {'n':>5} {'chance':>7} {'acc':>14} {'acc_norm':>14}" + ("  memorised acc / acc_norm" if mem else ""))
    fmt = lambda m: f"{m['value']:.3f}±{(m['stderr'] or 0):.3f}"  # noqa: E731
    for name, t in base["tasks"].items():
        line = f"{name:<22} {t['n_items']:>5} {t['chance']:>7.3f} {fmt(t['metrics']['acc']):>14} {fmt(t['metrics']['acc_norm']):>14}"
        if mem:
            m = mem["tasks"][name]["metrics"]
            line += f"  {fmt(m['acc'])} / {fmt(m['acc_norm'])}"
        print(line)


if __name__ == "__main__":
    main()

"""Zero-shot pack of a trained run, offline: BLiMP (shipped with the package; minimal pairs
scored as whole sentences), the BIG-bench multiple-choice tasks where a copy of the `bigbench`
1.0.0 sdist is at hand, and local JSONL task files.

    python scripts/eval/zeroshot.py --run runs/hope-smoke --tasks all --out results/hope
    python scripts/eval/zeroshot.py --run RUN --tasks blimp --blimp-pairs 100 --out DIR
    python scripts/eval/zeroshot.py --run RUN --tasks bigbench --bigbench-sdist bigbench-1.0.0.tar.gz --out DIR
    python scripts/eval/zeroshot.py --run RUN --tasks social_iqa,my_task.jsonl --limit 200 --out DIR --memorize

`--tasks all` is BLiMP plus the BIG-bench tasks when they are at hand offline (a line says when
they are skipped). Writes DIR/zeroshot.json (and, with --memorize, DIR/zeroshot_memorize.json:
the same metrics after memorising each item's context, with the deltas against the baseline;
a BLiMP sentence has no context, so its memorised numbers are the baseline's)."""

from __future__ import annotations

import argparse
import copy

from nested_learning.cli._common import command
from nested_learning.data.sources import data_dir_of
from nested_learning.eval import blimp
from nested_learning.eval import results as R
from nested_learning.eval.tasks import read_jsonl, resolve_tasks
from nested_learning.eval.zeroshot import score_items
from nested_learning.runs import load_run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(ap)
    ap.add_argument("--tasks", default="all",
                    help="all (BLiMP, plus BIG-bench when at hand offline), blimp, bigbench, BIG-bench task names, "
                         "or JSONL paths (comma-separated)")
    ap.add_argument("--limit", type=int, default=None,
                    help="the first N items of each multiple-choice task (BLiMP: --blimp-pairs)")
    ap.add_argument("--blimp-pairs", type=int, default=None,
                    help="a sample of N pairs of each BLiMP paradigm, seeded by --seed (default: all 1,000)")
    ap.add_argument("--blimp-paradigms", action="store_true", help="print BLiMP's table per paradigm too")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="contexts per batch (BLiMP: pairs per batch); peak memory grows with it, each row "
                         "carrying its own fast state")
    ap.add_argument("--data-dir", default=None, help="cache of the task files (default: $NL_DATA_DIR or ./data)")
    ap.add_argument("--bigbench-sdist", default=None,
                    help="a local copy of the bigbench 1.0.0 sdist to convert the BIG-bench tasks from "
                         "(default: DATA/bigbench-1.0.0.tar.gz where it exists)")
    a = ap.parse_args(argv)
    R.memorize_settings(a)  # bad flags fail before the model loads
    if a.blimp_pairs is not None and a.blimp_pairs < 1:
        raise SystemExit(f"--blimp-pairs must be >= 1, got {a.blimp_pairs}")
    paths = resolve_tasks(a.tasks, a.data_dir or data_dir_of({}), log=print, bigbench_sdist=a.bigbench_sdist)
    tasks = {n: blimp.load_pairs(p, a.blimp_pairs, a.seed) if p == blimp.ARCHIVE else read_jsonl(p)[: a.limit]
             for n, p in paths.items()}
    if a.memorize and all(p == blimp.ARCHIVE for p in paths.values()):
        print("--memorize: nothing to memorise (a BLiMP sentence is scored whole, with no context); "
              "the memorised run is skipped")
        a.memorize = False
    model, tok = load_run(a.run, a.step, a.device)
    baseline: dict = {}

    def evaluate(setting, reports):
        blocks = {}
        for name, items in tasks.items():
            is_blimp = paths[name] == blimp.ARCHIVE
            if is_blimp and setting is not None:  # no context to memorise: the baseline's numbers
                blocks[name] = copy.deepcopy(baseline[name])
                blocks[name]["extra"]["memorize"] = "not applied: a BLiMP sentence is scored whole, with no context"
                continue
            total = 2 * sum(map(len, items.values())) if is_blimp else len(items)
            bar = R.progress_bar(total, f"{name}{' (memorised)' if setting else ''}",
                                 "sentence" if is_blimp else "item", a.no_progress)
            if is_blimp:
                blocks[name] = blimp.score_blimp(model, tok, items, 2 * a.batch_size, bar)
            else:
                blocks[name] = score_items(model, tok, items, setting, a.batch_size, reports, bar)
            if bar is not None:
                bar.close()
            if setting is None:
                baseline[name] = blocks[name]
        return blocks

    out = R.baseline_and_memorised("zeroshot", model, a, evaluate)
    print_table(out, a.blimp_paradigms)
    return out


def print_table(out: dict, paradigms: bool = False) -> None:
    base = out["zeroshot"]
    mem = out.get("zeroshot_memorize")
    print(f"{'task':<22} {'n':>6} {'chance':>7} {'acc':>14} {'acc_norm':>14}" + ("  memorised acc / acc_norm" if mem else ""))

    def fmt(m):
        return "-" if m is None else f"{m['value']:.3f}±{(m['stderr'] or 0):.3f}"

    for name, t in base["tasks"].items():
        m = t["metrics"]
        line = f"{name:<22} {t['n_items']:>6} {t['chance']:>7.3f} {fmt(m['acc']):>14} {fmt(m.get('acc_norm')):>14}"
        if mem:
            mm = mem["tasks"][name]["metrics"]
            line += f"  {fmt(mm['acc'])} / {fmt(mm.get('acc_norm'))}"
        print(line)
    for t in base["tasks"].values():
        if "terms" in t.get("extra", {}):
            print()
            print("\n".join(blimp.table_lines(t, paradigms)))


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()

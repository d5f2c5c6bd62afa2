"""Multi-query associative recall (MQAR, as in Zoology): do the memories memorise? Each model
is trained from scratch on freshly generated key-value sequences and scored on held-out ones.

    python scripts/eval/recall.py --models hope,titans,transformer,hope-deltanet,hope-nowrites \\
        --pairs 2,4,8,16 --lengths 32,64,128 --steps 2000 --seeds 0 --time-limit 1200 --out results/recall

Each sequence is N key-value pairs, then the queries (every key once, in a random order, at
random later positions as Zoology places them); the model must output each queried key's
value, and the loss and the accuracy count only those positions. Besides chance (1 / number
of values), the table shows 1/N: what a model scores that answers with one of the sequence's
N values at random, without recall (the plateau a model sits on before it learns to recall). Models (all at the same
d_model, heads and layers): hope (self-modifying Titans mixer), titans, transformer,
hope-deltanet (HOPE with the gated DeltaNet mixer) and hope-nowrites (HOPE with its in-context
memory writes disabled: the control). Training mixes every (pairs, length) cell with L >= 4N;
cells with L < 4N are reported as not run. The data and the method are in the docstring of
nested_learning/eval/recall.py.

With --segment S the test sequences are read S tokens at a time, the fast state carried (the
same predictions as one forward, up to float rounding on near-ties); with --memorize too, each segment is memorised after it is
scored (model.memorize, the next-token loss of the input tokens, never the answers), and
DIR/recall_<model>_memorize.json holds the memorised accuracies with their baseline_delta:

    python scripts/eval/recall.py --models hope,titans --pairs 2,4,8 --lengths 64 --steps 600 \\
        --segment 16 --memorize --out results/recall_memorize

Training reads each sequence in one piece by default, so a model's CMS levels never update
within a sequence while it learns. With --train-segment S it learns in segments of S tokens,
one optimizer step per segment and the CMS update pass between them, as train.py streams a
document; --input-loss adds the input's own next-token loss (in the pair region: each key's
value) so that the early segments, which hold no query, have a loss and a teach signal:

    python scripts/eval/recall.py --models hope --pairs 2,4,8 --lengths 64 --steps 600 \\
        --train-segment 16 --input-loss --segment 16 --memorize --out results/recall_trained_in_segments

Writes DIR/recall_<model>.json (schema nested_learning.eval/1: task "mqar", the mean over
cells, with the grid, the marginals and the training summaries in extra, and one task per
cell "mqar_N<pairs>_L<length>"), DIR/recall_table.md (the printed table: accuracy ± standard
error per cell, by pairs and by length, chance 1/number of values) and, with matplotlib,
DIR/recall_accuracy.png (accuracy against pairs, a panel per length, a line per model)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from nested_learning.cli._common import command, field_overrides
from nested_learning.eval import recall as RC
from nested_learning.eval import results as R
from nested_learning.models.streaming import MemorizeTally
from nested_learning.train.config import OptimConfig


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(RC.MODELS), help=f"comma-separated, of {', '.join(RC.MODELS)}")
    ap.add_argument("--pairs", default="2,4,8,16", help="numbers of key-value pairs")
    ap.add_argument("--lengths", default="32,64,128", help="sequence lengths in tokens")
    ap.add_argument("--steps", type=int, default=2000,
                    help="batches of training sequences per model and seed: one optimizer step each (with "
                         "--train-segment one per segment)")
    ap.add_argument("--seeds", default="0", help="comma-separated; each seed: its own init, data and test set")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step (one cell per step)")
    ap.add_argument("--test-sequences", type=int, default=256, help="held-out sequences per cell")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary: keys, values (equal halves) and filler")
    ap.add_argument("--filler", type=int, default=16, help="filler tokens (their own vocabulary)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=OptimConfig.lr)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm bound (0: none)")
    ap.add_argument("--no-inner-updates", action="store_true",
                    help="skip the CMS update pass after each step (its fast state is dropped anyway: every batch "
                         "is fresh sequences)")
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                    help="a model config field for every model, its value in YAML (repeatable), e.g. "
                         "cms_periods=[16]: the campaign's ablations")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds of training per model and seed at most")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: these models are small, and on a shared CPU several threads "
                         "wait on each other; 0: torch's default)")
    ap.add_argument("--segment", type=int, default=None,
                    help="read each test sequence in segments of this many tokens, the fast state carried "
                         "(default: in one forward; needed for --memorize to act before the last segment)")
    ap.add_argument("--train-segment", type=int, default=None,
                    help="train on the sequences in segments of this many tokens, one optimizer step per segment "
                         "with the fast state carried (as train.py streams a document), so the CMS levels update "
                         "between segments of a sequence (default: one step per sequence)")
    ap.add_argument("--input-loss", action="store_true",
                    help="train on the input's own next-token loss beside the queries' (the value after each key in "
                         "the pair region, the filler's next token): every segment then has a loss and a teach "
                         "signal. Scoring still counts only the queries")
    ap.add_argument("--out", required=True, help="folder for the result JSON, the table and the plot")
    ap.add_argument("--no-progress", action="store_true")
    R.add_memorize_args(ap)
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in RC.MODELS]
    if bad or not models:
        raise SystemExit(f"unknown model(s) {bad}; choose from {', '.join(RC.MODELS)}")
    if a.steps < 1 or a.batch_size < 1 or a.test_sequences < 2:
        raise SystemExit("need --steps >= 1, --batch-size >= 1 and --test-sequences >= 2")
    for flag, v in (("--segment", a.segment), ("--train-segment", a.train_segment)):
        if v is not None and v < 1:
            raise SystemExit(f"{flag} must be >= 1 token, got {v}")
    memorize = R.memorize_settings(a)
    if memorize is not None and a.segment is None:
        raise SystemExit("--memorize needs --segment: a sequence read in one piece is scored before anything is "
                         "memorised, so memorisation could change no prediction")
    overrides = field_overrides(a.override)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        task = RC.RecallTask(a.vocab, a.filler)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    seeds = _ints(a.seeds)
    cells, skipped = RC.split_cells(task, _ints(a.pairs), _ints(a.lengths))
    if not cells:
        raise SystemExit("no (pairs, length) cell can be generated: " + "; ".join(w for _, w in skipped))
    for c, why in skipped:
        print(f"not run: pairs {c[0]} length {c[1]}: {why}", file=sys.stderr)
    warmup = a.warmup if a.warmup is not None else max(1, a.steps // 20)
    optim = OptimConfig.from_dict({**RC.DEFAULT_OPTIM, "lr": a.lr, "warmup": warmup}).as_dict()
    clip = a.clip or None
    settings = {"steps": a.steps, "seeds": seeds, "batch_size": a.batch_size, "test_sequences": a.test_sequences,
                "d_model": a.d_model, "n_layers": a.layers, "n_heads": a.heads, "optimizer": optim, "clip": clip,
                "inner_updates": not a.no_inner_updates, "time_limit": a.time_limit,
                "threads": torch.get_num_threads(), "overrides": overrides, "cells": [list(c) for c in cells],
                "segment": a.segment, "train_segment": a.train_segment, "input_loss": a.input_loss}
    os.makedirs(a.out, exist_ok=True)
    runs = []
    for name in models:
        run = RC.run_model(name, task, cells, a.steps, seeds, a.batch_size, a.test_sequences, a.d_model, a.layers,
                           a.heads, optim, clip, not a.no_progress, a.time_limit, inner_updates=not a.no_inner_updates,
                           overrides=overrides, segment=a.segment, memorize=memorize, train_segment=a.train_segment,
                           input_loss=a.input_loss)
        runs.append(run)
        res = R.result("recall", None, seeds[0], RC.result_tasks(run, task, skipped, settings))
        R.write(res, os.path.join(a.out, f"recall_{name}.json"))
        secs = sum(s["train"]["seconds"] for s in run["seeds"])
        m = res["tasks"]["mqar"]["metrics"]["acc"]
        print(f"{name}: {run['parameters']:,} parameters, {secs:.0f} s training, mean accuracy {m['value']:.3f}"
              f" (chance {task.chance:.4f})", flush=True)
        if memorize is not None:
            # no CMS levels (tally None): the baseline's numbers, and a warning that says why
            block, notes = R.summarise_memorisation(memorize, run["memorize_tally"] or MemorizeTally())
            mres = R.result("recall_memorize", None, seeds[0], RC.result_tasks(run, task, skipped, settings, True),
                            block, notes)
            R.add_deltas(mres, res)
            R.write(mres, os.path.join(a.out, f"recall_{name}_memorize.json"))
            d = mres["tasks"]["mqar"]["baseline_delta"]["acc"]
            print(f"{name} memorised: mean accuracy {mres['tasks']['mqar']['metrics']['acc']['value']:.3f} "
                  f"({d:+.3f} against reading without memorising; {block['updates_applied']:,} CMS updates)", flush=True)
    lines = RC.table(runs, task)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "recall_table.md"), "w") as f:
        f.write(text + "\n")
    png = RC.plot(runs, task, os.path.join(a.out, "recall_accuracy.png"))
    print(f"plot: {png}" if png else "plot: not drawn (matplotlib is not installed; pip install matplotlib)")
    return {"runs": runs, "task": task, "skipped": skipped}


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()

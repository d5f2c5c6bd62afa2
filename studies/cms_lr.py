"""Does the continuum memory do anything in context, and at what CMS learning rate? The CPU
campaign's HOPE runs (cms_lr 1e-3) end with CMS fast weights within 0.2% of their slow weights at
the median and a test-time-memorisation gain of 0.001-0.002 bits per byte (docs/
stability_journal.md section 4): the levels act as static MLPs. This study trains the campaign's
HOPE entry (`configs/campaign/cpu.yaml`: same data, steps, batch, context, seed) at several
`cms_lr` and measures, for each:

- the final validation loss (training's validation memorises each segment, as training does);
- the in-context gain: held-out long-document loss without and with memorisation
  (`scripts/eval/perplexity.py --memorize`, the campaign's settings), overall and by position;
- how far the fast weights move: ||W_fast - W_slow||_F / ||W_slow||_F per level after one
  training context (context_len tokens) of each held-out document, memorised segment by segment
  in the training segment (train.seq_len), as the evaluations memorise (models.streaming.stream_segment);
- stability: the fraction of clipped steps, the largest gradient norm, skipped steps;
- health (OUT/cms_lr.md's second table): the drift after 4x the training context, memorised
  the same way without a reset, and the gradient norm of each parameter group (summed over the
  layers) at the median of the run's second half.

    python -m studies.cms_lr [--lrs 1e-3,1e-2,3e-2,1e-1] [--seed 0] [--out studies/out/cms_lr]

Resumable: a finished run or evaluation is not repeated (an unfinished run resumes from its
checkpoint). Writes OUT/cms_lr.json, OUT/cms_lr.md (the table) and OUT/cms_lr.png."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from nested_learning.campaign.collect import train_summary
from nested_learning.campaign.spec import Campaign
from nested_learning.eval.plots import pyplot
from nested_learning.models.streaming import Memorize, stream_document, stream_segment
from nested_learning.runs.checkpoint import step_dirs
from nested_learning.runs.load import held_out_documents, load_run
from nested_learning.train.config import compose_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def reference_entry(campaign: Campaign, seed: int):
    """The campaign's reference (HOPE) entry of `seed` and the train.py config it composes."""
    entry = next(e for e in campaign.main_entries() if e.name == f"{campaign.reference}-s{seed}")
    return entry, compose_config([*campaign.train, *entry.overrides], config_dir=campaign.config_dir)


def train(campaign: Campaign, seed: int, lr: float, run: str, threads: int) -> float:
    """Train the campaign's HOPE entry at cms_lr `lr` into `run` (resuming); returns seconds."""
    entry, cfg = reference_entry(campaign, seed)
    steps = int(cfg["train"]["steps"])
    done = step_dirs(run) if os.path.isdir(run) else []
    if done and done[0][0] >= steps:
        return 0.0
    cmd = [sys.executable, "train.py", *campaign.train, *entry.overrides, f"model.overrides.cms_lr={lr:g}",
           f"train.seed={seed}", f"train.out_dir={run}"]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    with open(os.path.join(os.path.dirname(run), f"{os.path.basename(run)}.train.log"), "a") as log:
        subprocess.run(cmd, cwd=ROOT, env=_env(threads), stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def perplexity(run: str, threads: int, max_docs: int, max_tokens: int) -> dict:
    out = os.path.join(run, "eval", "perplexity")
    files = [os.path.join(out, f) for f in ("perplexity.json", "perplexity_memorize.json")]
    if not all(os.path.exists(f) for f in files):
        subprocess.run([sys.executable, "scripts/eval/perplexity.py", "--run", run, "--out", out, "--max-docs",
                        str(max_docs), "--max-tokens", str(max_tokens), "--memorize", "--no-progress"],
                       cwd=ROOT, env=_env(threads), check=True, stdout=subprocess.DEVNULL)
    res = {}
    for label, f in zip(("baseline", "memorised"), files):
        with open(f) as fh:
            task = next(iter(json.load(fh)["tasks"].values()))
        res[label] = {"loss": task["metrics"]["loss"]["value"], "bits_per_byte": task["metrics"]["bits_per_byte"]["value"],
                      "by_position": {b["bucket"]: b["loss"] for b in task["extra"]["loss_by_position"]}}
    return res


@torch.no_grad()
def drift(run: str, context: int, max_docs: int, spans=(1, 4)) -> dict[int, dict[str, float]]:
    """{k: per CMS level, ||W_fast - W_slow||_F / ||W_slow||_F after the first k * `context`
    tokens of each held-out document} for k in `spans`, memorised segment by segment as in
    training, without a reset; the mean over the documents, the blocks and the level's two
    linear layers (a document shorter than k * context counts with what it has)."""
    model, tok = load_run(run, None, "cpu")
    _, docs = held_out_documents(model, None)
    seg = stream_segment(model, Memorize())  # the training segment, as the evaluations memorise
    per: dict[int, dict[str, list[float]]] = {k: {} for k in spans}
    for _, text in docs[:max_docs]:
        ids = torch.tensor(tok.encode(text).ids[:max(spans) * context + 1])
        state, at = None, 0
        for k in spans:
            end = min(k * context, len(ids) - 1)
            if end > at:
                with torch.enable_grad():  # memorisation takes gradients
                    _, state = stream_document(model, ids[at:end + 1], seg, Memorize(), state=state)
                at = end
            for blk, st in zip(model.blocks, state.layers):
                for name, (fast, slow) in blk.cms.fast_memories(st["cms"]).items():
                    rel = ((fast.float() - slow.float()).flatten(1).norm(dim=1) / slow.float().norm()).mean()
                    per[k].setdefault(name.split(".")[0], []).append(float(rel))
    return {k: {lv: sum(v) / len(v) for lv, v in sorted(d.items())} for k, d in per.items()}


def grad_groups(run: str) -> dict[str, float]:
    """Each parameter group's gradient norm (metrics.jsonl health.grad_norm_groups, the groups
    of every layer combined: sqrt of the sum of squares), the median over the run's second half."""
    recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
    recs = [r for r in recs if (r.get("health") or {}).get("grad_norm_groups")]
    per: dict[str, list[float]] = {}
    for r in recs[len(recs) // 2:]:
        sq: dict[str, float] = {}
        for name, g in r["health"]["grad_norm_groups"].items():
            kind = name.split(".", 1)[1] if name.startswith("layer") else name
            sq[kind] = sq.get(kind, 0.0) + g * g
        for kind, v in sq.items():
            per.setdefault(kind, []).append(v ** 0.5)
    return {k: sorted(v)[len(v) // 2] for k, v in sorted(per.items())}


def health_table(rows: list[dict]) -> list[str]:
    groups = sorted({k for r in rows for k in r["grad_groups"]})
    L = ["| cms_lr | seed | drift after the context, mean over levels | after 4x the context | "
         + " | ".join(f"gradient norm, {g}" for g in groups) + " |", "|---:|---:|---:|---:|" + "---:|" * len(groups)]
    for r in rows:
        mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
        L.append(f"| {r['cms_lr']:g} | {r['seed']} | {mean(r['drift']):.2e} | {mean(r['drift_4x']):.2e} | "
                 + " | ".join(f"{r['grad_groups'].get(g, float('nan')):.3f}" for g in groups) + " |")
    return L


def table(rows: list[dict]) -> list[str]:
    levels = sorted({k for r in rows for k in r["drift"]})
    L = ["| cms_lr | final validation loss | long-document loss, no memorising | memorising | in-context gain "
         "(nats/token) | bits per byte, no / memorising | " + " | ".join(f"{lv} drift" for lv in levels)
         + " | clipped steps | largest gradient norm | skipped steps |",
         "|---:|---:|---:|---:|---:|---|" + "---:|" * len(levels) + "---:|---:|---:|"]
    for r in rows:
        p, t = r["perplexity"], r["train"]
        L.append(f"| {r['cms_lr']:g} | {t['final_val_loss']:.4f} | {p['baseline']['loss']:.4f} | "
                 f"{p['memorised']['loss']:.4f} | {p['baseline']['loss'] - p['memorised']['loss']:+.4f} | "
                 f"{p['baseline']['bits_per_byte']:.4f} / {p['memorised']['bits_per_byte']:.4f} | "
                 + " | ".join(f"{r['drift'][lv]:.2e}" for lv in levels)
                 + f" | {100 * t['clipped_fraction']:.1f}% | {t['grad_norm_max']:.2f} | {t['skipped_steps']} |")
    return L


def plot(rows: list[dict], path: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    rows = sorted(rows, key=lambda r: r["cms_lr"])
    lrs = [r["cms_lr"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(lrs, [r["train"]["final_val_loss"] for r in rows], "o-")
    ax[0].set_title("final validation loss (memorising each segment, as in training)", fontsize=9)
    ax[0].set_ylabel("nats/token")
    ax[1].plot(lrs, [r["perplexity"]["baseline"]["loss"] - r["perplexity"]["memorised"]["loss"] for r in rows], "o-")
    ax[1].axhline(0, color="grey", lw=0.8)
    ax[1].set_title("held-out long documents: loss without - with memorising", fontsize=9)
    ax[1].set_ylabel("nats/token (positive: memorising helps)")
    for lv in sorted(rows[0]["drift"]):
        ax[2].plot(lrs, [r["drift"][lv] for r in rows], "o-", label=lv)
    ax[2].set_yscale("log")
    ax[2].set_title("||W_fast - W_slow|| / ||W_slow|| after one context", fontsize=9)
    ax[2].legend(fontsize=7)
    for a in ax:
        a.set_xscale("log")
        a.set_xlabel("cms_lr")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="1e-3,1e-2,3e-2,1e-1", help="comma-separated cms_lr values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--campaign", default="cpu", help="the campaign whose HOPE entry is trained")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-docs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default="studies/out/cms_lr")
    a = ap.parse_args(argv)
    lrs = [float(x) for x in a.lrs.split(",") if x.strip()]
    if not lrs or any(x < 0 for x in lrs):
        raise SystemExit("--lrs: one or more non-negative numbers")
    campaign = Campaign.load(os.path.join(ROOT, "configs", "campaign", f"{a.campaign}.yaml"))
    context = int(reference_entry(campaign, a.seed)[1]["train"]["context_len"])
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    rows = []
    for lr in lrs:
        run = os.path.join(out, "runs", f"cms_lr{lr:g}-s{a.seed}")
        os.makedirs(os.path.dirname(run), exist_ok=True)
        secs = train(campaign, a.seed, lr, run, a.threads)
        summary = train_summary(run, [], secs)
        row = {"cms_lr": lr, "seed": a.seed, "run": os.path.relpath(run, ROOT),
               "train": {k: summary[k] for k in ("final_val_loss", "final_val_se", "clipped_fraction", "grad_norm_median",
                                                 "grad_norm_max", "skipped_steps", "steps", "tokens", "fast_memory")},
               "perplexity": perplexity(run, a.threads, a.max_docs, a.max_tokens)}
        spans = drift(run, context, a.max_docs)
        row.update(drift=spans[1], drift_4x=spans[4], grad_groups=grad_groups(run))
        rows.append(row)
        print("\n".join(table([row])[2:]), flush=True)
    with open(os.path.join(out, "cms_lr.json"), "w") as f:
        json.dump({"command": "python -m studies.cms_lr " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "campaign": a.campaign, "context": context, "rows": rows}, f, indent=1)
    rows_by_lr = sorted(rows, key=lambda r: r["cms_lr"])
    text = "\n".join([*table(rows_by_lr), "", *health_table(rows_by_lr)])
    with open(os.path.join(out, "cms_lr.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    png = plot(rows, os.path.join(out, "cms_lr.png"))
    print(f"plot: {png}" if png else "plot: not drawn (matplotlib is not installed)")
    return rows


if __name__ == "__main__":
    main()

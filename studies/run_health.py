"""The health of finished HOPE training runs, over 4x their training context: for each run folder,

- how far the CMS levels' fast weights move from their slow weights, ||W_fast - W_slow||_F /
  ||W_slow||_F per level after one and after four training contexts of each held-out document,
  memorised segment by segment without a reset (studies.cms_lr.drift);
- each parameter group's gradient norm at the median of the run's second half
  (studies.cms_lr.grad_groups);
- from its training summary: the fraction of clipped steps, the largest gradient norm, skipped
  steps and the final validation loss.

    python studies/run_health.py RUN [RUN ...] [--max-docs 8] [--out studies/out/run_health]

Writes OUT/run_health.json and OUT/run_health.md (one table row per run)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from nested_learning.campaign.collect import train_summary

if __package__:  # imported as studies.run_health (python -m studies.run_health)
    from .cms_lr import drift, grad_groups
else:  # python studies/run_health.py: studies/ is sys.path[0]
    from cms_lr import drift, grad_groups


def health(run: str, max_docs: int) -> dict:
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    over = cfg["model"].get("overrides") or {}
    brief = train_summary(run, [], 0.0)
    spans = drift(run, int(cfg["train"]["context_len"]), max_docs)
    return {"run": run, "cms_optimizer": over.get("cms_optimizer", "gd"), "cms_lr": over.get("cms_lr"),
            "final_val_loss": brief["final_val_loss"], "clipped_fraction": brief["clipped_fraction"],
            "grad_norm_max": brief["grad_norm_max"], "skipped_steps": brief["skipped_steps"],
            "drift": spans[1], "drift_4x": spans[4], "grad_groups": grad_groups(run)}


def table(rows: list[dict]) -> list[str]:
    groups = sorted({k for r in rows for k in r["grad_groups"]})
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    lines = ["| run | optimizer | cms_lr | val loss | clipped | largest grad norm | drift after the context "
             "(mean over levels) | after 4x | " + " | ".join(f"grad norm, {g}" for g in groups) + " |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(groups)]
    for r in rows:
        lines.append(f"| {os.path.basename(r['run'].rstrip('/'))} | {r['cms_optimizer']} | {r['cms_lr']} | "
                     f"{r['final_val_loss']:.3f} | {r['clipped_fraction']:.1%} | {r['grad_norm_max']:.1f} | "
                     f"{mean(r['drift']):.2%} | {mean(r['drift_4x']):.2%} | "
                     + " | ".join(f"{r['grad_groups'].get(g, float('nan')):.3f}" for g in groups) + " |")
    return lines


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished train.py run folders (HOPE)")
    ap.add_argument("--max-docs", type=int, default=8, help="held-out documents streamed per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="studies/out/run_health")
    a = ap.parse_args(argv)
    missing = [r for r in a.runs if not os.path.isfile(os.path.join(r, "config.json"))]
    if missing:
        raise SystemExit(f"not a finished run folder (no config.json): {', '.join(missing)}")
    torch.set_num_threads(a.threads)
    rows = []
    for run in a.runs:
        rows.append(health(run, a.max_docs))
        print(f"{run}: drift {rows[-1]['drift']} / 4x {rows[-1]['drift_4x']}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "run_health.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = "\n".join(table(rows))
    with open(os.path.join(a.out, "run_health.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

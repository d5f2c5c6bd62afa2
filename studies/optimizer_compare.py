"""Muon (mixed with AdamW) against AdamW on the smoke configs: the same tokens, seeds and
schedule, the loss curves, final validation loss and step time (the plan's P0 question).

    python studies/optimizer_compare.py                              # hope and transformer, 2 seeds, 300 steps
    python studies/optimizer_compare.py --models hope --seeds 0 --steps 100 --out studies/out/optim

Each run is `python train.py model=M optim=O train.seed=S train.steps=N` (validation every
N/3 steps on the same 4 x 8 x 128 validation tokens, no saves), in-process. Writes
OUT/optimizer_compare.json, OUT/optimizer_compare.png (training loss, a 10-step running mean,
one line per run) and prints the table: mean over seeds with the range."""

from __future__ import annotations

import argparse
import json
import os
import statistics

if __package__:  # imported as studies.optimizer_compare (python -m studies.optimizer_compare)
    from .variant_stability import train_in_process
else:  # python studies/optimizer_compare.py: studies/ is sys.path[0]
    from variant_stability import train_in_process

OPTIMS = ("adamw", "mixed_muon_adamw")


def summarise(recs: list[dict]) -> dict:
    loss = [r["loss"] for r in recs if not r.get("skipped")]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    tps = sorted(r["tokens_per_s"] for r in recs[1:])  # the first step includes warm-up
    return {"loss": [r["loss"] for r in recs], "val_loss": val, "final_val_loss": val[-1][1] if val else None,
            "final_train_loss": statistics.fmean(loss[-10:]) if loss else None,
            "median_tokens_per_s": tps[len(tps) // 2] if tps else None, "skipped": sum(bool(r.get("skipped")) for r in recs)}


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), dpi=120, squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in [r for r in rows if r["model"] == m]:
            y = r["loss"]
            smooth = [statistics.fmean(y[max(0, i - 9):i + 1]) for i in range(len(y))]
            ax.plot(range(1, len(y) + 1), smooth, color="C0" if r["optim"] == "adamw" else "C3",
                    linestyle="-" if r["seed"] == 0 else "--", label=f"{r['optim']} seed {r['seed']}")
        ax.set_title(f"{m} smoke: training loss (10-step mean)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="hope,transformer")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="studies/out/optimizer_compare")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for m in a.models.split(","):
        for o in OPTIMS:
            for s in (int(x) for x in a.seeds.split(",")):
                recs, status, sec = train_in_process([f"model={m}", f"optim={o}", f"train.seed={s}"], a.steps,
                                                     eval_every=max(1, a.steps // 3), label=f"opt-{m}-{o}-{s}")
                rows.append({"model": m, "optim": o, "seed": s, "status": status, "seconds": sec, **summarise(recs)})
                print(f"{m} {o} seed {s}: {status}, val {rows[-1]['final_val_loss']}, {sec:.0f} s", flush=True)
                with open(os.path.join(a.out, "optimizer_compare.json"), "w") as f:
                    json.dump(rows, f, indent=1)
    print("\n| model | optimizer | final val loss (mean, range over seeds) | train loss, last 10 steps | "
          "median tokens/s | skipped steps |\n|---|---|---|---|---:|---:|")
    for m in a.models.split(","):
        for o in OPTIMS:
            rs = [r for r in rows if r["model"] == m and r["optim"] == o]
            v = [r["final_val_loss"] for r in rs if r["final_val_loss"] is not None]
            t = [r["final_train_loss"] for r in rs if r["final_train_loss"] is not None]
            f = lambda xs: f"{statistics.fmean(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})" if xs else "-"  # noqa: E731
            print(f"| {m} | {o} | {f(v)} | {f(t)} | {statistics.fmean(r['median_tokens_per_s'] for r in rs):.0f} | "
                  f"{sum(r['skipped'] for r in rs)} |")
    print(f"plot: {plot(rows, os.path.join(a.out, 'optimizer_compare.png'))}")
    return rows


if __name__ == "__main__":
    main()

"""The forget gate's initial bias of HOPE's self-modifying memories, chosen from a measured sweep.

    python studies/forget_sweep.py --biases 4,6,8,10 --steps 150 --json studies/out/forget_sweep.json

Each row is the README's main job (`python train.py`, smoke HOPE) with
`model.overrides.forget_bias=B` (alpha = sigmoid(B) per token at init: an effective horizon of
1 / (1 - alpha) tokens), run in-process with evaluations every `--eval-every` steps. Reported:
the validation loss at the end, the mean training loss of the last 30 steps, the median and
largest pre-clip gradient norm, the fraction of clipped steps, and the health telemetry at the
last step of each context (`context_pos` = context_len - seq_len): the projection and main
memories' norms relative to their initial states (mean over layers) and the mixer's output rms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

if __package__:  # imported as studies.forget_sweep (the tests; python -m studies.forget_sweep)
    from .variant_stability import train_in_process
else:  # python studies/forget_sweep.py: studies/ is sys.path[0]
    from variant_stability import train_in_process


def context_end_health(recs: list[dict], memories=("mixer.proj", "mixer.memory")) -> dict:
    """Mean over layers and over the steps that end a context of each memory's `rel`, and the
    mixer rms; the same at the first step of a context for comparison."""
    last = max(r["context_pos"] for r in recs)
    out = {}
    for tag, pos in (("end", last), ("start", 0.0)):
        steps = [r for r in recs if r.get("health") and r["context_pos"] == pos]
        for m in memories:
            vals = [L[m]["rel"] for r in steps for L in r["health"]["memory"].values() if m in L and L[m]["rel"]]
            out[f"{m}_rel_{tag}"] = statistics.fmean(vals) if vals else None
        rms = [v for r in steps for v in r["health"]["mixer_rms"].values()]
        out[f"mixer_rms_{tag}"] = statistics.fmean(rms) if rms else None
    return out


def run_bias(bias: float, steps: int, eval_every: int, extra: list[str]) -> dict:
    over = [f"++model.overrides.forget_bias={bias}", *extra]
    recs, status, seconds = train_in_process(over, steps, eval_every=eval_every, label=f"forget-{bias}")
    gn = [r["grad_norm"] for r in recs if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"])]
    val = [r for r in recs if r.get("val_loss") is not None]
    row = {"forget_bias": bias, "alpha": 1 / (1 + math.exp(-bias)), "horizon_tokens": 1 + math.exp(bias),
           "status": status, "steps": len(recs), "seconds": seconds,
           "val_loss": val[-1]["val_loss"] if val else None,
           "val_loss_se": val[-1].get("val_loss_se") if val else None,
           "train_loss_last30": statistics.fmean(r["loss"] for r in recs[-30:]) if recs else None,
           "grad_norm_median": statistics.median(gn) if gn else None, "grad_norm_max": max(gn) if gn else None,
           "clip_frac": recs[-1].get("clip_frac") if recs else None, **context_end_health(recs)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--biases", default="4,6,8,10")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--override", action="append", default=[], help="extra train.py overrides (repeatable)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    rows = []
    for b in (float(x) for x in a.biases.split(",")):
        rows.append(run_bias(b, a.steps, a.eval_every, a.override))
        r = rows[-1]
        print(f"bias {b:5.1f} (horizon {r['horizon_tokens']:8.0f} tok): val {r['val_loss']} | train(last30) "
              f"{r['train_loss_last30']:.4f} | grad median {r['grad_norm_median']:.3g} max {r['grad_norm_max']:.3g} "
              f"| clipped {r['clip_frac']:.0%} | proj rel start/end {r['mixer.proj_rel_start']:.3g}/"
              f"{r['mixer.proj_rel_end']:.3g} | memory rel {r['mixer.memory_rel_start']:.3g}/"
              f"{r['mixer.memory_rel_end']:.3g} | mixer rms {r['mixer_rms_end']:.3g} | {r['seconds']:.0f} s", flush=True)
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

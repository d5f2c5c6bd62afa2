"""Does the fused self-modifying projection op (ops.selfmod_projection, the default) train the
README's main job as the per-chunk loop it replaced did? Runs `python train.py train.steps=N`
(HOPE smoke, fixed seed) in-process twice, with `SelfModifyingTitans.fused_projection` True and
False, and reports per step the loss and pre-clip gradient-norm differences, each run's median
tokens/s (steps after the first 10), and the health telemetry of both: every fast memory's norm
relative to its initial state at the last step and its largest op/loop difference over all
steps, the largest relative difference of the gradient norms by parameter group, and how often
clipping fired.

    python -m studies.selfmod_trace --steps 40 --json studies/out/selfmod_trace.json   # from the repository root
    python -m studies.selfmod_trace --steps 40 --json studies/out/selfmod_trace_stream.json train.context_len=null
      # the fast state never reset: 40 x 128 tokens, 5x the default 1,024-token context
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

from nested_learning.eval.results import write
from nested_learning.layers.self_modifying import SelfModifyingTitans
from studies.variant_stability import train_in_process


def trace(fused: bool, steps: int, overrides: list[str]) -> list[dict]:
    with mock.patch.object(SelfModifyingTitans, "fused_projection", fused):
        recs, status, _ = train_in_process(overrides, steps, label=f"selfmod-{'op' if fused else 'loop'}")
    if status != "completed":
        raise RuntimeError(f"fused_projection={fused}: {status}")
    return [r for r in recs if r.get("loss") is not None]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides (model=hope is the default)")
    a = ap.parse_args(argv)
    op, loop = trace(True, a.steps, a.overrides), trace(False, a.steps, a.overrides)
    rows = []
    for r_op, r_loop in zip(op, loop):
        rows.append({"step": r_op["step"], "loss_op": r_op["loss"], "loss_loop": r_loop["loss"],
                     "loss_diff": abs(r_op["loss"] - r_loop["loss"]),
                     "grad_norm_rel_diff": abs(r_op["grad_norm"] - r_loop["grad_norm"]) / r_loop["grad_norm"]})
    mem_diff, grad_diff = 0.0, 0.0
    for r_op, r_loop in zip(op, loop):
        h_op, h_loop = r_op.get("health") or {}, r_loop.get("health") or {}
        for layer, mems in (h_op.get("memory") or {}).items():
            for name, m in mems.items():
                ref = h_loop["memory"][layer][name]
                if m.get("rel") is not None and ref.get("rel") is not None:
                    mem_diff = max(mem_diff, abs(m["rel"] - ref["rel"]) / max(abs(ref["rel"]), 1e-12))
        for group, g in (h_op.get("grad_norm_groups") or {}).items():
            ref = h_loop["grad_norm_groups"][group]
            grad_diff = max(grad_diff, abs(g - ref) / max(abs(ref), 1e-12))
    last = {name: {f"{layer}.{m}": v["rel"] for layer, mems in (recs[-1].get("health") or {}).get("memory", {}).items()
                   for m, v in mems.items() if m.startswith("mixer.")}
            for name, recs in (("op", op), ("loop", loop))}
    health = {"mixer_memory_rel_at_last_step": last, "max_memory_rel_rel_diff": mem_diff,
              "max_grad_group_rel_diff": grad_diff,
              "clip_frac": {"op": op[-1].get("clip_frac"), "loop": loop[-1].get("clip_frac")}}
    tps = {name: statistics.median([r["tokens_per_s"] for r in recs[10:]] or [float("nan")])
           for name, recs in (("op", op), ("loop", loop))}
    out = {"steps": a.steps, "overrides": a.overrides, "rows": rows, "tokens_per_s": tps,
           "max_loss_diff": max(r["loss_diff"] for r in rows),
           "first_step_loss_diff": rows[0]["loss_diff"], "last_step_loss_diff": rows[-1]["loss_diff"],
           "health": health}
    for r in rows[:: max(1, len(rows) // 8)] + rows[-1:]:
        print(f"step {r['step']:4d}: loss op {r['loss_op']:.6f} loop {r['loss_loop']:.6f} "
              f"(|diff| {r['loss_diff']:.1e}); grad norm rel diff {r['grad_norm_rel_diff']:.1e}")
    print(f"largest |loss diff| {out['max_loss_diff']:.2e}; median tokens/s op {tps['op']:.0f}, loop {tps['loop']:.0f}")
    print("mixer memories' norm / initial norm at the last step (op | loop): " + ", ".join(
        f"{k} {v:.3g} | {last['loop'][k]:.3g}" for k, v in last["op"].items()))
    print(f"largest relative op/loop difference: memory norm ratios {mem_diff:.1e}, gradient norms by group "
          f"{grad_diff:.1e}; clipping fired on {health['clip_frac']['op']:.0%} (op) and "
          f"{health['clip_frac']['loop']:.0%} (loop) of steps")
    if a.json:
        write(out, a.json)
    return out


if __name__ == "__main__":
    main()

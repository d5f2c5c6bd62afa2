"""Does every model variant train stably under the defaults? Loss at steps 50/100/200 and the
largest gradient norm of the README's main job with one override per variant.

    python studies/variant_stability.py                         # every variant, 200 steps, with the fixes
    python studies/variant_stability.py --raw --variants hope-dgd,titans-mlp   # the rules before the fixes
    python studies/variant_stability.py --steps 200 --json studies/out/variant_stability.json
    python studies/variant_stability.py --layer-cost            # what the MLP memory's bound costs
    python studies/variant_stability.py --before-28 --eval-every 200 --json studies/out/before28.json  # issue 28's "before"

Each row is `python train.py <override> train.steps=N` (evaluations and saves off) run
in-process in a fresh temporary out_dir. `--raw` restores the inner rules as they were before
issue 19: the CMS `dgd` preconditioner on the raw inputs with lr as given, and the Titans
memory step without its curvature bound (the divergence guard stays on, so a diverging run
ends with TrainingDiverged; the row gives the first step whose loss or gradient was not
finite). `--before-28` restores the memories as they were before issue 28: HOPE's plain
(non-residual) memories with forget bias 4, and the Titans step bound that ignores momentum
(sum theta kappa <= 1 per chunk). Each row reports the median and largest pre-clip gradient
norm, the fraction of clipped steps and, with `--eval-every N`, the last validation loss with
its standard error. See docs/stability_journal.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "hope": [],
    "hope-dgd": ["model.overrides.cms_optimizer=dgd"],
    "hope-dgd-lr1e-5": ["model.overrides.cms_optimizer=dgd", "model.overrides.cms_lr=1e-5"],
    "hope-per-level": ["model.overrides.cms_optimizer=[gd,momentum,dgd,dgd]"],
    "hope-momentum": ["model.overrides.cms_optimizer=momentum"],
    "hope-differentiable-writes": ["+model.overrides.differentiable_writes=true"],
    "hope-context-null": ["train.context_len=null"],
    "hope-bf16": ["train.bf16=true"],
    "hope-muon": ["optim=mixed_muon_adamw"],
    "titans": ["model=titans"],
    "titans-mlp": ["model=titans", "model.overrides.memory=mlp"],
    "titans-mlp-lr1e-3": ["model=titans", "model.overrides.memory=mlp", "optim.lr=1e-3"],
    "transformer": ["model=transformer"],
    "transformer-window64": ["model=transformer", "+model.overrides.window=64"],
}
# every ablation of configs/experiment/ (issue 20), as exp-NAME
VARIANTS.update({f"exp-{f[:-5]}": [f"experiment={f[:-5]}"]
                 for f in sorted(os.listdir(os.path.join(ROOT, "configs", "experiment"))) if f.endswith(".yaml")})


def raw_rules(stack: ExitStack) -> None:
    """The inner rules before the fixes (for the 'before' rows)."""
    import torch

    from nested_learning.layers import cms, titans

    stack.enter_context(mock.patch.object(cms, "dgd_inputs", lambda x, delta, opt: (x, delta)))
    stack.enter_context(mock.patch.object(cms, "dgd_step", lambda lr, period: lr))
    stack.enter_context(mock.patch.object(titans, "bounded_step", lambda th, *args: torch.ones_like(th)))
    stack.enter_context(mock.patch.object(titans.TitansMemory, "mlp_bound_in_op", False))  # the MLP memory too


def momentum_blind_bound(theta, curvature, eta, alpha, chunk):
    """The Titans chunk step bound before issue 28: min(1, 1 / sum_t theta_t kappa_t) per chunk."""
    import torch.nn.functional as F

    B, T, H = theta.shape
    n = -(-T // chunk) * chunk
    load = F.pad(theta.float() * curvature, (0, 0, 0, n - T)).view(B, n // chunk, chunk, H).sum(2)
    return (1.0 / load.clamp(min=1e-30)).clamp(max=1.0).repeat_interleave(chunk, 1)[:, :T].to(theta.dtype)


def before_28(stack: ExitStack, overrides: list[str]) -> list[str]:
    """Issue 28's "before": the momentum-blind Titans bound, and for HOPE the plain memories."""
    from nested_learning.layers import titans

    stack.enter_context(mock.patch.object(titans, "bounded_step", momentum_blind_bound))
    stack.enter_context(mock.patch.object(titans.TitansMemory, "mlp_bound_in_op", False))  # the MLP memory too
    if any(o in ("model=titans", "model=transformer") for o in overrides):
        return overrides
    return overrides + ["++model.overrides.residual_memories=false", "++model.overrides.forget_bias=4.0"]


def train_in_process(overrides: list[str], steps: int, eval_every: int = 0, raw: bool = False,
                     label: str = "run", before28: bool = False) -> tuple[list[dict], str, float]:
    """(metrics.jsonl records, "completed" or "diverged (...)", seconds) of `python train.py
    <overrides> train.steps=N` run in-process in a fresh temporary out_dir (no saves)."""
    from nested_learning.train.config import compose_config
    from nested_learning.train.loop import TrainingDiverged, run
    from nested_learning.train.metrics import read_records

    out = tempfile.mkdtemp(prefix=f"{label}-")
    stack = ExitStack()
    if before28:
        overrides = before_28(stack, overrides)
    over = overrides + [f"train.steps={steps}", f"train.out_dir={out}", f"train.eval_every={eval_every}",
                        "train.save_every=0", "train.progress=false"]
    cfg = compose_config(over)
    t0, status = time.perf_counter(), "completed"
    with stack:
        if raw:
            raw_rules(stack)
        try:
            run(cfg)
        except TrainingDiverged as err:
            status = f"diverged ({str(err)[:80]})"
    return read_records(os.path.join(out, "metrics.jsonl")), status, time.perf_counter() - t0


def run_variant(name: str, steps: int, raw: bool, before28: bool = False, eval_every: int = 0) -> dict:
    recs, status, seconds = train_in_process(VARIANTS[name], steps, eval_every=eval_every, raw=raw,
                                             label=f"stab-{name}", before28=before28)
    bad = [r["step"] for r in recs if r.get("skipped")]
    gn = [r["grad_norm"] for r in recs if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"])]
    at = {s: next((r["loss"] for r in recs if r["step"] == s), None) for s in (50, 100, 200) if s <= steps}
    val = [r for r in recs if r.get("val_loss") is not None]
    rules = "raw" if raw else "before-28" if before28 else "fixed"
    return {"variant": name, "overrides": VARIANTS[name], "rules": rules, "steps": steps,
            "status": status, "steps_run": len(recs), "first_bad_step": bad[0] if bad else None,
            "skipped_steps": len(bad), "loss_at": at, "final_loss": recs[-1]["loss"] if recs else None,
            "max_grad_norm": max(gn) if gn else None, "median_grad_norm": statistics.median(gn) if gn else None,
            "median_grad_norm_first100": statistics.median(gn[:100]) if gn else None,
            "clip_frac": recs[-1].get("clip_frac") if recs else None,
            "val_loss": val[-1]["val_loss"] if val else None, "val_loss_se": val[-1].get("val_loss_se") if val else None,
            "seconds": seconds}


def layer_cost(repeats: int = 10) -> dict:
    """Median forward + backward time of the smoke Titans MLP memory layer (d_model 128, 4 heads,
    8 x 128 tokens), in interleaved rounds: one op call per segment without the bound (the
    floor), the bound inside the op (one call per segment: the layer now), and one call per chunk
    with the bound computed in the layer (the layer before issue 32)."""
    import torch

    import nested_learning.layers.titans as titans

    torch.manual_seed(0)
    layer = titans.TitansMemory(128, 4, memory="mlp", chunk_size=16)
    x = torch.randn(8, 128, 128)

    def once() -> float:
        t0 = time.perf_counter()
        o, _ = layer(x, layer.init_state(8, "cpu", torch.float32))
        o.square().mean().backward()
        return time.perf_counter() - t0

    def one_call(self, seq, mem):
        q, k, v, theta, eta, alpha = seq
        o, st = titans.ops.titan_mlp_update(q, k, v, theta, eta, alpha, initial_state=tuple(mem),
                                            chunk_size=self.chunk)
        return o, list(st)

    modes = {"no bound, one call": [mock.patch.object(titans.TitansMemory, "_run", one_call)],
             "bound in the op, one call": [],
             "bound in the layer, one call per chunk": [mock.patch.object(titans.TitansMemory, "mlp_bound_in_op", False)]}
    times = {m: [] for m in modes}
    for i in range(repeats + 1):
        for m, patches in modes.items():
            with ExitStack() as stack:
                for p in patches:
                    stack.enter_context(p)
                t = once()
            if i:  # the first round is a warm-up
                times[m].append(t)
    med = {m: sorted(t)[len(t) // 2] * 1e3 for m, t in times.items()}
    base = med["no bound, one call"]
    print(f"Titans MLP memory layer, forward + backward, median of {repeats} interleaved rounds: "
          + "; ".join(f"{m} {ms:.1f} ms ({ms / base:.2f}x)" for m, ms in med.items()))
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--raw", action="store_true", help="the inner rules before the fixes of issue 19")
    ap.add_argument("--before-28", action="store_true", help="the memories before issue 28 (plain HOPE memories, "
                    "momentum-blind Titans bound)")
    ap.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: none)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--layer-cost", action="store_true", help="time the MLP memory layer before/after, then exit")
    a = ap.parse_args()
    if a.layer_cost:
        layer_cost()
        return
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    rows = []
    print("| variant | rules | status | loss@50 | loss@100 | loss@200 | val loss (se) | median grad norm (first 100) "
          "| max grad norm | clipped | first bad step |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        r = run_variant(name, a.steps, a.raw, a.before_28, a.eval_every)
        rows.append(r)
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        g = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f} ({g(r['val_loss_se'])})"
        clip = "-" if r["clip_frac"] is None else f"{r['clip_frac']:.0%}"
        print(f"| {name} | {r['rules']} | {r['status'][:40]} | {f(r['loss_at'].get(50))} | {f(r['loss_at'].get(100))} | "
              f"{f(r['loss_at'].get(200))} | {val} | {g(r['median_grad_norm_first100'])} | {g(r['max_grad_norm'])} | "
              f"{clip} | {r['first_bad_step'] or '-'} |", flush=True)
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as fh:
                json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

"""Trace a Titans run's memory, call by call: the gates and the memory's per-head weight norm
entering and leaving each segment (the evidence of docs/stability_journal.md, case 2).

    python studies/titans_memory_trace.py model.overrides.memory=mlp train.steps=18
    python studies/titans_memory_trace.py --raw model.overrides.memory=mlp train.steps=18   # without the step bound

Arguments are train.py overrides (model=titans is implied); evaluations and saves are off.
One line per layer call of each training step: theta (mean, max), eta (mean), the largest
per-head Frobenius norm of each memory weight in and out, and the largest |o|."""

from __future__ import annotations

import sys
import tempfile
from contextlib import ExitStack

import torch

if __package__:  # imported as studies.titans_memory_trace (python -m studies.titans_memory_trace)
    from .variant_stability import raw_rules
else:  # python studies/titans_memory_trace.py: studies/ is sys.path[0]
    from variant_stability import raw_rules


def main() -> None:
    from nested_learning.layers import titans
    from nested_learning.train.config import compose_config
    from nested_learning.train.loop import TrainingDiverged, run

    args = sys.argv[1:]
    raw = "--raw" in args
    over = ["model=titans", f"train.out_dir={tempfile.mkdtemp(prefix='trace-')}", "train.eval_every=0",
            "train.save_every=0", "train.progress=false"] + [a for a in args if a != "--raw"]
    cfg = compose_config(over)
    calls = []
    real = titans.TitansMemory._run

    def traced(self, seq, mem):
        o, st = real(self, seq, mem)
        if torch.is_grad_enabled():
            _, _, _, theta, eta, _ = (t.detach() for t in seq)
            norm = lambda ms: " ".join(f"{float(m.detach().norm(dim=(-2, -1)).max()):.3g}" for m in ms[:2])  # noqa: E731
            calls.append(f"theta {float(theta.mean()):.4f}/{float(theta.max()):.4f} eta {float(eta.mean()):.3f} | "
                         f"memory in {norm(mem)} -> out {norm(st)} | max|o| {float(o.detach().abs().max()):.3g}")
        return o, st

    with ExitStack() as stack:
        if raw:
            raw_rules(stack)
        titans.TitansMemory._run = traced
        try:
            run(cfg)
        except TrainingDiverged as err:
            print(f"stopped: {err}")
        finally:
            titans.TitansMemory._run = real
    from nested_learning.models import size_config

    n_layers = (cfg["model"].get("overrides") or {}).get("n_layers") or size_config("titans", cfg["size"]["name"])["n_layers"]
    for i, line in enumerate(calls):
        print(f"call {i:4d} (step ~{i // n_layers + 1}, layer {i % n_layers}): {line}")


if __name__ == "__main__":
    main()

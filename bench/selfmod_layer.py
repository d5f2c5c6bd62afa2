"""The self-modifying mixer's forward + backward at smoke width, by segment length: the
projection recurrence as one op (`SelfModifyingTitans.fused_projection = True`, the default:
ops.selfmod_projection) against the per-chunk Python loop it replaced (`False`), in interleaved
rounds; also the largest relative difference of the two outputs.

    OMP_NUM_THREADS=2 python bench/selfmod_layer.py --seq 256,2048 --json bench/out/selfmod_layer.json
    OMP_NUM_THREADS=2 python bench/selfmod_layer.py --step --seq 256,2048   # HOPE's whole training step
    OMP_NUM_THREADS=2 python bench/selfmod_layer.py --step --seq 256,4096 --models transformer,titans

--step times the HOPE model's two-pass training step (bench/cases.py's StepCase: batch 4 at
256 tokens, batch 1 beyond) instead of the mixer alone; --models adds other models' steps to
the same interleaved rounds, and each row then gives HOPE's tokens/s per parameter over theirs
(issue 32's goal: the Transformer's at least 0.95x at smoke size, 2x at 4k-token segments).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from nested_learning.eval.results import write
from nested_learning.layers.self_modifying import SelfModifyingTitans
from nested_learning.models import build_model

if __package__:  # imported as bench.selfmod_layer (the tests)
    from .cases import StepCase
else:  # python bench/selfmod_layer.py: bench/ is sys.path[0]
    from cases import StepCase

SCHEDULES = {"loop": False, "op": True}


@contextlib.contextmanager
def fused(on: bool):
    default = SelfModifyingTitans.fused_projection
    SelfModifyingTitans.fused_projection = on
    try:
        yield
    finally:
        SelfModifyingTitans.fused_projection = default


def _interleaved(run, rounds: int, others: dict | None = None) -> dict[str, list[float]]:
    """Median-ready times (ms) of run() under each schedule, and of each of `others` (name ->
    run()), alternating, after one warm-up round."""
    others = others or {}
    times = {k: [] for k in [*SCHEDULES, *others]}
    for r in range(rounds + 1):
        for name in times:
            with fused(SCHEDULES.get(name, True)):
                t = time.perf_counter()
                others[name]() if name in others else run(name)
                if r:
                    times[name].append((time.perf_counter() - t) * 1e3)
    return times


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="256,2048", help="comma-separated segment lengths")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--step", action="store_true", help="time HOPE's whole training step instead of the mixer")
    ap.add_argument("--models", default="", help="with --step: other models timed in the same rounds")
    a = ap.parse_args(argv)
    rows = []
    for T in (int(s) for s in a.seq.split(",")):
        if a.step:
            B = a.batch if T <= 256 else 1
            model, step = StepCase("hope", a.size, B, T).make(torch.device("cpu"))
            params = {"hope": _params(model)}
            others = {}
            for name in filter(None, a.models.split(",")):
                m, others[name] = StepCase(name, a.size, B, T).make(torch.device("cpu"))
                params[name] = _params(m)
            times = _interleaved(lambda name: step(), a.rounds, others)
            row = {"step": True, "seq": T, "batch": B, "params": params,
                   "others_ms": {n: statistics.median(times[n]) for n in others}}
        else:
            torch.manual_seed(0)
            mixer = build_model("hope", a.size).blocks[0].mixer
            x = torch.randn(a.batch, T, mixer.h * mixer.d, requires_grad=True)
            state = mixer.init_state(a.batch, "cpu", torch.float32)
            outs = {}

            def run(name):
                y, _ = mixer(x, state)
                y.square().mean().backward()
                outs[name] = y.detach()

            times = _interleaved(run, a.rounds)
            diff = float((outs["op"] - outs["loop"]).norm() / outs["loop"].norm())
            row = {"step": False, "seq": T, "batch": a.batch, "rel_diff": diff}
        loop, op = statistics.median(times["loop"]), statistics.median(times["op"])
        row.update(size=a.size, loop_ms=loop, op_ms=op, speedup=loop / op, threads=torch.get_num_threads())
        rows.append(row)
        what = f"HOPE {a.size} training step" if a.step else "the mixer fwd+bwd"
        extra = "" if a.step else f"; outputs differ by {row['rel_diff']:.1e} (relative)"
        for n, ms in row.get("others_ms", {}).items():  # tokens/s per parameter: HOPE's over theirs
            per_param = {s: (ms / row[f"{s}_ms"]) * (row["params"][n] / row["params"]["hope"]) for s in SCHEDULES}
            row.setdefault("per_param_vs", {})[n] = per_param
            extra += (f"; {n} {ms:.1f} ms, HOPE's tokens/s per parameter over {n}'s: loop {per_param['loop']:.2f}x, "
                      f"op {per_param['op']:.2f}x")
        print(f"{what} B={row['batch']} T={T}: per-chunk loop {loop:.1f} ms, one op {op:.1f} ms "
              f"({loop / op:.2f}x){extra}", flush=True)
    if a.json:
        write({"rows": rows}, a.json)
    return rows


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()

"""The self-modifying mixer's forward + backward at smoke width, by segment length: one
autograd graph per projection chunk (`SelfModifyingTitans.batched_reads = False`, the default)
against the chunk recurrence without autograd and one batched read for every chunk
(`batched_reads = True`, opt-in), in interleaved rounds; also checks the two give the same
outputs.

    OMP_NUM_THREADS=2 python bench/selfmod_layer.py --seq 256,2048 --json bench/out/selfmod_layer.json
    OMP_NUM_THREADS=2 python bench/selfmod_layer.py --step --seq 256,2048   # HOPE's whole training step

--step times the HOPE model's two-pass training step (bench/cases.py's StepCase: batch 4 at
256 tokens, batch 1 beyond) instead of the mixer alone.
"""

from __future__ import annotations

import argparse
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

DEFAULT = SelfModifyingTitans.batched_reads


def _time(mixer, x, state, batched: bool) -> tuple[float, torch.Tensor]:
    SelfModifyingTitans.batched_reads = batched
    try:
        t = time.perf_counter()
        y, _ = mixer(x, state)
        y.square().mean().backward()
        return (time.perf_counter() - t) * 1e3, y.detach()
    finally:
        SelfModifyingTitans.batched_reads = DEFAULT


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="256,2048", help="comma-separated segment lengths")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--step", action="store_true", help="time HOPE's whole training step instead of the mixer")
    a = ap.parse_args(argv)
    if a.step:
        return _steps(a)
    torch.manual_seed(0)
    mixer = build_model("hope", a.size).blocks[0].mixer
    rows = []
    for T in (int(s) for s in a.seq.split(",")):
        x = torch.randn(a.batch, T, mixer.h * mixer.d, requires_grad=True)
        state = mixer.init_state(a.batch, "cpu", torch.float32)
        times = {False: [], True: []}
        outs = {}
        for r in range(a.rounds + 1):
            for batched in (False, True):
                ms, outs[batched] = _time(mixer, x, state, batched)
                if r:  # the first round warms up
                    times[batched].append(ms)
        loop, batched = statistics.median(times[False]), statistics.median(times[True])
        row = {"seq": T, "batch": a.batch, "size": a.size, "loop_ms": loop, "batched_ms": batched,
               "speedup": loop / batched, "same_outputs": bool(torch.equal(outs[False], outs[True])),
               "threads": torch.get_num_threads()}
        rows.append(row)
        print(f"T={T}: one graph per chunk {loop:.1f} ms, batched reads {batched:.1f} ms ({loop / batched:.2f}x); "
              f"outputs {'identical' if row['same_outputs'] else 'DIFFER'}", flush=True)
    if a.json:
        write({"rows": rows}, a.json)
    return rows


def _steps(a) -> list[dict]:
    rows = []
    for T in (int(s) for s in a.seq.split(",")):
        B = a.batch if T <= 256 else 1
        _, step = StepCase("hope", a.size, B, T).make(torch.device("cpu"))
        times = {False: [], True: []}
        for r in range(a.rounds + 1):
            for batched in (False, True):
                SelfModifyingTitans.batched_reads = batched
                try:
                    t = time.perf_counter()
                    step()
                    if r:
                        times[batched].append((time.perf_counter() - t) * 1e3)
                finally:
                    SelfModifyingTitans.batched_reads = DEFAULT
        loop, batched = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"step": True, "seq": T, "batch": B, "size": a.size, "loop_ms": loop, "batched_ms": batched,
                     "speedup": loop / batched, "threads": torch.get_num_threads()})
        print(f"HOPE {a.size} training step B={B} T={T}: one graph per chunk {loop:.1f} ms, batched reads "
              f"{batched:.1f} ms ({loop / batched:.2f}x)", flush=True)
    if a.json:
        write({"rows": rows}, a.json)
    return rows


if __name__ == "__main__":
    main()

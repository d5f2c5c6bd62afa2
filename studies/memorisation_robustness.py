"""How robust is the memorisation test's effect to rounding-level changes in training? Trains
the in-test needle HOPE models (tests/models/test_training_and_memorize.py: seeds 0-2, 150
AdamW steps) with the self-modifying mixer's two schedules of its projection recurrence (the
fused op, the default; the per-chunk loop it replaced), each also with a 1e-7 perturbation of
the initial weights, and reports the fraction of 64 facts whose P(answer) one memorize step
raises, and the mean log-gain (bench/RESULTS.md 16 and 17).

    python -m studies.memorisation_robustness [--seeds 0,1,2] [--noise 1e-7]   # from the repository root: it imports tests/
"""

from __future__ import annotations

import argparse

import torch

from nested_learning.layers.self_modifying import SelfModifyingTitans


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--noise", type=float, default=1e-7)
    a = ap.parse_args(argv)
    from tests.models.test_training_and_memorize import memorisation_gain, needle_batch, train_needle_model

    ctx, query, val = needle_batch(64, torch.Generator().manual_seed(123))
    default, rows = SelfModifyingTitans.fused_projection, []
    try:
        for fused in (False, True):
            SelfModifyingTitans.fused_projection = fused
            for seed in (int(s) for s in a.seeds.split(",")):
                for noise in (0.0, a.noise):
                    m = train_needle_model(seed, init_noise=noise, noise_seed=1)
                    gain, _, _ = memorisation_gain(m, ctx, query, val)
                    row = {"fused_projection": fused, "seed": seed, "init_noise": noise,
                           "fraction_raised": float((gain > 0).float().mean()), "mean_gain": float(gain.mean())}
                    rows.append(row)
                    print(f"fused projection {fused!s:5} seed {seed} init noise {noise:g}: {row['fraction_raised']:.1%} "
                          f"of the facts raised, mean log-gain {row['mean_gain']:.4f}", flush=True)
    finally:
        SelfModifyingTitans.fused_projection = default
    return rows


if __name__ == "__main__":
    main()

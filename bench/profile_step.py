"""Profile one two-pass training step of a model on this machine: the median step time with
the in-context updates on (teach-signal capture + CMS update pass) and off (timed in
interleaved pairs, with the spread of the per-pair ratios), the time of the update pass
alone, and torch.profiler's table of the ops that dominate.

    python bench/profile_step.py [--model hope --size smoke --batch 4 --seq 256 --rows 20]
    python bench/profile_step.py --profile update   # the table of the update pass alone
    python bench/profile_step.py --override cms_optimizer=deep_momentum   # a model config field changed
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.profiler import profile

from nested_learning.cli._common import field_overrides

if __package__:  # imported as bench.profile_step (python -m bench.profile_step)
    from .cases import StepCase
    from .run import median_ms
else:  # python bench/profile_step.py: bench/ is sys.path[0]
    from cases import StepCase
    from run import median_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hope")
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=9, help="interleaved (on, off) pairs timed")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                    help="a model config field changed (repeatable), e.g. cms_optimizer=deep_momentum")
    ap.add_argument("--profile", choices=("step", "update"), default="step",
                    help="what the op table profiles: one whole step, or 5 update passes alone")
    ap.add_argument("--diff", type=int, default=0, metavar="N",
                    help="also print the N (op, shapes) that cost most more with the updates on")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    over = field_overrides(args.override)
    on_case = StepCase(args.model, args.size, args.batch, args.seq, overrides=over)
    m, step_on = on_case.make(dev)
    _, step_off = StepCase(args.model, args.size, args.batch, args.seq, updates=False, overrides=over).make(dev)
    # interleaved (on, off, on, off, ...) so that drift of a noisy machine hits both alike
    step_on(), step_off()
    on_t, off_t = [], []
    for _ in range(args.repeat):
        on_t.append(median_ms(step_on, dev, warmup=0, repeat=1))
        off_t.append(median_ms(step_off, dev, warmup=0, repeat=1))
    on, off = statistics.median(on_t), statistics.median(off_t)
    ratios = sorted(a / b for a, b in zip(on_t, off_t))
    tok = torch.randint(0, m.config.vocab_size, (args.batch, args.seq), device=dev)
    loss, cap, st = m.train_forward(tok)
    loss.backward()
    upd = median_ms(lambda: m.apply_updates(st, cap), dev, warmup=1, repeat=args.repeat)
    said = "".join(f" {k}={v}" for k, v in over.items())
    print(f"{args.model}{said} {args.size} B={args.batch} T={args.seq} on {dev}: {m.num_parameters():,} parameters")
    print(f"step with in-context updates {on:.1f} ms, without {off:.1f} ms (ratio {on / off:.2f}; per-pair "
          f"ratios {ratios[0]:.2f}-{ratios[-1]:.2f}, median {statistics.median(ratios):.2f}); "
          f"update pass alone {upd:.1f} ms; {args.batch * args.seq / on * 1e3:.0f} tokens/s")
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    with profile() as p:
        if args.profile == "step":
            step_on()
        else:
            for _ in range(5):
                m.apply_updates(st, cap)
    print(f"profiled: {'one step' if args.profile == 'step' else '5 update passes'}")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.diff:
        print_difference(step_on, step_off, args.diff)
    return 0


def print_difference(step_on, step_off, rows: int) -> None:
    """The (op, input shapes) whose self time differs most between one profiled step with the
    in-context updates and one without: where the updates' extra time goes."""
    totals = []
    for step in (step_on, step_off):
        with profile(record_shapes=True) as p:
            step()
        totals.append({(e.key, str(e.input_shapes)[:60]): (e.self_cpu_time_total / 1e3, e.count)
                       for e in p.key_averages(group_by_input_shape=True)})
    on, off = totals
    keys = sorted(set(on) | set(off), key=lambda k: on.get(k, (0, 0))[0] - off.get(k, (0, 0))[0], reverse=True)
    print(f"{'on - off':>10} {'on ms (calls)':>16} {'off ms (calls)':>16}  op [input shapes]")
    for k in keys[:rows]:
        (a, na), (b, nb) = on.get(k, (0.0, 0)), off.get(k, (0.0, 0))
        print(f"{a - b:10.1f} {a:9.1f} ({na:4d}) {b:9.1f} ({nb:4d})  {k[0]} {k[1]}")


if __name__ == "__main__":
    sys.exit(main())

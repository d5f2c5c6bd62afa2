"""Profile one two-pass training step of a model on this machine: the median step time with
the in-context updates on (teach-signal capture + CMS update pass) and off, the time of the
update pass alone, and torch.profiler's table of the ops that dominate.

    python bench/profile_step.py [--model hope --size smoke --batch 4 --seq 256 --rows 20]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import profile

from nested_learning.models import build_model


def median_ms(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hope")
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    m = build_model(args.model, args.size).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    tok = torch.randint(0, m.config.vocab_size, (args.batch, args.seq), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(updates: bool):
        if updates:
            loss, cap, st = m.train_forward(tok)
        else:
            loss, st = m(tok, targets=m.next_token_targets(tok))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if updates:
            m.apply_updates(st, cap)
        sync()

    on = median_ms(lambda: step(True), args.repeat)
    off = median_ms(lambda: step(False), args.repeat)
    loss, cap, st = m.train_forward(tok)
    loss.backward()
    upd = median_ms(lambda: (m.apply_updates(st, cap), sync()), args.repeat)
    print(f"{args.model} {args.size} B={args.batch} T={args.seq} on {dev}: {m.num_parameters():,} parameters")
    print(f"step with in-context updates {on:.1f} ms, without {off:.1f} ms (ratio {on / off:.2f}); "
          f"update pass alone {upd:.1f} ms; {args.batch * args.seq / on * 1e3:.0f} tokens/s")
    with profile() as p:
        step(True)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the time of token-by-token decoding goes: cProfile of model.generate.

    OMP_NUM_THREADS=1 python bench/profile_decode.py --model hope --tokens 64 --top 14
    OMP_NUM_THREADS=1 python bench/profile_decode.py --model hope --torch   # ATen calls of the decode step
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from nested_learning.models import build_model


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hope", choices=["hope", "titans", "transformer"])
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--torch", action="store_true",
                    help="torch.profiler over the decode step (time and count of each ATen call) instead of cProfile")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    m = build_model(a.model, a.size).eval()
    prompt = torch.randint(0, m.config.vocab_size, (1, 1))
    m.generate(prompt, 4)  # warm-up
    t0 = time.perf_counter()
    m.generate(prompt, a.tokens)
    ms = (time.perf_counter() - t0) / a.tokens * 1e3
    print(f"{a.model} {a.size}: {ms:.2f} ms per token ({a.tokens} tokens, {torch.get_num_threads()} threads)")
    if a.torch:
        from nested_learning.checks import range_checks_off
        from nested_learning.models.decode import Decoder

        toks = torch.randint(0, m.config.vocab_size, (a.tokens,))
        with torch.no_grad(), range_checks_off():
            dec = Decoder(m, m.hidden(prompt)[1], room=a.tokens)
            with torch.profiler.profile() as tp:
                for t in toks:
                    dec.step(t[None])
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
        return ms
    prof = cProfile.Profile()
    prof.runcall(m.generate, prompt, a.tokens)
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    return ms


if __name__ == "__main__":
    main()

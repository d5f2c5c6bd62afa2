"""Does torch.compile pay for the decode step? Times each block's one-token `decode` eagerly and
compiled (inductor), on the state after a prompt, and prints the compile time.

    OMP_NUM_THREADS=1 python bench/probe_compile_decode.py --model hope --tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nested_learning.checks import range_checks_off
from nested_learning.models import build_model
from nested_learning.models.decode import Decoder


def _per_token_ms(dec: Decoder, toks: torch.Tensor) -> float:
    t = time.perf_counter()
    for i in range(toks.shape[0]):
        dec.step(toks[i:i + 1])
    return (time.perf_counter() - t) / toks.shape[0] * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hope", choices=["hope", "titans", "transformer"])
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    m = build_model(a.model, a.size).eval()
    toks = torch.randint(0, m.config.vocab_size, (a.tokens,))
    out = {}
    with torch.no_grad(), range_checks_off():
        _, state = m.hidden(toks[None, :1])
        eager = Decoder(m, state, room=a.tokens * (2 * a.rounds + 2))
        compiled = Decoder(m, state, room=a.tokens * (2 * a.rounds + 2))
        step = torch.compile(compiled.step)
        t = time.perf_counter()
        step(toks[:1])
        out["first_call_s"] = time.perf_counter() - t
        compiled.step = step
        _per_token_ms(compiled, toks)  # the recompiles a changing int or shape asks for
        times = {"eager": [], "compiled": []}
        for _ in range(a.rounds):
            times["eager"].append(_per_token_ms(eager, toks))
            times["compiled"].append(_per_token_ms(compiled, toks))
    out.update({k: statistics.median(v) for k, v in times.items()})
    print(f"{a.model} {a.size}: eager {out['eager']:.2f} ms per token, compiled {out['compiled']:.2f} ms "
          f"(first call {out['first_call_s']:.1f} s)")
    return out


if __name__ == "__main__":
    main()

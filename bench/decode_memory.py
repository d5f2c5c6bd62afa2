"""Peak resident memory of token-by-token generation by the number of generated tokens: does it
stay flat?

    python bench/decode_memory.py --models hope,titans --tokens 512,4096
    python bench/decode_memory.py --models titans --tokens 512,4096 --window 256 --json bench/out/decode_memory.json

Each row is one process that builds the model (smoke size, seeded), generates N tokens greedily
from a one-token prompt and reports its peak RSS (`resource.getrusage`, the whole process:
interpreter, torch, model) and the size of the fast state it ends with (memories, CMS levels,
KV caches). `--window W` decodes with every attention layer keeping at most W
keys (`model.attention_window(W)`); without it, full attention keeps every key, so a model with
attention layers (Titans, the Transformer) grows its KV cache with every token."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from nested_learning.eval.results import write

CHILD = """
import resource, sys, time, torch
torch.set_num_threads(1)
from nested_learning.models import build_model
name, n, window = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
m = build_model(name, "smoke").eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with m.attention_window(None if window == "none" else int(window)):
    out, state = m.generate(torch.tensor([[1]]), n)
dt = time.perf_counter() - t0
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, dt, out.shape[1],
      sum(t.numel() * t.element_size() for t in state.tensors()))
"""


def measure(model: str, tokens: int, window: int | None) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, model, str(tokens), str(window or "none")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode:
        raise SystemExit(f"{model} {tokens}: {p.stderr[-2000:]}")
    before, peak, secs, n, kv = p.stdout.split()
    return {"model": model, "tokens": int(n), "window": window, "rss_after_build_mb": int(before) / 1024,
            "peak_rss_mb": int(peak) / 1024, "seconds": float(secs), "ms_per_token": 1e3 * float(secs) / int(n),
            "fast_state_mb": int(kv) / 2**20}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="hope,titans")
    ap.add_argument("--tokens", default="512,4096", help="generated tokens per row")
    ap.add_argument("--window", type=int, default=None, help="attention keys kept while decoding (default: all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    t0 = time.perf_counter()
    print(f"{'model':12} {'tokens':>7} {'window':>7} {'peak RSS MB':>12} {'state MB':>12} {'ms/token':>9}")
    for model in a.models.split(","):
        for n in [int(x) for x in a.tokens.split(",")]:
            r = measure(model, n, a.window)
            rows.append(r)
            print(f"{model:12} {r['tokens']:>7} {str(r['window']):>7} {r['peak_rss_mb']:>12.1f} {r['fast_state_mb']:>12.2f} "
                  f"{r['ms_per_token']:>9.2f}", flush=True)
    print(f"# {time.perf_counter() - t0:.0f} s")
    if a.json:
        write(rows, a.json)  # atomic, strict JSON
    return rows


if __name__ == "__main__":
    main()

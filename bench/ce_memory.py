"""Peak memory and time of the tied-head cross-entropy with its teach signal, fused vs
logits-materialising, each measured in a fresh process: the peak resident memory of one
forward + backward above the resident memory before it (Linux: the peak is reset through
/proc/self/clear_refs, then read as VmHWM).

    python bench/ce_memory.py [--tokens 8192 --dim 512 --vocab 32768 --repeat 3 --json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys, time, torch
from nested_learning import ops
N, D, V, backend, repeat = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
g = torch.Generator().manual_seed(0)
h = torch.randn(N, D, generator=g).requires_grad_()
W = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
y = torch.randint(0, V, (N,), generator=g)

def step():
    h.grad = W.grad = None
    if backend == "naive":  # logits materialised, autograd; the teach signal from the softmax
        logits = h @ W.T
        loss = torch.nn.functional.cross_entropy(logits, y)
        with torch.no_grad():
            p = logits.softmax(-1)
            p[torch.arange(N), y] -= 1
            delta = p @ W
    else:
        loss, delta = ops.linear_cross_entropy(h, W, y, backend=backend)
    loss.backward()
    return loss, delta

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))  # kB

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size (VmHWM) to the current one
base = status("VmRSS")
step()
peak = (status("VmHWM") - base) / 1024
times = []
for _ in range(repeat):
    t = time.perf_counter()
    step()
    times.append((time.perf_counter() - t) * 1e3)
times.sort()
print(json.dumps({"peak_mib": peak, "median_ms": times[len(times) // 2] if times else None}))
"""


def measure(N: int, D: int, V: int, backend: str, repeat: int = 0) -> dict:
    """{"peak_mib", "median_ms"} of one fresh process; backend "naive" or an op backend."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(N), str(D), str(V), backend, str(repeat)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {backend} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", nargs="*", default=["naive", "cpu"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    print(f"tokens={args.tokens} D={args.dim} V={args.vocab}, fwd+bwd, median of {args.repeat}")
    print(f"{'backend':10} {'peak MiB':>10} {'median ms':>10}")
    for b in args.backends:
        m = measure(args.tokens, args.dim, args.vocab, b, args.repeat)
        rows.append({"backend": b, **m})
        print(f"{b:10} {m['peak_mib']:10.1f} {m['median_ms']:10.1f}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The package's Titans memory layer beside titans-pytorch's NeuralMemory at a matching
configuration: heads, head dim, chunk size, linear memory, momentum and forgetting on.
Forward + backward of one layer on x [B, T, heads * head_dim]; median wall time.

Two NeuralMemory settings are timed. With `batch_size=chunk` its weights are updated after
every chunk, so each chunk's gradient is taken at that chunk's start state: the recurrence of
MATH section 3 that the package computes. With `batch_size=None` (its default) every chunk's
gradient within the call is taken at the call's initial weights, all in parallel: a cheaper,
different computation (exact only for the first chunk).

    python bench/peer_titans.py [--batch 2 --seq 2048 --heads 4 --head-dim 64 --chunk 16 --json PATH]

Needs titans-pytorch (`pip install -e ".[peers]"`); says so and exits 0 when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

from nested_learning import ops
from nested_learning.layers.titans import TitansMemory

if __package__:  # imported as bench.peer_titans (python -m bench.peer_titans)
    from .run import median_ms
else:  # python bench/peer_titans.py: bench/ is sys.path[0]
    from run import median_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if importlib.util.find_spec("titans_pytorch") is None:
        print("titans-pytorch is not installed: nothing to compare (pip install -e '.[peers]')")
        return 0
    from titans_pytorch import MemoryMLP, NeuralMemory

    torch.manual_seed(0)
    D = args.heads * args.head_dim
    x = torch.randn(args.batch, args.seq, D, requires_grad=True)
    ours = TitansMemory(D, args.heads, memory="linear", chunk_size=args.chunk)
    def neural_memory(batch_size):
        return NeuralMemory(D, chunk_size=args.chunk, heads=args.heads, dim_head=args.head_dim,
                            model=MemoryMLP(args.head_dim, depth=1), momentum=True, batch_size=batch_size)

    peer_exact, peer_parallel = neural_memory(args.chunk), neural_memory(None)

    def run_ours():
        y, _ = ours(x, ours.init_state(args.batch, x.device, x.dtype))
        y.sum().backward()

    def run_peer(peer):
        y, _ = peer(x)
        y.sum().backward()

    rows = {}
    for name, fn in (("nested_learning.TitansMemory", run_ours),
                     (f"NeuralMemory(batch_size={args.chunk})", lambda: run_peer(peer_exact)),
                     ("NeuralMemory(batch_size=None)", lambda: run_peer(peer_parallel))):
        rows[name] = median_ms(fn, torch.device("cpu"), warmup=1, repeat=args.repeat)
        extra = f" (titan_update backend: {ops.last_backend('titan_update')})" if "nested" in name else ""
        print(f"{name:32} {rows[name]:10.1f} ms fwd+bwd{extra}", flush=True)
    ours = rows["nested_learning.TitansMemory"]
    ratio = {n: ms / ours for n, ms in rows.items() if n.startswith("NeuralMemory")}
    print(f"B={args.batch} T={args.seq} heads={args.heads} head_dim={args.head_dim} chunk={args.chunk}, "
          f"{torch.get_num_threads()} threads; titans-pytorch time / ours: "
          + ", ".join(f"{n} {r:.2f}x" for n, r in ratio.items()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_ms": rows, "peer_time_over_ours": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

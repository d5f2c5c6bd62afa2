"""CPU probe of the C++ DGD kernels (torch.ops.nested_learning_C) at the issue's shape
(B=2, T=2048, H=4, d=64, float32, a = k, read after): medians of the forward, the forward
that also keeps the backward's residuals, the states-only checkpoint pass and the backward,
each timed alone, with the page faults per call (fresh pages: NESTED_LEARNING_CPU_POOL_MB=0 turns
the buffer pool off). --only NAME --loops N runs one of them N times untimed (for `perf record`):

    python bench/probe_dgd_cpu.py [--repeat 9]
    NESTED_LEARNING_CPU_POOL_MB=0 python bench/probe_dgd_cpu.py
    OMP_NUM_THREADS=1 perf record -o /tmp/dgd.data python bench/probe_dgd_cpu.py --only bwd --loops 300
"""
import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from nested_learning import build_info
from nested_learning.ops.dgd import CPU_CHUNK

ap = argparse.ArgumentParser()
ap.add_argument("--repeat", type=int, default=9)
ap.add_argument("--only", choices=["fwd", "fwd_residuals", "checkpoints", "bwd"])
ap.add_argument("--loops", type=int, default=300)
args = ap.parse_args()

torch.manual_seed(0)
B, T, H, d, C = 2, 2048, 4, 64, CPU_CHUNK
q, w = torch.randn(B, T, H, d), torch.randn(B, T, H, d)
k = F.normalize(torch.randn(B, T, H, d), dim=-1)
al, et = 0.9 + 0.1 * torch.rand(B, T, H), torch.rand(B, T, H)
N = torch.ops.nested_learning_C
o, s, ckpt, rbuf = N.dgd_fwd(q, k, w, al, et, k, None, True, C, True)
do, ds = torch.randn_like(o), torch.randn_like(s)
runs = {
    "fwd": lambda: N.dgd_fwd(q, k, w, al, et, k, None, True, C, False),
    "fwd_residuals": lambda: N.dgd_fwd(q, k, w, al, et, k, None, True, C, True),
    "checkpoints": lambda: N.dgd_checkpoints(q, k, w, al, et, k, None, C),
    "bwd": lambda: N.dgd_bwd(do, ds, q, k, w, al, et, k, ckpt, rbuf, True, C, True),
}
if args.only:
    for _ in range(args.loops):
        runs[args.only]()
else:
    pool = os.environ.get("NESTED_LEARNING_CPU_POOL_MB", "1024 (default)")
    print(f"B={B} T={T} H={H} d={d} chunk={C} | {torch.get_num_threads()} threads | median of {args.repeat} | "
          f"buffer pool {pool} MB | cpu kernels {build_info()['cpu_kernels']}")
    for name, fn in runs.items():
        fn()
        ts = []
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.repeat
        print(f"{name:14s} {statistics.median(ts) * 1e3:8.2f} ms {faults:8.0f} page faults per call")

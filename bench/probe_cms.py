"""GPU probe of the CMS apply kernel (nested_learning/kernels/cms.py): its achieved bandwidth as a fraction of
the measured device copy bandwidth (issue bar: 70%), one chunk per call (the memory-bound
case: W and m are read and written once, the chunk's tokens read once).

    python bench/probe_cms.py [--json PATH]          (needs CUDA and Triton)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        return 0
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import triton.testing

    from nested_learning.kernels.cms import cms_apply

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for B, Dout, Din, C in ((8, 4096, 512, 16), (8, 2048, 2048, 16)):
            W = torch.randn(B, Dout, Din, device="cuda", dtype=dtype)
            x = torch.randn(B, C, Din, device="cuda", dtype=dtype)
            d = torch.randn(B, C, Dout, device="cuda", dtype=dtype)
            copy_ms = triton.testing.do_bench(lambda: W.clone())  # noqa: B023
            copy_bw = 2 * W.nbytes / (copy_ms * 1e-3)
            for opt in ("gd", "momentum", "dgd"):
                m = torch.zeros_like(W) if opt == "momentum" else None
                ms = triton.testing.do_bench(lambda: cms_apply(W, m, x, d, C, 1e-3, opt, 0.9, 1.0))  # noqa: B023
                nbytes = 2 * W.nbytes * (2 if m is not None else 1) + x.nbytes + d.nbytes
                bw = nbytes / (ms * 1e-3)
                rows.append(dict(dtype=str(dtype).split(".")[-1], B=B, Dout=Dout, Din=Din, C=C, optimizer=opt, ms=ms,
                                 GBps=bw / 1e9, copy_GBps=copy_bw / 1e9, fraction=bw / copy_bw))
                r = rows[-1]
                print(f"{r['dtype']:9} B={B} {Dout}x{Din} C={C} {opt:9} {ms:8.3f} ms {r['GBps']:8.1f} GB/s "
                      f"(copy {r['copy_GBps']:.1f} GB/s): {100 * r['fraction']:.0f}%", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

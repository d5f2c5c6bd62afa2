"""Streaming one token per call through ops.cms_update (generation, test-time memorisation):
a call that completes no chunk only appends to the ring buffer, with no weight-sized copy.
Times 64 one-token calls at period 64 on a pilot-size layer (W 3072 x 768) both ways: calling
the op on every call (what happened before that shortcut) and through ops.cms_update.

    python bench/stream_cms.py
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from nested_learning import ops
from nested_learning.ops import cms as cms_op

B, DIN, DOUT, PERIOD = 1, 768, 3072, 64


def stream(direct: bool, W, x, d):
    st = ops.CMSState.create(W, PERIOD, batch_size=B)
    t0 = time.perf_counter()
    for i in range(PERIOD):
        xi, di = x[:, i:i + 1], d[:, i:i + 1]
        if direct:
            Wn, _, bx, bd, _ = cms_op._op(st.weight, xi, di, st.buffer_x, st.buffer_delta, None, st.filled, 0.01,
                                          "gd", 0.9, 1.0, "cpu")
            st = replace(st, weight=Wn, buffer_x=bx, buffer_delta=bd, filled=(st.filled + 1) % PERIOD)
        else:
            st, _ = ops.cms_update(st, xi, di, lr=0.01)
    return (time.perf_counter() - t0) * 1e3, st.weight


def main() -> None:
    torch.manual_seed(0)
    W = torch.randn(DOUT, DIN) * 0.02
    x, d = torch.randn(B, PERIOD, DIN), torch.randn(B, PERIOD, DOUT)
    times = {True: [], False: []}
    for _ in range(5):
        for direct in (True, False):
            ms, w = stream(direct, W, x, d)
            times[direct].append(ms)
            times.setdefault(("w", direct), w)
    med = {k: sorted(v)[2] for k, v in times.items() if not isinstance(k, tuple)}
    same = torch.allclose(times[("w", True)], times[("w", False)])
    print(f"{PERIOD} one-token calls, period {PERIOD}, W {DOUT}x{DIN}, median of 5: op on every call "
          f"{med[True]:.1f} ms, ops.cms_update {med[False]:.1f} ms ({med[True] / med[False]:.1f}x); same weights: {same}")


if __name__ == "__main__":
    main()

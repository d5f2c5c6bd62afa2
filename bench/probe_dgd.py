"""GPU probe of the Triton DGD kernels: per-kernel times at B=8, T=4096, H=16, d=64 (bf16),
the whole forward / forward+backward, fla's chunk_gated_delta_rule forward when installed, a
float32 parity check against the float64 reference, and (when the extension was built with its
CUDA kernels) the fused per-token kernel against the chunk kernels on 1 and 8 tokens, raw and
through ops.dgd_update. Needs no compiled extension for the rest:

    TRITON_INTERPRET=0 python bench/probe_dgd.py
"""

import nested_learning.kernels.dgd as K
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from nested_learning.reference.dgd import dgd_update_reference

B, T, H, d = 8, 4096, 16, 64
dev, bf = "cuda", torch.bfloat16
q = torch.randn(B, T, H, d, device=dev, dtype=bf)
k = F.normalize(torch.randn(B, T, H, d, device=dev), dim=-1).to(bf)
w = torch.randn(B, T, H, d, device=dev, dtype=bf)
al = 0.9 + 0.1 * torch.rand(B, T, H, device=dev)
et = torch.rand(B, T, H, device=dev)
h0 = torch.randn(B, H, d, d, device=dev)
_, _, _, DK, DV, BT, BK, BV, BVS, NT = K._tiles(q, w, 64)
f32 = dict(device=dev, dtype=torch.float32)
G = torch.empty(B * H, T, **f32)
Ai = torch.empty(B * H, T, BT, **f32)
Wm = torch.empty(B * H, T, DK, **f32)
U0 = torch.empty(B * H, T, DV, **f32)
hs = torch.empty(B * H, NT, DV, DK, **f32)
U = torch.empty(B * H, T, DV, **f32)
ht = torch.empty(B, H, DV, DK, **f32)
o = torch.empty_like(w)
P = "tf32"
t = {
    "diag_inv": lambda: K.dgd_diag_inv_fwd_kernel[(triton.cdiv(T, K.SUB), B * H)](k, k, al, et, Ai, T, H, DK, BT, BK, K.SUB, P),
    "prep": lambda: K.dgd_prep_fwd_kernel[(NT, B * H)](k, k, w, al, et, G, Ai, Wm, U0, T, H, DK, DV, BT, BK, BV, K.SUB, P),
    "state": lambda: K.dgd_state_fwd_kernel[(triton.cdiv(DV, BVS), B * H)](k, G, Wm, U0, h0, hs, U, ht, T, H, NT, DK, DV, BT, BK, BVS, True, P),
    "output": lambda: K.dgd_output_fwd_kernel[(NT, B * H)](q, k, al, G, hs, U, o, T, H, NT, DK, DV, BT, BK, BV, True, P),
}
print("forward kernels (ms):", {n: round(do_bench(f), 3) for n, f in t.items()})
do = torch.randn_like(w)
fwd = lambda: K.dgd_fwd(q, k, w, al, et, k, h0, 64, True)  # noqa: E731
bwd = lambda: K.dgd_bwd(do, None, q, k, w, al, et, k, h0, 64, True)  # noqa: E731
print(f"triton fwd {do_bench(fwd):.3f} ms, bwd (incl. recompute) {do_bench(bwd):.3f} ms")
try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla

    beta = et / al
    v = (w / beta[..., None]).to(bf)
    h0t = h0.transpose(-1, -2).contiguous()
    f = lambda: fla(q, k, v, g=al.log(), beta=beta, scale=1.0, initial_state=h0t, output_final_state=True)  # noqa: E731
    o1, s1 = fwd()
    o2, s2 = f()
    print(f"fla fwd {do_bench(f):.3f} ms; rel diff o {((o1.float() - o2.float()).norm() / o2.float().norm()).item():.1e} state {((s1 - s2.transpose(-1, -2)).norm() / s2.norm()).item():.1e}")
except ImportError as e:
    print("fla not installed:", e)
# float32 parity with the float64 reference (a != k, read before, T not a multiple of 64)
g = torch.Generator(device="cpu").manual_seed(0)
x = [torch.randn(2, 333, 3, 48, generator=g, dtype=torch.float64) for _ in range(3)]
x[1] = F.normalize(x[1], dim=-1)
a = F.normalize(torch.randn(2, 333, 3, 48, generator=g, dtype=torch.float64), dim=-1)
ga = 0.5 + 0.5 * torch.rand(2, 333, 3, generator=g, dtype=torch.float64)
ge = torch.rand(2, 333, 3, generator=g, dtype=torch.float64)
ref_o, ref_s = dgd_update_reference(*x, ga, ge, a, None, "before", 64)
got_o, got_s = K.dgd_fwd(*[y.float().cuda().contiguous() for y in (*x, ga, ge, a)], None, 64, False)
print(f"fp32 parity: o {((got_o.double().cpu() - ref_o).norm() / ref_o.norm()).item():.1e} state {((got_s.double().cpu() - ref_s).norm() / ref_s.norm()).item():.1e}")

# streaming: the fused per-token CUDA kernel vs the chunk kernels (raw, and through the op)
if hasattr(torch.ops, "nested_learning_C") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "nested_learning_C::dgd_recurrent_fwd", "CUDA"):
    from nested_learning import ops

    for n in (1, 8):
        xs = [t[:, :n].contiguous() for t in (q, k, w)]
        gs = [t[:, :n].contiguous() for t in (al, et)]
        cu = lambda: torch.ops.nested_learning_C.dgd_recurrent_fwd(xs[0], xs[1], xs[2], xs[1], gs[0], gs[1], h0, True)  # noqa: E731
        tr = lambda: K.dgd_fwd(xs[0], xs[1], xs[2], gs[0], gs[1], xs[1], h0, 64, True)  # noqa: E731
        print(f"{n} token(s), kernels alone: cuda {do_bench(cu):.4f} ms, triton {do_bench(tr):.4f} ms")
    x1 = [t[:, :1].contiguous() for t in (q, k, w, al, et)]
    for be in ("cuda", "triton"):
        print(f"1 token through ops.dgd_update ({be}): "
              f"{do_bench(lambda: ops.dgd_update(*x1, initial_state=h0, backend=be)):.4f} ms")
else:
    print("streaming: the extension's CUDA kernels are not built (scripts/gpu_check.sh builds them)")

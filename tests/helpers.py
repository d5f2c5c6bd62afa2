"""Input makers and independent per-token loops used as oracles by the op tests, and a runner
of Python in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python *args` in the repository root with extra environment variables, captured."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=timeout)


def dgd_inputs(B, T, H, dk, dv, dtype=F64, seed=0, erase=True, state=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = r(B, T, H, dk)
    k = F.normalize(r(B, T, H, dk), dim=-1)
    w = r(B, T, H, dv)
    alpha = 0.5 + 0.5 * torch.rand(B, T, H, generator=g, dtype=dtype)
    eta = torch.rand(B, T, H, generator=g, dtype=dtype)
    a = F.normalize(r(B, T, H, dk), dim=-1) if erase else None
    h0 = r(B, H, dv, dk) if state else None
    return dict(q=q, k=k, w=w, alpha=alpha, eta=eta, a=a, initial_state=h0)


def dgd_loop(q, k, w, alpha, eta, a=None, initial_state=None, read="after"):
    """W_t = W_{t-1}(alpha_t I - eta_t a_t k_t^T) + w_t k_t^T, token by token, [d, d] explicit."""
    B, T, H, dk = q.shape
    dv = w.shape[-1]
    a = k if a is None else a
    W = torch.zeros(B, H, dv, dk, dtype=q.dtype) if initial_state is None else initial_state
    eye = torch.eye(dk, dtype=q.dtype)
    outs = []
    for t in range(T):
        P = alpha[:, t, :, None, None] * eye - eta[:, t, :, None, None] * torch.einsum(
            "bhi,bhj->bhij", a[:, t], k[:, t]
        )
        W_new = W @ P + torch.einsum("bhi,bhj->bhij", w[:, t], k[:, t])
        outs.append(torch.einsum("bhij,bhj->bhi", W_new if read == "after" else W, q[:, t]))
        W = W_new
    return torch.stack(outs, 1), W


def titan_inputs(B, T, H, dk, dv, dtype=F64, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda: torch.rand(B, T, H, generator=g, dtype=dtype)  # noqa: E731
    d = dict(
        q=F.normalize(r(B, T, H, dk), dim=-1),
        k=F.normalize(r(B, T, H, dk), dim=-1),
        v=r(B, T, H, dv),
        theta=0.5 * u(),
        eta=u(),
        alpha=0.2 * u(),
    )
    d["initial_state"] = (r(B, H, dv, dk), 0.1 * r(B, H, dv, dk)) if state else None
    return d


def memory_loop(params, momenta, loss_fn, read_fn, inputs, theta, eta, alpha, chunk):
    """Titans recurrence token by token for any memory: params/momenta lists of [B,H,...]
    tensors, loss_fn(params, t) the scalar sum of per-(b,h) losses of token t, read_fn(params,
    t) the read of token t. The gradient of token t is taken with autograd at the chunk-start
    parameters (chunk=1: at the previous parameters, the exact recurrence)."""
    T = theta.shape[1]
    P, S = [p.clone() for p in params], [s.clone() for s in momenta]
    outs = []
    for t in range(T):
        if t % chunk == 0:
            Pc = [p.clone() for p in P]
        outs.append(read_fn(Pc, t))
        leaf = [p.detach().requires_grad_() for p in Pc]
        grads = torch.autograd.grad(loss_fn(leaf, t), leaf)
        th, et, al = (x[:, t, :, None, None] for x in (theta, eta, alpha))
        S = [et * s - th * gr for s, gr in zip(S, grads)]
        P = [(1 - al) * p + s for p, s in zip(P, S)]
    return torch.stack(outs, 1), P, S


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x has a NaN (NaN never passes)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num

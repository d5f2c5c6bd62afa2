"""Outer optimizers (MATH section 5): AdamW, and Muon for 2-D weight matrices with AdamW for
everything else (embeddings, norms, biases, gates, convolution kernels, 3-D memory inits)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..layers.cms import CMSChain
from ..layers.common import CausalDepthwiseConv
from .config import OptimConfig


def muon_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters Muon may own: nn.Linear weights and CMS level matrices (2-D)."""
    ids = set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            ids.add(id(m.weight))
        elif isinstance(m, CMSChain):
            ids.update(id(p) for p in list(m.up) + list(m.down))
        elif isinstance(m, CausalDepthwiseConv):
            ids.discard(id(m.weight))
    return ids


def zeropower_newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of G = U S V^T (quintic Newton-Schulz, as in Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float() / (G.norm() + eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


class NewtonSchulzMuon(torch.optim.Optimizer):
    """Muon for 2-D parameters: Nesterov momentum, then Newton-Schulz orthogonalisation of the
    update, scaled so its RMS matches AdamW's (0.2 sqrt(max(m, n))), decoupled weight decay.
    Used when torch.optim.Muon is absent."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, ns_steps=ns_steps))
        for g in self.param_groups:
            for p in g["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(p.grad)
                upd = p.grad.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
                upd = zeropower_newton_schulz(upd, g["ns_steps"]) * (0.2 * math.sqrt(max(p.shape)))
                p.mul_(1 - g["lr"] * g["weight_decay"]).add_(upd, alpha=-g["lr"])


class OptimizerGroup:
    """Several optimizers stepped as one (state_dict keyed by name)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self):
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != set(self.optimizers):
            raise ValueError(f"optimizer state has {sorted(sd)}, expected {sorted(self.optimizers)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(sd[k])


def _adamw(params, lr, betas, wd, eps):
    # FSDP shards some parameters (DTensor) and keeps the memory inits whole: the fused step
    # cannot mix the two in one group, so each kind gets its own (one kind: the groups as before)
    sharded = lambda p: hasattr(p, "full_tensor")  # noqa: E731
    groups = [{"params": [p for p in params if (p.dim() >= 2) == decay and sharded(p) == kind],
               "weight_decay": wd if decay else 0.0} for decay in (True, False) for kind in (False, True)]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_optimizer(model: nn.Module, cfg: OptimConfig | dict) -> OptimizerGroup:
    """The optimizers of an `optim:` section (OptimConfig, or a dict of its keys): AdamW, or
    Muon on 2-D weight matrices beside AdamW for the rest (mixed_muon_adamw)."""
    cfg = OptimConfig.of(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    betas, wd, eps = tuple(cfg.betas), cfg.weight_decay, cfg.eps
    if cfg.name == "adamw":
        return OptimizerGroup({"adamw": _adamw(params, cfg.lr, betas, wd, eps)})
    ids = muon_parameters(model)
    mat = [p for p in params if id(p) in ids and p.dim() == 2]
    rest = [p for p in params if not (id(p) in ids and p.dim() == 2)]
    if hasattr(torch.optim, "Muon") and cfg.muon_impl != "newton_schulz":
        muon = torch.optim.Muon(mat, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=wd,
                                adjust_lr_fn="match_rms_adamw")
    else:
        muon = NewtonSchulzMuon(mat, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=wd)
    return OptimizerGroup({"muon": muon, "adamw": _adamw(rest, cfg.lr, betas, wd, eps)})


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to 1 over the first `warmup` steps (step 0 at 1/warmup), then cosine
    decay to min_ratio at `total` steps. min_ratio=1 is a linear warm-up then a constant 1
    (exactly: `total` no longer matters): continual learning's schedule, counted over the whole
    protocol (eval/continual.py)."""
    if step < warmup:
        return (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


def set_lr(opt: OptimizerGroup, factor: float) -> None:
    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])
        g["lr"] = g["base_lr"] * factor

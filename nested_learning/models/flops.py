"""FLOPs per token of a model, counted from its layers (docs/FLOPS.md states every term).

A multiply-add is 2 FLOPs. Terms, per token:
- dense: every linear map (the projections, MLPs, the CMS levels' two weights, the tied head);
- attention: q.k scores and the weighted sum of values over the keys a token attends to (the
  mean over a segment of `seq_len` tokens from an empty cache, capped by the window);
- memory: the in-context memories whose writes the outer loss differentiates (the Titans
  memory, the self-modifying mixer's main memory, DeltaNet): reads and chunk writes;
- stopped: writes whose gradient is stopped (the self-modifying projection memory unless
  differentiable_writes) and, in training, the CMS update pass; these run once, forward only.
Training counts dense, attention and memory three times (forward, and a backward of twice the
forward) and `stopped` once. Normalisations, gates' nonlinearities, the curvature bound's
spectral norms and the optimizers are left out (lower order in d)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..layers.attention import CausalSelfAttention
from ..layers.cms import CMSChain
from ..layers.deltanet import GatedDeltaNet
from ..layers.self_modifying import SelfModifyingTitans
from ..layers.titans import TitansMemory


@dataclass
class FlopCount:
    dense: float = 0.0
    attention: float = 0.0
    memory: float = 0.0
    stopped: float = 0.0

    @property
    def forward(self) -> float:
        return self.dense + self.attention + self.memory + self.stopped

    def training(self) -> float:
        return 3 * (self.dense + self.attention + self.memory) + self.stopped

    def as_dict(self) -> dict:
        return {**asdict(self), "forward": self.forward, "training": self.training()}


def mean_keys(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to over a causal segment of seq_len tokens."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _linear(m: nn.Linear) -> float:
    return 2.0 * m.in_features * m.out_features


def count_flops(model, seq_len: int, training: bool = True) -> FlopCount:
    """FlopCount per token of `model` over segments of seq_len tokens; training=True adds the CMS
    update pass (the second pass of a training step). A training step is `.training()`, a
    forward `.forward`; a training step without the update pass is
    count_flops(model, T, training=False).training()."""
    c = FlopCount()
    D = model.embed.weight.shape[1]
    c.dense += 2.0 * model.embed.weight.shape[0] * D  # the tied head (the embedding is a lookup)
    counted: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, CausalSelfAttention):
            c.attention += 2 * 2.0 * mod.h * mod.d * mean_keys(seq_len, mod.window)
        elif isinstance(mod, TitansMemory):
            H, d = mod.h, mod.d
            c.dense += 2.0 * 3 * D * mod.conv.kernel  # the depthwise convolution
            if mod.kind == "linear":  # read M q; write: the error M k - v, then the chunk's two outer-product sums
                c.memory += 2.0 * H * d * d * (1 + 1 + 2)
            else:  # read q + W1 act(W2 q); write: forward of k, the error's backward, four outer-product sums
                hid = mod.W1.shape[-1]
                c.memory += 2.0 * H * d * hid * (2 + 2 + 1 + 4)
        elif isinstance(mod, SelfModifyingTitans):
            H, d, rows = mod.h, mod.d, mod.P0.shape[1]
            c.dense += 2.0 * H * rows * d  # the projection by P (a per-sequence fast weight)
            c.memory += 2.0 * H * d * d * 3  # main memory: W q, W a, the update u k^T
            if mod.self_modifying:  # projection write: P a and the update, per token
                term = 2.0 * H * rows * d * 2
                if mod.differentiable_writes:
                    c.memory += term
                else:
                    c.stopped += term
        elif isinstance(mod, GatedDeltaNet):
            c.memory += 2.0 * mod.h * mod.d * mod.d * 3  # S k, the update, S q
        elif isinstance(mod, CMSChain):
            for up in mod.up:
                hid = up.shape[0]
                c.dense += 2 * 2.0 * D * hid
                if training:  # the update pass: the two weights' outer-product sums
                    c.stopped += 2 * 2.0 * D * hid
        if isinstance(mod, nn.Linear) and id(mod) not in counted:
            counted.add(id(mod))
            c.dense += _linear(mod)
    return c


def flops_per_token(model, seq_len: int, training: bool = True) -> float:
    """FLOPs per token of a training step (training=True) or a forward (False)."""
    c = count_flops(model, seq_len, training)
    return c.training() if training else c.forward

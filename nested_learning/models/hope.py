"""HOPE, top to bottom: its config, its block, its model.

A HOPE block is x + selfmod(norm x) (self-modifying Titans: the sequence mixer, whose
projections are memories that learn in the forward pass), then the Continuum Memory System:
a chain of MLP levels, each residual with its own pre-norm, whose fast weights are updated
by the teach signal once per level period (the second pass of a training step, or
`memorize` at test time). MATH sections 3-5; the layers live in `nested_learning.layers`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..layers.attention import CausalSelfAttention
from ..layers.cms import CMSChain, CMSConfig
from ..layers.common import RMSNorm, rms_norm
from ..layers.deltanet import GatedDeltaNet
from ..layers.self_modifying import MEMORY_TARGETS, SelfModifyingTitans
from .config import ModelConfig, positive_field
from .lm import Block, LanguageModel

MIXERS = ("selfmod", "attention", "sliding_window", "deltanet")


@dataclass
class HOPEConfig(ModelConfig):
    # self-modifying Titans (the sequence mixer)
    proj_chunk: int = 16  # the projection memories' chunk
    memory_chunk: int = 64  # the main memory's chunk (parallel schedule only)
    eta_max: float = 0.3
    mixer: str = "selfmod"  # the sequence mixer: "selfmod" | "attention" | "sliding_window" | "deltanet"
    mixer_window: int = 64  # keys attended by mixer="sliding_window"
    self_modifying: bool = True  # False: q, k, v and the gates are ordinary slow linear maps
    memory_target: str = "self"  # the main memory's target: "self" (a = 2k - v) | "values" (Eq. 28: a = 2k)
    residual_memories: bool = True  # memories read x + W x and write eta (v - k) (MATH 6); False: W x
    forget_bias: float = 8.0  # the forget gate's initial bias: alpha = sigmoid(8) per token, a ~3k-token horizon (studies/forget_sweep.py)
    # the CMS chain (checked by CMSConfig)
    cms_periods: tuple = (1, 4, 16, 64)
    cms_hidden_mult: int = 2
    cms_optimizer: str = "gd"  # or a tuple, one per level: "gd" | "momentum" | "dgd" | "deep_momentum"
    cms_lr: float = 0.1  # or a tuple, one per level; 1e-3 until 0.2.0 left the levels inert (bench/RESULTS.md 20)
    cms_beta: float = 0.9
    cms_dgd_alpha: float = 1.0
    cms_deep_momentum_hidden: int = 16
    teach_scale: float = 1.0
    teach_clip: float | None = None
    # both: gradients of the outer loss through the in-context writes
    differentiable_writes: bool = False

    def __post_init__(self):
        super().__post_init__()
        for n in ("proj_chunk", "memory_chunk", "mixer_window"):
            positive_field(self, n)
        if self.mixer not in MIXERS:
            raise ValueError(f"HOPEConfig.mixer must be one of {MIXERS}, got {self.mixer!r}")
        if not 0 < self.eta_max <= 1:
            raise ValueError(f"HOPEConfig.eta_max must lie in (0, 1], got {self.eta_max}")
        if self.memory_target not in MEMORY_TARGETS:
            raise ValueError(f"HOPEConfig.memory_target must be one of {MEMORY_TARGETS}, got {self.memory_target!r}")
        for n in ("self_modifying", "residual_memories"):
            if not isinstance(getattr(self, n), bool):
                raise ValueError(f"HOPEConfig.{n} must be true or false, got {getattr(self, n)!r}")
        if not isinstance(self.forget_bias, (int, float)) or not math.isfinite(self.forget_bias):
            raise ValueError(f"HOPEConfig.forget_bias must be a finite number, got {self.forget_bias!r}")
        self.cms_periods = self.cms().periods  # checks every cms_* and teach_* field

    def cms(self) -> CMSConfig:
        """The CMS chain's config (raises ValueError on a bad cms_* or teach_* field)."""
        fields = {"periods": "cms_periods", "hidden_mult": "cms_hidden_mult", "optimizer": "cms_optimizer",
                  "lr": "cms_lr", "beta": "cms_beta", "dgd_alpha": "cms_dgd_alpha",
                  "deep_momentum_hidden": "cms_deep_momentum_hidden", "teach_scale": "teach_scale",
                  "teach_clip": "teach_clip", "differentiable_writes": "differentiable_writes"}
        return CMSConfig(self.d_model, **{f: getattr(self, h) for f, h in fields.items()},
                         names={"d_model": "HOPEConfig.d_model", **{f: f"HOPEConfig.{h}" for f, h in fields.items()}})


class HOPEBlock(Block):
    has_cms = True

    def __init__(self, cfg: HOPEConfig):
        super().__init__()
        self.n1 = RMSNorm(cfg.d_model)
        if cfg.mixer == "selfmod":
            self.mixer = SelfModifyingTitans(cfg.d_model, cfg.n_heads, proj_chunk=cfg.proj_chunk,
                                             memory_chunk=cfg.memory_chunk, eta_max=cfg.eta_max,
                                             differentiable_writes=cfg.differentiable_writes,
                                             self_modifying=cfg.self_modifying, memory_target=cfg.memory_target,
                                             residual=cfg.residual_memories, forget_bias=cfg.forget_bias)
        elif cfg.mixer == "deltanet":
            self.mixer = GatedDeltaNet(cfg.d_model, cfg.n_heads, chunk_size=cfg.memory_chunk)
        else:  # full causal or sliding-window attention, with its KV cache as the mixer's state
            window = cfg.mixer_window if cfg.mixer == "sliding_window" else cfg.window
            self.mixer = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.rope_theta, window, cfg.use_flash)
        self.cms = CMSChain(cfg.cms())

    def init_state(self, batch, device, dtype) -> dict:
        return {"mixer": self.mixer.init_state(batch, device, dtype),
                "cms": self.cms.init_state(batch, device, dtype)}

    def forward(self, x, state, pos, capture=None, index=0):
        if isinstance(self.mixer, CausalSelfAttention):
            m, mixer = self.mixer(self.n1(x), state["mixer"], pos)
        else:
            m, mixer = self.mixer(self.n1(x), state["mixer"])
        x = self.cms(x + m, state["cms"], index, capture)
        return x, {"mixer": mixer, "cms": state["cms"]}

    def decode_begin(self, state, pos, room):
        return {"mixer": self.mixer.decode_begin(state["mixer"], pos, room), "cms": state["cms"]}

    def decode(self, x, buf, pos):
        x = x + self.mixer.decode(rms_norm(self.n1, x), buf["mixer"], pos)
        return self.cms.decode(x, buf["cms"])

    def decode_end(self, buf):
        return {"mixer": self.mixer.decode_end(buf["mixer"]), "cms": buf["cms"]}

    def apply_updates(self, state, capture, index, log, lr=None, levels=None, surprise_threshold=0.0):
        cms, surprise = self.cms.update(state["cms"], capture, index, log, lr, levels, surprise_threshold)
        return {**state, "cms": cms}, surprise


class HOPE(LanguageModel):
    block_class = HOPEBlock

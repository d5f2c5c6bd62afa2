"""The pre-norm residual blocks of the three models. Each has init_state(batch, device,
dtype) -> dict and forward(x, state, pos, capture, index) -> (x, state)."""

from __future__ import annotations

import torch.nn as nn

from ..layers.attention import CausalSelfAttention
from ..layers.cms import CMSChain
from ..layers.common import MLP, RMSNorm
from ..layers.self_modifying import SelfModifyingTitans
from ..layers.titans import TitansMemory


def _attention(cfg) -> CausalSelfAttention:
    return CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.rope_theta, cfg.window, cfg.use_flash)


class TransformerBlock(nn.Module):
    """x + attn(norm x); x + mlp(norm x)."""

    def __init__(self, cfg):
        super().__init__()
        self.n1, self.attn = RMSNorm(cfg.d_model), _attention(cfg)
        self.n2, self.mlp = RMSNorm(cfg.d_model), MLP(cfg.d_model, cfg.mlp_mult * cfg.d_model)

    def init_state(self, batch, device, dtype) -> dict:
        return {"attn": self.attn.init_state(batch, device, dtype)}

    def forward(self, x, state, pos, capture=None, index=0):
        a, cache = self.attn(self.n1(x), state["attn"], pos)
        x = x + a
        return x + self.mlp(self.n2(x)), {"attn": cache}


class TitansBlock(nn.Module):
    """The Titans baseline (memory as a layer): x + mem(norm x); x + attn(norm x); x + mlp(norm x)."""

    def __init__(self, cfg):
        super().__init__()
        self.n0 = RMSNorm(cfg.d_model)
        self.mem = TitansMemory(cfg.d_model, cfg.n_heads, cfg.memory, cfg.chunk_size, cfg.conv_kernel,
                                cfg.memory_hidden_mult)
        self.n1, self.attn = RMSNorm(cfg.d_model), _attention(cfg)
        self.n2, self.mlp = RMSNorm(cfg.d_model), MLP(cfg.d_model, cfg.mlp_mult * cfg.d_model)

    def init_state(self, batch, device, dtype) -> dict:
        return {"mem": self.mem.init_state(batch, device, dtype),
                "attn": self.attn.init_state(batch, device, dtype)}

    def forward(self, x, state, pos, capture=None, index=0):
        m, mem = self.mem(self.n0(x), state["mem"])
        x = x + m
        a, cache = self.attn(self.n1(x), state["attn"], pos)
        x = x + a
        return x + self.mlp(self.n2(x)), {"mem": mem, "attn": cache}


class HOPEBlock(nn.Module):
    """x + selfmod(norm x), then the CMS chain (each level residual with its own pre-norm)."""

    def __init__(self, cfg):
        super().__init__()
        self.n1 = RMSNorm(cfg.d_model)
        self.mixer = SelfModifyingTitans(cfg.d_model, cfg.n_heads, cfg.proj_chunk, cfg.memory_chunk,
                                         cfg.eta_max, cfg.differentiable_writes)
        self.cms = CMSChain(cfg.d_model, cfg.cms_periods, cfg.cms_hidden_mult, cfg.cms_optimizer,
                            cfg.cms_lr, cfg.cms_beta, cfg.cms_dgd_alpha, cfg.teach_scale, cfg.teach_clip,
                            cfg.differentiable_writes)

    def init_state(self, batch, device, dtype) -> dict:
        return {"mixer": self.mixer.init_state(batch, device, dtype),
                "cms": self.cms.init_state(batch, device, dtype)}

    def forward(self, x, state, pos, capture=None, index=0):
        m, mixer = self.mixer(self.n1(x), state["mixer"])
        x = self.cms(x + m, state["cms"], index, capture)
        return x, {"mixer": mixer, "cms": state["cms"]}

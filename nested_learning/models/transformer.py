"""The Transformer baseline: config, block and model. Each block is
x + attn(norm x); x + mlp(norm x)."""

from __future__ import annotations

from dataclasses import dataclass

from ..layers.attention import CausalSelfAttention
from ..layers.common import MLP, RMSNorm
from .config import ModelConfig
from .lm import Block, LanguageModel


@dataclass
class TransformerConfig(ModelConfig):
    pass


def attention(cfg: ModelConfig) -> CausalSelfAttention:
    """The causal self-attention of a config (full, or windowed by cfg.window)."""
    return CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.rope_theta, cfg.window, cfg.use_flash)


class TransformerBlock(Block):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n1, self.attn = RMSNorm(cfg.d_model), attention(cfg)
        self.n2, self.mlp = RMSNorm(cfg.d_model), MLP(cfg.d_model, cfg.mlp_hidden)

    def init_state(self, batch, device, dtype) -> dict:
        return {"attn": self.attn.init_state(batch, device, dtype)}

    def forward(self, x, state, pos, capture=None, index=0):
        a, cache = self.attn(self.n1(x), state["attn"], pos)
        x = x + a
        return x + self.mlp(self.n2(x)), {"attn": cache}


class Transformer(LanguageModel):
    block_class = TransformerBlock

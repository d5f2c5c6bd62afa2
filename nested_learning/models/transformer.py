"""The Transformer baseline: config, block and model. Each block is
x + attn(norm x); x + mlp(norm x)."""

from __future__ import annotations

from dataclasses import dataclass

from ..layers.attention import CausalSelfAttention
from ..layers.common import MLP, RMSNorm, rms_norm
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

    def decode_begin(self, state, pos, room):
        return {"attn": self.attn.decode_begin(state["attn"], pos, room)}

    def decode(self, x, buf, pos):
        x = x + self.attn.decode(rms_norm(self.n1, x), buf["attn"], pos)
        return x + self.mlp.decode(rms_norm(self.n2, x))

    def decode_end(self, buf):
        return {"attn": self.attn.decode_end(buf["attn"])}


class Transformer(LanguageModel):
    block_class = TransformerBlock

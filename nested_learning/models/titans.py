"""The Titans baseline (memory as a layer): config, block and model. Each block is
x + mem(norm x); x + attn(norm x); x + mlp(norm x)."""

from __future__ import annotations

from dataclasses import dataclass

from ..layers.common import MLP, RMSNorm, rms_norm
from ..layers.titans import TitansMemory
from .config import ModelConfig, positive_field
from .lm import Block, LanguageModel
from .transformer import attention


@dataclass
class TitansConfig(ModelConfig):
    memory: str = "linear"  # "linear" | "mlp"
    chunk_size: int = 16
    conv_kernel: int = 4
    memory_hidden_mult: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.memory not in ("linear", "mlp"):
            raise ValueError(f"TitansConfig.memory must be 'linear' or 'mlp', got {self.memory!r}")
        for n in ("chunk_size", "conv_kernel", "memory_hidden_mult"):
            positive_field(self, n)


class TitansBlock(Block):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.n0 = RMSNorm(cfg.d_model)
        self.mem = TitansMemory(cfg.d_model, cfg.n_heads, memory=cfg.memory, chunk_size=cfg.chunk_size,
                                conv_kernel=cfg.conv_kernel, mlp_hidden=cfg.memory_hidden_mult)
        self.n1, self.attn = RMSNorm(cfg.d_model), attention(cfg)
        self.n2, self.mlp = RMSNorm(cfg.d_model), MLP(cfg.d_model, cfg.mlp_hidden)

    def init_state(self, batch, device, dtype) -> dict:
        return {"mem": self.mem.init_state(batch, device, dtype),
                "attn": self.attn.init_state(batch, device, dtype)}

    def forward(self, x, state, pos, capture=None, index=0):
        m, mem = self.mem(self.n0(x), state["mem"])
        x = x + m
        a, cache = self.attn(self.n1(x), state["attn"], pos)
        x = x + a
        return x + self.mlp(self.n2(x)), {"mem": mem, "attn": cache}

    def decode_begin(self, state, pos, room):
        return {"mem": self.mem.decode_begin(state["mem"]), "attn": self.attn.decode_begin(state["attn"], pos, room)}

    def decode(self, x, buf, pos):
        x = x + self.mem.decode(rms_norm(self.n0, x), buf["mem"])
        x = x + self.attn.decode(rms_norm(self.n1, x), buf["attn"], pos)
        return x + self.mlp.decode(rms_norm(self.n2, x))

    def decode_end(self, buf):
        return {"mem": self.mem.decode_end(buf["mem"]), "attn": self.attn.decode_end(buf["attn"])}


class Titans(LanguageModel):
    block_class = TitansBlock

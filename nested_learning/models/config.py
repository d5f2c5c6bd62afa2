"""The fields every model shares (ModelConfig); each model's own config extends it in the
model's file. Every field is checked at construction and a bad value raises a ValueError
naming the field."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..checks import positive_int


def positive_field(cfg, name):
    """cfg.name must be a positive int (ValueError naming the config class and field)."""
    positive_int(f"{type(cfg).__name__}.{name}", getattr(cfg, name))


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_mult: float = 4  # the MLP's hidden width is mlp_mult * d_model (a whole number; 7.5 is fine)
    rope_theta: float = 10000.0
    window: int | None = None  # sliding-window attention (None: full causal)
    use_flash: bool = False  # flash-attn when installed, on CUDA, in half precision
    init_std: float = 0.02  # tied embedding init (small: the head shares it)

    def __post_init__(self):
        for n in ("vocab_size", "d_model", "n_layers", "n_heads"):
            positive_field(self, n)
        m = self.mlp_mult
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 or (m * self.d_model) % 1:
            raise ValueError(f"{type(self).__name__}.mlp_mult must be a positive number with mlp_mult * d_model a whole "
                             f"number (the MLP's hidden width), got {m!r} (d_model={self.d_model})")
        if self.d_model % self.n_heads:
            raise ValueError(f"{type(self).__name__}.d_model={self.d_model} must be divisible by "
                             f"n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"{type(self).__name__}: head dim d_model/n_heads must be even (RoPE)")
        if self.window is not None:
            positive_field(self, "window")
        if not self.init_std > 0:
            raise ValueError(f"{type(self).__name__}.init_std must be positive, got {self.init_std}")

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width, mlp_mult * d_model."""
        return int(self.mlp_mult * self.d_model)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

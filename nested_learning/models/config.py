"""One dataclass config per model; every field is checked at construction and a bad value
raises a ValueError naming the field."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..ops._checks import positive_int


def _pos_int(cfg, name):
    positive_int(f"{type(cfg).__name__}.{name}", getattr(cfg, name))


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_mult: int = 4
    rope_theta: float = 10000.0
    window: int | None = None  # sliding-window attention (None: full causal)
    use_flash: bool = False  # flash-attn when installed, on CUDA, in half precision
    init_std: float = 0.02  # tied embedding init (small: the head shares it)

    def __post_init__(self):
        for n in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_mult"):
            _pos_int(self, n)
        if self.d_model % self.n_heads:
            raise ValueError(f"{type(self).__name__}.d_model={self.d_model} must be divisible by "
                             f"n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"{type(self).__name__}: head dim d_model/n_heads must be even (RoPE)")
        if self.window is not None:
            _pos_int(self, "window")
        if not self.init_std > 0:
            raise ValueError(f"{type(self).__name__}.init_std must be positive, got {self.init_std}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class TransformerConfig(ModelConfig):
    pass


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
            _pos_int(self, n)


@dataclass
class HOPEConfig(ModelConfig):
    proj_chunk: int = 16  # self-modifying projection memories' chunk
    memory_chunk: int = 64  # main memory's chunk (parallel schedule only)
    eta_max: float = 0.3
    cms_periods: tuple = (1, 4, 16, 64)
    cms_hidden_mult: int = 2
    cms_optimizer: str = "gd"  # or a tuple, one per level: "gd" | "momentum" | "dgd"
    cms_lr: float = 1e-3  # or a tuple, one per level
    cms_beta: float = 0.9
    cms_dgd_alpha: float = 1.0
    teach_scale: float = 1.0
    teach_clip: float | None = None
    differentiable_writes: bool = False

    def __post_init__(self):
        super().__post_init__()
        for n in ("proj_chunk", "memory_chunk", "cms_hidden_mult"):
            _pos_int(self, n)
        self.cms_periods = tuple(self.cms_periods)
        if not self.cms_periods:
            raise ValueError("HOPEConfig.cms_periods must name at least one level")
        for i, p in enumerate(self.cms_periods):
            positive_int(f"HOPEConfig.cms_periods[{i}]", p)
        opts = (self.cms_optimizer,) if isinstance(self.cms_optimizer, str) else tuple(self.cms_optimizer)
        for o in opts:
            if o not in ("gd", "momentum", "dgd"):
                raise ValueError(f"HOPEConfig.cms_optimizer must be 'gd', 'momentum' or 'dgd', got {o!r}")
        if not isinstance(self.cms_optimizer, str) and len(opts) != len(self.cms_periods):
            raise ValueError("HOPEConfig.cms_optimizer: one entry per level of cms_periods")
        lrs = (self.cms_lr,) if isinstance(self.cms_lr, (int, float)) else tuple(self.cms_lr)
        if any(lr < 0 for lr in lrs) or (len(lrs) > 1 and len(lrs) != len(self.cms_periods)):
            raise ValueError("HOPEConfig.cms_lr must be non-negative, one value or one per level")
        if not 0 < self.eta_max <= 1:
            raise ValueError(f"HOPEConfig.eta_max must lie in (0, 1], got {self.eta_max}")
        if self.teach_clip is not None and self.teach_clip <= 0:
            raise ValueError(f"HOPEConfig.teach_clip must be positive or None, got {self.teach_clip}")

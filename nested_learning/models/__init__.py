"""HOPE, Titans and Transformer language models: `build_model(name, size, **overrides)`."""

from __future__ import annotations

from dataclasses import fields

from .blocks import HOPEBlock, TitansBlock, TransformerBlock
from .config import HOPEConfig, ModelConfig, TitansConfig, TransformerConfig
from .lm import LanguageModel, UpdateReport
from .state import ModelState


class Transformer(LanguageModel):
    block_class = TransformerBlock


class Titans(LanguageModel):
    block_class = TitansBlock


class HOPE(LanguageModel):
    block_class = HOPEBlock


MODELS = {"hope": (HOPE, HOPEConfig), "titans": (Titans, TitansConfig),
          "transformer": (Transformer, TransformerConfig)}

# Shared sizes; model-specific fields keep their defaults unless overridden.
SIZES = {
    "tiny": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_mult=2),
    "smoke": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4),
}


def build_model(name: str, size: str = "smoke", **overrides) -> LanguageModel:
    """build_model("hope" | "titans" | "transformer", size="smoke" | "tiny", **config fields)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    cls, cfg_cls = MODELS[name]
    known = {f.name for f in fields(cfg_cls)}
    bad = set(overrides) - known
    if bad:
        raise ValueError(f"{cfg_cls.__name__} has no field(s) {sorted(bad)}; fields: {sorted(known)}")
    return cls(cfg_cls(**{**SIZES[size], **overrides}))


__all__ = ["HOPE", "HOPEConfig", "LanguageModel", "MODELS", "ModelConfig", "ModelState", "SIZES",
           "Titans", "TitansConfig", "Transformer", "TransformerConfig", "UpdateReport", "build_model"]

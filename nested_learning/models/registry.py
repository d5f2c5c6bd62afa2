"""The registry: every model by name, and the sizes (shared dimensions, per-model layer
counts): `build_model(name, size, **overrides)`."""

from __future__ import annotations

import difflib
from dataclasses import fields

from .hope import HOPE, HOPEConfig
from .lm import LanguageModel
from .titans import Titans, TitansConfig
from .transformer import Transformer, TransformerConfig

MODELS = {"hope": (HOPE, HOPEConfig), "titans": (Titans, TitansConfig),
          "transformer": (Transformer, TransformerConfig)}

# Sizes: shared dimensions (d_model and the vocabulary, so the embedding is the same for every
# model), then per-model layer counts and MLP widths chosen so that the three models of a size
# match: total and non-embedding parameter counts within 5% of each other, and within 10% of the
# size's name (pilot ~160M, mid ~760M, target ~1.3B). Both are checked by
# tests/models/test_sizes.py. HOPE has no MLP of its own (its CMS levels are its MLPs), so its
# mlp_mult is unused; the baselines' MLPs are widened to make up for HOPE's memories. "tiny" is for
# tests only and is not matched. Model-specific fields keep their defaults.
SIZES = {
    "tiny": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_mult=2),
    "smoke": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4,
                  mlp_mult=dict(hope=4, titans=4.75, transformer=7.5)),
    "pilot": dict(vocab_size=32000, d_model=768, n_heads=12,
                  n_layers=dict(hope=13, titans=14, transformer=20)),
    "mid": dict(vocab_size=32000, d_model=1536, n_heads=16,
                n_layers=dict(hope=17, titans=18, transformer=25)),
    "target": dict(vocab_size=32000, d_model=2048, n_heads=16,
                   n_layers=dict(hope=16, titans=17, transformer=25)),
}
NOMINAL_PARAMETERS = {"pilot": 160e6, "mid": 760e6, "target": 1.3e9}
MATCHED_SIZES = ("smoke", "pilot", "mid", "target")  # the sizes whose models are compared


def size_config(name: str, size: str) -> dict:
    """The config fields of `size` for model `name`."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    return {k: (v[name] if isinstance(v, dict) else v) for k, v in SIZES[size].items()}


def build_model(name: str, size: str = "smoke", **overrides) -> LanguageModel:
    """build_model("hope" | "titans" | "transformer", size="tiny" | "smoke" | "pilot" | "mid" |
    "target", **config fields). Build under `torch.device("meta")` to count parameters of the
    large sizes without allocating them."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    cls, cfg_cls = MODELS[name]
    base = size_config(name, size)
    known = {f.name for f in fields(cfg_cls)}
    bad = set(overrides) - known
    if bad:
        near = {b: difflib.get_close_matches(b, sorted(known), n=3, cutoff=0.5) for b in sorted(bad)}
        said = "; ".join(f"{b}" + (f" (did you mean {', '.join(n)}?)" if n else "") for b, n in near.items())
        raise ValueError(f"{cfg_cls.__name__} has no field {said}; its fields are {', '.join(sorted(known))}")
    return cls(cfg_cls(**{**base, **overrides}))

"""HOPE, Titans and Transformer language models: `build_model(name, size, **overrides)`.
Each model's config, block and model class live in one file (hope.py, titans.py,
transformer.py) over the shared LanguageModel (lm.py); registry.py names them and the sizes."""

from __future__ import annotations

from .config import ModelConfig
from .hope import HOPE, HOPEBlock, HOPEConfig
from .lm import Block, LanguageModel, UpdateReport
from .registry import MATCHED_SIZES, MODELS, NOMINAL_PARAMETERS, SIZES, build_model, size_config
from .state import ModelState
from .titans import Titans, TitansBlock, TitansConfig
from .transformer import Transformer, TransformerBlock, TransformerConfig

__all__ = ["Block", "HOPE", "HOPEBlock", "HOPEConfig", "LanguageModel", "MATCHED_SIZES", "MODELS", "ModelConfig",
           "ModelState", "NOMINAL_PARAMETERS", "SIZES", "Titans", "TitansBlock", "TitansConfig", "Transformer",
           "TransformerBlock", "TransformerConfig", "UpdateReport", "build_model", "size_config"]

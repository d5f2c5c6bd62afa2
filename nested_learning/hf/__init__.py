"""Hugging Face transformers integration (the `[hf]` extra): importing this package registers
the three models with `AutoConfig` and `AutoModelForCausalLM`; `convert_run` writes a run as a
transformers model directory (safetensors weights, config, tokenizer)."""

from .convert import convert_run, hf_tokenizer
from .modeling import (
    CLASSES,
    MODEL_TYPES,
    FastStateCache,
    NestedLearningConfig,
    NestedLearningForCausalLM,
    from_package_model,
    register,
)

register()

__all__ = ["CLASSES", "MODEL_TYPES", "FastStateCache", "NestedLearningConfig", "NestedLearningForCausalLM",
           "convert_run", "from_package_model", "hf_tokenizer", "register"]

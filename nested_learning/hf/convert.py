"""A run (or one of its checkpoints) as a transformers model directory: model.safetensors,
config.json (its model type names the model) and the tokenizer, loadable with
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` once
`nested_learning.hf` is imported."""

from __future__ import annotations

import os

from transformers import PreTrainedTokenizerFast

from ..data.tokens import SPECIALS
from ..runs.load import load_run
from .modeling import from_package_model


def hf_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The run's BPE tokenizer (a `tokenizers.Tokenizer`) as a transformers fast tokenizer: the
    end-of-text token is also its BOS (a document starts after it, as in training) and EOS."""
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIALS[0], eos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1], unk_token=None, clean_up_tokenization_spaces=False)


def convert_run(run: str, out: str, step: int | None = None) -> str:
    """Write the run's model (latest checkpoint, or `step`) and tokenizer to `out`; returns out."""
    model, tok = load_run(run, step=step, device="cpu")
    hf = from_package_model(model)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    hf_tokenizer(tok).save_pretrained(out)
    return out

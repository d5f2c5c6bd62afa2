"""The three models as Hugging Face transformers models: configuration and causal-LM classes
registered with `AutoConfig` and `AutoModelForCausalLM` (model types `nested_learning_hope`,
`nested_learning_titans`, `nested_learning_transformer`), saved and loaded in safetensors by
`save_pretrained` / `from_pretrained`, generating through `model.generate(...)` with the fast
state carried as the cache.

Importing `nested_learning.hf` registers the classes (needs the `[hf]` extra: transformers).
The forward streams its input through the fast state in segments of `prefill_segment()` tokens,
exactly as `LanguageModel.generate` streams a prompt, so its logits, and greedy generation
through transformers, equal this package's. What a transformers cache of attention keys cannot
hold, the fast state does: Titans' and HOPE's memories, HOPE's CMS levels and every KV cache,
in one object (`FastStateCache`). Padding is not supported: a batch of prompts must have equal
lengths (an attention mask with zeros is refused), since a pad token would be written into
the memories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..constants import IGNORE
from ..models.registry import MODELS
from ..models.state import ModelState

MODEL_TYPES = {name: f"nested_learning_{name}" for name in MODELS}


class FastStateCache:
    """A model's whole fast state (memories, CMS levels, KV caches) as the cache transformers'
    `generate` carries between steps; `state` is the ModelState, `seen` the tokens consumed."""

    is_compileable = False

    def __init__(self, state: ModelState | None = None, seen: int = 0):
        self.state, self.seen = state, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class NestedLearningConfig(PretrainedConfig):
    """A model of this package: `nl_model` (hope | titans | transformer) and `nl_config`, the
    fields of its config dataclass (HOPEConfig, TitansConfig, TransformerConfig)."""

    model_type = "nested_learning"

    def __init__(self, nl_model: str = "hope", nl_config: dict | None = None, eos_token_id: int | None = 0,
                 bos_token_id: int | None = 0, pad_token_id: int | None = 1, **kwargs):
        if nl_model not in MODELS:
            raise ValueError(f"unknown model {nl_model!r}; choose from {sorted(MODELS)}")
        self.nl_model = nl_model
        self.nl_config = dict(nl_config or {})
        for k in ("vocab_size", "d_model", "n_layers", "n_heads"):  # what transformers' tools look for
            if k in self.nl_config:
                setattr(self, {"d_model": "hidden_size", "n_layers": "num_hidden_layers",
                               "n_heads": "num_attention_heads"}.get(k, k), self.nl_config[k])
        kwargs.setdefault("tie_word_embeddings", False)  # one weight, shared inside the package's model
        super().__init__(eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=pad_token_id, **kwargs)

    def build(self):
        cls, cfg_cls = MODELS[self.nl_model]
        return cls(cfg_cls(**self.nl_config))


class NestedLearningForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NestedLearningConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: NestedLearningConfig):
        super().__init__(config)
        self.model = config.build()
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # generate must not make a DynamicCache: ours is the state
        return False

    def _init_weights(self, module):  # the package's own initialisation, done when the model is built
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return None  # the head is the embedding (tied inside the package's model): nothing to tie here

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      **kwargs):
        if cache is not None and cache.seen:  # the state has consumed everything but the new tokens
            input_ids = input_ids[:, cache.seen:]
        elif next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache", True)}

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: FastStateCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits of input_ids [B, T] continuing the state in `cache` (a fresh one when None); with
        labels, the mean next-token loss (labels shifted inside, IGNORE = -100 not counted)."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, tokens] tensor (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padding is not supported: a pad token would be written into the fast state; "
                             "pass prompts of equal length (one at a time), or use nested_learning's generate")
        net = self.model
        state = cache.state if cache is not None else None
        state = net.init_state(input_ids.shape[0]) if state is None else state
        seg = net.prefill_segment()
        hs = []
        for s in range(0, input_ids.shape[1], seg):
            h, state = net.hidden(input_ids[:, s:s + seg], state)
            hs.append(h)
        h = torch.cat(hs, 1)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, net.embed.weight)
        loss = None
        if labels is not None:
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE)
        seen = (cache.seen if cache is not None else 0) + input_ids.shape[1]
        out = FastStateCache(state.detach(), seen) if (use_cache is None or use_cache) else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out)


def _subclasses():
    """One config and one model class per model, each with its own model type."""
    out = {}
    for name, model_type in MODEL_TYPES.items():
        cfg = type(f"{name.capitalize()}NLConfig", (NestedLearningConfig,), {
            "model_type": model_type,
            "__init__": (lambda n: lambda self, nl_model=n, **kw: NestedLearningConfig.__init__(self, nl_model, **kw))(name),
            "__doc__": f"NestedLearningConfig of a {name} model (model type {model_type})."})
        mdl = type(f"{name.capitalize()}NLForCausalLM", (NestedLearningForCausalLM,), {
            "config_class": cfg, "__doc__": f"The {name} model of nested_learning as a transformers causal LM."})
        out[name] = (cfg, mdl)
    return out


CLASSES = _subclasses()


def register() -> None:
    """Register the three config/model pairs with AutoConfig and AutoModelForCausalLM (idempotent)."""
    for cfg, mdl in CLASSES.values():
        try:
            AutoConfig.register(cfg.model_type, cfg)
            AutoModelForCausalLM.register(cfg, mdl)
        except ValueError:  # registered already (a second import): nothing to do
            pass


def from_package_model(model) -> NestedLearningForCausalLM:
    """The transformers model holding `model` (a LanguageModel of this package), sharing its weights."""
    name = next(n for n, (cls, _) in MODELS.items() if type(model) is cls)
    cfg_cls, mdl_cls = CLASSES[name]
    cfg = cfg_cls(nl_config=dict(model.config.__dict__))
    hf = mdl_cls(cfg)
    hf.model = model
    return hf

"""lm-evaluation-harness adapter (`pip install -e ".[eval]"`): a trained run as an lm-eval
model, registered as `nested_learning`.

    import lm_eval
    from nested_learning.eval.lm_eval_adapter import NestedLearningLM
    lm_eval.simple_evaluate(model=NestedLearningLM("runs/hope-smoke"), tasks=["piqa", "hellaswag"])
    # or: lm_eval --model nested_learning --model_args run_path=runs/hope-smoke --tasks piqa

loglikelihood scores continuations only (nested_learning.eval.loglik: the context's state is
computed once per distinct context and repeated for its continuations); loglikelihood_rolling
streams each whole document through the fast state from an end-of-text token (every token is
predicted once, with all the document before it in the state, instead of the disjoint
windows of a fixed-context model); generate_until decodes greedily from the context's state.
With memorize=True every context is memorised first (model.memorize on the context only)."""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..data.tokens import SPECIALS
from ..models.streaming import Memorize, MemorizeTally, stream_document, stream_segment
from ..runs.load import load_run
from .loglik import consume_context, encode_pair, score_requests


@register_model("nested_learning")
class NestedLearningLM(LM):
    def __init__(self, run_path: str, step: int | None = None, device: str | None = None, batch_size: int = 32,
                 memorize: bool = False, memorize_steps: int = 1, memory_lr: float | None = None,
                 surprise_threshold: float = 0.0, max_gen_toks: int = 256, **_ignored):
        super().__init__()
        self.model, self.tok = load_run(run_path, None if step is None else int(step), device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # lm-eval may pass "auto"
        self.memorize = (Memorize(int(memorize_steps), None if memory_lr is None else float(memory_lr),
                                  float(surprise_threshold)) if memorize in (True, "True", "true", 1) else None)
        self.max_gen_toks = int(max_gen_toks)
        self.eot = self.tok.token_to_id(SPECIALS[0])
        self.reports = MemorizeTally()  # what memorisation did (model.memorize), for inspection

    @property
    def eot_token_id(self) -> int:
        return self.eot

    def tok_encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, *r.args[:2]) for r in requests]
        scored = score_requests(self.model, pairs, self.memorize, self.batch_size, self.reports)
        return [(s.loglik, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests) -> list[float]:
        out, seg = [], stream_segment(self.model, self.memorize)
        for r in requests:
            ids = self.tok_encode(r.args[0])
            if not ids:
                out.append(0.0)
                continue
            loss, _ = stream_document(self.model, torch.tensor([self.eot, *ids]), seg, self.memorize,
                                      reports=self.reports)
            out.append(-float(loss.double().sum()))
        return out

    def generate_until(self, requests) -> list[str]:
        out, dev = [], self.model.embed.weight.device
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = torch.tensor([self.tok_encode(context) or [self.eot]], device=dev)
            state = consume_context(self.model, ids, self.memorize, self.reports, stream_segment(self.model, self.memorize))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            new, _ = self.model.generate(ids[:, -1:], n, temperature, state=state, eos=self.eot)
            text = self.tok_decode(t for t in new[0].tolist() if t != self.eot)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out

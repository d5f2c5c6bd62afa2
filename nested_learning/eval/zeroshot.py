"""Zero-shot multiple choice, scored as lm-evaluation-harness scores it: `acc` is the argmax
of the summed continuation log-likelihood, `acc_norm` of that sum divided by the choice's
length in characters; each with its standard error (sample standard deviation / sqrt(n)),
the item count and the chance level (the mean over items of |gold| / |choices|)."""

from __future__ import annotations

from ..models.streaming import Memorize
from .loglik import encode_pair, score_requests
from .results import mean_stderr
from .tasks import Item


def score_items(model, tok, items: list[Item], memorize: Memorize | None = None, batch_size: int = 32,
                reports: list | None = None, progress=None) -> dict:
    """The task block of a result file (metrics, n_items, chance, per-item records)."""
    requests, owner = [], []
    for n, it in enumerate(items):
        for c in it.choices:
            requests.append(encode_pair(tok, it.context, c))
            owner.append(n)
    scored = score_requests(model, requests, memorize, batch_size, reports, progress, owner)
    records, acc, acc_norm, chance = [], [], [], []
    k = 0
    for it in items:
        lls = [s.loglik for s in scored[k:k + len(it.choices)]]
        norm = [ll / len(c) for ll, c in zip(lls, it.choices)]
        pred, pred_norm = max(range(len(lls)), key=lls.__getitem__), max(range(len(norm)), key=norm.__getitem__)
        acc.append(float(pred in it.gold))
        acc_norm.append(float(pred_norm in it.gold))
        chance.append(len(it.gold) / len(it.choices))
        records.append({"id": it.id, "gold": it.gold, "loglik": lls, "pred": pred, "pred_norm": pred_norm,
                        "context_tokens": len(requests[k][0]),
                        "choice_tokens": [len(r[1]) for r in requests[k:k + len(it.choices)]]})
        k += len(it.choices)
    metrics = {}
    for name, vals in (("acc", acc), ("acc_norm", acc_norm)):
        v, se = mean_stderr(vals)
        metrics[name] = {"value": v, "stderr": se}
    return {"metrics": metrics, "n_items": len(items), "chance": sum(chance) / len(chance), "records": records}

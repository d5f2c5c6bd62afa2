"""Log-likelihood scoring measures what lm-evaluation-harness measures: continuation tokens
only, from the model's own forward pass; batching changes nothing; memorisation sees the
context only; acc, acc_norm, stderr and chance against a hand-computed case."""

import math

import pytest
import torch
import torch.nn.functional as F

from nested_learning.eval import loglik, zeroshot
from nested_learning.eval.loglik import Scored, encode_pair, score_requests
from nested_learning.eval.tasks import Item
from nested_learning.models import build_model
from nested_learning.models.streaming import Memorize

SMALL = dict(hope=dict(proj_chunk=4, memory_chunk=8, cms_periods=(1, 4)), titans=dict(chunk_size=4), transformer={})


class ToyTok:
    """Characters as tokens (2 + byte): enough to check how pairs are split."""

    def encode(self, text):
        return type("E", (), {"ids": [2 + b % 60 for b in text.encode()]})()

    def token_to_id(self, s):
        return 0


def test_encode_pair_moves_trailing_space_and_empty_context_is_eot():
    tok = ToyTok()
    ctx, cont = encode_pair(tok, "Q: x\nA: ", "Yes")
    assert ctx == tok.encode("Q: x\nA:").ids and cont == tok.encode(" Yes").ids
    assert encode_pair(tok, "", "Hi") == ([0], tok.encode("Hi").ids)


def forward_loglik(m, ctx, cont):
    """The reference: one forward over context + continuation, log-softmax at the positions
    that predict continuation tokens."""
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(m(seq)[0][0].float(), -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    lp = [float(logp[p, t]) for p, t in zip(pos, cont)]
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(pos, cont))
    return sum(lp), greedy


@pytest.mark.parametrize("name", list(SMALL))
def test_scores_equal_the_models_forward_and_batching_changes_nothing(name):
    torch.manual_seed(0)
    m = build_model(name, "tiny", **SMALL[name]).eval()
    g = torch.Generator().manual_seed(1)
    r = lambda n: torch.randint(0, 64, (n,), generator=g).tolist()  # noqa: E731
    c1, c2, c3 = r(9), r(9), r(14)  # two contexts of one length (batched together), one longer
    reqs = [(c1, r(3)), (c1, r(1)), (c1, r(5)), (c2, r(2)), (c2, r(4)), (c3, r(3)), ([5], r(2))]
    batched = score_requests(m, reqs, batch_size=8)
    alone = [score_requests(m, [q], batch_size=1)[0] for q in reqs]
    for q, b, a in zip(reqs, batched, alone):
        ref, greedy = forward_loglik(m, *q)
        assert b.tokens == len(q[1])  # only the continuation is scored
        assert math.isclose(b.loglik, ref, rel_tol=1e-5, abs_tol=1e-5), (b.loglik, ref)
        assert math.isclose(a.loglik, b.loglik, rel_tol=1e-5, abs_tol=1e-5)
        assert b.greedy == greedy


def test_memorisation_sees_the_context_only_and_starts_fresh_per_item():
    torch.manual_seed(0)
    m = build_model("hope", "tiny", **SMALL["hope"]).eval()
    seen = []
    original = type(m).memorize

    def spy(self, tokens, state=None, **kw):
        seen.append((tokens.clone(), kw["targets"].clone(), None if state is None else state.position))
        return original(self, tokens, state, **kw)

    type(m).memorize = spy
    try:
        ctx_a, ctx_b = [10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]
        conts = [[40, 41], [42], [43, 44, 45]]
        reqs = [(ctx_a, c) for c in conts] + [(ctx_b, c) for c in conts]
        mem = score_requests(m, reqs, Memorize(steps=2, lr=1.0), batch_size=4)
    finally:
        type(m).memorize = original
    base = score_requests(m, reqs)
    assert seen, "memorize was never called"
    for tokens, targets, position in seen:
        assert position == 0  # every batch of contexts starts from a fresh state
        used = set(tokens.flatten().tolist()) | set(targets.flatten().tolist()) - {-100}
        assert used <= set(ctx_a) | set(ctx_b)  # never a continuation token
    assert any(abs(a.loglik - b.loglik) > 1e-6 for a, b in zip(mem, base))  # it did change the scores


def test_acc_acc_norm_stderr_chance_by_hand(monkeypatch):
    items = [Item("a", "ctx a", ["xx", "y"], [0]), Item("b", "ctx b", ["p", "qqqq", "r"], [1]),
             Item("c", "ctx c", ["m", "nn"], [0, 1])]
    # log-likelihoods chosen so that acc and acc_norm disagree on item a and b
    lls = [-2.0, -1.5, -3.0, -4.0, -3.5, -1.0, -5.0]
    monkeypatch.setattr(zeroshot, "score_requests",
                        lambda *a, **k: [Scored(v, False, 1) for v in lls])
    monkeypatch.setattr(zeroshot, "encode_pair", lambda tok, c, x: ([1], [2]))
    res = zeroshot.score_items(None, None, items)
    # item a: acc picks y (-1.5 > -2) wrong; norm: -1.0 (xx) vs -1.5 (y) picks xx right
    # item b: acc picks p (-3.0) wrong; norm: p -3.0, qqqq -1.0, r -3.5 picks qqqq right
    # item c: acc picks m (-1.0) right; norm: m -1.0, nn -2.5 right
    assert [r["pred"] for r in res["records"]] == [1, 0, 0]
    assert [r["pred_norm"] for r in res["records"]] == [0, 1, 0]
    acc, norm = res["metrics"]["acc"], res["metrics"]["acc_norm"]
    assert acc["value"] == pytest.approx(1 / 3) and norm["value"] == 1.0
    assert acc["stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert norm["stderr"] == 0.0
    assert res["chance"] == pytest.approx((1 / 2 + 1 / 3 + 2 / 2) / 3)
    assert res["n_items"] == 3


def test_requests_need_tokens():
    m = build_model("transformer", "tiny").eval()
    with pytest.raises(ValueError, match="at least one token"):
        score_requests(m, [([], [1])])
    with pytest.raises(ValueError, match="encodes to no token"):
        loglik.encode_pair(type("T", (), {"encode": lambda s, t: type("E", (), {"ids": [1, 2]})(),
                                          "token_to_id": lambda s, x: 0})(), "ab", "c")

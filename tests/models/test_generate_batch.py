"""Batched generation of prompts of different lengths: each row gets what `generate` gives
its prompt alone (no padding enters a state), stop tokens end rows one by one, and nucleus
sampling keeps exactly the smallest set of tokens whose probability reaches top_p."""

from __future__ import annotations

import pytest
import torch

from nested_learning.models import build_model
from nested_learning.models.lm import LanguageModel

SMALL = {"hope": dict(proj_chunk=4, memory_chunk=8, cms_periods=[1, 4, 8]), "titans": dict(chunk_size=4),
         "transformer": {}}


def _model(name):
    torch.manual_seed(0)
    m = build_model(name, "tiny", **SMALL[name]).eval()
    with torch.no_grad():  # sharper logits than at init, so greedy paths vary between prompts
        m.embed.weight.mul_(6.0)
    return m


@pytest.mark.parametrize("name", ["hope", "titans", "transformer"])
def test_each_row_is_its_prompt_generated_alone(name):
    m = _model(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 64, (n,), generator=g) for n in (3, 11, 1, 17, 8)]  # across chunk boundaries
    rows = m.generate_batch(prompts, 9)
    for p, row in zip(prompts, rows):
        alone, _ = m.generate(p, 9)
        assert torch.equal(row, alone[0]), (name, p.numel(), row, alone[0])
    assert len({tuple(r.tolist()) for r in rows}) > 1  # the rows differ: a real test of per-row state


def test_stop_tokens_end_rows_one_by_one():
    m = _model("hope")
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9, 10, 11, 12, 13])]
    free = m.generate_batch(prompts, 8)
    first = int(free[0][2])  # row 0 stops at its third token; row 1 only at its own stop, or at 8
    rows = m.generate_batch(prompts, 8, stop=[[first], [-1]])
    assert torch.equal(rows[0], free[0][:3]) and int(rows[0][-1]) == first
    assert torch.equal(rows[1], free[1])
    shared = m.generate_batch(prompts, 8, stop=first)
    assert int(shared[0][-1]) == first and len(shared[0]) <= 3
    with pytest.raises(ValueError, match="one list of ids per prompt"):
        m.generate_batch(prompts, 4, stop=[[1], [2], [3]])
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty 1-d integer tensor"):
        m.generate_batch([torch.tensor([1]), torch.tensor([])], 4)
    with pytest.raises(ValueError, match="top_p must lie in"):
        m.generate_batch(prompts, 4, temperature=1.0, top_p=0.0)


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([LanguageModel._pick(logits, 1.0, None, g, top_p=0.7) for _ in range(400)])
    assert set(picks.flatten().tolist()) == {0, 1}
    share = (picks == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.08  # renormalised within the nucleus
    assert set(torch.stack([LanguageModel._pick(logits, 1.0, None, g, top_p=0.5) for _ in range(50)])
               .flatten().tolist()) == {0}  # 0.5 reaches 0.5 on its own
    every = torch.stack([LanguageModel._pick(logits, 1.0, None, g, top_p=1.0) for _ in range(400)])
    assert set(every.flatten().tolist()) == {0, 1, 2, 3}  # top_p 1: nothing is cut


def test_sampled_rows_match_their_prompt_alone_with_one_row():
    m = _model("titans")
    p = torch.tensor([3, 4, 5, 6])
    a = m.generate_batch([p], 6, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b, _ = m.generate(p, 6, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])


def test_a_non_finite_state_stops_decoding_with_the_ops_error():
    from nested_learning.checks import NonFiniteInputError

    m = _model("transformer")  # no gated op on its path: only the logits can tell a poisoned state
    state = m.generate(torch.tensor([3, 4]), 1)[1]
    for t in state.tensors():
        if t.is_floating_point():
            t.fill_(float("nan"))
    with pytest.raises(NonFiniteInputError, match="decoding step 0: the logits are not finite"):
        m.generate(torch.tensor([3, 4]), 4, state=state)
    m = _model("titans")
    with torch.no_grad():
        m.embed.weight[7].fill_(float("inf"))  # the tied head: every step's logits
    with pytest.raises(NonFiniteInputError, match="the logits are not finite"):
        m.generate_batch([torch.tensor([3]), torch.tensor([4, 5])], 4)

import pytest
import torch

from nested_learning.models import MATCHED_SIZES, NOMINAL_PARAMETERS, SIZES, build_model

NAMES = ["hope", "titans", "transformer"]


def counts(name, size):
    with torch.device("meta"):
        m = build_model(name, size)
    return m.num_parameters(), m.num_parameters(embedding=False)


@pytest.mark.parametrize("size", sorted(NOMINAL_PARAMETERS))
@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_within_ten_percent_of_the_size_name(name, size):
    n, _ = counts(name, size)
    nominal = NOMINAL_PARAMETERS[size]
    assert abs(n - nominal) / nominal < 0.10, (name, size, n)


@pytest.mark.parametrize("size", MATCHED_SIZES)
def test_models_of_a_compared_size_match_within_five_percent(size):
    """Total and non-embedding counts: the largest of the three models is within 5% of the smallest."""
    c = {name: counts(name, size) for name in NAMES}
    for i, what in enumerate(("total", "non-embedding")):
        n = [v[i] for v in c.values()]
        assert max(n) / min(n) - 1 < 0.05, (size, what, c)


@pytest.mark.parametrize("size", MATCHED_SIZES)
def test_models_of_a_compared_size_share_the_embedding(size):
    assert isinstance(SIZES[size]["d_model"], int) and isinstance(SIZES[size]["vocab_size"], int)
    emb = {name: counts(name, size)[0] - counts(name, size)[1] for name in NAMES}
    assert len(set(emb.values())) == 1, emb


def test_smoke_counts():
    """The smoke size's exact counts (docs quote them: README, bench/RESULTS.md)."""
    assert {name: counts(name, "smoke") for name in NAMES} == {
        "hope": (1_773_344, 1_249_056), "titans": (1_767_216, 1_242_928), "transformer": (1_770_624, 1_246_336)}

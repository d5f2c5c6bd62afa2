import pytest
import torch

from nested_learning.models import NOMINAL_PARAMETERS, build_model


@pytest.mark.parametrize("size", sorted(NOMINAL_PARAMETERS))
@pytest.mark.parametrize("name", ["hope", "titans", "transformer"])
def test_parameter_count_within_ten_percent_of_the_size_name(name, size):
    with torch.device("meta"):
        n = build_model(name, size).num_parameters()
    nominal = NOMINAL_PARAMETERS[size]
    assert abs(n - nominal) / nominal < 0.10, (name, size, n)

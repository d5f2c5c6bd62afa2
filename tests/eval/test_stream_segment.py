"""The segment an evaluation streams in (models.streaming.stream_segment): memorising a model loaded from a run
streams in the run's training segment, so that its CMS levels read weights as stale as in
training (MATH 4.3); everything else streams in the prefill segment."""

import pytest

from nested_learning.models.streaming import Memorize, stream_segment
from nested_learning.runs.load import load_run


@pytest.mark.parametrize("name", ["hope", "titans", "transformer"])
def test_memorising_a_run_streams_in_its_training_segment(tiny_runs, name):
    model, _ = load_run(tiny_runs[name], device="cpu")
    assert model.run_info.seq_len == 16  # tests/train/conftest.py BASE: train.seq_len
    assert stream_segment(model, None) == model.prefill_segment()
    # only a model with CMS levels memorises; the others stream as without memorising
    assert stream_segment(model, Memorize()) == (16 if name == "hope" else model.prefill_segment())


def test_a_model_not_loaded_from_a_run_streams_in_the_prefill_segment(tiny_runs):
    model, _ = load_run(tiny_runs["hope"], device="cpu")
    model.run_info = None
    assert stream_segment(model, Memorize()) == model.prefill_segment()

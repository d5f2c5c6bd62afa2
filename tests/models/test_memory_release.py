"""Nothing a training, memorisation or evaluation step records outlives it: once the step's
results are dropped, its teach capture, the activations it watched, the layer inputs it kept
and the teach signals are freed by reference counting alone (no garbage-collector cycle,
which Python could not even see: autograd hooks live in C++ storage)."""

import gc
import weakref

import pytest
import torch

from nested_learning.layers.teach import TeachCapture
from nested_learning.models import build_model

SMALL = dict(hope=dict(proj_chunk=4, memory_chunk=8, cms_periods=(1, 4)),
             titans=dict(chunk_size=4), transformer={})


def _refs(capture: TeachCapture) -> list[weakref.ref]:
    held = [*capture.tensors.values(), *capture.inputs.values(), *capture.grads.values()]
    assert held, "the capture recorded nothing: the test would prove nothing"
    return [weakref.ref(capture), *map(weakref.ref, held)]


def _alive(refs) -> int:
    return sum(r() is not None for r in refs)


@pytest.fixture(autouse=True)
def no_automatic_gc():
    """Reference counting alone must free a step; the collector may not paper over a cycle."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("name", ["transformer", "titans", "hope"])
def test_a_training_step_frees_its_capture_activations_and_signals(name):
    torch.manual_seed(0)
    m = build_model(name, "tiny", **SMALL[name])
    loss, cap, state = m.train_forward(torch.randint(0, 64, (2, 16)))
    loss.backward()
    state, report = m.apply_updates(state, cap)
    refs = _refs(cap)
    assert cap.grads, "the backward pass stored no teach signal"
    del loss, cap, state, report
    assert _alive(refs) == 0
    gc.collect()  # and nothing is left for the collector either
    assert _alive(refs) == 0


def test_memorize_frees_its_captures():
    torch.manual_seed(0)
    m = build_model("hope", "tiny", **SMALL["hope"])
    made = []
    original = TeachCapture.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        made.append(weakref.ref(self))

    TeachCapture.__init__ = spy
    try:
        state, report = m.memorize(torch.randint(0, 64, (2, 16)), steps=3)
    finally:
        TeachCapture.__init__ = original
    assert len(made) == 3 and report.updates_applied > 0
    assert _alive(made) == 0


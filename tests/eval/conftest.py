import copy

import pytest

from tests.train.conftest import BASE, corpus_dir  # noqa: F401 (fixture)

OVERRIDES = {"hope": {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4, 8]},
             "titans": {"chunk_size": 4}, "transformer": {}}


@pytest.fixture(scope="session")
def tiny_runs(corpus_dir, tmp_path_factory):  # noqa: F811
    """{name: run directory} of a tiny HOPE, Titans and Transformer trained 4 steps by run()."""
    from nested_learning.train.loop import run

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, over in OVERRIDES.items():
        cfg = copy.deepcopy(BASE)
        cfg["model"] = {"name": name, "overrides": over}
        cfg["data"].update(path=corpus_dir, data_dir=str(root / "data"))
        cfg["train"].update(out_dir=str(root / name), steps=4, save_every=2, eval_every=0)
        run(cfg)
        out[name] = cfg["train"]["out_dir"]
    return out

"""A command line the config cannot take is refused in one line naming the nearest known keys or
options, before anything is created; model.overrides.FIELD=VALUE sets any model config field."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nested_learning.train.config_checks import ConfigError, check_command_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("overrides, message", [
    (["train.step=20"], "unknown key train.step (did you mean train.steps"),
    (["+train.step=20"], "unknown key train.step (did you mean train.steps"),  # Hydra's advice, followed
    (["optim.lrr=1e-3"], "unknown key optim.lrr (did you mean optim.lr?)"),
    (["data.vocab=300"], "unknown key data.vocab (did you mean data.vocab_size?)"),
    (["modl=titans"], "unknown key modl (did you mean model?)"),
    (["model=hopee"], "unknown model 'hopee' (did you mean model=hope?); the model options are hope, titans"),
    (["size=smok"], "unknown size 'smok' (did you mean size=smoke?)"),
    (["model.overrides.cms_lrr=1e-2"], "HOPEConfig has no field cms_lrr (did you mean cms_lr"),
    (["train.steps=abc"], "could not be converted to Integer"),
    (["data=local"], "data=local needs data.path"),
    (["train.seq_len=100"], "train.seq_len=100 must be a multiple of"),
    (["steps"], "'steps' is not key=value"),
])
def test_a_bad_command_line_is_one_line_naming_the_nearest(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_command_line(overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_model_fields_and_typed_sections_are_set_from_the_command_line():
    cfg = check_command_line(["model.overrides.cms_lr=1e-2", "optim=mixed_muon_adamw", "optim.muon_lr=1e-2",
                              "data.vocab_size=8192"])
    assert cfg["model"]["overrides"] == {"cms_lr": 1e-2}
    assert cfg["optim"]["name"] == "mixed_muon_adamw" and cfg["optim"]["muon_lr"] == 1e-2
    assert cfg["optim"]["warmup"] == 20 and cfg["data"]["vocab_size"] == 8192  # the schemas' defaults fill in
    # an experiment's overrides and the command line's merge (the command line wins)
    cfg = check_command_line(["experiment=hope_cms_per_level", "model.overrides.cms_lr=1e-2"])
    assert cfg["model"]["overrides"] == {"cms_optimizer": ["gd", "gd", "momentum", "dgd"], "cms_lr": 1e-2}
    assert check_command_line(["--cfg", "job"]) is None  # Hydra's own flags: left to Hydra


def test_train_py_refuses_a_misspelt_key_in_one_line_and_creates_nothing(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "train.step=20"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NL_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: unknown key train.step (did you mean train.steps"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert os.listdir(tmp_path) == []  # no run directory, no .hydra, no data folder

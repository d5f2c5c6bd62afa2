"""A campaign: the entries of a study (models x seeds, then each ablation as an override of the
reference model), the training overrides they share and the evaluation pack each runs, read
from `configs/campaign/<name>.yaml` (or any YAML file of that form).

An entry is one training run and its evaluations. Main entries are `<model>-s<seed>` for every
model and seed; ablation entries are `<experiment>-s<seed>`, the experiment's model overrides
(configs/experiment/<experiment>.yaml) applied to the reference model. Ablations run the
`ablations.seeds` first; `confirm_seeds` are added to an ablation once its first seed's effect
on the final validation loss lies within `confirm_sigmas` seed standard deviations of the
reference (so it cannot be told from seed noise with one seed)."""

from __future__ import annotations

import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field

import torch
import yaml

from ..checks import unknown_keys_message
from ..models.registry import MODELS, build_model
from ..train.config import compose_config

STAGES_FIRST = "train"


class CampaignError(ValueError):
    """A campaign file that cannot be run, named with the reason."""


def repo_root() -> str:
    """The checkout the package runs from (configs/, train.py, scripts/)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Entry:
    name: str                    # "hope-s0", "hope_cms_depth1-s0"
    group: str                   # "main" | "ablation"
    variant: str                 # the model name (main) or the experiment name (ablation)
    model: str                   # hope | titans | transformer
    seed: int
    overrides: tuple[str, ...]   # train.py overrides of this entry (after the shared ones)
    model_overrides: tuple[tuple[str, object], ...] = ()  # the config fields the ablation changes
    pinned: tuple[tuple[str, object], ...] = ()  # the campaign's fields of this model (model_overrides:)


def hydra_value(v) -> str:
    """A YAML value as a Hydra command-line value ([1,4,16], true, gd)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


def experiment_overrides(name: str, config_dir: str) -> tuple[str, dict]:
    """(model name, {field: value}) of configs/experiment/<name>.yaml: its model.overrides."""
    path = os.path.join(config_dir, "experiment", f"{name}.yaml")
    if not os.path.isfile(path):
        have = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)) if f.endswith(".yaml"))
        raise CampaignError(f"no experiment config {path}; the experiments are {', '.join(have)}")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    model = doc.get("model") or {}
    if "name" not in model or not model.get("overrides"):
        raise CampaignError(f"{path}: an ablation needs model.name and model.overrides")
    return model["name"], dict(model["overrides"])


@dataclass
class Campaign:
    name: str
    path: str
    scale: str
    launcher: list[str]
    seeds: list[int]
    models: list[str]
    reference: str
    train: list[str]
    evaluation: dict[str, str]
    execute: bool = True
    threads: int | None = None
    ablation_seeds: list[int] = field(default_factory=lambda: [0])
    confirm_seeds: list[int] = field(default_factory=list)
    confirm_sigmas: float = 2.0
    experiments: list[str] = field(default_factory=list)
    root: str = field(default_factory=repo_root)
    runs_root: str | None = None      # default: <root>/runs
    reports_root: str | None = None   # default: <root>/reports
    reports: dict = field(default_factory=dict)  # make_report's files, relative to root (see report_path)
    # per model, config fields every entry of that model gets before an ablation's own (a default
    # that changed after the campaign ran, pinned to the value it ran with)
    model_overrides: dict = field(default_factory=dict)

    KEYS = ("name", "extends", "scale", "launcher", "execute", "threads", "seeds", "models", "reference", "train",
            "model_overrides", "ablations", "evaluation", "reports")
    REPORTS = ("experiments", "ablations", "progress", "writeup")  # what make_report writes

    @classmethod
    def load(cls, name_or_path: str, root: str | None = None, runs_root: str | None = None,
             reports_root: str | None = None) -> Campaign:
        root = root or repo_root()
        path, doc = cls._read(name_or_path, root)
        missing = [k for k in ("name", "launcher", "seeds", "models", "train", "evaluation") if k not in doc]
        if missing:
            raise CampaignError(f"{path}: missing key(s) {', '.join(missing)}")
        abl = doc.get("ablations") or {}
        bad = set(abl) - {"seeds", "confirm_seeds", "confirm_sigmas", "experiments"}
        if bad:
            raise CampaignError(f"{path}: " + unknown_keys_message(
                "ablations", sorted(bad), ("seeds", "confirm_seeds", "confirm_sigmas", "experiments")))
        c = cls(name=str(doc["name"]), path=path, scale=str(doc.get("scale", "")), launcher=list(doc["launcher"]),
                seeds=[int(s) for s in doc["seeds"]], models=list(doc["models"]),
                reference=str(doc.get("reference", doc["models"][0])), train=[str(t) for t in doc["train"]],
                evaluation={str(k): " ".join(str(v).split()) for k, v in (doc["evaluation"] or {}).items()},
                execute=bool(doc.get("execute", True)), threads=doc.get("threads"),
                ablation_seeds=[int(s) for s in abl.get("seeds", [0])],
                confirm_seeds=[int(s) for s in abl.get("confirm_seeds", [])],
                confirm_sigmas=float(abl.get("confirm_sigmas", 2.0)),
                experiments=list(abl.get("experiments", [])), root=root, runs_root=runs_root,
                reports_root=reports_root, reports=dict(doc.get("reports") or {}),
                model_overrides={str(m): dict(f or {}) for m, f in (doc.get("model_overrides") or {}).items()})
        c.check()
        return c

    @classmethod
    def _read(cls, name_or_path: str, root: str, seen: tuple[str, ...] = ()) -> tuple[str, dict]:
        """(path, mapping) of a campaign file, with the campaign it `extends` (a name or file)
        underneath: the file's own keys replace the base's, whole (an `ablations` block too)."""
        path = name_or_path
        if not name_or_path.endswith((".yaml", ".yml")):
            path = os.path.join(root, "configs", "campaign", f"{name_or_path}.yaml")
        if not os.path.isfile(path):
            folder = os.path.join(root, "configs", "campaign")
            have = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
            raise CampaignError(f"no campaign {name_or_path!r} (looked for {path}); the campaigns are "
                                f"{', '.join(have) or 'none'}")
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        if not isinstance(doc, dict):
            raise CampaignError(f"{path}: a campaign file is a mapping of {', '.join(cls.KEYS)}")
        bad = set(doc) - set(cls.KEYS)
        if bad:
            raise CampaignError(f"{path}: " + unknown_keys_message("campaign", sorted(bad), cls.KEYS))
        base = doc.pop("extends", None)
        if base is None:
            return path, doc
        if "name" not in doc:  # else it would share the base's runs/ and reports/ folders
            raise CampaignError(f"{path}: a campaign that extends {base!r} needs a name of its own")
        if os.path.abspath(path) in seen:
            raise CampaignError(f"{path}: extends itself through {' -> '.join(seen)}")
        if not str(base).endswith((".yaml", ".yml")) or os.path.isabs(str(base)):
            ref = str(base)
        else:  # a file named relative to the extending file
            ref = os.path.join(os.path.dirname(path), str(base))
        _, under = cls._read(ref, root, (*seen, os.path.abspath(path)))
        return path, {**under, **doc}

    def check(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise CampaignError(f"{self.path}: unknown model(s) {bad}; choose from {', '.join(MODELS)}")
        if self.reference not in self.models:
            raise CampaignError(f"{self.path}: reference {self.reference!r} is not one of the models {self.models}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CampaignError(f"{self.path}: seeds must be distinct and at least one, got {self.seeds}")
        if STAGES_FIRST in self.evaluation:
            raise CampaignError(f"{self.path}: an evaluation stage may not be called {STAGES_FIRST!r}")
        for t in self.train:
            if t.split("=")[0].lstrip("+") in ("train.seed", "train.out_dir"):
                raise CampaignError(f"{self.path}: {t}: the runner sets train.seed and train.out_dir per entry")
        bad = set(self.model_overrides) - set(self.models)
        if bad:
            raise CampaignError(f"{self.path}: model_overrides names {sorted(bad)}, which are not among the models "
                                f"{self.models}")
        bad = set(self.reports) - set(self.REPORTS)
        if bad:
            raise CampaignError(f"{self.path}: " + unknown_keys_message("reports", sorted(bad), self.REPORTS))
        if any(self.reports.get(k, "") is None for k in self.REPORTS[:3]):
            raise CampaignError(f"{self.path}: only reports.writeup may be null (no write-up filled)")
        for e in self.experiments:
            model, _ = experiment_overrides(e, self.config_dir)
            if model != self.reference:
                raise CampaignError(f"{self.path}: ablation {e} varies {model}, not the reference {self.reference}")

    @property
    def config_dir(self) -> str:
        return os.path.join(self.root, "configs")

    @property
    def runs_dir(self) -> str:
        return os.path.join(self.runs_root or os.path.join(self.root, "runs"), f"campaign-{self.name}")

    @property
    def reports_dir(self) -> str:
        return os.path.join(self.reports_root or os.path.join(self.root, "reports"), self.name)

    def report_path(self, kind: str) -> str | None:
        """Where make_report writes `kind` (one of REPORTS): the campaign file's `reports:` entry
        (relative to the checkout; a null writeup: none), else docs/experiments_report.md,
        reports/ablations.md (beside reports/<name>/), docs/stage2_progress.md, docs/writeup.md."""
        if kind in self.reports:
            path = self.reports[kind]
            return None if path is None else os.path.join(self.root, path)
        if kind == "ablations":
            return os.path.join(os.path.dirname(self.reports_dir), "ablations.md")
        return os.path.join(self.root, "docs", {"experiments": "experiments_report.md", "progress": "stage2_progress.md",
                                                "writeup": "writeup.md"}[kind])

    @property
    def stages(self) -> list[str]:
        return [STAGES_FIRST, *self.evaluation]

    # --- entries ---------------------------------------------------------------------------

    def _model_args(self, model: str, fields: dict) -> tuple[str, ...]:
        # model.name too: an experiment in the shared overrides (plan_pilot) names a model of its own
        fields = {**self.model_overrides.get(model, {}), **fields}
        return (f"model={model}", f"model.name={model}") + tuple(
            f"model.overrides.{k}={hydra_value(v)}" for k, v in fields.items())

    def main_entries(self) -> list[Entry]:
        return [Entry(f"{m}-s{s}", "main", m, m, s, self._model_args(m, {}),
                      pinned=tuple(self.model_overrides.get(m, {}).items()))
                for s in self.seeds for m in self.models]

    def ablation_entry(self, experiment: str, seed: int) -> Entry:
        model, over = experiment_overrides(experiment, self.config_dir)
        pinned = {k: v for k, v in self.model_overrides.get(model, {}).items() if k not in over}
        return Entry(f"{experiment}-s{seed}", "ablation", experiment, model, seed, self._model_args(model, over),
                     tuple(over.items()), tuple(pinned.items()))

    def entries(self, final_loss: dict[str, float] | None = None) -> list[Entry]:
        """Every entry to run, in order: the main grid seed by seed, each ablation's first seeds,
        then the confirmation seeds of the ablations that need them (known once the reference's
        seeds and the ablation's first seeds have a final validation loss in `final_loss`)."""
        out = self.main_entries()
        out += [self.ablation_entry(e, s) for s in self.ablation_seeds for e in self.experiments]
        for e in self.experiments:
            if self.needs_confirmation(e, final_loss or {}):
                out += [self.ablation_entry(e, s) for s in self.confirm_seeds if s not in self.ablation_seeds]
        return out

    def needs_confirmation(self, experiment: str, final_loss: dict[str, float]) -> bool:
        ref = [final_loss.get(f"{self.reference}-s{s}") for s in self.seeds]
        own = [final_loss.get(f"{experiment}-s{s}") for s in self.ablation_seeds]
        if not self.confirm_seeds or None in ref or None in own or len(ref) < 2:
            return False
        effect = statistics.fmean(own) - statistics.fmean(ref)
        return abs(effect) <= self.confirm_sigmas * statistics.stdev(ref)

    # --- commands --------------------------------------------------------------------------

    def run_dir(self, entry: Entry) -> str:
        return os.path.join(self.runs_dir, entry.name)

    def stage_out(self, entry: Entry, stage: str) -> str:
        return os.path.join(self.run_dir(entry), "eval", stage)

    def rel(self, path: str) -> str:
        """A path as the commands name it: relative to the checkout when inside it."""
        r = os.path.relpath(path, self.root)
        return path if r.startswith("..") else r

    def train_command(self, entry: Entry) -> list[str]:
        launch = [sys.executable if a == "{python}" else a for a in self.launcher]
        return [*launch, *self.train, *entry.overrides, f"train.seed={entry.seed}",
                f"train.out_dir={self.rel(self.run_dir(entry))}"]

    def eval_command(self, entry: Entry, stage: str) -> list[str]:
        rec = " ".join(f"--override {k}={shlex.quote(hydra_value(v))}" for k, v in (*entry.pinned, *entry.model_overrides))
        text = self.evaluation[stage].format(
            python=shlex.quote(sys.executable), run=shlex.quote(self.rel(self.run_dir(entry))),
            out=shlex.quote(self.rel(self.stage_out(entry, stage))), seed=entry.seed,
            recall_model=entry.model, recall_overrides=rec)
        return shlex.split(text)

    def command(self, entry: Entry, stage: str) -> list[str]:
        return self.train_command(entry) if stage == STAGES_FIRST else self.eval_command(entry, stage)

    def parameters(self, entry: Entry) -> tuple[int, int]:
        """(total, non-embedding) parameters of the entry's model, built on the meta device from
        the config `train.py` composes for it."""
        cfg = compose_config([*self.train, *entry.overrides], config_dir=self.config_dir)
        with torch.device("meta"):
            model = build_model(cfg["model"]["name"], cfg["size"]["name"], **cfg["model"].get("overrides", {}))
        return model.num_parameters(), model.num_parameters(embedding=False)

"""The numbers of a campaign, read from its report folder (reports/<campaign>/<entry>/, the
files collect.py writes): one value per (entry, metric), each with the file and the JSON path it
came from, and their mean and standard deviation over seeds per variant.

A metric is named by where it lives: `METRICS` lists each with its file (relative to the
entry's folder; `{run}` is the entry name, since NIAH and passkey name their files after the
run folder), the path inside the file, whether higher is better, and its chance level."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from ..models.registry import size_config
from .collect import final_losses
from .spec import Campaign, Entry


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    file: str              # relative to reports/<campaign>/<entry>/
    path: tuple            # keys into the JSON object
    higher_is_better: bool
    chance: float | str | None = None  # a number, a JSON path (tuple) beside `path`, or None
    chance_path: tuple | None = None
    floor: Callable[[dict], float | None] | None = None  # a second reference level from the result file
    floor_label: str | None = None  # its name ("no-recall")
    floor_note: str | None = None  # what a model at that level does
    floor_none_above: str | None = None  # what it means that no model is above it
    # a proportion over a finite set of items (prompts, pairs, sequences): its own standard error
    # bounds its seed spread from below (three seeds of 18 prompts can agree exactly by chance)
    proportion: bool = False


def _task(stage, file, task, metric):
    return f"{stage}/{file}", ("tasks", task, "metrics", metric, "value")


def _m(key, label, stage, file, task, metric, higher=True, chance=None, chance_from_task=False, **more):
    f, p = _task(stage, file, task, metric)
    return Metric(key, label, f, p, higher, chance, ("tasks", task, "chance") if chance_from_task else None, **more)


def _no_recall_level(doc) -> float | None:
    """MQAR's level without recall: a model that answers with one of the sequence's N values at
    random scores 1/N, so over the scored cells (equally weighted in the mean accuracy) it scores
    the mean of 1/N. Models sit on it before they learn to recall (bench/RESULTS.md 11.4)."""
    cells = _dig(doc, ("tasks", "mqar", "extra", "settings", "cells"))
    return sum(1 / n for n, _ in cells) / len(cells) if cells else None


# MQAR's chance and its no-recall level, the same with and without memorisation
_RECALL = dict(chance_from_task=True, floor=_no_recall_level, floor_label="no-recall",
               floor_note="a model that answers with one of the sequence's N values at random, without recalling "
                          "which, scores 1/N; mean over the cells",
               floor_none_above="none recalls at this training budget", proportion=True)

UNIFORM = "uniform"  # chance of a loss: ln(vocabulary), the loss of the uniform distribution

METRICS = [
    Metric("val_loss", "validation loss (nats/token, final)", "train.json", ("final_val_loss",), False, UNIFORM),
    _m("ppl_loss", "long-document loss (nats/token)", "perplexity", "perplexity.json", "*", "loss", False, UNIFORM),
    _m("bpb", "bits per byte", "perplexity", "perplexity.json", "*", "bits_per_byte", False),
    _m("bpb_mem", "bits per byte, memorising", "perplexity", "perplexity_memorize.json", "*", "bits_per_byte", False),
    _m("blimp", "BLiMP accuracy", "zeroshot", "zeroshot.json", "blimp", "acc", chance_from_task=True, proportion=True),
    _m("niah_single", "NIAH single, rank-1", "niah", "niah_{run}.json", "single", "rank1", chance_from_task=True, proportion=True),
    _m("niah_single_mem", "NIAH single, rank-1, memorising", "niah", "niah_{run}_memorize.json", "single", "rank1",
       chance_from_task=True, proportion=True),
    _m("niah_multikey", "NIAH multikey, rank-1", "niah", "niah_{run}.json", "multikey", "rank1",
       chance_from_task=True, proportion=True),
    _m("niah_exact", "NIAH single, exact answer", "niah", "niah_{run}.json", "single", "exact", chance=0.0, proportion=True),
    _m("passkey", "passkey, rank-1", "passkey", "passkey_{run}.json", "single", "rank1",
       chance_from_task=True, proportion=True),
    _m("passkey_mem", "passkey, rank-1, memorising", "passkey", "passkey_{run}_memorize.json", "single", "rank1",
       chance_from_task=True, proportion=True),
    _m("cl_acc", "continual ACC (mean -loss after the last era)", "continual", "continual.json", "sotu_eras", "ACC"),
    _m("cl_bwt", "continual BWT (backward transfer)", "continual", "continual.json", "sotu_eras", "BWT"),
    _m("cl_fwt", "continual FWT (forward transfer)", "continual", "continual.json", "sotu_eras", "FWT"),
    _m("cl_acc_mem", "continual ACC, memorising", "continual", "continual_memorize.json", "sotu_eras", "ACC"),
    _m("recall", "MQAR accuracy", "recall", "recall_{model}.json", "mqar", "acc", **_RECALL),
    _m("recall_mem", "MQAR accuracy, memorising", "recall", "recall_{model}_memorize.json", "mqar", "acc",
       **_RECALL),
]
BY_KEY = {m.key: m for m in METRICS}


def _dig(obj, path):
    """obj[path[0]][path[1]]...; a "*" takes the first key (the only task of a perplexity file)."""
    for k in path:
        if not isinstance(obj, dict) or not obj or (k != "*" and k not in obj):
            return None
        obj = obj[next(iter(obj))] if k == "*" else obj[k]
    return obj


def _file_values(doc) -> tuple:
    """(task, metric, value, stderr) of every metric of every task of a result file, sorted; a
    file without tasks (train.json): the whole file."""
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(tasks, dict):
        return (json.dumps(doc, sort_keys=True, default=str),) if doc is not None else ()
    return tuple(sorted((t, m, x.get("value"), x.get("stderr")) for t, tv in tasks.items()
                        for m, x in (tv.get("metrics") or {}).items() if isinstance(x, dict)))


@dataclass
class Value:
    value: float
    source: str   # "<reports>/<entry>/zeroshot/zeroshot.json: tasks.blimp.metrics.acc.value"
    chance: float | None
    floor: float | None = None
    stderr: float | None = None  # the evaluation's own standard error of this value, where it states one
    file_values: tuple = ()  # every (task, metric, value, stderr) of its result file (_file_values)


class CampaignResults:
    """Every finished value of a campaign's entries, by entry name and metric key."""

    def __init__(self, campaign: Campaign, rel=None):
        self.c = campaign
        self.rel = rel or campaign.rel
        self.entries = campaign.entries(final_losses(campaign.reports_dir))
        self.values: dict[str, dict[str, Value]] = {e.name: self._read(e) for e in self.entries}
        self.jsons: dict[str, dict] = {}

    def folder(self, entry: Entry) -> str:
        return os.path.join(self.c.reports_dir, entry.name)

    @staticmethod
    def load(path: str):
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def file(self, entry: Entry, metric: Metric) -> str:
        return os.path.join(self.folder(entry), metric.file.format(run=entry.name, model=entry.model))

    def _read(self, entry: Entry) -> dict[str, Value]:
        out = {}
        for m in METRICS:
            path = self.file(entry, m)
            doc = self.load(path)
            v = _dig(doc, m.path)
            if v is None:
                continue
            chance = _dig(doc, m.chance_path) if m.chance_path else m.chance
            if chance == UNIFORM:
                chance = self.uniform_loss(entry)
            se = _dig(doc, (*m.path[:-1], "stderr"))
            out[m.key] = Value(float(v), f"{self.rel(path)}: {'.'.join(m.path)}", chance,
                               m.floor(doc) if m.floor else None, None if se is None else float(se),
                               _file_values(doc))
        return out

    def uniform_loss(self, entry: Entry) -> float | None:
        """ln(vocabulary) of the entry's model: the loss of a model that knows nothing."""
        doc = self.load(os.path.join(self.folder(entry), "train.json"))
        if not doc:
            return None
        return math.log(size_config(doc["model"], doc["size"])["vocab_size"])

    def json(self, entry: Entry, rel_file: str):
        return self.load(os.path.join(self.folder(entry), rel_file.format(run=entry.name, model=entry.model)))

    def done(self, entry: Entry) -> bool:
        log = self.load(os.path.join(self.folder(entry), "stages.json")) or {"done": {}}
        return all(s in log["done"] for s in self.c.stages)

    def variants(self, group: str) -> list[str]:
        seen = []
        for e in self.entries:
            if e.group == group and e.variant not in seen:
                seen.append(e.variant)
        return seen

    def of_variant(self, variant: str) -> list[Entry]:
        return [e for e in self.entries if e.variant == variant]

    def seeds(self, variant: str, key: str) -> list[tuple[Entry, Value]]:
        return [(e, self.values[e.name][key]) for e in self.of_variant(variant) if key in self.values[e.name]]

    def stat(self, variant: str, key: str) -> tuple[float | None, float | None, int]:
        vals = [v.value for _, v in self.seeds(variant, key)]
        if not vals:
            return None, None, 0
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)

    def identical(self, variant: str, other: str, key: str) -> bool:
        """Every seed of `variant` has a result file whose every number equals `other`'s of the
        same seed (at least one seed in common; all the file's tasks and metrics, so that two
        models agreeing on one proportion of a few prompts by chance do not count): the
        evaluation does not see what tells the two apart."""
        mine = {e.seed: v.file_values for e, v in self.seeds(variant, key)}
        theirs = {e.seed: v.file_values for e, v in self.seeds(other, key)}
        common = set(mine) & set(theirs)
        return bool(common) and all(mine[s] == theirs[s] for s in common)

    def spread(self, variant: str, key: str) -> float | None:
        """How far `variant`'s value moves by chance: its seeds' standard deviation, and for a
        proportion (BY_KEY[key].proportion) at least its evaluation's own standard error (the
        root mean square over the seeds). None with one seed and no standard error."""
        sd = self.stat(variant, key)[1]
        errs = [v.stderr for _, v in self.seeds(variant, key) if v.stderr is not None]
        if not BY_KEY[key].proportion or not errs:
            return sd
        se = math.sqrt(statistics.fmean(e * e for e in errs))
        return se if sd is None else max(sd, se)

    def chance(self, key: str) -> float | None:
        for vals in self.values.values():
            if key in vals and vals[key].chance is not None:
                return vals[key].chance
        return None

    def floor(self, key: str) -> float | None:
        """The metric's second reference level (MQAR: without recall), when every entry that has
        the metric states the same one; None otherwise."""
        levels = {round(vals[key].floor, 12) for vals in self.values.values()
                  if key in vals and vals[key].floor is not None}
        return levels.pop() if len(levels) == 1 else None

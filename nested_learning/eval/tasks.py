"""The tasks of the zero-shot pack: BLiMP (shipped with the package, `blimp.py`), and
multiple-choice tasks in one local JSONL format, among them nine BIG-bench tasks converted into
it from the `bigbench` 1.0.0 sdist where a copy of that sdist is at hand (PyPI no longer serves
that version; a converted copy is cached).

The format: one item per line,

    {"id": "social_iqa/17", "context": "Q: ... \\nA:", "choices": [" Go home", " Stay"], "gold": 1}

`context` is scored never; each choice is a continuation of it (leading white space kept);
`gold` is the index of the right choice, or a list of indices where several are right. Any
file in this format is a task (`--tasks path/to/file.jsonl`); its name is the file's stem."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass

from ..data.sources import download_sdist
from . import blimp

BIGBENCH = ("bigbench", "1.0.0")
# name -> (folder under bigbench/benchmark_tasks, what it probes)
BIGBENCH_TASKS = {
    "social_iqa": ("social_iqa", "social reasoning: motivations and reactions of people"),
    "physical_intuition": ("physical_intuition", "physical reasoning: everyday physics"),
    "strategyqa": ("strategyqa", "commonsense multi-step yes/no questions"),
    "winowhy": ("winowhy", "coreference: is the reason given for a Winograd resolution right"),
    "causal_judgment": ("causal_judgment", "causal reasoning as a typical person judges it"),
    "date_understanding": ("date_understanding", "temporal commonsense: dates from descriptions"),
    "logical_deduction_3": ("logical_deduction/three_objects", "deduction: the order of three objects"),
    "goal_inference": ("goal_step_wikihow/goal_inference", "procedural commonsense: the goal of a step"),
    "step_inference": ("goal_step_wikihow/step_inference", "procedural commonsense: a step of a goal"),
}


@dataclass
class Item:
    id: str
    context: str
    choices: list[str]
    gold: list[int]


def read_jsonl(path: str) -> list[Item]:
    """Items of a task file, each line checked (a bad line is an error naming it)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from err
            for key in ("context", "choices", "gold"):
                if key not in rec:
                    raise ValueError(f"{where}: missing field {key!r} (need context, choices, gold)")
            choices = rec["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise ValueError(f"{where}: choices must be a list of at least two non-empty strings")
            gold = rec["gold"] if isinstance(rec["gold"], list) else [rec["gold"]]
            if not gold or not all(isinstance(g, int) and 0 <= g < len(choices) for g in gold):
                raise ValueError(f"{where}: gold must be an index (or list of indices) into choices, got {rec['gold']!r}")
            if not isinstance(rec["context"], str):
                raise ValueError(f"{where}: context must be a string")
            items.append(Item(str(rec.get("id", f"{os.path.basename(path)}/{n}")), rec["context"], choices, gold))
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def write_jsonl(items: list[Item], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "context": it.context, "choices": it.choices,
                                "gold": it.gold if len(it.gold) > 1 else it.gold[0]}) + "\n")
    os.replace(tmp, path)


def convert_bigbench(task: dict, name: str) -> list[Item]:
    """A BIG-bench JSON task as items: context = task_prefix + example_input_prefix + input +
    example_output_prefix (BIG-bench's defaults "\\nQ: " and "\\nA: "; leading white space
    dropped), choices = the keys of target_scores, gold = those of the highest positive score.
    The choices are scored as continuations and never listed in the context (zero-shot
    log-likelihood scoring, as lm-evaluation-harness scores BIG-bench). Examples without
    target_scores (generative ones) are skipped."""
    prefix = task.get("task_prefix", "")
    q, a = task.get("example_input_prefix", "\nQ: "), task.get("example_output_prefix", "\nA: ")
    items = []
    for i, ex in enumerate(task.get("examples", [])):
        scores = ex.get("target_scores")
        if not scores or len(scores) < 2:
            continue
        best = max(scores.values())
        if best <= 0:
            continue
        choices = list(scores)
        items.append(Item(f"{name}/{i}", (prefix + q + ex["input"]).lstrip() + a, choices,
                          [j for j, c in enumerate(choices) if scores[c] == best]))
    return items


def bigbench_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "bigbench-" + BIGBENCH[1])


def bigbench_sdist_path(data_dir: str) -> str:
    """Where a local copy of the sdist is looked for when none is named: DATA/bigbench-1.0.0.tar.gz."""
    return os.path.join(data_dir, f"{BIGBENCH[0]}-{BIGBENCH[1]}.tar.gz")


def bigbench_cached(data_dir: str) -> bool:
    return all(os.path.exists(os.path.join(bigbench_dir(data_dir), f"{n}.jsonl")) for n in BIGBENCH_TASKS)


def prepare_bigbench(data_dir: str, log=print, sdist: str | None = None) -> dict[str, str]:
    """{task name: JSONL path} of every BIGBENCH_TASKS task, converted once from the sdist and
    cached under data_dir. The sdist is `sdist`, else DATA/bigbench-1.0.0.tar.gz, else a pip
    download (which fails where the registry no longer serves 1.0.0, saying what to do)."""
    root = bigbench_dir(data_dir)
    paths = {n: os.path.join(root, f"{n}.jsonl") for n in BIGBENCH_TASKS}
    if bigbench_cached(data_dir):
        return paths
    if sdist is None and os.path.exists(bigbench_sdist_path(data_dir)):
        sdist = bigbench_sdist_path(data_dir)
    if sdist is not None and not os.path.isfile(sdist):
        raise SystemExit(f"--bigbench-sdist {sdist}: no such file")
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        if sdist is None:
            log(f"zero-shot pack: downloading the {BIGBENCH[0]}=={BIGBENCH[1]} sdist once (about 360 MB) ...")
            sdist = download_sdist(*BIGBENCH, tmp, (
                f"The package registry may no longer serve {BIGBENCH[0]} {BIGBENCH[1]}: pass a local copy of its sdist "
                f"with --bigbench-sdist PATH (or put it at {bigbench_sdist_path(data_dir)}), or local task files "
                "with --tasks path.jsonl. BLiMP (--tasks blimp) needs no download."))
        wanted = {f"bigbench/benchmark_tasks/{folder}/task.json": n for n, (folder, _) in BIGBENCH_TASKS.items()}
        found = {}
        with tarfile.open(sdist) as tar:
            for m in tar:
                rel = m.name.split("/", 1)[-1]
                if rel in wanted and m.isfile():
                    with tar.extractfile(m) as f:
                        found[wanted[rel]] = json.load(f)
        missing = sorted(set(BIGBENCH_TASKS) - set(found))
        if missing:
            raise RuntimeError(f"{sdist} lacks the tasks {missing}")
        for n, task in found.items():
            write_jsonl(convert_bigbench(task, n), paths[n])
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"zero-shot pack: {len(paths)} BIG-bench tasks cached in {root}")
    return paths


def resolve_tasks(spec: str, data_dir: str, log=print, bigbench_sdist: str | None = None) -> dict[str, str]:
    """{name: path} for --tasks, comma-separated parts:

    - "all": BLiMP, plus the nine BIG-bench tasks when they are at hand offline (converted in
      DATA/bigbench-1.0.0/, or an sdist named by bigbench_sdist or at DATA/bigbench-1.0.0.tar.gz);
      otherwise one line says they were skipped, and nothing is downloaded;
    - "blimp": BLiMP (its path is `blimp.ARCHIVE`, the shipped archive);
    - "bigbench", or names of its tasks: the BIG-bench tasks (a pip download is tried when no
      copy is at hand);
    - paths of local JSONL task files."""
    out: dict[str, str] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in ("all", "blimp"):
            out["blimp"] = blimp.ARCHIVE
            if part == "blimp":
                continue
            if bigbench_cached(data_dir) or bigbench_sdist or os.path.exists(bigbench_sdist_path(data_dir)):
                out.update(prepare_bigbench(data_dir, log, bigbench_sdist))
            else:
                log(f"zero-shot pack: BIG-bench tasks skipped (no converted copy in {bigbench_dir(data_dir)} and no "
                    f"{BIGBENCH[0]}-{BIGBENCH[1]} sdist at {bigbench_sdist_path(data_dir)} or --bigbench-sdist)")
        elif part == "bigbench" or part in BIGBENCH_TASKS:
            pack = prepare_bigbench(data_dir, log, bigbench_sdist)
            out.update(pack if part == "bigbench" else {part: pack[part]})
        elif os.path.exists(part):
            out[os.path.splitext(os.path.basename(part))[0]] = part
        else:
            raise SystemExit(f"unknown task {part!r}: not a file, and not one of all, blimp, bigbench, "
                             f"{', '.join(BIGBENCH_TASKS)}")
    if not out:
        raise SystemExit("--tasks names no task")
    return out

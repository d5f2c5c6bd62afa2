"""The paper's standard pack through lm-evaluation-harness (needs the [eval] extra, and a
network the first time each task's dataset is fetched from its hub).

    python scripts/eval/lm_eval.py --run runs/hope-smoke --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,siqa,boolq,lambada_openai,wikitext --out DIR
    python scripts/eval/lm_eval.py --run RUN --tasks my_task --include-path my_task_yamls/ --out DIR   # local task files

Writes DIR/lm_eval.json (lm-eval's own results, with the run recorded) and, with --memorize,
DIR/lm_eval_memorize.json (every context memorised before it is scored)."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import sys

from nested_learning.cli._common import command
from nested_learning.eval import results as R

STANDARD = "piqa,hellaswag,winogrande,arc_easy,arc_challenge,siqa,boolq,lambada_openai,wikitext"


def to_blocks(res: dict) -> dict:
    """lm-eval's results as task blocks of the result schema (value and stderr per metric)."""
    blocks = {}
    for task, metrics in res["results"].items():
        out = {}
        for key, v in metrics.items():
            if "_stderr" in key or not isinstance(v, (int, float)) or key == "alias":
                continue
            name, _, filt = key.partition(",")
            se = metrics.get(f"{name}_stderr,{filt}")
            out[name if filt in ("", "none") else key] = {"value": float(v),
                                                          "stderr": se if isinstance(se, (int, float)) else None}
        n = res.get("n-samples", {}).get(task, {})
        blocks[task] = {"metrics": out, "n_items": n.get("effective"), "chance": None,
                        "extra": {"lm_eval_config": res.get("configs", {}).get(task)}}
    return blocks


def import_harness():
    """`import lm_eval` (lm-evaluation-harness). Run as `python scripts/eval/lm_eval.py`, the
    script's own folder is first on sys.path and its lm_eval.py would be imported in place of the
    harness: the harness is then looked up on the rest of sys.path (which is left as it is)."""
    shadow = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    loaded = sys.modules.get("lm_eval")
    if loaded is not None and hasattr(loaded, "simple_evaluate"):
        return loaded
    if shadow is None or not os.path.exists(os.path.join(shadow, "lm_eval.py")):
        import lm_eval

        return lm_eval
    spec = importlib.machinery.PathFinder.find_spec(
        "lm_eval", [p for p in sys.path if os.path.abspath(p or ".") != shadow])
    if spec is None:
        raise ImportError("No module named 'lm_eval'")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_eval"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(ap)
    ap.add_argument("--tasks", default=STANDARD)
    ap.add_argument("--include-path", default=None, help="a folder of lm-eval task YAML files")
    ap.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args(argv)
    R.memorize_settings(a)
    try:
        lm_eval = import_harness()
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise SystemExit("lm-evaluation-harness is not installed: pip install -e '.[eval]'") from err
    from nested_learning.eval.lm_eval_adapter import NestedLearningLM

    lm = NestedLearningLM(a.run, a.step, a.device, a.batch_size)
    manager = TaskManager(include_path=a.include_path) if a.include_path else None

    def evaluate(setting, reports):
        lm.memorize, lm.reports = setting, reports
        res = lm_eval.simple_evaluate(model=lm, tasks=a.tasks.split(","), limit=a.limit, task_manager=manager,
                                      random_seed=a.seed, numpy_random_seed=a.seed, torch_random_seed=a.seed)
        return to_blocks(res)

    out = R.baseline_and_memorised("lm_eval", lm.model, a, evaluate)
    for label, res in out.items():
        for task, block in res["tasks"].items():
            print(label, task, {m: round(v["value"], 4) for m, v in block["metrics"].items()})
    return out


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()

"""Markdown tables from evaluation result files (schema nested_learning.eval/1): first every
headline metric with the runs side by side, then per file the zero-shot pack (multiple-choice
tasks; BLiMP per phenomenon, field and paradigm beside the authors' models), perplexity with its
loss by position, retrieval (NIAH, passkey) by length, continual-learning matrices with their
transfer metrics, and any other evaluation's metrics (recall, lm-eval, ...). JSON files that are
not result files are listed at the end, so nothing is left out silently.

    python scripts/eval/report.py results/smoke                 # every result file below the folder
    python scripts/eval/report.py results/smoke --out results/smoke/REPORT.md

Every number is read from the files; nothing is recomputed but means over the listed rows."""

from __future__ import annotations

import argparse
import json
import os
import sys

from nested_learning.cli._common import command
from nested_learning.eval.blimp import table_lines as blimp_table_lines

SCHEMA = "nested_learning.eval/1"


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def zeroshot_tables(res: dict, path: str) -> list[str]:
    run = res["run"] or {}
    memorised = res["evaluation"].endswith("_memorize")
    out = [f"**{res['evaluation']}**: {run.get('model')} {run.get('size')} step {run.get('step')} "
           f"(`{os.path.relpath(path)}`)", "",
           "| task | items | chance | acc ± se | acc_norm ± se |" + (" Δ acc vs baseline |" if memorised else ""),
           "|---|---:|---:|---|---|" + ("---:|" if memorised else "")]

    def ms(m):
        return "-" if m is None or m["value"] is None else f"{m['value']:.3f} ± {_f(m['stderr'])}"

    for name, block in res["tasks"].items():
        m = block["metrics"]
        row = (f"| {name} | {block['n_items']} | {_f(block['chance'])} | {ms(m.get('acc'))} | "
               f"{ms(m.get('acc_norm'))} |")
        if memorised:
            row += f" {_f(block.get('baseline_delta', {}).get('acc'), 4)} |"
        out.append(row)
    out.append("")
    for block in res["tasks"].values():
        if "terms" in (block.get("extra") or {}):
            note = block["extra"].get("memorize")
            out += blimp_table_lines(block, paradigms=True) + ([f"\n{note}"] if note else []) + [""]
    return out


def retrieval_tables(res: dict, path: str) -> list[str]:
    run = res["run"]
    out = []
    for variant, block in res["tasks"].items():
        ex = block["extra"]
        out += [f"**{res['evaluation']}, {variant}**: {run['model']} {run['size']} step {run['step']} "
                f"(`{os.path.relpath(path)}`); haystack {ex['haystack']} ({ex['haystack_tokens']:,} tokens); "
                f"{ex['samples_per_cell']} sample(s) x depths {', '.join(f'{d:g}' for d in ex['depths'])}; "
                f"rank1 chance {block['chance']:.3f}", "",
                "| length | prompts | exact | found | rank1 ± se | mean rank | prompt tok/s | note |",
                "|---|---:|---:|---:|---|---:|---:|---|"]
        for e in ex["by_length"]:
            if e["status"] != "run":
                out.append(f"| {e['name']} | - | - | - | - | - | - | not run: {e['reason']} |")
                continue
            note = [f"attention windowed to {e['attended_keys']} keys"] if e["windowed"] else []
            if e.get("non_finite"):
                note.append(f"{e['non_finite']} prompts drove the state non-finite (scored wrong)")
            out.append(f"| {e['name']} | {e['items']} | {_f(e['exact'])} | {_f(e.get('found'))} | "
                       f"{_f(e['rank1'])} ± {_f(e['rank1_stderr'])} | {e['mean_rank']:.2f} | "
                       f"{e['prompt_tokens_per_s']:,.0f} | {'; '.join(note)} |")
        out.append("")
    return out


def _label(res: dict, path: str) -> str:
    run = res.get("run") or {}
    where = run.get("run_dir") or run.get("checkpoint") or os.path.dirname(path)
    return f"{os.path.basename(os.path.normpath(where))} (step {run.get('step', '?')})"


def _metric(m) -> str:
    if not isinstance(m, dict) or m.get("value") is None:
        return "-"
    return f"{m['value']:.4g}" + (f" ± {m['stderr']:.2g}" if m.get("stderr") is not None else "")


def side_by_side(results: list[tuple[str, dict]]) -> list[str]:
    """One row per (evaluation, task, metric), one column per run: the headline numbers together."""
    runs = sorted({_label(res, path) for path, res in results})
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for path, res in results:
        for task, block in res["tasks"].items():
            for metric, m in (block.get("metrics") or {}).items():
                cells.setdefault((res["evaluation"], task, metric), {})[_label(res, path)] = _metric(m)
    out = ["## All results, runs side by side", "", "| evaluation | task | metric | " + " | ".join(runs) + " |",
           "|---|---|---|" + "---:|" * len(runs)]
    for (ev, task, metric), row in sorted(cells.items()):
        out.append(f"| {ev} | {task} | {metric} | " + " | ".join(row.get(r, "") for r in runs) + " |")
    return out + [""]


def perplexity_tables(res: dict, path: str) -> list[str]:
    run = res["run"] or {}
    out = []
    for name, block in res["tasks"].items():
        m, ex = block["metrics"], block["extra"]
        out += [f"**{res['evaluation']}** ({name}): {run.get('model')} {run.get('size')} step {run.get('step')} "
                f"(`{os.path.relpath(path)}`); {block['n_items']} documents, {ex['tokens']:,} tokens, segment "
                f"{ex['segment']}; uniform loss {ex['uniform_loss']:.3f}", "",
                f"perplexity {_metric(m['perplexity'])} | loss {_metric(m['loss'])} | bits/byte "
                f"{_metric(m['bits_per_byte'])}", "", "| position | tokens | documents | loss ± se |",
                "|---|---:|---:|---|"]
        for r in ex["loss_by_position"]:
            out.append(f"| {r['bucket']} | {r['tokens']:,} | {r['documents']} | {r['loss']:.4f} ± {_f(r['stderr'], 4)} |")
        out.append("")
    return out


def other_tables(res: dict, path: str) -> list[str]:
    """Any other evaluation: each task's metrics as reported."""
    run = res.get("run") or {}
    out = [f"**{res['evaluation']}**: {run.get('model')} {run.get('size')} step {run.get('step')} "
           f"(`{os.path.relpath(path)}`)", "", "| task | items | metric | value ± se |", "|---|---:|---|---|"]
    for task, block in res["tasks"].items():
        for metric, m in (block.get("metrics") or {}).items():
            out.append(f"| {task} | {block.get('n_items', '-')} | {metric} | {_metric(m)} |")
    return out + [""]


def continual_tables(res: dict, path: str) -> list[str]:
    run = res["run"]
    out = []
    for name, block in res["tasks"].items():
        ex, m = block["extra"], block["metrics"]
        acc = m["ACC"]
        out += [f"**{res['evaluation']}** ({name}): {run['model']} {run['size']} from {ex.get('start', '?')}, "
                f"{ex['steps_per_segment']} steps x {ex['batch_size']} x {ex['seq_len']} tokens per segment "
                f"(`{os.path.relpath(path)}`); held-out documents {ex['held_out_documents']}, scored tokens "
                f"{ex['scored_tokens']} after a {ex['context_prefix']}-token prefix"
                + (", memorised" if ex.get("memorised_prefix") else ""), "",
                f"ACC {_f(acc['value'], 4)} ± {_f(acc['stderr'], 4)} | BWT {_f(m['BWT']['value'], 4)} | "
                f"FWT {_f(m['FWT']['value'], 4)} | forgetting {_f(m['forgetting']['value'], 4)} "
                "(scores are negative losses: higher is better)", "",
                "| held-out loss ± se | " + " | ".join(ex["segments"]) + " |",
                "|---|" + "---:|" * len(ex["segments"])]
        se = ex.get("loss_stderr") or [[None] * len(ex["segments"])] * len(ex["rows"])
        for row, losses, ses in zip(ex["rows"], ex["loss_matrix"], se):
            out.append(f"| {row} | " + " | ".join("NaN" if x is None else f"{x:.3f}" + (f" ± {s:.3f}" if s else "")
                                                for x, s in zip(losses, ses)) + " |")
        skipped = [(s["segment"], s["skipped_steps"], s.get("diverged_at_step")) for s in ex["stages"]
                   if s["skipped_steps"]]
        if skipped:
            out.append(f"\nskipped training steps (segment, steps, diverged at): {skipped}")
        out.append("")
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--out", default=None, help="write the report here (default: print it)")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.folder):
        raise FileNotFoundError(f"{a.folder} is not a folder of result files")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(a.folder) for f in fs if f.endswith(".json"))
    results, not_results = [], []
    for path in files:
        with open(path) as fh:
            try:
                res = json.load(fh)
            except json.JSONDecodeError as err:
                not_results.append((path, f"not JSON ({err.msg})"))
                continue
        if not isinstance(res, dict) or res.get("schema") != SCHEMA:
            not_results.append((path, f"not a result file (schema {res.get('schema') if isinstance(res, dict) else None!r})"))
            continue
        results.append((path, res))
    if not results:
        raise FileNotFoundError(f"no result files (schema {SCHEMA}) under {a.folder}")
    tables = {"zeroshot": zeroshot_tables, "niah": retrieval_tables, "passkey": retrieval_tables,
              "continual": continual_tables, "perplexity": perplexity_tables}
    lines = side_by_side(results) + ["## Each result file", ""]
    for path, res in results:
        lines += tables.get(res["evaluation"].split("_")[0], other_tables)(res, path)
    if not_results:
        lines += ["JSON files under the folder that are not result files (left out):", ""]
        lines += [f"- `{os.path.relpath(p)}`: {why}" for p, why in not_results] + [""]
    text = "\n".join(lines)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return text


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()

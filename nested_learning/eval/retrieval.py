"""The length x depth grid of a retrieval task (NIAH, passkey) for one model: which lengths
run, the scores by length and depth, and the plots. A length that a model cannot run (the
prompt cannot hold the needles, full attention past --max-kv-gib, the time budget) is a
"not run" entry with its reason, never a zero."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..data.sources import read_local
from ..models.streaming import stream_segment
from ..runs.load import held_out_documents, load_run
from . import results as R
from .needle import (
    PASSKEY_FILLER,
    VARIANTS,
    Haystack,
    NeedleTask,
    length_name,
    parse_depths,
    parse_lengths,
    score_item,
)
from .plots import finish, pyplot
from .results import load_partial, mean_stderr, save_partial


def evaluate_grid(task: NeedleTask, model, variant: str, lengths: list[int], depths: list[float], samples: int,
                  segment: int, window: int | None, max_kv_gib: float, time_budget: float | None, seed: int,
                  memorize=None, reports=None, progress=None, partial: str | None = None,
                  key: dict | None = None) -> dict:
    """The task block of one variant: metrics over every item run, by length (with "not run"
    entries), the depth x length grid, and per-item records. partial: a file that keeps each
    scored prompt's record (rewritten atomically after each), so a killed run resumes without
    scoring them again; used only when its key (the caller's `key`, e.g. the checkpoint, and the
    task's settings) matches, and removed when the grid is complete."""
    key = {**(key or {}), "variant": variant, "segment": segment, "window": window, "haystack": task.haystack.name,
           "digits": task.digits, "distractors": task.k, "memorize": None if memorize is None else memorize.as_dict()}
    done = (load_partial(partial, key) or {}).get("items", {})  # prompts a killed run already scored
    if done:
        print(f"resuming from {partial}: {len(done)} prompts already scored", file=sys.stderr)
    records, by_length, spent = [], [], 0.0
    rate = None  # measured prompt tokens per second
    attn = model.has_attention()
    with model.attention_window(window):
        keys = model.attended_keys()  # None: unbounded (or no attention)
    for L in sorted(lengths):
        entry = {"length": L, "name": length_name(L), "status": "run",
                 "windowed": bool(attn and keys is not None and L > keys),
                 "attended_keys": (min(L, keys) if keys else L) if attn else None}
        todo = len(depths) * samples
        reason = None
        rows = 2 + task.k + task.n  # the prompt's state and its copies for the candidate values
        need = model.kv_bytes(min(L, keys) if keys else L, rows)
        if attn and need > max_kv_gib * 2**30:
            reason = (f"attention over {min(L, keys) if keys else L} keys needs {need / 2**30:.1f} GiB of KV cache "
                      f"({rows} copies of the state while scoring) > --max-kv-gib {max_kv_gib}: "
                      "pass a smaller --attention-window")
        elif time_budget is not None and rate is not None and spent + todo * L / rate > time_budget:
            reason = (f"estimated {todo * L / rate:.0f} s for {todo} prompts at the measured {rate:.0f} tokens/s "
                      f"exceeds what is left of --time-budget {time_budget:.0f} s ({time_budget - spent:.0f} s)")
        if reason is None:
            try:
                items = [task.item(variant, L, d, seed + s) for d in depths for s in range(samples)]
            except ValueError as err:
                reason = str(err)
        if reason is not None:
            entry.update(status="not run", reason=reason)
            by_length.append(entry)
            if progress is not None:
                progress.update(todo)
            continue
        recs = []
        with model.attention_window(window):
            for k, it in enumerate(items):
                name = f"{L}|{it.depth}|{k}"
                if name not in done:  # a record kept by an earlier, killed run is not scored again
                    t0 = time.perf_counter()
                    done[name] = {**score_item(task, model, it, segment, memorize=memorize, reports=reports),
                                  "seconds": time.perf_counter() - t0}
                    save_partial(partial, key, {"items": done})
                recs.append(done[name])
                if progress is not None:
                    progress.update(1)
        dt = sum(r["seconds"] for r in recs)
        spent += dt
        rate = sum(r["prompt_tokens"] for r in recs) / dt
        ex, ex_se = mean_stderr([float(r["exact"]) for r in recs])
        r1, r1_se = mean_stderr([r["rank1"] for r in recs])
        entry.update(items=len(recs), exact=ex, exact_stderr=ex_se, rank1=r1, rank1_stderr=r1_se,
                     found=mean_stderr([r["found"] for r in recs])[0],
                     mean_rank=sum(sum(r["ranks"]) / len(r["ranks"]) for r in recs) / len(recs),
                     seconds=dt, prompt_tokens_per_s=rate, non_finite=sum("non_finite" in r for r in recs),
                     by_depth={str(d): {"exact": mean_stderr([float(r["exact"]) for r in recs if r["depth"] == d])[0],
                                        "rank1": mean_stderr([r["rank1"] for r in recs if r["depth"] == d])[0]}
                               for d in depths})
        by_length.append(entry)
        records += [{**r, "windowed": entry["windowed"]} for r in recs]
    if partial is not None and os.path.exists(partial):
        os.remove(partial)
    ex, ex_se = mean_stderr([float(r["exact"]) for r in records])
    r1, r1_se = mean_stderr([r["rank1"] for r in records])
    fd, fd_se = mean_stderr([r["found"] for r in records])
    n_values = max((len(r["expected"]) for r in records), default=1)
    n_distract = task.k + (task.n - 1 if variant == "multikey" else 0)
    return {"metrics": {"exact": {"value": ex if records else None, "stderr": ex_se},
                        "found": {"value": fd if records else None, "stderr": fd_se},
                        "rank1": {"value": r1 if records else None, "stderr": r1_se}},
            "n_items": len(records), "chance": 1.0 / (n_distract + 1),
            "extra": {"chance_note": f"chance of rank1 (a value's log-likelihood above all {n_distract} distractors"
                                     f"{', the other keys values among them' if variant == 'multikey' else ''}): "
                                     f"1/{n_distract + 1}; of exact by guessing: about (1/{9 * 10 ** (task.digits - 1)})"
                                     f"^{n_values}",
                      "variant": variant, "depths": depths, "samples_per_cell": samples, "segment": segment,
                      "attention_window": window, "haystack": task.haystack.name,
                      "haystack_tokens": task.haystack.tokens, "distractors": task.k, "digits": task.digits,
                      "by_length": by_length},
            "records": records}


def plot_heatmap(block: dict, path: str, title: str) -> str:
    """Depth (rows) x length (columns) accuracy, exact match and rank1 side by side; grey
    columns are lengths not run."""
    import numpy as np

    plt = pyplot()
    ex = block["extra"]
    lengths, depths = ex["by_length"], ex["depths"]
    w = max(2.6, 0.9 + 0.5 * len(lengths))
    fig, axes = plt.subplots(1, 2, figsize=(2 * w + 1.2, 2.0 + 0.28 * len(depths)), dpi=120, layout="constrained")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#cccccc")
    for ax, metric in zip(axes, ("exact", "rank1")):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, e in enumerate(lengths):
            for i, d in enumerate(depths):
                if e["status"] == "run":
                    grid[i, j] = e["by_depth"][str(d)][metric]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto")
        for i in range(len(depths)):  # each cell carries its number (an empty cell: not run)
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="black" if grid[i, j] > 0.6 else "white")
        ax.set_xticks(range(len(lengths)), [e["name"] + ("" if e["status"] == "run" else "\nnot run")
                                            for e in lengths], fontsize=6)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=6)
        ax.set_xlabel("prompt length (tokens)", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
        ax.set_title({"exact": "exact match (greedy)", "rank1": f"rank1 (chance {block['chance']:.2f})"}[metric],
                     fontsize=7)
    fig.colorbar(im, ax=list(axes), label="accuracy")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_vs_length(blocks: dict[str, dict], path: str, title: str, chance: float | None = None) -> str:
    """Accuracy (exact, solid; rank1, dashed) against length, one line per labelled block."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for label, block in blocks.items():
        rows = [e for e in block["extra"]["by_length"] if e["status"] == "run"]
        xs = [e["length"] for e in rows]
        line = ax.plot(xs, [e["exact"] for e in rows], marker="o", label=f"{label} exact")[0]
        ax.errorbar(xs, [e["rank1"] for e in rows], yerr=[e["rank1_stderr"] or 0 for e in rows], marker="s",
                    linestyle="--", color=line.get_color(), capsize=2, label=f"{label} rank1")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"rank1 chance {chance:.2f}")
    ax.set_xscale("log", base=2)
    ticks = sorted({e["length"]: e["name"] for b in blocks.values() for e in b["extra"]["by_length"]
                    if e["status"] == "run"}.items())
    ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks])  # the lengths as the heatmap names them (2k, ...)
    ax.minorticks_off()
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    return finish(fig, ax, path, title, "accuracy")


# ---------------------------------------------------------------------------- command line
def main(kind: str, argv=None) -> dict:
    """scripts/eval/niah.py (kind 'niah') and scripts/eval/passkey.py (kind 'passkey')."""

    ap = argparse.ArgumentParser(description=(__import__("sys").modules["__main__"].__doc__ or ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(ap)
    ap.add_argument("--lengths", default="2k,4k,...,32k", help="prompt lengths in tokens ('k' = 1024; a,b,...,z doubles)")
    ap.add_argument("--depths", default="0,25,...,100", help="needle depths in percent of the haystack")
    ap.add_argument("--samples", type=int, default=2, help="prompts per (length, depth) cell")
    ap.add_argument("--variants", default="single" if kind == "passkey" else ",".join(VARIANTS))
    if kind == "niah":
        ap.add_argument("--haystack", default=None, help="local text (.txt/.jsonl file or folder) instead of the run's "
                                                         "held-out documents")
        ap.add_argument("--needles", type=int, default=3, help="needles of the multi-* variants")
    ap.add_argument("--distractors", type=int, default=9, help="distractor values ranked against the true one")
    ap.add_argument("--digits", type=int, default=7 if kind == "niah" else 5)
    ap.add_argument("--attention-window", default="8192",
                    help="attention layers keep at most this many keys ('none': full attention, up to --max-kv-gib)")
    ap.add_argument("--max-kv-gib", type=float, default=8.0)
    ap.add_argument("--segment", type=int, default=None, help="prompt tokens per streamed segment (default: memorising, the run's training "
                                                                  "segment train.seq_len; otherwise the model's prefill segment)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds per model and variant; longer lengths that would not fit are 'not run'")
    ap.add_argument("--data-dir", default=None, help="corpus cache (default: as in training)")
    a = ap.parse_args(argv)
    R.memorize_settings(a)
    try:
        lengths, depths = parse_lengths(a.lengths), parse_depths(a.depths)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    allowed = ("single",) if kind == "passkey" else VARIANTS
    if bad := [v for v in variants if v not in allowed]:
        raise SystemExit(f"--variants: unknown {bad}; choose from {list(allowed)}")
    if a.samples < 1:
        raise SystemExit(f"--samples must be >= 1, got {a.samples}")
    try:
        window = None if a.attention_window.lower() == "none" else int(a.attention_window)
    except ValueError:
        raise SystemExit(f"--attention-window must be a positive integer or 'none', got {a.attention_window!r}") from None
    if (window is not None and window < 1) or (a.segment is not None and a.segment < 1):
        raise SystemExit("--attention-window and --segment must be >= 1")
    curves: dict[str, dict[str, dict]] = {v: {} for v in variants}
    out_all = {}
    for run in [r for r in a.run.split(",") if r]:
        model, tok = load_run(run, a.step, a.device)
        label = os.path.basename(os.path.normpath(model.run_info.run_dir or run))
        while f"{kind}_{label}" in out_all:
            label += "-2"  # two runs of the same name: keep both
        if kind == "passkey":
            hay = Haystack.from_texts(tok, [PASSKEY_FILLER], "passkey filler (Mohtashami & Jaggi, 2023)")
        elif a.haystack:
            hay = Haystack.from_texts(tok, [t for _, t in read_local(a.haystack)], a.haystack)
        else:
            name, docs = held_out_documents(model, a.data_dir)
            hay = Haystack.from_texts(tok, [t for _, t in docs], name)
        task = NeedleTask(tok, hay, kind, a.digits, a.distractors, getattr(a, "needles", 3))
        total = len(variants) * len(lengths) * len(depths) * a.samples

        def evaluate(setting, reports, model=model, task=task, label=label):
            segment = a.segment or stream_segment(model, setting)
            bar = R.progress_bar(total, f"{kind} {label}{' (memorised)' if setting else ''}", "prompt", a.no_progress)
            ck = {"checkpoint": os.path.abspath(model.run_info.checkpoint), "step": model.run_info.step,
                  "seed": a.seed, "samples": a.samples}
            blocks = {v: evaluate_grid(task, model, v, lengths, depths, a.samples, segment, window, a.max_kv_gib,
                                       a.time_budget, a.seed, setting, reports, bar,
                                       partial=os.path.join(a.out, f".{kind}_{label}_{v}{'_memorize' if setting else ''}"
                                                                   ".partial.pt"), key=ck)
                      for v in variants}
            if bar is not None:
                bar.close()
            return blocks

        res = R.baseline_and_memorised(f"{kind}_{label}", model, a, evaluate)
        out_all.update(res)
        info = model.run_info
        for name, r in res.items():
            tag = "memorised" if name.endswith("_memorize") else "baseline"
            for v, block in r["tasks"].items():
                curves[v][label if tag == "baseline" else f"{label} memorised"] = block
                plot_heatmap(block, os.path.join(a.out, f"{name}_{v}_heatmap.png"),
                             f"{kind} {v}: {info.model} {info.size} step {info.step} ({tag})")
                _print(name, v, block)
        del model, task, evaluate, res  # free this model before the next is loaded
    for v, blocks in curves.items():
        png = plot_vs_length(blocks, os.path.join(a.out, f"{kind}_{v}_accuracy_vs_length.png"),
                             f"{kind} {v}: accuracy by prompt length", 1.0 / (a.distractors + 1))
        print(f"plot: {png}")
    return out_all


def _print(name: str, variant: str, block: dict) -> None:
    m = {k: "n/a" if v["value"] is None else f"{v['value']:.3f}" for k, v in block["metrics"].items()}
    print(f"{name} {variant}: exact {m['exact']} | found {m['found']} | rank1 {m['rank1']} "
          f"(chance {block['chance']:.3f}) over {block['n_items']} prompts")
    for e in block["extra"]["by_length"]:
        if e["status"] == "run":
            print(f"    {e['name']:>6}: exact {e['exact']:.3f} | found {e['found']:.3f} | "
                  f"rank1 {e['rank1']:.3f} ± {e['rank1_stderr'] or 0:.3f} | "
                  f"mean rank {e['mean_rank']:.2f} | {e['items']} prompts, {e['prompt_tokens_per_s']:.0f} tok/s"
                  + (f" | attention windowed to {e['attended_keys']} keys" if e["windowed"] else "")
                  + (f" | {e['non_finite']} prompts made the state non-finite (scored wrong)" if e["non_finite"] else ""))
        else:
            print(f"    {e['name']:>6}: not run ({e['reason']})")

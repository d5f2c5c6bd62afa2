"""Synthetic associative recall: multi-query associative recall (MQAR) as in Zoology (Arora et
al., 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"), for models
trained from scratch on freshly generated sequences. Does a memory memorise?

A sequence of length L with N pairs:

    k_1 v_1 k_2 v_2 ... k_N v_N | query region (L - 2N tokens)

- The key, value and filler vocabularies are disjoint: keys [0, K), values [K, 2K), filler
  [2K, vocab) with K = (vocab - n_filler) // 2. Within a sequence the N keys are distinct and
  so are the N values (Zoology draws both without replacement).
- The query region is cut into (L - 2N) // 2 two-token slots (one filler token more when
  L - 2N is odd). N slots are drawn without replacement with Zoology's power law,
  p(slot g) proportional to (g + 1)^(a - 1), a = 0.01 (queries cluster early but reach the
  end). Each drawn slot holds [key, filler], every other slot [filler, filler], so queries sit
  at random later positions, not all right after the pairs. Every key is queried exactly once,
  in a random order (a random permutation of the pairs, drawn apart from the slots).
- The target at a query key's position is its value (next-token prediction of the value,
  which never appears in the input after the query); every other target is -100, so the loss
  and the accuracy count only the values after query keys. Accuracy: the arg-max over the
  whole vocabulary equals the value. Chance: 1 / K (a model that knows a value comes and
  guesses which). A model that answers with one of the sequence's N values at random scores
  1/N without any recall: the plateau models sit on before they learn to recall.
- Differences from Zoology: filler tokens come from their own vocabulary (Zoology fills with
  random tokens from the whole vocabulary, so filler can repeat a key), and keys take the drawn
  slots in a random order (Zoology's draw order puts the first pairs' queries earlier). L must
  be at least 4N, as in Zoology.

Data and seeds: the test set of a cell (N, L) comes from numpy's generator seeded with
(seed, 1, N, L), the training batches from (seed, 0, N, L); any training row equal to a test
row is replaced (counted as `train_rows_replaced`), so no test sequence is ever trained on.
Training mixes the cells: each step is one batch of one cell, the cells visited in a fresh
seeded order every round. Each model is built at the same width (d_model, n_heads, n_layers)
with torch seeded by `seed`, and trained by `train_step`: the one training step of train.py
(`nested_learning.train.step.TrainStep`) on a batch of fresh sequences, from a fresh fast state.

Reading a sequence: by default in one forward. With a segment length S, in segments of S tokens
with the fast state carried, as a stream is read (the same predictions up to float rounding on
near-ties; exact on the tests' models). Test-time memorisation (predict with a Memorize
setting) then memorises each segment after scoring it, with the next-token loss of the input
tokens themselves (k_i -> v_i in the pair region), never the labels; HOPE's CMS levels, read
at each segment's start, can then hold the pairs for the queries in later segments. By default
training reads each sequence in one piece, its CMS update pass after the step (from a state that
is then dropped), so a trained model has never used an in-sequence CMS update: memorisation
then measures what the update rule stores as it stands. Training in segments (train_step's
`segment`) takes one step per segment with the state carried, the update pass between them, as
train.py streams a document; with the input's own next-token loss (input_targets) the pair
region has a loss, and so a teach signal that writes k_i -> v_i into the levels.

The control `hope-nowrites` is HOPE with its in-context writes disabled: eta (the learning
rate of the projection memory and of the main memory) is 0, set through the layer's eta_max
after construction, so neither memory is ever written; the forget gate still scales both by
a scalar, which stores no key-value binding."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ..constants import IGNORE
from ..models import build_model
from ..models.streaming import Memorize, MemorizeTally
from ..train.config import OptimConfig
from ..train.optim import build_optimizer, lr_factor
from ..train.step import TrainStep
from .plots import pyplot
from .results import mean_stderr, progress_bar

# name -> (registry model, config overrides, in-context writes of HOPE's self-modifying mixer)
MODELS = {
    "hope": ("hope", {}, True),
    "titans": ("titans", {}, True),
    "transformer": ("transformer", {}, True),
    "hope-deltanet": ("hope", {"mixer": "deltanet"}, True),
    "hope-nowrites": ("hope", {}, False),
}
DEFAULT_OPTIM = {"warmup": 50}  # train.py's optimizer (OptimConfig's defaults) with a longer warm-up


# ---------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class RecallTask:
    vocab_size: int = 256
    n_filler: int = 16  # filler tokens (their own vocabulary)
    power_a: float = 0.01  # Zoology's query-slot law: p(slot g) ~ (g + 1)^(a - 1)

    def __post_init__(self):
        if self.n_filler < 1 or self.n_keys < 1:
            raise ValueError(f"RecallTask needs n_filler >= 1 and vocab_size >= n_filler + 2, got "
                             f"vocab_size={self.vocab_size}, n_filler={self.n_filler}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"RecallTask.power_a must lie in (0, 1], got {self.power_a}")

    @property
    def n_keys(self) -> int:
        return (self.vocab_size - self.n_filler) // 2

    n_values = n_keys

    @property
    def keys(self) -> range:
        return range(0, self.n_keys)

    @property
    def values(self) -> range:
        return range(self.n_keys, 2 * self.n_keys)

    @property
    def filler(self) -> range:
        return range(2 * self.n_keys, self.vocab_size)

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def check(self, n_pairs: int, seq_len: int) -> str | None:
        """Why (n_pairs, seq_len) cannot be generated, or None."""
        if n_pairs < 1:
            return f"pairs must be >= 1, got {n_pairs}"
        if n_pairs > self.n_keys:
            return f"{n_pairs} pairs need {n_pairs} distinct keys; the vocabulary has {self.n_keys}"
        if seq_len < 4 * n_pairs:
            return f"length {seq_len} < 4 x {n_pairs} pairs (the pairs and one query slot per pair)"
        return None


def make_batch(task: RecallTask, n_pairs: int, seq_len: int, batch: int,
               rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """`batch` MQAR sequences: tokens and targets [batch, seq_len] (int64; targets -100 except
    at query keys, where they are the key's value). See the module docstring."""
    why = task.check(n_pairs, seq_len)
    if why:
        raise ValueError(why)
    N, L, B = n_pairs, seq_len, batch
    keys = np.argsort(rng.random((B, task.n_keys)), axis=1)[:, :N]  # N distinct keys per row
    values = task.n_keys + np.argsort(rng.random((B, task.n_values)), axis=1)[:, :N]
    tokens = task.filler.start + rng.integers(0, task.n_filler, size=(B, L))
    tokens[:, 0:2 * N:2], tokens[:, 1:2 * N:2] = keys, values
    slots = (L - 2 * N) // 2
    p = np.arange(1, slots + 1, dtype=np.float64) ** (task.power_a - 1)
    # N slots without replacement, in proportion to p (Efraimidis-Spirakis: the top N of u^(1/p))
    chosen = np.argsort(np.log(rng.random((B, slots))) / p, axis=1)[:, ::-1][:, :N]
    which = np.argsort(rng.random((B, N)), axis=1)  # the pair queried in each chosen slot
    pos = 2 * N + 2 * chosen
    rows = np.arange(B)[:, None]
    tokens[rows, pos] = np.take_along_axis(keys, which, 1)
    targets = np.full((B, L), IGNORE, dtype=np.int64)
    targets[rows, pos] = np.take_along_axis(values, which, 1)
    return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets)


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


@dataclass
class TestSet:
    """Held-out sequences of each cell (N, L), and the digests of every one of them."""

    cells: dict  # (pairs, length) -> (tokens, targets)
    digests: set

    def __contains__(self, tokens: Tensor) -> bool:
        return _digest(tokens.numpy()) in self.digests


def make_test_set(task: RecallTask, cells: list[tuple[int, int]], n: int, seed: int) -> TestSet:
    out, digests = {}, set()
    for N, L in cells:
        tok, tgt = make_batch(task, N, L, n, np.random.default_rng([seed, 1, N, L]))
        out[(N, L)] = (tok, tgt)
        digests.update(_digest(r) for r in tok.numpy())
    return TestSet(out, digests)


class TrainBatches:
    """Fresh training batches, one cell per step (the cells in a new seeded order each round);
    a row that equals a held-out row is drawn again."""

    def __init__(self, task: RecallTask, cells: list[tuple[int, int]], batch: int, seed: int,
                 test: TestSet | None = None, max_tries: int = 100):
        self.task, self.cells, self.batch, self.test, self.max_tries = task, list(cells), batch, test, max_tries
        self.rngs = {c: np.random.default_rng([seed, 0, *c]) for c in self.cells}
        self.order_rng = np.random.default_rng([seed, 2])
        self.queue: list[tuple[int, int]] = []
        self.replaced = 0

    def next(self) -> tuple[tuple[int, int], Tensor, Tensor]:
        if not self.queue:
            self.queue = [self.cells[i] for i in self.order_rng.permutation(len(self.cells))]
        cell = self.queue.pop(0)
        return (cell, *self.draw(cell, self.batch))

    def draw(self, cell: tuple[int, int], batch: int) -> tuple[Tensor, Tensor]:
        tok, tgt = make_batch(self.task, *cell, batch, self.rngs[cell])
        if self.test is None:
            return tok, tgt
        for _ in range(self.max_tries):
            seen = [i for i, r in enumerate(tok.numpy()) if _digest(r) in self.test.digests]
            if not seen:
                return tok, tgt
            self.replaced += len(seen)
            t2, g2 = make_batch(self.task, *cell, len(seen), self.rngs[cell])
            tok[seen], tgt[seen] = t2, g2
        raise RuntimeError(f"cell {cell}: could not draw a training row outside the test set in {self.max_tries} "
                           "tries: the cell has too few distinct sequences for this test set")


# ---------------------------------------------------------------------------- models
def build_recall_model(name: str, task: RecallTask, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                       seed: int = 0, **overrides):
    """The model `name` of MODELS at the shared width, seeded."""
    if name not in MODELS:
        raise ValueError(f"unknown recall model {name!r}; choose from {sorted(MODELS)}")
    reg, over, writes = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(reg, size="tiny", vocab_size=task.vocab_size, d_model=d_model, n_layers=n_layers,
                        n_heads=n_heads, **{**over, **overrides})
    if not writes:
        model.disable_memory_writes()
    return model


# ---------------------------------------------------------------------------- training
def input_targets(tokens: Tensor, targets: Tensor) -> Tensor:
    """Targets [B, L] for training with the input's own next-token loss beside the queries': at a
    query key its value (the label, as in `targets`), at every other position the next input
    token, at the last position none (-100). A queried value never appears in the input after
    its query, so no target but the label itself tells a query's answer; in the pair region the
    target after k_i is v_i, the binding a memory must write to answer the query later."""
    out = targets.clone()
    free = out == IGNORE
    following = torch.full_like(tokens, IGNORE)
    following[:, :-1] = tokens[:, 1:]
    out[free] = following[free]
    return out


def train_step(model, opt, tokens: Tensor, targets: Tensor, clip: float | None = 1.0,
               inner_updates: bool = True, lr_factor: float | None = None, segment: int | None = None) -> dict:
    """One batch of fresh sequences: the one training step of train.py
    (nested_learning.train.step.TrainStep, one micro-batch) from a fresh fast state (every row
    starts a new sequence), its result's state dropped (the next batch starts fresh too). A
    skipped step (the loss, gradient norm or fast state not finite, or a NaN gate reaching an
    op) changes nothing: no optimizer step, no inner update. lr_factor: the schedule's factor
    for this batch (optim.lr_factor), set before each of its steps.

    segment S: the sequences stream in segments of S tokens, one step per segment with the fast
    state carried from segment to segment, as train.py streams a document: the inner update pass
    after each segment's step changes the CMS levels that the next segment reads. A segment with
    no scored target has no loss and no teach signal: its tokens only advance the fast state
    through a forward, with no step. "loss" is the mean over the scored tokens of the batch,
    "grad_norm" the largest of its steps', "skipped" how many of its steps were skipped."""
    step = TrainStep(model, opt, clip=clip, inner_updates=inner_updates)
    L = tokens.shape[1]
    seg = L if segment is None else segment
    state = model.init_state(tokens.shape[0])
    total, scored, gnorms, skipped, updates, steps = 0.0, 0, [], 0, 0, 0
    for s in range(0, L, seg):
        x, y = tokens[:, s:s + seg], targets[:, s:s + seg]
        n = int((y != IGNORE).sum())
        if n == 0:
            with torch.no_grad():
                _, state = model(x, state)
            continue
        r = step(x, y, [state], lr_factor=lr_factor)
        state, steps = r.states[0], steps + 1
        total, scored = total + r.loss * n, scored + n
        gnorms.append(r.grad_norm)
        skipped, updates = skipped + (r.skipped is not None), updates + r.updates_applied
    gnorm = max(gnorms) if gnorms and all(math.isfinite(g) for g in gnorms) else math.nan  # NaN: a step had none
    return {"loss": total / scored if scored else math.nan, "grad_norm": gnorm, "skipped": skipped,
            "inner_updates": updates, "steps": steps}


def train(model, batches: TrainBatches, steps: int, optim: dict | None = None, clip: float | None = 1.0,
          progress: bool = True, desc: str = "train", time_limit: float | None = None,
          inner_updates: bool = True, segment: int | None = None, input_loss: bool = False) -> dict:
    """`steps` batches of fresh sequences (linear warm-up over optim["warmup"] of them, then
    cosine decay to min_lr_ratio, as train.py schedules its steps); a summary of the run.
    Each batch is one optimizer step, or with `segment` one per segment that has a scored
    target (train_step; `optimizer_steps` counts them). input_loss: train on input_targets
    (the input's next-token loss beside the queries'), so that every segment has a loss and the
    pair region a teach signal. time_limit (seconds) stops early, recorded as `stopped_at_step`."""
    optim = OptimConfig.from_dict({**DEFAULT_OPTIM, **(optim or {})})
    opt = build_optimizer(model, optim)
    model.train()
    losses, skipped, updates, stopped, opt_steps = [], 0, 0, None, 0
    bar = progress_bar(steps, desc, "step", off=not progress)
    t0 = time.perf_counter()
    for step in range(steps):
        _, tok, tgt = batches.next()
        rec = train_step(model, opt, tok, input_targets(tok, tgt) if input_loss else tgt, clip, inner_updates,
                         lr_factor(step, optim.warmup, steps, optim.min_lr_ratio), segment)
        opt_steps += rec["steps"]
        skipped += rec["skipped"]
        updates += rec["inner_updates"]
        losses.append(rec["loss"])
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", refresh=False)
            bar.update(1)
        if time_limit is not None and time.perf_counter() - t0 > time_limit and step + 1 < steps:
            stopped = step + 1
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    k = max(1, len(losses) // 10)
    every = max(1, len(losses) // 50)
    return {"steps": len(losses), "seconds": seconds, "skipped_steps": skipped, "inner_updates": updates,
            "loss_first": _nanmean(losses[:k]), "loss_last": _nanmean(losses[-k:]),
            "loss_curve": [[i + 1, losses[i]] for i in range(0, len(losses), every)],
            "train_rows_replaced": batches.replaced, "stopped_at_step": stopped, "optimizer": optim.as_dict(), "clip": clip,
            "segment": segment, "input_loss": input_loss, "optimizer_steps": opt_steps}


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


# ---------------------------------------------------------------------------- evaluation
def accuracy(predictions: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: (correct, scored) [B] counts over the positions whose target is not -100;
    a position is correct when its prediction (the arg-max of its logits, [B, L]) is its target."""
    mask = targets != IGNORE
    hit = (predictions == targets) & mask
    return hit.sum(1), mask.sum(1)


def predict(model, tokens: Tensor, segment: int | None = None, memorize: Memorize | None = None,
            reports: list | None = None) -> Tensor:
    """Arg-max next-token predictions [B, L] of the sequences tokens [B, L], from a fresh state.

    segment None: one forward over the whole sequence. Else the sequences stream in segments of
    `segment` tokens with the fast state carried (the in-forward memories carry across; HOPE's
    CMS levels are read at each segment's start, as in training's segments). With `memorize`
    (a model with CMS levels), each segment is scored first and then memorised (model.memorize)
    with the next-token loss of the input itself: the targets are the following input tokens
    (the segment's own, then the next segment's first), never the MQAR labels. A queried
    value never appears in the input after its query, so memorisation sees the pairs
    (k_i -> v_i) and the filler, not the answers, and no position is scored by a state that
    has learned from it. Memorisation reports go to `reports`."""
    if segment is None and memorize is None:
        with torch.no_grad():
            return model(tokens)[0].argmax(-1)
    L = tokens.shape[1]
    seg = L if segment is None else segment
    state = model.init_state(tokens.shape[0])
    out = []
    for s in range(0, L, seg):
        x = tokens[:, s:s + seg]
        with torch.no_grad():
            logits, after = model(x, state)
        out.append(logits.argmax(-1))
        if memorize is not None and model.has_cms():
            nxt = tokens[:, s + seg] if s + seg < L else None
            state, rep = model.memorize(x, state, next_token=nxt, **memorize.options())
            if reports is not None:
                reports.append(rep)
        else:
            state = after
    return torch.cat(out, 1)


def evaluate(model, test: TestSet, batch: int = 128, segment: int | None = None, memorize: Memorize | None = None,
             reports: list | None = None) -> dict[tuple[int, int], dict]:
    """Per cell: accuracy over its query positions, the standard error over sequences (each
    sequence's accuracy is one item: queries of a sequence share its memory), the counts.
    segment, memorize, reports: how the sequences are read (predict)."""
    model.eval()
    out = {}
    for cell, (tok, tgt) in test.cells.items():
        per_seq = []
        for s in range(0, tok.shape[0], batch):
            c, n = accuracy(predict(model, tok[s:s + batch], segment, memorize, reports), tgt[s:s + batch])
            per_seq += (c.double() / n.double()).tolist()
        acc, se = mean_stderr(per_seq)
        out[cell] = {"acc": acc, "stderr": se, "sequences": len(per_seq), "queries": cell[0] * len(per_seq)}
    return out


# ---------------------------------------------------------------------------- the suite
def split_cells(task: RecallTask, pairs: list[int], lengths: list[int]):
    """(cells that can be generated, [(cell, why not)] for the others), in pairs-major order."""
    ok, skipped = [], []
    for L in lengths:
        for N in pairs:
            why = task.check(N, L)
            (skipped.append(((N, L), why)) if why else ok.append((N, L)))
    return sorted(ok), sorted(skipped)


def run_model(name: str, task: RecallTask, cells: list[tuple[int, int]], steps: int, seeds: list[int],
              batch: int = 32, n_test: int = 256, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
              optim: dict | None = None, clip: float | None = 1.0, progress: bool = True,
              time_limit: float | None = None, inner_updates: bool = True, overrides: dict | None = None,
              segment: int | None = None, memorize: Memorize | None = None, train_segment: int | None = None,
              input_loss: bool = False) -> dict:
    """Train and evaluate model `name` once per seed; {"cells": {(N, L): summary over seeds},
    "seeds": [per seed: training summary and per-cell results], "parameters", "config"}. With
    `memorize`, each seed's model is also evaluated with test-time memorisation (predict):
    "cells_memorized" (and per seed), and "memorize_tally", the memorisation reports' totals
    (None for a model without CMS levels: it has nothing to memorise, and its memorised
    cells are its baseline's)."""
    for what, v in (("segment", segment), ("train_segment", train_segment)):
        if v is not None and v < 1:
            raise ValueError(f"{what} must be >= 1 token, got {v}")
    per_seed, tally = [], MemorizeTally() if memorize is not None else None
    for seed in seeds:
        test = make_test_set(task, cells, n_test, seed)
        model = build_recall_model(name, task, d_model, n_layers, n_heads, seed, **(overrides or {}))
        batches = TrainBatches(task, cells, batch, seed, test)
        summary = train(model, batches, steps, optim, clip, progress, f"{name} seed {seed}", time_limit,
                        inner_updates, train_segment, input_loss)
        t0 = time.perf_counter()
        rec = {"seed": seed, "train": summary, "cells": evaluate(model, test, segment=segment)}
        summary["eval_seconds"] = time.perf_counter() - t0
        if memorize is not None:
            t0 = time.perf_counter()
            rec["cells_memorized"] = (evaluate(model, test, segment=segment, memorize=memorize, reports=tally)
                                      if model.has_cms() else rec["cells"])
            summary["eval_memorized_seconds"] = time.perf_counter() - t0
        per_seed.append(rec)
    cfg = asdict(model.config)
    out = {"model": name, "parameters": model.num_parameters(), "config": cfg, "segment": segment,
           "cells": {c: combine([s["cells"][c] for s in per_seed]) for c in cells}, "seeds": per_seed}
    if memorize is not None:
        out["cells_memorized"] = {c: combine([s["cells_memorized"][c] for s in per_seed]) for c in cells}
        out["memorize_tally"] = tally if model.has_cms() else None
    return out


def combine(results: list[dict]) -> dict:
    """One cell over seeds: the mean accuracy; its standard error over seeds when there are
    several (training is the larger source of spread), else over the test sequences."""
    accs = [r["acc"] for r in results]
    mean, se = mean_stderr(accs)
    if len(results) == 1:
        se = results[0]["stderr"]
    return {"acc": mean, "stderr": se, "stderr_over": "seeds" if len(results) > 1 else "sequences",
            "per_seed": accs, "sequences": sum(r["sequences"] for r in results),
            "queries": sum(r["queries"] for r in results)}


def marginal(cells: dict, key: int) -> dict[int, dict]:
    """Mean accuracy over the cells sharing cells' key-th coordinate (0: pairs, 1: length), with
    the standard error of a mean of independent cells."""
    groups: dict[int, list[dict]] = {}
    for c, r in cells.items():
        groups.setdefault(c[key], []).append(r)
    out = {}
    for k, rs in sorted(groups.items()):
        ses = [r["stderr"] for r in rs]
        se = math.sqrt(sum(s * s for s in ses)) / len(rs) if all(s is not None for s in ses) else None
        out[k] = {"acc": sum(r["acc"] for r in rs) / len(rs), "stderr": se, "cells": len(rs)}
    return out


def result_tasks(run: dict, task: RecallTask, skipped: list, settings: dict, memorized: bool = False) -> dict:
    """The `tasks` block of the result file (schema nested_learning.eval/1): "mqar" (the mean
    over cells, with the grid, the marginals and the training summaries in extra) and one
    task per cell, "mqar_N{pairs}_L{length}". memorized: the cells evaluated with test-time
    memorisation (run["cells_memorized"]) instead of the baseline's."""
    cells = run["cells_memorized" if memorized else "cells"]
    overall = marginal({(0, c): r for c, r in cells.items()}, 0)[0]
    tasks = {"mqar": {
        "metrics": {"acc": {"value": overall["acc"], "stderr": overall["stderr"]}},
        "n_items": sum(r["sequences"] for r in cells.values()), "chance": task.chance,
        "extra": {"model": run["model"], "parameters": run["parameters"], "model_config": run["config"],
                  "task": {**asdict(task), "n_keys": task.n_keys, "n_values": task.n_values},
                  "query_placement": "Zoology: random later slots (power law a=power_a), keys in random order",
                  "settings": settings,
                  "by_pairs": {str(k): v for k, v in marginal(cells, 0).items()},
                  "by_length": {str(k): v for k, v in marginal(cells, 1).items()},
                  "not_run": [{"pairs": c[0], "length": c[1], "reason": why} for c, why in skipped],
                  "training": [{"seed": s["seed"], **s["train"]} for s in run["seeds"]]},
        "records": []}}
    for (N, L), r in cells.items():
        tasks[f"mqar_N{N}_L{L}"] = {
            "metrics": {"acc": {"value": r["acc"], "stderr": r["stderr"]}}, "n_items": r["sequences"],
            "chance": task.chance,
            "extra": {"pairs": N, "length": L, "queries": r["queries"], "stderr_over": r["stderr_over"],
                      "per_seed": r["per_seed"]},
            "records": []}
    return tasks


def table(runs: list[dict], task: RecallTask) -> list[str]:
    """Markdown: accuracy ± standard error per model (rows) and cell (columns), then the
    marginals by pairs and by length, with the chance level."""
    cells = sorted({c for r in runs for c in r["cells"]})
    f = lambda r: f"{r['acc']:.3f} ± {r['stderr']:.3f}" if r["stderr"] is not None else f"{r['acc']:.3f}"  # noqa: E731
    lines = [f"MQAR accuracy ± standard error (chance 1/{task.n_values} = {task.chance:.4f}; a model that answers "
             "with one of the sequence's N values at random, without recall, scores 1/N)", "",
             "| model | params | steps | train s | " + " | ".join(f"N={N} L={L}" for N, L in cells) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cells)]
    rows = [(r, r["model"], "cells") for r in runs]
    rows += [(r, f"{r['model']} memorised", "cells_memorized") for r in runs if "cells_memorized" in r]
    for r, label, key in rows:
        steps = sum(s["train"]["steps"] for s in r["seeds"]) // len(r["seeds"])
        secs = sum(s["train"]["seconds"] for s in r["seeds"]) / len(r["seeds"])
        lines.append(f"| {label} | {r['parameters']:,} | {steps} | {secs:.0f} | "
                     + " | ".join(f(r[key][c]) if c in r[key] else "-" for c in cells) + " |")
    for key, label in ((0, "pairs"), (1, "length")):
        ks = sorted({c[key] for c in cells})
        lines += ["", f"by {label} (mean over the other axis)", "",
                  "| model | " + " | ".join(f"{label} {k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for r, name, which in rows:
            m = marginal(r[which], key)
            lines.append(f"| {name} | " + " | ".join(f(m[k]) if k in m else "-" for k in ks) + " |")
        if key == 0:
            lines.append("| (a value of the sequence at random: 1/N) | " + " | ".join(f"{1 / k:.3f}" for k in ks) + " |")
    return lines


def plot(runs: list[dict], task: RecallTask, path: str) -> str | None:
    """Accuracy against the number of pairs, one panel per length, one line per model (error
    bars: standard errors), chance dashed, 1/N dotted (answering with one of the sequence's
    values at random). None when matplotlib is not installed."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    lengths = sorted({c[1] for r in runs for c in r["cells"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.4 * len(lengths) + 0.6, 3.2), dpi=120, squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for r in runs:
            for key, label, ls in (("cells", r["model"], "-"), ("cells_memorized", f"{r['model']} memorised", "--")):
                if key not in r:
                    continue
                cs = sorted(c for c in r[key] if c[1] == L)
                ys = [r[key][c] for c in cs]
                ax.errorbar([c[0] for c in cs], [y["acc"] for y in ys], yerr=[y["stderr"] or 0 for y in ys],
                            marker="o", ms=3, capsize=2, ls=ls, label=label)
        ax.axhline(task.chance, ls="--", color="grey", lw=0.8, label="chance")
        ns = sorted({c[0] for r in runs for c in r["cells"] if c[1] == L})
        ax.plot(ns, [1 / n for n in ns], ls=":", color="black", lw=0.8, label="a value of the sequence (1/N)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("key-value pairs")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"length {L}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

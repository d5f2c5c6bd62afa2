"""Scoring through the fast state, a capability of every language model of the package: tokens
go through the model segment by segment with the fast state carried, and each token's
next-token loss is read off, optionally memorising each segment after it is scored
(test-time memorisation). Training's validation loss, perplexity, the zero-shot pack,
continual learning and the lm-evaluation-harness adapter all use this one code path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..constants import IGNORE
from .state import ModelState


@dataclass(frozen=True)
class Memorize:
    """Test-time memorisation settings (model.memorize): steps per segment, the CMS learning
    rate (None: the model's), the surprise threshold and the levels (None: all)."""

    steps: int = 1
    lr: float | None = None
    surprise_threshold: float = 0.0
    levels: tuple[int, ...] | None = None

    def options(self) -> dict:
        """The keyword arguments of model.memorize for these settings."""
        return {"steps": self.steps, "lr": self.lr, "surprise_threshold": self.surprise_threshold,
                "levels": self.levels}

    def as_dict(self) -> dict:
        return {**self.options(), "levels": None if self.levels is None else list(self.levels)}


@dataclass
class MemorizeTally:
    """Running totals of the memorisation reports of an evaluation, in constant memory however
    many items it memorises; pass it where a list of reports is accepted (it has `append`)."""

    reports: int = 0
    updates: dict = field(default_factory=dict)  # "layer L level K" -> chunk updates of a sequence
    tokens: int = 0  # token signals seen (token x level x layer)
    passed: int = 0  # of which above the surprise threshold
    lo: float = math.inf
    hi: float = -math.inf
    mean_sum: float = 0.0  # of the per-pass mean surprises
    mean_n: int = 0
    # memorising with steps > 1: the memorised tokens' summed loss before the first update and
    # when re-read at the last step: does the update rule store what it is given?
    loss_before: float = 0.0
    loss_after: float = 0.0
    loss_reports: int = 0

    def append(self, rep) -> None:
        self.reports += 1
        if len(rep.loss) > 1:
            self.loss_before += rep.loss[0]
            self.loss_after += rep.loss[-1]
            self.loss_reports += 1
        for e in rep.events:
            key = f"layer {e.layer} level {e.level}"
            self.updates[key] = self.updates.get(key, 0) + e.rows_updated
        self.tokens += rep.surprise_tokens
        self.passed += rep.surprise_passed
        self.lo, self.hi = min(self.lo, rep.surprise_min), max(self.hi, rep.surprise_max)
        self.mean_sum += sum(rep.surprise)
        self.mean_n += len(rep.surprise)


def stream_segment(model, memorize: Memorize | None = None) -> int:
    """The segment an evaluation streams in. Memorising (a Memorize setting, on a model with
    CMS levels) a model loaded from a run: the run's training segment (train.seq_len), so
    that each level's reads are as stale as in training. A segment reads every level's
    segment-start weights (MATH 4.3), so a longer segment than training's reads staler weights
    and learns from staler teach signals; with a large cms_lr that made memorising hurt
    (bench/RESULTS.md 20). Otherwise model.prefill_segment(): without memorising the segment
    changes only the speed."""
    if memorize is None or not model.has_cms():
        return model.prefill_segment()
    seq_len = getattr(getattr(model, "run_info", None), "seq_len", None)
    return int(seq_len) if seq_len else model.prefill_segment()


def segment_losses(model, tokens: Tensor, targets: Tensor, state: ModelState,
                   memorize: Memorize | None = None, reports: list | None = None) -> tuple[Tensor, ModelState]:
    """Per-token loss [B, T] (float32, 0 where the target is IGNORE) of one segment and the new
    state. Without `memorize`: a plain forward (the in-forward memories update as always; CMS
    levels are read). With it: the segment's losses are taken first, then its tokens are
    memorised (model.memorize), so later segments see the updated CMS levels and no token is
    scored by a state that has learned from it. The memorisation report goes to `reports`."""
    if memorize is None or not model.has_cms():
        with torch.no_grad():
            loss, state = model(tokens, state, targets=targets, reduction="none")
        return loss.float(), state
    state, rep = model.memorize(tokens, state, targets=targets, **memorize.options())
    loss, rep.token_loss = rep.token_loss.float(), None  # the report stays small
    if reports is not None:
        reports.append(rep)
    return loss, state


def stream_document(model, doc: Tensor, segment: int, memorize: Memorize | None = None,
                    state: ModelState | None = None, reports: list | None = None,
                    on_segment=None) -> tuple[Tensor, ModelState]:
    """Losses of every next-token prediction of one document doc [N] (N - 1 values), streamed
    in segments of `segment` tokens from a fresh state (or `state`, batch 1); on_segment(n), when
    given, is called after each segment with the predictions it scored (a progress bar's update)."""
    doc = doc.to(model.embed.weight.device).view(1, -1).long()
    state = model.init_state(1) if state is None else state
    out = []
    for s in range(0, doc.shape[1] - 1, segment):
        tok = doc[:, s:s + segment]
        tgt = doc[:, s + 1:s + segment + 1]
        if tgt.shape[1] < tok.shape[1]:  # the last token has no target
            tgt = torch.cat([tgt, torch.full_like(tok[:, :1], IGNORE)], 1)
        loss, state = segment_losses(model, tok, tgt, state, memorize, reports)
        out.append(loss[0, : tgt.shape[1]][tgt[0] != IGNORE])
        if on_segment is not None:
            on_segment(len(out[-1]))
    return torch.cat(out), state

"""Document streams: per-row readers of whole documents for training, and the fixed held-out
streams that validation scores.

Each row of a batch reads whole documents segment by segment; a row that starts a new document is
flagged so the model resets that row's fast state (document boundaries fall on segment
boundaries, which are chunk-aligned when seq_len is a multiple of every chunk)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..checks import positive_int
from ..constants import IGNORE
from .tokens import TokenDocs


class DocumentStreams:
    """Rows that each read documents in their own seeded order, one segment of seq_len
    tokens per step. `next()` -> tokens [B, T], targets [B, T] (the next token, or IGNORE past
    a document's end), reset [B] (True where the row starts a new document, or a new context
    of context_len tokens within one: the fast state lives at most context_len tokens). With world > 1,
    rank r owns global rows r*B .. (r+1)*B-1. The position is a small dict (checkpointed)."""

    def __init__(self, docs: TokenDocs, batch: int, seq_len: int, seed: int, pad_id: int,
                 rank: int = 0, world: int = 1, context_len: int | None = None):
        if len(docs) == 0:
            raise ValueError("no documents to stream")
        if context_len is not None and (context_len < seq_len or context_len % seq_len):
            raise ValueError(f"context_len={context_len} must be a multiple of seq_len={seq_len}")
        self.docs, self.B, self.T, self.seed, self.pad = docs, batch, seq_len, seed, pad_id
        self.context = context_len
        self.rows = [rank * batch + b for b in range(batch)]
        self.pos = {"epoch": [0] * batch, "index": [0] * batch, "offset": [0] * batch}
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # row -> (epoch, its document order)

    def _order(self, row: int, epoch: int) -> np.ndarray:
        """Row `row`'s document order in `epoch`: a seeded permutation, computed once per row and
        epoch and kept until the row's next epoch (int32 where it fits: 4 bytes per document and
        row, instead of a permutation of every document on every step)."""
        got = self._orders.get(row)
        if got is None or got[0] != epoch:
            n = len(self.docs)
            perm = np.random.default_rng([self.seed, row, epoch]).permutation(n)
            got = (epoch, perm.astype(np.int32) if n < 2**31 else perm)
            self._orders[row] = got
        return got[1]

    def next(self):
        toks = np.full((self.B, self.T), self.pad, dtype=np.int64)
        tgts = np.full((self.B, self.T), IGNORE, dtype=np.int64)
        reset = np.zeros(self.B, dtype=bool)
        for b, row in enumerate(self.rows):
            e, i, off = self.pos["epoch"][b], self.pos["index"][b], self.pos["offset"][b]
            d = self.docs.doc(int(self._order(row, e)[i]))
            reset[b] = off == 0 if self.context is None else off % self.context == 0
            seg = d[off: off + self.T + 1].astype(np.int64)
            n = min(len(seg), self.T)
            toks[b, :n] = seg[:n]
            tgts[b, : len(seg) - 1] = seg[1:]
            off += self.T
            if off >= len(d) - 1:  # the document is done: next segment starts the next one
                off, (i, e) = 0, self._following(i, e)
            self.pos["epoch"][b], self.pos["index"][b], self.pos["offset"][b] = e, i, off
        return torch.from_numpy(toks), torch.from_numpy(tgts), torch.from_numpy(reset)

    def _following(self, i: int, e: int) -> tuple[int, int]:
        """(index, epoch) of the document after index i of epoch e."""
        return (0, e + 1) if i + 1 == len(self.docs) else (i + 1, e)

    def restage(self, batch: int, seq_len: int) -> dict[int, dict]:
        """A context-length curriculum stage: B' <= B rows of seq_len T'. The rank keeps its
        first B' rows (their row ids, hence their document orders, unchanged) and each kept row
        moves to the start of its next document, so every segment of the new stage starts on a
        boundary of the new seq_len and context_len. Returns the dropped rows' positions by row
        id (the trainer keeps them as dormant rows, so a later change of world size continues
        them instead of replaying their documents)."""
        if batch > len(self.rows):
            raise ValueError(f"a curriculum stage cannot grow the batch beyond the first stage's rows "
                             f"({batch} > {len(self.rows)})")
        if self.context is not None and (self.context < seq_len or self.context % seq_len):
            raise ValueError(f"train.context_len={self.context} must be a multiple of every stage's seq_len "
                             f"({seq_len})")
        dropped = {row: {k: self.pos[k][b] for k in self.pos} for b, row in enumerate(self.rows) if b >= batch}
        for row in dropped:
            self._orders.pop(row, None)
        self.rows, self.B, self.T = self.rows[:batch], batch, seq_len
        self.pos = {k: list(v[:batch]) for k, v in self.pos.items()}
        for b in range(batch):
            if self.pos["offset"][b] != 0:  # mid-document: on to the next one
                i, e = self._following(self.pos["index"][b], self.pos["epoch"][b])
                self.pos["offset"][b], self.pos["index"][b], self.pos["epoch"][b] = 0, i, e
        return dropped

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.pos.items()}

    def load_state_dict(self, pos: dict) -> None:
        if {k: len(v) for k, v in pos.items()} != {k: self.B for k in self.pos}:
            raise ValueError(f"data position is for another batch layout: {pos}")
        self.pos = {k: list(v) for k, v in pos.items()}


# ---------------------------------------------------------------------------- held-out streams
MIN_EVAL_STREAM = 1024  # shortest stream cap when context_len is null (with it: context_len)


@dataclass(frozen=True)
class HeldOutStreams:
    """The fixed token streams of validation: stream k is the first lengths[k] next-token
    predictions of validation document docs[k] (its tokens 0 .. lengths[k], read from a fresh
    state in segments with the fast state carried, and reset every `context` tokens as
    training resets it; None: never). Built from the document lengths alone (held_out_streams),
    so every model, batch size and world size scores the same tokens at the same positions."""

    docs: tuple[int, ...]  # distinct document indices, in split order
    lengths: tuple[int, ...]  # predictions per stream (>= 1)
    context: int | None

    @property
    def n_tokens(self) -> int:
        """Next-token predictions scored (the sum of the lengths)."""
        return sum(self.lengths)

    def pieces(self) -> list[tuple[int, int, int]]:
        """(stream, start, stop): the stream's predictions start .. stop - 1 (inputs tokens
        start .. stop - 1 of its document, targets start + 1 .. stop), one piece per context.
        Each piece starts from a fresh state, as training starts every context; pieces are
        independent, so they may be read in any order and batched together."""
        out = []
        for k, n in enumerate(self.lengths):
            step = self.context or n
            out.extend((k, s, min(s + step, n)) for s in range(0, n, step))
        return out


def held_out_streams(docs: TokenDocs, eval_tokens: int, context_len: int | None) -> HeldOutStreams:
    """Validation's streams: `eval_tokens` next-token predictions (or every one the split has)
    from distinct documents, each document a stream of its leading tokens. The cap S on a
    stream is the smallest that reaches eval_tokens over the whole split (water-filling: the
    budget shared as evenly as the documents' lengths allow), but at least context_len
    (MIN_EVAL_STREAM when null), so that many short streams do not replace a few long ones.
    Documents are taken in split order, each contributing min(its predictions, S), until the
    budget is met (the last stream cut to meet it exactly). No document is used twice."""
    positive_int("train.eval_tokens", eval_tokens)
    preds = np.maximum(np.diff(np.asarray(docs.offsets, dtype=np.int64)) - 1, 0)  # [n_docs]
    if not preds.any():
        raise ValueError("the validation split holds no document of 2 tokens or more: nothing to validate on")
    if int(preds.sum()) <= eval_tokens:
        cap = int(preds.max())
    else:  # the smallest cap whose capped total reaches the budget
        srt = np.sort(preds)
        lo, hi = 1, int(srt[-1])
        while lo < hi:
            mid = (lo + hi) // 2
            if int(np.minimum(srt, mid).sum()) >= eval_tokens:
                hi = mid
            else:
                lo = mid + 1
        cap = max(lo, context_len or MIN_EVAL_STREAM)
    ids, lengths, left = [], [], int(eval_tokens)
    for i in range(len(preds)):
        if left <= 0:
            break
        n = min(int(preds[i]), cap, left)
        if n > 0:
            ids.append(i)
            lengths.append(n)
            left -= n
    return HeldOutStreams(tuple(ids), tuple(lengths), context_len)

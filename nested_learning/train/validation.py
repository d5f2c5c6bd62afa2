"""Training's validation loss: the fixed held-out streams scored through the fast state, as in
training, batched over streams and ranks, with the standard error over streams."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..constants import IGNORE
from ..data.streams import HeldOutStreams, held_out_streams
from ..models.streaming import Memorize, segment_losses
from .config import TrainConfig


@dataclass(frozen=True)
class Validation:
    """Training's validation result: the mean next-token loss over every scored token, its
    standard error over the streams (one stream per document, so: over documents; None with
    fewer than 2), the tokens and streams scored, and each stream's mean loss (in the order of
    HeldOutStreams.docs, for paired comparisons of two models)."""

    loss: float
    se: float | None
    tokens: int
    streams: int
    stream_loss: tuple[float, ...]


def mean_and_se(sums, counts) -> tuple[float, float | None]:
    """The token-weighted mean loss sum(sums) / N (N = sum(counts)) and its standard error over
    the K streams, the ratio estimator's: sqrt(K / (K - 1) * sum_k (n_k / N)^2 (m_k - m)^2), with
    m_k = sums_k / n_k each stream's mean. With equal n_k this is the sample standard deviation
    of the stream means over sqrt(K). Streams of no token are left out."""
    pairs = [(float(a), float(n)) for a, n in zip(sums, counts) if n > 0]
    N = sum(n for _, n in pairs)
    if not pairs:
        return math.nan, None
    m = sum(a for a, _ in pairs) / N
    K = len(pairs)
    if K < 2:
        return m, None
    var = K / (K - 1) * sum((n / N) ** 2 * (a / n - m) ** 2 for a, n in pairs)
    return m, math.sqrt(var)


def validation_loss(model, docs, cfg: dict, info, pad_id: int, batch: int | None = None,
                    seq_len: int | None = None, streams: HeldOutStreams | None = None) -> Validation:
    """Training's validation: the next-token losses of the fixed held-out streams (data.streams.
    held_out_streams: train.eval_tokens predictions from distinct validation documents, the
    same tokens at the same positions for every model, batch size and world size), read as in
    training: each context of a stream from a fresh state, in segments of seq_len with the fast
    state carried (CMS levels memorise each segment after it is scored, as the training step's
    update pass does). The contexts are independent, so they are batched: `batch` rows per rank
    (default train.batch_size; a curriculum passes its current stage's batch and seq_len), the
    longest first; every rank runs the same number of segments (FSDP's collectives) and the
    per-stream sums are all-reduced."""
    t = cfg["train"]
    batch, seq_len = batch or t["batch_size"], seq_len or t["seq_len"]
    plan = streams or held_out_streams(docs, t.get("eval_tokens", TrainConfig.eval_tokens), t.get("context_len"))
    pieces = sorted(plan.pieces(), key=lambda p: p[2] - p[1], reverse=True)  # stable: deterministic
    rows = batch * info.world
    totals = torch.zeros(len(plan.docs), 2, dtype=torch.float64, device=info.device)
    for r in range(0, len(pieces), rows):
        group = pieces[r: r + rows]
        mine = group[info.rank * batch: (info.rank + 1) * batch]
        text = [docs.doc(plan.docs[k]) for k, _, _ in mine]
        segments = -(-max(z - a for _, a, z in group) // seq_len)  # the same on every rank
        state = model.init_state(batch)
        row_sum = torch.zeros(batch, 2, dtype=torch.float64, device=info.device)
        for s in range(segments):
            tok = np.full((batch, seq_len), pad_id, dtype=np.int64)
            tgt = np.full((batch, seq_len), IGNORE, dtype=np.int64)
            for b, (_, a, z) in enumerate(mine):
                lo = a + s * seq_len
                n = min(seq_len, z - lo)
                if n > 0:
                    tok[b, :n] = text[b][lo: lo + n]
                    tgt[b, :n] = text[b][lo + 1: lo + n + 1]
            tok, tgt = torch.from_numpy(tok).to(info.device), torch.from_numpy(tgt).to(info.device)
            last = s == segments - 1  # no later segment reads its memorisation: a plain forward, same losses
            loss, state = segment_losses(model, tok, tgt, state, None if last else Memorize())
            valid = tgt != IGNORE
            row_sum += torch.stack([torch.where(valid, loss.double(), 0.0).sum(1), valid.sum(1).double()], 1)
        if mine:
            idx = torch.tensor([k for k, _, _ in mine], device=info.device)
            totals.index_add_(0, idx, row_sum[: len(mine)])
    if info.world > 1:
        torch.distributed.all_reduce(totals)
    sums, counts = totals[:, 0].tolist(), totals[:, 1].tolist()
    loss, se = mean_and_se(sums, counts)
    return Validation(loss, se, int(sum(counts)), len(plan.docs),
                      tuple(a / n if n else math.nan for a, n in zip(sums, counts)))

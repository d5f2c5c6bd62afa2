"""Log-likelihood scoring of continuations, as lm-evaluation-harness scores them: only the
continuation's tokens are scored (never the context's), no end-of-text token is appended, and
trailing white space of the context moves to the continuation before tokenising.

Requests that share a context (the choices of one item) share its pass: the context streams
through the fast state once (or is memorised, with `memorize`), the state is repeated for
each continuation, and the continuations are scored in one batched forward, right-padded
(the padding comes after every scored token, so it cannot change them). Contexts of the same
length are batched together."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import IGNORE
from ..data.tokens import SPECIALS
from ..models.state import ModelState, map_tensors
from ..models.streaming import Memorize, segment_losses, stream_segment


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the lm-evaluation-harness way: the continuation's
    ids are those of context + continuation past the context's own ids; an empty context is
    the end-of-text token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [tok.token_to_id(SPECIALS[0])], tok.encode(continuation).ids
    whole, ctx = tok.encode(context + continuation).ids, tok.encode(context).ids
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} encodes to no token after context {context[-40:]!r}")
    return ctx, cont


@dataclass
class Scored:
    loglik: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax of its prediction
    tokens: int  # continuation tokens scored


def select_rows(state: ModelState, index: Tensor) -> ModelState:
    """The state of rows `index` (a row may repeat)."""
    return map_tensors(state, lambda t: t.index_select(0, index))


def consume_context(model, ctx: Tensor, memorize: Memorize | None, reports: list | None,
                    segment: int) -> ModelState:
    """The state after ctx [G, L] minus its last token, streamed (or memorised) in segments
    with the context's own next tokens as targets: nothing past the context is ever seen."""
    state = model.init_state(ctx.shape[0])
    inp, tgt = ctx[:, :-1], ctx[:, 1:]
    for s in range(0, inp.shape[1], segment):
        _, state = segment_losses(model, inp[:, s:s + segment], tgt[:, s:s + segment], state, memorize, reports)
    return state


def score_requests(model, requests: list[tuple[list[int], list[int]]], memorize: Memorize | None = None,
                   batch_size: int = 32, reports: list | None = None, progress=None,
                   item_of: list[int] | None = None) -> list[Scored]:
    """Scored (log-likelihood, greedy, token count) of each (context ids, continuation ids).
    `progress` (a tqdm bar) advances by the items done, `item_of[i]` naming request i's item
    (default: one item per request)."""
    device = model.embed.weight.device
    segment = stream_segment(model, memorize)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation need at least one token each")
        groups[tuple(ctx)].append(i)
    by_len: dict[int, list[tuple]] = defaultdict(list)
    for ctx in groups:
        by_len[len(ctx)].append(ctx)
    out: list[Scored | None] = [None] * len(requests)
    for length in sorted(by_len):
        ctxs = by_len[length]
        for b in range(0, len(ctxs), batch_size):
            batch = ctxs[b:b + batch_size]
            state = consume_context(model, torch.tensor(batch, device=device), memorize, reports, segment)
            rows = [(g, i) for g, c in enumerate(batch) for i in groups[c]]
            scored = score_rows(model, state, [c[-1] for c in batch], [(g, requests[i][1]) for g, i in rows])
            for (_, i), sc in zip(rows, scored):
                out[i] = sc
            if progress is not None:
                progress.update(len({i if item_of is None else item_of[i] for _, i in rows}))
    return out


def score_rows(model, state: ModelState, last: list[int], rows: list[tuple[int, list[int]]]) -> list[Scored]:
    """Scored of each row (g, continuation ids) read from context g's state (state row g, which
    has consumed all of context g but its last token, last[g]), in one batched forward."""
    device = model.embed.weight.device
    width = max(len(cont) for _, cont in rows)
    inp = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=device)
    for r, (g, cont) in enumerate(rows):
        inp[r, : len(cont)] = torch.tensor([last[g], *cont[:-1]], device=device)
        tgt[r, : len(cont)] = torch.tensor(cont, device=device)
    st = select_rows(state, torch.tensor([g for g, _ in rows], device=device))
    with torch.no_grad():
        logits, _ = model(inp, st)
    logp = F.log_softmax(logits.float(), -1)
    valid = tgt != IGNORE
    tok_lp = logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * valid
    hit = (logp.argmax(-1) == tgt) | ~valid
    return [Scored(float(tok_lp[r].sum()), bool(hit[r].all()), int(valid[r].sum())) for r in range(len(rows))]

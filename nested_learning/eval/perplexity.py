"""Long-document perplexity: each document streams through the fast state in segments, as in
training, from an end-of-text token (so its first token is predicted too); reported as
token-level perplexity, bits per byte (the document's UTF-8 bytes: comparable across
tokenizers) and the loss by position bucket (0-1k, 1k-2k, 2k-4k, ... tokens): a model that
uses its long context has a lower loss late in a document."""

from __future__ import annotations

import math
import os
import sys

import torch

from ..data.tokens import SPECIALS
from ..models.streaming import Memorize, MemorizeTally, stream_document
from .results import load_partial, mean_stderr, save_partial


def bucket_edges(n_tokens: int, first: int = 1024) -> list[int]:
    """0, first, 2 first, 4 first, ... up to past n_tokens."""
    edges = [0, first]
    while edges[-1] < n_tokens:
        edges.append(edges[-1] * 2)
    return edges


def bucket_name(lo: int, hi: int) -> str:
    k = lambda n: f"{n // 1024}k" if n and n % 1024 == 0 else str(n)  # noqa: E731
    return f"{k(lo)}-{k(hi)}"


def document_perplexity(model, tok, texts: list[tuple[str, str]], segment: int, memorize: Memorize | None = None,
                        max_tokens: int | None = None, reports=None, progress=None, partial: str | None = None,
                        key: dict | None = None) -> dict:
    """The task block (metrics, n_items = documents, per-document records, loss by position).
    progress: a bar advanced in scored tokens, segment by segment. partial: a file that holds the
    finished documents' losses (rewritten atomically after each document), so a killed run
    resumes where it stopped; it is used only when its key (the documents, segment, max_tokens,
    memorisation and the caller's `key`, e.g. the checkpoint) matches, and removed at the end."""
    eot = tok.token_to_id(SPECIALS[0])
    key = {**(key or {}), "docs": [n for n, _ in texts], "segment": segment, "max_tokens": max_tokens,
           "memorize": None if memorize is None else memorize.as_dict()}
    losses, docs, start = _resume(partial, key, reports)
    if progress is not None and docs:
        progress.update(sum(d["tokens"] for d in docs))
    for i, (name, text) in enumerate(texts[start:], start):
        enc = tok.encode(text)
        ids = enc.ids[:max_tokens]
        if ids:
            scored_text = text if len(ids) == len(enc.ids) else _prefix(tok, text, enc, len(ids))
            loss, _ = stream_document(model, torch.tensor([eot, *ids]), segment, memorize, reports=reports,
                                      on_segment=None if progress is None else progress.update)
            loss = loss.double().cpu()
            n_bytes = len(scored_text.encode("utf-8"))
            losses.append(loss)
            docs.append({"id": name, "tokens": len(ids), "bytes": n_bytes, "loss": float(loss.mean()),
                         "bits_per_byte": float(loss.sum()) / math.log(2) / max(n_bytes, 1)})
        if partial is not None:
            save_partial(partial, key, {"losses": losses, "docs": docs, "next": i + 1,
                                        "tally": dict(vars(reports)) if isinstance(reports, MemorizeTally) else None})
    if partial is not None and os.path.exists(partial):
        os.remove(partial)
    if not docs:
        raise ValueError("no document had a token to score")
    tokens = sum(d["tokens"] for d in docs)
    total = float(sum(x.sum() for x in losses))
    loss = total / tokens
    _, se = mean_stderr([d["loss"] for d in docs])  # over documents, the sampling unit
    bpb = total / math.log(2) / sum(d["bytes"] for d in docs)
    _, se_bpb = mean_stderr([d["bits_per_byte"] for d in docs])
    edges = bucket_edges(max(len(x) for x in losses))
    by_pos = []
    for lo, hi in zip(edges, edges[1:]):
        part = [x[lo:hi] for x in losses if len(x) > lo]
        n = sum(len(p) for p in part)
        if n:
            _, bse = mean_stderr([float(p.mean()) for p in part])
            by_pos.append({"bucket": bucket_name(lo, hi), "start": lo, "end": hi, "tokens": n, "documents": len(part),
                           "loss": float(sum(p.sum() for p in part)) / n, "stderr": bse})
    return {"metrics": {"loss": {"value": loss, "stderr": se},
                        "perplexity": {"value": math.exp(loss), "stderr": None if se is None else math.exp(loss) * se},
                        "bits_per_byte": {"value": bpb, "stderr": se_bpb}},
            "n_items": len(docs), "chance": None,
            "extra": {"tokens": tokens, "segment": segment, "max_tokens": max_tokens,
                      "uniform_loss": math.log(tok.get_vocab_size()), "loss_by_position": by_pos},
            "records": docs}


def _resume(partial: str | None, key: dict, reports) -> tuple[list, list, int]:
    """(losses, document records, next document index) kept by a killed run with the same key,
    restoring its memorisation tally; else a fresh start."""
    saved = load_partial(partial, key)
    if saved is None:
        return [], [], 0
    if isinstance(reports, MemorizeTally) and saved["tally"] is not None:
        reports.__dict__.update(saved["tally"])
    print(f"perplexity: resuming from {partial}: {saved['next']} of {len(key['docs'])} documents done",
          file=sys.stderr)
    return saved["losses"], saved["docs"], saved["next"]


def _prefix(tok, text: str, enc, n: int) -> str:
    """The text that the first n tokens cover (by the tokenizer's character offsets when it
    has them: a character split across the cut counts whole)."""
    offsets = getattr(enc, "offsets", None)
    return text[: offsets[n - 1][1]] if offsets else tok.decode(enc.ids[:n])


def plot_loss_by_position(results: dict[str, dict], path: str, title: str) -> str:
    """One line per labelled result ({label: task block}): mean loss per position bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for label, block in results.items():
        rows = block["extra"]["loss_by_position"]
        x = list(range(len(rows)))
        y = [r["loss"] for r in rows]
        err = [r["stderr"] or 0.0 for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xticks(x, [r["bucket"] for r in rows])
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

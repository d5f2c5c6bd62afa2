"""The context-length curriculum's data side: `restage` turns a DocumentStreams of B rows and
seq_len T into one of B' <= B rows and seq_len T' (train.curriculum: the batch shrinks as the
sequence grows so the tokens per step stay constant).

A rank keeps its first B' rows (their row ids, hence their document orders, are unchanged)
and each kept row moves to the start of its next document, so every segment of the new stage
starts on a boundary of the new seq_len and context_len (a segment never straddles two
lengths). The trainer gives every row a fresh fast state at the same moment."""

from __future__ import annotations

from .data import DocumentStreams

__all__ = ["restage"]


def restage(streams: DocumentStreams, batch: int, seq_len: int) -> dict[int, dict]:
    """Returns the dropped rows' positions by row id (the trainer keeps them as dormant rows,
    so a later change of world size continues them instead of replaying their documents)."""
    if batch > len(streams.rows):
        raise ValueError(f"a curriculum stage cannot grow the batch beyond the first stage's rows "
                         f"({batch} > {len(streams.rows)})")
    if streams.context is not None and (streams.context < seq_len or streams.context % seq_len):
        raise ValueError(f"train.context_len={streams.context} must be a multiple of every stage's seq_len "
                         f"({seq_len})")
    dropped = {row: {k: streams.pos[k][b] for k in ("epoch", "index", "offset")}
               for b, row in enumerate(streams.rows) if b >= batch}
    streams.rows = streams.rows[:batch]
    streams.B, streams.T = batch, seq_len
    pos = {k: list(v[:batch]) for k, v in streams.pos.items()}
    n_docs = len(streams.docs)
    for b in range(batch):
        if pos["offset"][b] != 0:  # mid-document: on to the next one
            pos["offset"][b], pos["index"][b] = 0, pos["index"][b] + 1
            if pos["index"][b] == n_docs:
                pos["index"][b], pos["epoch"][b] = 0, pos["epoch"][b] + 1
    streams.pos = pos
    return dropped

"""The one-token decode step of every language model of the package: what `generate` and
`generate_batch` run once the prompt has streamed through the fast state.

`Decoder(model, state)` moves the state into preallocated buffers (the KV caches with room for
the tokens to come, the unfinished chunks of the Titans and self-modifying memories at their
full chunk length) and `step(tokens)` feeds one token per row: each block's `decode` makes
forward's arithmetic for that one token without re-reading anything (a token of an unfinished
chunk reads the chunk-start memory; the token that completes a chunk or a projection chunk makes
the chunk's write inside the step). `state()` gives back the ModelState that forward would have
left. Logits agree with the streamed forward to float rounding (different matrix-product
shapes), tested in tests/models/test_decode_step.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .state import ModelState


class Decoder:
    def __init__(self, model, state: ModelState, room: int = 0):
        """`state`: the model's state after the prompt (batch B); `room`: how many tokens will
        be decoded (sizes the KV caches; more still works, by growing them)."""
        self.model, self.position = model, state.position
        self.buffers = [blk.decode_begin(st, state.position, room) for blk, st in zip(model.blocks, state.layers)]

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens [B] (one per row, at the current position) -> next-token logits [B, vocab]."""
        m = self.model
        x = F.embedding(tokens, m.embed.weight)
        for blk, buf in zip(m.blocks, self.buffers):
            x = blk.decode(x, buf, self.position)
        self.position += 1
        return F.linear(F.rms_norm(x, (x.shape[-1],), m.norm.weight, m.norm.eps), m.embed.weight)

    def state(self) -> ModelState:
        """The ModelState after every token stepped so far (forward's layout)."""
        return ModelState([blk.decode_end(buf) for blk, buf in zip(self.model.blocks, self.buffers)], self.position)

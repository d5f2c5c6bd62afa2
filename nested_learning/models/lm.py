"""The language model shared by HOPE, Titans and the Transformer: tied embedding, pre-norm
blocks, final norm; per-sequence fast state; teach signals; test-time memorisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..layers.cms import UpdateEvent, UpdateLog
from ..layers.common import RMSNorm
from ..layers.teach import TeachCapture
from ..ops._checks import positive_int
from .state import ModelState, reset_rows


@dataclass
class UpdateReport:
    """What a CMS update pass (or memorisation) did."""

    updates_applied: int = 0  # chunk updates that changed a weight (any level, layer)
    surprise: list[float] = field(default_factory=list)  # mean ||delta_t|| per pass
    loss: list[float] = field(default_factory=list)  # summed-token loss per pass (memorize)
    events: list[UpdateEvent] = field(default_factory=list)


class LanguageModel(nn.Module):
    block_class: type = None  # set by each model

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.blocks = nn.ModuleList(self.block_class(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)

    # ----- parameters and state -------------------------------------------------------
    def num_parameters(self) -> int:
        """Exact count of trainable parameters (the tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        p = self.embed.weight
        device, dtype = device or p.device, dtype or p.dtype
        return ModelState([b.init_state(batch_size, device, dtype) for b in self.blocks], 0)

    def reset_state(self, state: ModelState, mask: Tensor | None = None,
                    fresh: ModelState | None = None) -> ModelState:
        """Fresh state for the sequences where mask [B] is True (all when None). `fresh`: a
        ready init_state(B) (FSDP: building one gathers parameters, so every rank must)."""
        batch = self._batch_of(state)
        fresh = self.init_state(batch) if fresh is None else fresh
        if mask is None:
            fresh.position = state.position
            return fresh
        return reset_rows(state, fresh, mask.to(torch.bool))

    @staticmethod
    def _batch_of(state: ModelState) -> int:
        return state.tensors()[0].shape[0]

    # ----- forward -------------------------------------------------------------------
    def hidden(self, tokens: Tensor, state: ModelState | None = None,
               capture: TeachCapture | None = None) -> tuple[Tensor, ModelState]:
        """Final-norm output h [B, T, D] and the new state."""
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be an integer tensor [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
        B, T = tokens.shape
        state = self.init_state(B) if state is None else state
        if capture is not None:
            capture.position = state.position
        x = self.embed(tokens)
        layers = []
        for i, (blk, st) in enumerate(zip(self.blocks, state.layers)):
            x, st = blk(x, st, state.position, capture, i)
            if capture is not None:
                capture.watch(("block", i), x)
            layers.append(st)
        h = self.norm(x)
        if capture is not None:
            capture.watch(("final",), h)
        return h, ModelState(layers, state.position + T)

    def forward(self, tokens: Tensor, state: ModelState | None = None, capture: TeachCapture | None = None,
                targets: Tensor | None = None, reduction: str = "mean") -> tuple[Tensor, ModelState]:
        """tokens [B, T] -> logits [B, T, vocab] and the new fast state; with targets [B, T]
        (IGNORE = -100 where none), the loss instead of the logits (computed inside forward,
        so DDP and FSDP wrappers see every use of the weights)."""
        h, state = self.hidden(tokens, state, capture)
        if targets is None:
            return F.linear(h, self.embed.weight), state
        return self.loss(h, targets, reduction)[0], state

    @staticmethod
    def next_token_targets(tokens: Tensor, next_token: Tensor | None = None, ignore_index: int = -100) -> Tensor:
        """targets[t] = tokens[t+1]; the last position gets next_token [B] (the first token of
        the next segment) when given, else ignore_index."""
        last = (torch.full_like(tokens[:, :1], ignore_index) if next_token is None
                else next_token.view(-1, 1).to(tokens.dtype))
        return torch.cat([tokens[:, 1:], last], 1)

    def loss(self, h: Tensor, targets: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
        """Cross-entropy of the tied head and the teach signal at the final norm (MATH 1)."""
        return ops.linear_cross_entropy(h, self.embed.weight, targets, reduction=reduction)

    # ----- two-pass training ---------------------------------------------------------
    def train_forward(self, tokens: Tensor, state: ModelState | None = None, next_token: Tensor | None = None,
                      targets: Tensor | None = None, module: nn.Module | None = None):
        """First pass: returns (mean loss, capture, new state). Call loss.backward() (the outer
        gradients and, through hooks, the teach signals), then apply_updates(state, capture).
        targets default to the next tokens (next_token [B] for the last position); `module` is
        a DDP/FSDP wrapper of this model to call instead of the model itself."""
        capture = TeachCapture()
        targets = self.next_token_targets(tokens, next_token) if targets is None else targets
        loss, new_state = (self if module is None else module)(tokens, state, capture, targets=targets)
        capture.scale = float((targets != -100).sum().clamp(min=1))  # mean -> summed loss
        return loss, capture, new_state

    def apply_updates(self, state: ModelState, capture: TeachCapture, lr: float | None = None,
                      levels=None, surprise_threshold: float = 0.0) -> tuple[ModelState, UpdateReport]:
        """Second pass: apply every CMS level's chunk updates from the captured teach signals."""
        log, layers, surprises = UpdateLog(), [], []
        for i, (blk, st) in enumerate(zip(self.blocks, state.layers)):
            st = dict(st)
            if hasattr(blk, "cms"):
                st["cms"], s = blk.cms.update(st["cms"], capture, i, log, lr, levels, surprise_threshold)
                surprises += list(s.values())
            layers.append(st)
        events = log.events()
        report = UpdateReport(
            updates_applied=sum(e.update_norm > 0 for e in events),
            surprise=[float(torch.stack(surprises).mean())] if surprises else [],
            events=events,
        )
        return ModelState(layers, state.position), report

    # ----- test-time memorisation ----------------------------------------------------
    def memorize(self, tokens: Tensor, state: ModelState | None = None, steps: int = 1, lr: float | None = None,
                 surprise_threshold: float = 0.0, levels=None, next_token: Tensor | None = None,
                 targets: Tensor | None = None) -> tuple[ModelState, UpdateReport]:
        """Update the fast state from the teach signal of `tokens` (never the slow weights).

        Each step re-reads `tokens` from the same starting state with the CMS weights updated
        so far, takes the teach signals of the summed next-token loss (at the same places as
        in training: the levels' outputs, after the final norm) and applies the CMS updates;
        tokens whose signal norm is at or below surprise_threshold contribute nothing. The
        returned state has consumed `tokens` once. Models without CMS levels only consume
        the tokens (their memories learn in the forward pass): updates_applied is 0.

        Measured on a tiny needle task (tests/models/test_training_and_memorize.py): one step
        at a large lr raises the answer's probability for every fact; several steps at that lr
        overshoot (the summed-token GD step on the CMS weights is ill-conditioned: most tokens
        share one input direction), so prefer steps=1, or a small lr with several steps."""
        positive_int("steps", steps)
        if surprise_threshold < 0:
            raise ValueError(f"surprise_threshold must be >= 0, got {surprise_threshold}")
        state = self.init_state(tokens.shape[0]) if state is None else state
        report, start = UpdateReport(), state
        targets = self.next_token_targets(tokens, next_token) if targets is None else targets
        for _ in range(steps):
            capture = TeachCapture()
            with torch.enable_grad():
                # through forward(), so wrappers' hooks (FSDP unsharding) run as in training
                loss, after = self(tokens, start, capture, targets=targets, reduction="sum")
                report.loss.append(float(loss.detach()))
                if not any(k[0] == "cms" for k in capture.tensors):
                    return after.detach(), report
                capture.backward_from(loss)
            updated, rep = self.apply_updates(start, capture, lr, levels, surprise_threshold)
            report.updates_applied += rep.updates_applied
            report.surprise += rep.surprise
            report.events += rep.events
            start = ModelState([{**s, "cms": u["cms"]} if "cms" in u else s
                                for s, u in zip(start.layers, updated.layers)], start.position)
        final = ModelState([{**a, "cms": s["cms"]} if "cms" in s else a
                            for a, s in zip(after.layers, start.layers)], after.position)
        return final.detach(), report

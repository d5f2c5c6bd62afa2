"""The one training step: the two-pass step of `python train.py`, continual learning
(eval/continual.py) and the recall suite (eval/recall.py).

    for each micro-batch k (grad_accum of them, each with its own fast state):
        reset the rows that start a new document (model.reset_state)
        forward (train_forward: loss, teach-signal capture, new fast state) under autocast,
        backward of loss / grad_accum (DDP: gradient sync only on the last micro-batch)
        the inner update pass on this micro-batch's state (model.apply_updates: the CMS levels)
    sync hook (FSDP: average the replicated parameters' gradients), then on_grads (telemetry)
    clip the gradient norm
    guard: the loss, the gradient norm and the new fast states must be finite, and no op may
        have met a non-finite input (NonFiniteInputError); agree hook (several ranks: one decision)
    good: the optimizer step, the new fast states.  skipped: no optimizer step and no inner
        update (the returned states are the pre-step ones, as given, before any reset)
    zero the gradients

One rule for every caller: a skipped step changes nothing. One learning-rate schedule:
`lr_factor` (optim.lr_factor, set with optim.set_lr before the step). One order: each
micro-batch's inner update follows its own backward, the optimizer step follows all of them
(the inner update pass reads the pre-step slow weights).

What a caller keeps across steps is its own choice: the trainer carries each row's fast state
from step to step (reset at document boundaries), continual learning likewise within a
segment, the recall suite starts every batch from a fresh state."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checks import NonFiniteInputError
from ..constants import IGNORE
from .optim import set_lr

__all__ = ["StepResult", "TrainStep", "finite_states"]


@dataclass
class StepResult:
    """What one step did. `states`: the fast states to carry on (one per micro-batch): the new
    ones after a good step, the pre-step ones (as given) after a skipped step. `reports`: the
    inner update pass's UpdateReport per micro-batch (empty after a skipped step: nothing was
    applied). `teach`: the mean teach-signal norm (the gradient of the summed loss at the final
    norm's output, per scored token) of each micro-batch that ran."""

    loss: float  # mean over the micro-batches (NaN when an op met a non-finite input)
    grad_norm: float  # before clipping (NaN when it was not computed)
    skipped: str | None  # why the step was skipped, or None
    states: list
    reports: list = field(default_factory=list)
    teach: list[float] = field(default_factory=list)

    @property
    def updates_applied(self) -> int:
        """Inner (CMS chunk) updates that changed a weight, over the micro-batches."""
        return sum(r.updates_applied for r in self.reports)


def finite_states(states) -> bool:
    """Whether every floating-point tensor of the fast states is finite (one host sync)."""
    flags = [torch.isfinite(x).all() for s in states for x in s.tensors() if x.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _clip_grad_norm(params, clip: float) -> float:
    return float(torch.nn.utils.clip_grad_norm_(params, clip))


class TrainStep:
    """One optimizer step of `model` with `opt` (see the module docstring).

    clip: the gradient-norm bound (None: no clipping, the norm is still measured).
    grad_accum: micro-batches per step; the batch's rows are split into that many equal parts.
    inner_updates: run the inner update pass (False: the fast states still advance through
        the forward, the CMS levels are not updated).
    autocast: a callable returning the context of the forwards (bf16 autocast; default none).
    forward(tokens, targets, state) -> (loss, capture, state): default model.train_forward
        (the trainer passes its compiled/sharded forward).
    Hooks for several ranks (all optional):
    no_sync(): the context of every micro-batch but the last (DDP: no gradient all-reduce);
    sync(): after the last backward (FSDP: average the replicated parameters' gradients);
    clip_norm(params, clip) -> norm: the clipping (FSDP: sharding.clip_mixed);
    agree(loss, skipped) -> (loss, skipped): one decision for every rank;
    raise_op_errors: a NonFiniteInputError from a forward is raised, not a skipped step (with
        several ranks the others wait in a collective: the run must stop)."""

    def __init__(self, model, opt, clip: float | None = None, grad_accum: int = 1, inner_updates: bool = True,
                 autocast: Callable = contextlib.nullcontext, forward: Callable | None = None,
                 no_sync: Callable | None = None, sync: Callable | None = None, clip_norm: Callable | None = None,
                 agree: Callable | None = None, raise_op_errors: bool = False):
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive int, got {grad_accum!r}")
        self.model, self.opt, self.clip, self.grad_accum = model, opt, clip, grad_accum
        self.inner_updates, self.autocast = inner_updates, autocast
        self.forward = forward or (lambda tokens, targets, st: model.train_forward(tokens, st, targets=targets))
        self.no_sync, self.sync, self.agree = no_sync or contextlib.nullcontext, sync, agree
        self.clip_norm, self.raise_op_errors = clip_norm or _clip_grad_norm, raise_op_errors

    def __call__(self, tokens: Tensor, targets: Tensor, states: list, reset: Tensor | None = None,
                 lr_factor: float | None = None, on_grads: Callable | None = None) -> StepResult:
        """One step on tokens/targets [grad_accum * micro, T] from `states` (one fast state per
        micro-batch); reset [grad_accum * micro] marks the rows that start a new document.
        lr_factor: the schedule's factor for this step (optim.lr_factor), set before it.
        on_grads(): called once the gradients are complete, before clipping, unless an op met
        a non-finite input (the trainer's gradient-norm telemetry)."""
        model, accum = self.model, self.grad_accum
        if len(states) != accum or tokens.shape[0] % accum:
            raise ValueError(f"{tokens.shape[0]} rows and {len(states)} fast states do not make {accum} equal "
                             "micro-batches with one fast state each")
        if lr_factor is not None:
            set_lr(self.opt, lr_factor)
        micro = tokens.shape[0] // accum
        loss_acc, teach, reports, new_states, bad = 0.0, [], [], list(states), None
        for k in range(accum):
            sl = slice(k * micro, (k + 1) * micro)
            st = states[k]
            if reset is not None and reset[sl].any():
                st = model.reset_state(st, reset[sl])
            with self.no_sync() if k < accum - 1 else contextlib.nullcontext():
                with self.autocast():
                    try:
                        loss, cap, st = self.forward(tokens[sl], targets[sl], st)
                    except NonFiniteInputError as err:
                        if self.raise_op_errors:
                            raise
                        bad, loss_acc = f"non-finite values reached an op ({err})", math.nan
                        break
                cap.scale *= accum
                (loss / accum).backward()
            loss_acc += float(loss.detach()) / accum
            sig = cap.signal(("final",))
            valid = targets[sl] != IGNORE
            teach.append(float(sig.float().norm(dim=-1)[valid].mean()) if valid.any() else 0.0)
            if self.inner_updates and math.isfinite(loss_acc):
                st, rep = model.apply_updates(st, cap)
                reports.append(rep)
            new_states[k] = st.detach()
            del loss, cap, sig  # this micro-batch's activations and signals go before the next forward
        if bad is None:
            if self.sync is not None:
                self.sync()
            if on_grads is not None:
                on_grads()
        gnorm = self.clip_norm(model.parameters(), math.inf if self.clip is None else self.clip) if bad is None \
            else math.nan
        if bad is None and not math.isfinite(loss_acc):
            bad = f"loss {loss_acc}"
        elif bad is None and not math.isfinite(gnorm):
            bad = f"gradient norm {gnorm}"
        elif bad is None and not finite_states(new_states):
            bad = "the fast state after the inner updates is not finite"
        if self.agree is not None:
            loss_acc, bad = self.agree(loss_acc, bad)
        if bad is None:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if bad is not None:
            return StepResult(loss_acc, gnorm, bad, list(states), [], teach)
        return StepResult(loss_acc, gnorm, None, new_states, reports, teach)

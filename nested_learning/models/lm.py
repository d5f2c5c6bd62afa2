"""The language model shared by HOPE, Titans and the Transformer: tied embedding, pre-norm
blocks, final norm; per-sequence fast state; teach signals; test-time memorisation."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..checks import NonFiniteInputError, positive_int, range_checks_off
from ..constants import IGNORE
from ..layers.attention import CausalSelfAttention
from ..layers.cms import UpdateEvent, UpdateLog
from ..layers.common import RMSNorm
from ..layers.self_modifying import SelfModifyingTitans
from ..layers.teach import TeachCapture
from .decode import Decoder
from .state import ModelState, reset_rows


@dataclass
class UpdateReport:
    """What a CMS update pass (or memorisation) did."""

    updates_applied: int = 0  # chunk updates that changed a weight (any level, layer)
    surprise: list[float] = field(default_factory=list)  # mean ||delta_t|| per pass
    loss: list[float] = field(default_factory=list)  # summed-token loss per pass (memorize)
    events: list[UpdateEvent] = field(default_factory=list)
    # token signals seen by the update rule, over every level, layer and pass: how many had a
    # signal, how many passed the surprise threshold, and the range of their ||delta_t||
    surprise_tokens: int = 0
    surprise_passed: int = 0
    surprise_min: float = float("inf")
    surprise_max: float = float("-inf")
    token_loss: Tensor | None = None  # memorize: per-token loss [B, T] of the first pass (0 if ignored)

    def merge(self, other: UpdateReport) -> None:
        """Add the updates and surprise statistics of another pass."""
        self.updates_applied += other.updates_applied
        self.surprise += other.surprise
        self.events += other.events
        self.surprise_tokens += other.surprise_tokens
        self.surprise_passed += other.surprise_passed
        self.surprise_min = min(self.surprise_min, other.surprise_min)
        self.surprise_max = max(self.surprise_max, other.surprise_max)


class Block(nn.Module):
    """A pre-norm residual block: init_state(batch, device, dtype) -> dict, and
    forward(x, state, pos, capture, index) -> (x, state). Blocks with CMS levels set has_cms
    and override apply_updates (the second pass of a training step, and memorisation)."""

    has_cms = False

    # The one-token decode step (models/decode.py): decode_begin(state, pos, room) -> the
    # block's decode buffers, decode(x [B, D], buffers, pos) -> [B, D], decode_end(buffers) ->
    # the state forward would have left. This default runs forward on the token; the blocks of
    # the package override all three with preallocated buffers and no replay.
    def decode_begin(self, state: dict, pos: int, room: int):
        return {"state": state}

    def decode(self, x: Tensor, buf: dict, pos: int) -> Tensor:
        y, buf["state"] = self(x[:, None], buf["state"], pos)
        return y[:, 0]

    def decode_end(self, buf: dict) -> dict:
        return buf["state"]

    def apply_updates(self, state: dict, capture: TeachCapture, index: int, log: UpdateLog, lr: float | None = None,
                      levels=None, surprise_threshold: float = 0.0) -> tuple[dict, dict]:
        """(new state, {level: (mean surprise, statistics)}) after this block's CMS updates."""
        return state, {}


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
    def num_parameters(self, embedding: bool = True) -> int:
        """Exact count of trainable parameters (the tied embedding/head counted once);
        embedding=False leaves out the embedding (vocab_size x d_model)."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return n if embedding else n - self.embed.weight.numel()

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

    def has_cms(self) -> bool:
        """Whether any block has CMS levels (fast weights that memorisation updates)."""
        return any(b.has_cms for b in self.blocks)

    def _attention(self) -> list[CausalSelfAttention]:
        return [m for m in self.modules() if isinstance(m, CausalSelfAttention)]

    def has_attention(self) -> bool:
        """Whether any block attends (its state then grows with the context: a KV cache)."""
        return bool(self._attention())

    def attended_keys(self) -> int | None:
        """The most keys any attention layer attends to (None: unbounded, or no attention)."""
        ws = [m.window for m in self._attention()]
        return None if not ws or None in ws else max(ws)

    def kv_bytes(self, length: int, rows: int = 1) -> int:
        """Bytes of the KV caches at `length` keys per attention layer, for `rows` copies of the
        state, in the weights' dtype."""
        per_key = sum(2 * m.h * m.d for m in self._attention())
        return rows * length * per_key * self.embed.weight.element_size()

    def disable_memory_writes(self) -> int:
        """A control for in-context learning: every self-modifying mixer stops writing its
        memories (eta = 0: neither the projection memory nor the main memory is ever written; the
        forget gate still scales them). Returns the number of mixers changed; a model without
        one raises ValueError."""
        mixers = [m for m in self.modules() if isinstance(m, SelfModifyingTitans)]
        if not mixers:
            raise ValueError("no self-modifying Titans mixer in this model: nothing to disable")
        for m in mixers:
            m.eta_max = 0.0  # eta = eta_max * sigmoid(.) (SelfModifyingTitans._project)
        return len(mixers)

    @contextlib.contextmanager
    def attention_window(self, window: int | None):
        """Inside, every attention layer keeps at most `window` keys (None: as configured; a
        layer's own smaller window stays); the configured windows come back on exit."""
        layers = self._attention()
        saved = [m.window for m in layers]
        try:
            if window is not None:
                for m in layers:
                    m.window = window if m.window is None else min(m.window, window)
            yield self
        finally:
            for m, w in zip(layers, saved):
                m.window = w

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
    def next_token_targets(tokens: Tensor, next_token: Tensor | None = None, ignore_index: int = IGNORE) -> Tensor:
        """targets[t] = tokens[t+1]; the last position gets next_token [B] (the first token of
        the next segment) when given, else ignore_index."""
        last = (torch.full_like(tokens[:, :1], ignore_index) if next_token is None
                else next_token.view(-1, 1).to(tokens.dtype))
        return torch.cat([tokens[:, 1:], last], 1)

    def loss(self, h: Tensor, targets: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
        """Cross-entropy of the tied head and the teach signal at the final norm (MATH 1)."""
        return ops.linear_cross_entropy(h, self.embed.weight, targets, reduction=reduction)

    # ----- inference -----------------------------------------------------------------
    def chunk_sizes(self) -> dict[str, int]:
        """Every chunk size and CMS period of the config, by its config name."""
        c = self.config
        out = {f"model.{f}": getattr(c, f) for f in ("chunk_size", "proj_chunk", "memory_chunk") if hasattr(c, f)}
        out.update({f"model.cms_periods ({p})": p for p in getattr(c, "cms_periods", ())})
        return out

    def chunk_multiple(self) -> int:
        """The least common multiple of every chunk size and CMS period: segments of a multiple
        of it cut no chunk (streaming gives the same result either way; this is for speed)."""
        return math.lcm(1, *self.chunk_sizes().values())

    def prefill_segment(self, target: int = 512) -> int:
        """Segment length for streaming a long prompt: about `target` tokens, a chunk multiple."""
        m = self.chunk_multiple()
        return m * max(1, round(target / m))

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 state: ModelState | None = None, eos: int | None = None, segment: int | None = None,
                 generator: torch.Generator | None = None, top_p: float | None = None) -> tuple[Tensor, ModelState]:
        """Continue `tokens` [B, T] (or [T]) by up to max_new_tokens tokens: [B, N] and the state.

        The prompt streams through the fast state in segments of `segment` tokens (default
        prefill_segment()), so a long prompt never builds a graph or an activation of its whole
        length; then each new token is fed back one at a time with the state carried (KV caches
        for attention, the memories of Titans and HOPE; CMS levels are read, not updated),
        through the one-token decode step (models/decode.py: preallocated buffers, no replay
        of unfinished chunks; the same logits as forward to float rounding).
        temperature 0 is greedy (deterministic); else softmax(logits / temperature), over the
        top_k logits when given and to the nucleus of probability top_p, sampled with
        `generator` (prompts of different lengths: generate_batch). With eos, a row that emitted it
        emits only eos afterwards, and decoding stops once every row has. The returned state
        has consumed the prompt and every returned token."""
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty integer tensor [B, T] or [T], got {tuple(tokens.shape)}")
        positive_int("max_new_tokens", max_new_tokens)
        self._check_sampling(temperature, top_k, top_p)
        segment = self.prefill_segment() if segment is None else positive_int("segment", segment)
        B, T = tokens.shape
        state = self.init_state(B) if state is None else state
        for s in range(0, T, segment):
            h, state = self.hidden(tokens[:, s:s + segment], state)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=tokens.device)
        logits = F.linear(h[:, -1], self.embed.weight)
        dec = Decoder(self, state, room=max_new_tokens)
        with range_checks_off():  # the per-op gate checks, hoisted: each step's logits are checked instead
            for i in range(max_new_tokens):
                nxt = self._pick(self._finite(logits, i), temperature, top_k, generator, top_p)
                if eos is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    done |= nxt == eos
                out.append(nxt)
                logits = dec.step(nxt)
                if eos is not None and bool(done.all()):
                    break
        return torch.stack(out, 1), dec.state()

    @staticmethod
    def _finite(logits: Tensor, step: int) -> Tensor:
        """The logits; a non-finite one (a NaN or Inf anywhere in the state reaches the logits)
        raises NonFiniteInputError, as an op's gate check would."""
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteInputError(f"decoding step {step}: the logits are not finite (the fast state went "
                                      "non-finite)")
        return logits

    @torch.no_grad()
    def generate_batch(self, prompts: list, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, stop=None, generator: torch.Generator | None = None,
                       segment: int | None = None) -> list[Tensor]:
        """Continue each prompt of `prompts` (1-d integer tensors of any lengths) by up to
        max_new_tokens tokens, all rows decoded together; returns one tensor of new tokens per
        prompt, ending at its first stop token (included) when it met one.

        No padding enters any state: every row starts at position 0, the prefix all prompts
        share in length streams in segments, then each step feeds every row its next prompt token
        or, once its prompt is consumed, the token it generated; so each row's state sees
        exactly its own tokens at their own positions, as `generate` on that prompt alone (equal
        up to float rounding: the longer prompts' tails go through the decode step here). Sampling:
        temperature 0 is greedy; else softmax(logits / temperature) restricted to the top_k
        logits and to the smallest set whose probability reaches top_p (nucleus), drawn with
        `generator`. stop: a token id, a list of ids for every row, or one list per row."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of 1-d integer tensors")
        for i, p in enumerate(prompts):
            if not torch.is_tensor(p) or p.dim() != 1 or p.is_floating_point() or p.numel() == 0:
                raise ValueError(f"prompts[{i}] must be a non-empty 1-d integer tensor, got "
                                 f"{tuple(p.shape) if torch.is_tensor(p) else type(p).__name__}")
        positive_int("max_new_tokens", max_new_tokens)
        self._check_sampling(temperature, top_k, top_p)
        B, device = len(prompts), prompts[0].device
        stops = self._stop_sets(stop, B)
        lens = [int(p.numel()) for p in prompts]
        common = min(lens)
        segment = self.prefill_segment() if segment is None else positive_int("segment", segment)
        state = self.init_state(B)
        head = torch.stack([p[:common] for p in prompts])
        for s in range(0, common, segment):
            h, state = self.hidden(head[:, s:s + segment], state)
        width = max(lens)
        padded = torch.stack([torch.cat([p, p.new_zeros(width - p.numel())]) for p in prompts])
        in_prompt = torch.tensor(lens, device=device)[:, None] > torch.arange(width, device=device)[None]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        t = common  # the position of the next input token
        logits = F.linear(h[:, -1], self.embed.weight)
        dec = Decoder(self, state, room=width - common + max_new_tokens)
        with range_checks_off():  # as in generate: each step's logits are checked instead
            while True:
                nxt = self._pick(self._finite(logits, t - common), temperature, top_k, generator, top_p)
                picks = nxt.tolist()  # one transfer for the step, not one per row
                for b in range(B):  # rows past their prompt take the token just picked
                    if t >= lens[b] and not done[b]:
                        tok = picks[b]
                        out[b].append(tok)
                        done[b] = tok in stops[b] or len(out[b]) >= max_new_tokens
                if all(done):
                    break
                feed = nxt if t >= width else torch.where(in_prompt[:, t], padded[:, t], nxt)
                logits = dec.step(feed)
                t += 1
        return [torch.tensor(o, dtype=torch.long, device=device) for o in out]

    @staticmethod
    def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None:
            positive_int("top_k", top_k)
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")

    @staticmethod
    def _stop_sets(stop, batch: int) -> list[set[int]]:
        if stop is None:
            return [set() for _ in range(batch)]
        if isinstance(stop, int):
            return [{stop} for _ in range(batch)]
        stop = list(stop)
        if stop and all(isinstance(x, int) for x in stop):
            return [set(stop) for _ in range(batch)]
        if len(stop) != batch or not all(isinstance(x, (list, tuple, set)) for x in stop):
            raise ValueError(f"stop must be a token id, a list of ids, or one list of ids per prompt ({batch})")
        return [set(int(y) for y in x) for x in stop]

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: int | None, generator, top_p: float | None = None) -> Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if top_p is not None and top_p < 1:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the set has reached top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

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
        capture.scale = float((targets != IGNORE).sum().clamp(min=1))  # mean -> summed loss
        return loss, capture, new_state

    def apply_updates(self, state: ModelState, capture: TeachCapture, lr: float | None = None,
                      levels=None, surprise_threshold: float = 0.0) -> tuple[ModelState, UpdateReport]:
        """Second pass: apply every CMS level's chunk updates from the captured teach signals."""
        log, layers, surprises = UpdateLog(), [], []
        for i, (blk, st) in enumerate(zip(self.blocks, state.layers)):
            st, s = blk.apply_updates(dict(st), capture, i, log, lr, levels, surprise_threshold)
            surprises += list(s.values())
            layers.append(st)
        events = log.events()
        report = UpdateReport(updates_applied=sum(e.update_norm > 0 for e in events), events=events)
        if surprises:
            stats = torch.stack([x for _, x in surprises])  # [levels, 4]
            mean, seen, passed, lo, hi = torch.stack([  # one host sync for all five
                torch.stack([m for m, _ in surprises]).mean(), *stats[:, :2].sum(0),
                stats[:, 2].min(), stats[:, 3].max()]).tolist()
            report.surprise = [mean]
            report.surprise_tokens, report.surprise_passed = int(seen), int(passed)
            if seen:
                report.surprise_min, report.surprise_max = lo, hi
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

        Measured on a tiny needle task (tests/models/test_training_and_memorize.py, three trained
        models): one step at lr=0.01 raises the answer's log-probability a little (by 0.002 to
        0.008 nats) for most facts of every model; the effect of a large lr differs from model
        to model (one step at lr=1 raised P(answer) 1.5x on some and lowered it on others), so
        pick the lr on held-out items, or take several steps at a small lr."""
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
                token_loss, after = self(tokens, start, capture, targets=targets, reduction="none")
                loss = token_loss.sum()
                report.loss.append(float(loss.detach()))
                if report.token_loss is None:
                    report.token_loss = token_loss.detach()
                if not any(k[0] == "cms" for k in capture.tensors):
                    return after.detach(), report
                capture.backward_from(loss)
            updated, rep = self.apply_updates(start, capture, lr, levels, surprise_threshold)
            del capture
            report.merge(rep)
            start = ModelState([{**s, "cms": u["cms"]} if "cms" in u else s
                                for s, u in zip(start.layers, updated.layers)], start.position)
        final = ModelState([{**a, "cms": s["cms"]} if "cms" in s else a
                            for a, s in zip(after.layers, start.layers)], after.position)
        return final.detach(), report

"""Continuum Memory System chain (MATH section 4): levels z <- z + MLP_l(norm(z)) whose two
linear layers are fast weights, one per sequence, updated every `period` tokens from the
teach signal through ops.cms_update (two-pass, stop-gradient writes: the forward reads the
state, the update pass consumes the teach signals of the same backward pass)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..checks import positive_int
from ..ops import INNER_OPTIMIZERS
from .common import RMSNorm, dense, fast_weight
from .teach import TeachCapture


def dgd_inputs(x: Tensor, delta: Tensor, optimizer: str) -> tuple[Tensor, Tensor]:
    """The inputs and signals a level's layer is updated with. For `dgd` the preconditioner
    `(alpha I - lr sum_t k_t k_t^T)` takes unit keys k_t = x_t / ||x_t||, as DGD assumes (MATH
    section 2), and the signal is scaled by ||x_t|| so that the gradient term
    sum_t (||x_t|| delta_t) k_t^T = sum_t delta_t x_t^T is unchanged. Raw RMS-normalised inputs
    have ||x_t||^2 ~ d_model, which made the preconditioner's top eigenvalue lr * C * d_model
    (8 for the smoke model's period-64 level at lr 1e-3) and the weights blow up.
    Other optimizers take x and delta as they are."""
    if optimizer != "dgd":
        return x, delta
    n = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (x / n.to(x.dtype)), delta * n.to(delta.dtype)


def dgd_step(lr: float, period: int) -> float:
    """The dgd level's step, min(lr, 1 / period): with unit keys the preconditioner's
    eigenvalues are then in [alpha - 1, alpha], so it never expands the weight (a sum of
    `period` unit rank-one terms has eigenvalues at most `period`). At the defaults
    (lr 1e-3, periods up to 64) this is lr itself."""
    return min(float(lr), 1.0 / period)


@dataclass(frozen=True)
class UpdateEvent:
    """One completed chunk of one CMS level of one block: the update it applied to the
    level's two linear layers (up and down), as training and memorisation report it."""

    layer: int
    level: int
    token_index: int  # absolute position of the token that completed the chunk
    chunk_tokens: int
    update_norm: float  # ||delta W||_F of the level (both linear layers), mean over the batch
    rows_updated: int = 0  # sequences of the batch whose weights this update changed
    # dgd levels only (None for gd, momentum and deep_momentum): the preconditioner
    # (alpha I - eta sum_t k_t k_t^T) of this chunk, k_t the unit keys the op was given
    # (dgd_inputs) and eta the level's step dgd_step(lr, period). alpha is the retention
    # (cms_dgd_alpha); eta_x2 is eta ||k_t||^2, the preconditioner's shrinkage along one
    # token's key, averaged over the chunk's tokens, the batch and both linear layers.
    alpha: float | None = None
    eta_x2: float | None = None


@dataclass
class UpdateLog:
    """Cheap log of applied CMS updates: the statistics stay tensors until `events()` reads
    them, all at once (one host sync for every level and layer of an update pass)."""

    records: list = field(default_factory=list)

    def add(self, layer: int, level: int, index: tuple[int, ...], chunk: int, norms: Tensor,
            alpha: float | None = None, eta_x2: Tensor | None = None) -> None:
        """norms [B, n]: per sequence, ||delta W||_F of each of the n completed chunks;
        dgd levels add alpha and eta_x2 [n] (the mean eta ||k_t||^2 of each chunk)."""
        if index:
            self.records.append((layer, level, index, chunk, norms, alpha, eta_x2))

    def events(self) -> list[UpdateEvent]:
        if not self.records:
            return []
        parts = []  # per record: mean norm [n], rows updated [n], then eta_x2 [n] for dgd
        for *_, norms, _, eta_x2 in self.records:
            parts += [norms.float().mean(0), (norms > 0).sum(0).float()]
            if eta_x2 is not None:
                parts.append(eta_x2.to(norms.device))
        dt = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        flat, at, out = torch.cat([p.to(dt) for p in parts]).tolist(), 0, []
        for layer, level, index, chunk, _, alpha, eta_x2 in self.records:
            n = len(index)
            mean, rows = flat[at:at + n], flat[at + n:at + 2 * n]
            at += 2 * n
            ex = [None] * n
            if eta_x2 is not None:
                ex, at = flat[at:at + n], at + n
            out += [UpdateEvent(layer, level, i, chunk, m, int(r), alpha, e)
                    for i, m, r, e in zip(index, mean, rows, ex)]
        return out


def dgd_statistics(states: tuple, keys: tuple, n_up: int, lr: float) -> Tensor:
    """[n_up] eta ||k_t||^2 averaged over each completed chunk's tokens, the batch and the
    given linear layers: `states` their CMSState before the update, `keys` the keys they were
    just given. A chunk's tokens are the buffered ones (state.buffer_x[:, :filled]) then the
    new, the first n_up * C of them in completed chunks."""
    sq = []
    for st, k in zip(states, keys):
        xs = torch.cat([st.buffer_x[:, :st.filled], k.to(st.buffer_x.dtype)], 1)[:, :n_up * st.period].detach()
        xs = xs.to(torch.promote_types(xs.dtype, torch.float32))
        sq.append(xs.square().sum(-1).reshape(xs.shape[0], n_up, st.period).mean((0, 2)))
    return lr * torch.stack(sq).mean(0)


@dataclass
class CMSLevelState:
    up: ops.CMSState
    down: ops.CMSState


@dataclass
class CMSConfig:
    """The CMS chain of one block, and the one place its settings are checked: a level per
    period, each a residual MLP (d_model -> hidden_mult d_model -> d_model) whose two weights
    are fast weights updated once per `period` tokens by `optimizer` ("gd", "momentum", "dgd" or
    "deep_momentum"; one name, or one per level) at learning rate `lr` (one value, or one per
    level). Deep momentum's MLP memory has `deep_momentum_hidden` hidden units."""

    # no defaults here: a model's config holds them (HOPEConfig's cms_* fields) and passes every one
    d_model: int
    periods: tuple
    hidden_mult: int
    optimizer: str | tuple
    lr: float | tuple
    beta: float  # momentum's decay
    dgd_alpha: float  # DGD's retention
    deep_momentum_hidden: int  # H of deep momentum's memory (reference/deep_momentum.py)
    teach_scale: float
    teach_clip: float | None  # per-token L2 clip of the teach signal
    differentiable_writes: bool
    names: dict | None = field(default=None, repr=False, compare=False)  # field -> name in messages

    def _n(self, f: str) -> str:
        return (self.names or {}).get(f, f)

    def __post_init__(self):
        positive_int(self._n("d_model"), self.d_model)
        positive_int(self._n("hidden_mult"), self.hidden_mult)
        positive_int(self._n("deep_momentum_hidden"), self.deep_momentum_hidden)
        self.periods = tuple(self.periods)
        if not self.periods:
            raise ValueError(f"{self._n('periods')} must name at least one level")
        for i, p in enumerate(self.periods):
            positive_int(f"{self._n('periods')}[{i}]", p)
        n = len(self.periods)
        opts = (self.optimizer,) * n if isinstance(self.optimizer, str) else tuple(self.optimizer)
        lrs = (self.lr,) * n if isinstance(self.lr, (int, float)) else tuple(self.lr)
        if len(opts) != n or len(lrs) != n:
            raise ValueError(f"{self._n('optimizer')} and {self._n('lr')} need one entry per level "
                             f"({n} in {self._n('periods')})")
        for o in opts:
            if o not in INNER_OPTIMIZERS:
                raise ValueError(f"{self._n('optimizer')} must be one of {INNER_OPTIMIZERS}, got {o!r}")
        if any(not isinstance(x, (int, float)) or x < 0 for x in lrs):
            raise ValueError(f"{self._n('lr')} must be non-negative numbers, got {self.lr!r}")
        if self.teach_clip is not None and self.teach_clip <= 0:
            raise ValueError(f"{self._n('teach_clip')} must be positive or None, got {self.teach_clip}")

    @property
    def level_optimizers(self) -> tuple[str, ...]:
        return (self.optimizer,) * len(self.periods) if isinstance(self.optimizer, str) else tuple(self.optimizer)

    @property
    def level_lrs(self) -> tuple[float, ...]:
        n = len(self.periods)
        return (float(self.lr),) * n if isinstance(self.lr, (int, float)) else tuple(map(float, self.lr))


class CMSChain(nn.Module):
    def __init__(self, cfg: CMSConfig):
        super().__init__()
        self.optimizers, self.lrs = cfg.level_optimizers, cfg.level_lrs
        self.periods, self.beta, self.dgd_alpha = cfg.periods, cfg.beta, cfg.dgd_alpha
        self.deep_momentum_hidden = cfg.deep_momentum_hidden
        self.teach_scale, self.teach_clip = cfg.teach_scale, cfg.teach_clip
        self.differentiable_writes = cfg.differentiable_writes
        d, hid = cfg.d_model, cfg.hidden_mult * cfg.d_model
        self.norms = nn.ModuleList(RMSNorm(d) for _ in cfg.periods)
        self.up = nn.ParameterList(nn.Parameter(torch.randn(hid, d) / d**0.5) for _ in cfg.periods)
        self.down = nn.ParameterList(nn.Parameter(torch.randn(d, hid) * 0.5 / hid**0.5) for _ in cfg.periods)

    def fast_memories(self, state: list[CMSLevelState]) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (fast weight [B, ...], the slow weight it started from): for telemetry."""
        out = {}
        for lvl, st in enumerate(state):
            out[f"level{lvl}.up"], out[f"level{lvl}.down"] = (st.up.weight, self.up[lvl]), (st.down.weight, self.down[lvl])
        return out

    def init_state(self, batch: int, device, dtype) -> list[CMSLevelState]:
        out = []
        for up, down, period, opt in zip(self.up, self.down, self.periods, self.optimizers):
            mk = lambda w: ops.CMSState.create(dense(w).to(device, dtype), period, batch, opt,  # noqa: E731
                                               self.deep_momentum_hidden)
            out.append(CMSLevelState(mk(up), mk(down)))
        return out

    def forward(self, z: Tensor, state: list[CMSLevelState], layer: int,
                capture: TeachCapture | None = None) -> Tensor:
        for lvl, (norm, st) in enumerate(zip(self.norms, state)):
            u = norm(z)
            Wu = fast_weight(self.up[lvl], st.up.weight, self.differentiable_writes)
            Wd = fast_weight(self.down[lvl], st.down.weight, self.differentiable_writes)
            pre = torch.bmm(u, Wu.transpose(1, 2).to(u.dtype))
            a = F.gelu(pre)
            out = torch.bmm(a, Wd.transpose(1, 2).to(a.dtype))
            if capture is not None:
                keep = (lambda t: t) if self.differentiable_writes else (lambda t: t.detach())
                capture.watch(("cms", layer, lvl, "up"), pre, keep(u))
                capture.watch(("cms", layer, lvl, "down"), out, keep(a))
            z = z + out
        return z

    def decode(self, z: Tensor, state: list[CMSLevelState]) -> Tensor:
        """forward for one token z [B, D] with no capture (the levels are read, not written)."""
        for norm, st in zip(self.norms, state):
            u = F.rms_norm(z, (z.shape[-1],), norm.weight, norm.eps)[:, None]
            a = F.gelu(torch.bmm(u, st.up.weight.transpose(1, 2).to(u.dtype)))
            z = z + torch.bmm(a, st.down.weight.transpose(1, 2).to(a.dtype))[:, 0]
        return z

    def _factor(self, norm_t: Tensor, passed: Tensor, surprise_threshold: float) -> Tensor | None:
        """Each token's teach-signal factor [B, T, 1]: teach_scale, times the clip's
        min(1, teach_clip / ||delta_t||), times 0 below the surprise threshold. None (the signals
        are used as they are, no multiply) when it is 1 on every token with a signal: scale 1, no
        clip and threshold <= 0, where it would only zero tokens whose signal is zero (or so small,
        below about 1e-22, that its squared norm underflows)."""
        if self.teach_scale == 1.0 and self.teach_clip is None and surprise_threshold <= 0:
            return None
        factor = torch.full_like(norm_t, self.teach_scale)
        if self.teach_clip is not None:
            factor = factor * (self.teach_clip / norm_t.clamp(min=1e-30)).clamp(max=1.0)
        return factor * passed

    def update(self, state: list[CMSLevelState], capture: TeachCapture, layer: int, log: UpdateLog,
               lr: float | None = None, levels=None, surprise_threshold: float = 0.0):
        """Apply the teach signals of `capture` (one forward + backward) to the fast weights.
        Returns the new state and, per level, the mean surprise ||delta_t|| of the tokens and a
        tensor (tokens with a signal, tokens past the threshold, min, max of their ||delta_t||)."""
        new, surprise = [], {}
        for lvl, st in enumerate(state):
            if levels is not None and lvl not in levels:
                new.append(st)
                continue
            kd, ku = ("cms", layer, lvl, "down"), ("cms", layer, lvl, "up")
            d_down, d_up = capture.signal(kd), capture.signal(ku)
            norm_t = d_down.float().norm(dim=-1, keepdim=True)  # [B, T, 1] surprise per token
            passed = norm_t > surprise_threshold
            factor = self._factor(norm_t, passed, surprise_threshold)
            seen = norm_t > 0  # tokens with a signal (ignored targets have none)
            surprise[lvl] = (norm_t.mean(), torch.stack([
                seen.sum().to(norm_t.dtype), passed.sum().to(norm_t.dtype),
                torch.where(seen, norm_t, torch.inf).min(), torch.where(seen, norm_t, -torch.inf).max()]))
            opt, step = self.optimizers[lvl], self.lrs[lvl] if lr is None else lr
            kw = dict(lr=dgd_step(step, self.periods[lvl]) if opt == "dgd" else step, optimizer=opt,
                      beta=self.beta, alpha=self.dgd_alpha)
            wdt = st.up.weight.dtype  # under autocast the activations may be in another dtype
            x_up, s_up = dgd_inputs(capture.inputs[ku], d_up if factor is None else d_up * factor, opt)
            x_dn, s_dn = dgd_inputs(capture.inputs[kd], d_down if factor is None else d_down * factor, opt)
            up, u_rep = ops.cms_update(st.up, x_up.to(wdt), s_up.to(wdt), **kw)
            down, d_rep = ops.cms_update(st.down, x_dn.to(wdt), s_dn.to(wdt), **kw)
            norms = (u_rep.update_norms.square() + d_rep.update_norms.square()).sqrt()
            dgd = None
            if opt == "dgd" and u_rep.token_index:
                dgd = dict(alpha=float(self.dgd_alpha), eta_x2=dgd_statistics(
                    (st.up, st.down), (x_up, x_dn), len(u_rep.token_index), kw["lr"]))
            log.add(layer, lvl, tuple(capture.position + i for i in u_rep.token_index), self.periods[lvl], norms,
                    **(dgd or {}))
            new.append(CMSLevelState(up, down))
        return new, surprise

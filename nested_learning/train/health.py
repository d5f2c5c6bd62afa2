"""Model health, per training step: what a falling loss does not show.

- `memory_norms`: every fast memory's norm at the end of the step (mean over the batch's rows
  of the per-row Frobenius norm), its initial value's norm, and their ratio (`rel`), per layer.
  A memory that decays to zero or explodes inside its context shows here first.
- `MixerProbe`: the rms of each layer's sequence-mixer output over the step's tokens (forward
  hooks on the block's `mixer` / `mem` module, registered once; skipped while compiling).
- `grad_norms_by_group`: the pre-clip gradient norm of each parameter group, per layer
  (`layer{i}.memory_init` for the memories' initial states, `layer{i}.mixer`, `layer{i}.cms`,
  `layer{i}.attn`, `layer{i}.mlp`, `layer{i}.norm`; `embed`, `other`).
- `HealthMonitor.check`: a warning, once per memory and kind, when a memory's ratio falls
  under `collapse` or rises over `explode`, or its norm is not finite.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ..layers.common import dense

MIXER_ATTRS = ("mixer", "mem")  # a block's sequence mixer (HOPE, Titans)
MEMORY_INIT_NAMES = ("P0", "M0", "W1", "W2")
COLLAPSE, EXPLODE = 1e-3, 1e3


def _row_norm(x: Tensor) -> float:
    """Mean over the batch's rows of the per-row Frobenius norm of x [B, ...]."""
    return float(x.detach().float().flatten(1).norm(dim=1).mean())


def memory_norms(model, state) -> dict:
    """{"layer{i}": {"<component>.<memory>": {"norm", "init", "rel"}}} for every module of every
    block that has `fast_memories(state)`; `rel` is None where the initial state is zero."""
    out = {}
    for i, (blk, st) in enumerate(zip(model.blocks, state.layers)):
        rec = {}
        for key, sub in st.items():
            mod = getattr(blk, key, None)
            if mod is None or not hasattr(mod, "fast_memories"):
                continue
            for name, (fast, slow) in mod.fast_memories(sub).items():
                n, n0 = _row_norm(fast), float(dense(slow).float().norm())
                rec[f"{key}.{name}"] = {"norm": n, "init": n0, "rel": n / n0 if n0 > 0 else None}
        if rec:
            out[f"layer{i}"] = rec
    return out


def param_group(name: str) -> str:
    """The telemetry group of a parameter name (`blocks.2.mixer.P0` -> `layer2.memory_init`)."""
    m = re.match(r"(?:.*\.)?blocks\.(\d+)\.(\w+)(?:\.(\w+))?", name)
    if not m:
        return "embed" if "embed" in name else "other"
    layer, part, leaf = m.group(1), m.group(2), m.group(3)
    if part in MIXER_ATTRS:
        return f"layer{layer}.memory_init" if leaf in MEMORY_INIT_NAMES else f"layer{layer}.mixer"
    if part.startswith("n") and part[1:].isdigit():
        return f"layer{layer}.norm"
    return f"layer{layer}.{part}"


def grad_norms_by_group(model) -> dict[str, float]:
    """Pre-clip gradient norm of each parameter group (call after backward, before clipping).
    A sharded (FSDP2) gradient counts its local shard, reduced over the ranks."""
    sq: dict[str, Tensor] = {}
    sharded = []
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if hasattr(g, "to_local") else g
        v = local.detach().float().square().sum()
        key = param_group(name.replace("_orig_mod.", "").replace("_fsdp_wrapped_module.", ""))
        sq[key] = sq.get(key, 0) + v
        if hasattr(g, "to_local"):
            sharded.append(key)
    if not sq:
        return {}
    keys = sorted(sq)
    vals = torch.stack([torch.as_tensor(sq[k]).float() for k in keys])
    if sharded and torch.distributed.is_initialized():
        part = torch.tensor([k in sharded for k in keys], device=vals.device)
        red = torch.where(part, vals, torch.zeros_like(vals))
        torch.distributed.all_reduce(red)
        vals = torch.where(part, red, vals)
    return {k: float(v) for k, v in zip(keys, vals.sqrt().tolist())}


class MixerProbe:
    """Records the rms of each block's sequence-mixer output (forward hooks). `take()` returns
    {"layer{i}": rms over the tokens since the last take} and clears it; `clear()` drops what
    was recorded (the trainer clears before each step, so validation forwards never count)."""

    def __init__(self, model):
        self._sums: dict[int, list[float]] = {}
        self._handles = []
        for i, blk in enumerate(model.blocks):
            for attr in MIXER_ATTRS:
                mod = getattr(blk, attr, None)
                if isinstance(mod, torch.nn.Module):
                    self._handles.append(mod.register_forward_hook(self._hook(i)))
                    break

    def _hook(self, layer: int):
        def hook(module, args, output):
            if torch.compiler.is_compiling():
                return
            y = output[0] if isinstance(output, tuple) else output
            y = y.detach().float()
            acc = self._sums.setdefault(layer, [0.0, 0])
            acc[0] = acc[0] + y.square().sum()  # a tensor: no host sync per forward
            acc[1] += y.numel()
        return hook

    def take(self) -> dict[str, float]:
        out = {f"layer{i}": math.sqrt(float(s) / n) for i, (s, n) in sorted(self._sums.items()) if n}
        self._sums.clear()
        return out

    def clear(self) -> None:
        self._sums.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class HealthMonitor:
    """Warns once per memory and kind (collapsed / exploded / non-finite) through `warn`."""

    def __init__(self, warn, collapse: float = COLLAPSE, explode: float = EXPLODE):
        self.warn, self.collapse, self.explode = warn, collapse, explode
        self._said: set[tuple[str, str, str]] = set()

    def check(self, step: int, norms: dict) -> list[str]:
        said = []
        for layer, mems in norms.items():
            for name, rec in mems.items():
                n, rel = rec["norm"], rec["rel"]
                if not math.isfinite(n):
                    kind = "non-finite"
                elif rel is not None and rel < self.collapse:
                    kind = "collapsed"
                elif (rel if rel is not None else n) > self.explode:
                    kind = "exploded"
                else:
                    continue
                if (layer, name, kind) in self._said:
                    continue
                self._said.add((layer, name, kind))
                ratio = "" if rel is None else f", {rel:.3g} x its initial norm"
                msg = (f"step {step}: {layer} {name} {kind}: norm {n:.3g}{ratio} at the end of the step "
                       f"(thresholds: under {self.collapse:g} or over {self.explode:g} x initial)")
                said.append(msg)
                self.warn(msg)
        return said


def context_position(offsets, context_len: int | None) -> float:
    """Mean over the batch's rows of the position, within its context, at which the step's
    segment starts (tokens; the document offset when the state lives a whole document)."""
    offs = [int(o) % context_len if context_len else int(o) for o in offsets]
    return sum(offs) / max(len(offs), 1)

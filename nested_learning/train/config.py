"""The typed training config: `TrainConfig` is the `train:` section of configs/config.yaml (a
Hydra structured config, registered as the `train` group's `default`), the one place its
defaults live. `TrainConfig.from_dict` builds it from a plain dict (what `run(cfg)` receives,
from Hydra or a test) and `__post_init__` checks every field, each message naming the key and
the rule. `OptimConfig` is the `optim:` section (here too) and `DataConfig` the `data:`
section (nested_learning/data/config.py); the model section is checked by the model's own
config."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..checks import ConfigSection, positive_int
from ..data.config import DataConfig

__all__ = ["OPTIMIZERS", "OptimConfig", "TrainConfig", "WandbConfig", "compose_config", "model_overrides", "number",
           "register"]


def number(name: str, v, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """v as a float within the bounds; strings that read as numbers are accepted (Hydra and
    YAML sometimes hand numbers over as strings), anything else names the key."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    below = x <= lo if lo_open else x < lo
    above = x >= hi if hi_open else x > hi
    if math.isnan(x) or below or above:
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{hb}, got {v!r}")
    return x


def _nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return v


def _flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")


def _int_like(name: str, v) -> int:
    """An int, or a float/str that is a whole number (YAML reads 3.0e9 as a float)."""
    x = number(name, v, 0.0, lo_open=True)
    if x != int(x):
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    return int(x)


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"          # offline: nothing leaves the machine; online: needs a login
    project: str = "nested_learning"

    def __post_init__(self):
        _flag("train.wandb.enabled", self.enabled)
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"train.wandb.mode must be 'offline', 'online' or 'disabled', got {self.mode!r}")

    @classmethod
    def from_dict(cls, d: dict) -> WandbConfig:
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown key(s) train.wandb.{', train.wandb.'.join(sorted(set(d) - known))}; "
                             f"the keys are {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class TrainConfig(ConfigSection):
    SECTION = "train"

    # how long: train.steps, or a token budget from which the steps are derived (one of the two)
    steps: int | None = 150
    tokens: Any | None = None     # token budget; steps = ceil(tokens / tokens per step) (steps must be null)
    seed: int = 0
    out_dir: str = "runs/${model.name}-${size.name}"
    batch_size: int = 8              # sequences per micro-batch (per rank) (of the first curriculum stage)
    seq_len: int = 128               # a multiple of every chunk size and CMS period
    context_len: int | None = 1024  # the fast state carries across segments for this many tokens, then
    #                                    resets (and at every document start); null: across whole documents
    curriculum: list[Any] | None = None  # [[step, seq_len], ...] from step 0: the context-length curriculum
    curriculum_constant_tokens: bool = True  # the batch shrinks as seq_len grows (tokens per step constant)
    grad_accum: int = 1
    clip: float | None = 1.0      # gradient-norm bound; null: no clipping
    max_bad_steps: int = 3           # non-finite steps in a row that stop the run (TrainingDiverged)
    bf16: bool = False
    compile: bool = False
    device: str = "auto"             # auto | cpu | cuda
    dist_backend: str | None = None  # null: nccl on CUDA, gloo on CPU
    fsdp: bool = False               # FSDP2 (fully_shard per block): PyTorch's counterpart of ZeRO-3
    inner_updates: bool = True       # the CMS update pass after each backward
    health_every: int = 1            # log fast-memory norms, mixer rms, grouped gradient norms every N steps (0: never)
    eval_every: int = 50
    eval_tokens: int = 32768         # next-token predictions scored by each validation (fixed held-out streams)
    save_every: int = 50             # checkpoint every N steps (0: never, except save_every_minutes)
    save_every_minutes: float | None = None  # also checkpoint when this much wall time passed since the last
    checkpoint_format: str = "auto"  # auto (dcp when train.fsdp, else single) | single | dcp
    keep_last: int | None = 3     # checkpoints kept (older ones deleted after each save); null: all
    keep_fast_state: str = "all"  # all | newest: older checkpoints drop their per-rank fast state (most of a
    # small model's checkpoint); resuming from one then starts every row's context afresh
    export: bool = False             # at the end, write out_dir/export/ (one safetensors file + config)
    resume: bool = True              # continue from out_dir's newest intact checkpoint when there is one
    overwrite: bool = False          # with resume=false: delete the run already in out_dir instead of refusing
    progress: bool = True
    dry_run: bool = False            # print the plan (parameters, tokens, steps, checkpoints, memory) and stop
    plan_world: int = 8              # the dry run's world size when not launched by torchrun
    plan_gpu_gib: float = 80.0       # the dry run's GPU memory, for its fits / does-not-fit line
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig.from_dict(self.wandb)
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("set exactly one of train.steps and train.tokens (a token budget from which the steps "
                             f"are derived), got steps={self.steps!r} tokens={self.tokens!r}")
        if self.steps is not None:
            positive_int("train.steps", self.steps)
        else:
            self.tokens = _int_like("train.tokens", self.tokens)
        for k in ("batch_size", "seq_len", "grad_accum", "max_bad_steps", "plan_world"):
            positive_int(f"train.{k}", getattr(self, k))
        for k in ("eval_every", "save_every", "eval_tokens"):
            _nonneg_int(f"train.{k}", getattr(self, k))
        if self.keep_last is not None:
            positive_int("train.keep_last (null keeps every checkpoint)", self.keep_last)
        if self.keep_fast_state not in ("all", "newest"):
            raise ValueError(f"train.keep_fast_state must be all or newest, got {self.keep_fast_state!r}")
        if self.eval_every and not self.eval_tokens:
            raise ValueError("train.eval_tokens must be positive when train.eval_every is (0 tokens would log no "
                             "validation loss)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"train.seed must be a non-negative int, got {self.seed!r}")
        for k in ("resume", "overwrite", "bf16", "compile", "fsdp", "inner_updates", "progress", "export",
                  "dry_run", "curriculum_constant_tokens"):
            _flag(f"train.{k}", getattr(self, k))
        if self.clip is not None:
            self.clip = number("train.clip (the gradient-norm bound; null: no clipping)", self.clip, 0.0, lo_open=True)
        if self.save_every_minutes is not None:
            self.save_every_minutes = number("train.save_every_minutes", self.save_every_minutes, 0.0, lo_open=True)
        self.plan_gpu_gib = number("train.plan_gpu_gib", self.plan_gpu_gib, 0.0, lo_open=True)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.dist_backend not in (None, "nccl", "gloo"):
            raise ValueError(f"train.dist_backend must be 'nccl', 'gloo' or null, got {self.dist_backend!r}")
        if self.checkpoint_format not in ("auto", "single", "dcp"):
            raise ValueError(f"train.checkpoint_format must be 'auto', 'single' or 'dcp', got {self.checkpoint_format!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"train.out_dir must be a path, got {self.out_dir!r}")
        if self.export and not (self.save_every or self.save_every_minutes):
            raise ValueError("train.export=true exports the final checkpoint: set train.save_every or "
                             "train.save_every_minutes (the last step is then always saved)")
        self._check_curriculum()
        if self.context_len is not None and (isinstance(self.context_len, bool) or not isinstance(self.context_len, int)
                                             or self.context_len < 1):
            raise ValueError(f"train.context_len must be null or a positive int, got {self.context_len!r}")

    def check_context_len(self) -> None:
        """context_len is a multiple of every stage's seq_len (checked after the model's chunk
        rule on seq_len, whose message says more)."""
        for sl in self.stage_seq_lens():
            ctx = self.context_len
            if ctx is not None and (ctx < sl or ctx % sl):
                raise ValueError(f"train.context_len must be null or a multiple of train.seq_len={sl} (every "
                                 f"curriculum stage's seq_len), got {ctx!r}")

    def _check_curriculum(self) -> None:
        c = self.curriculum
        if c is None:
            return
        rule = "train.curriculum must be a list of [step, seq_len] pairs starting at step 0 with increasing steps"
        if not isinstance(c, (list, tuple)) or not c:
            raise ValueError(f"{rule}, got {c!r}")
        stages = []
        for s in c:
            if (not isinstance(s, (list, tuple)) or len(s) != 2
                    or any(isinstance(x, bool) or not isinstance(x, int) for x in s)):
                raise ValueError(f"{rule}, got the stage {s!r}")
            stages.append((int(s[0]), int(s[1])))
        if stages[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(stages, stages[1:])):
            raise ValueError(f"{rule}, got {c!r}")
        if any(b[1] < a[1] for a, b in zip(stages, stages[1:])):
            raise ValueError(f"train.curriculum: the seq_len of a stage may not be shorter than the one before (the "
                             f"batch cannot grow back), got {c!r}")
        if stages[0][1] != self.seq_len:
            raise ValueError(f"train.seq_len={self.seq_len} must equal the first curriculum stage's seq_len "
                             f"({stages[0][1]}): batch_size and seq_len describe the first stage")
        for step, sl in stages:
            positive_int(f"train.curriculum seq_len (stage at step {step})", sl)
            if self.curriculum_constant_tokens and (self.batch_size * self.seq_len) % sl:
                raise ValueError(f"train.curriculum: the stage at step {step} has seq_len={sl}, which does not divide "
                                 f"the tokens of a micro-batch (batch_size x seq_len = {self.batch_size * self.seq_len}): "
                                 "the batch could not shrink to keep the tokens per step constant")
        self.curriculum = [list(s) for s in stages]

    # ----- derived
    def stages(self) -> list[tuple[int, int, int]]:
        """(first step, seq_len, micro-batch) of every curriculum stage (one stage without a
        curriculum)."""
        if not self.curriculum:
            return [(0, self.seq_len, self.batch_size)]
        tokens = self.batch_size * self.seq_len
        return [(s, sl, tokens // sl if self.curriculum_constant_tokens else self.batch_size)
                for s, sl in self.curriculum]

    def stage_at(self, step: int) -> tuple[int, int, int]:
        """The stage in force at (0-based) step `step`: (index, seq_len, micro-batch)."""
        idx = max(i for i, (s, _, _) in enumerate(self.stages()) if s <= step)
        _, sl, b = self.stages()[idx]
        return idx, sl, b

    def stage_seq_lens(self) -> list[int]:
        return [sl for _, sl, _ in self.stages()]

    def tokens_per_step(self, world: int, step: int = 0) -> int:
        _, sl, b = self.stage_at(step)
        return b * sl * self.grad_accum * world

    def total_steps(self, world: int, start: int = 0, seen: int = 0) -> int:
        """train.steps, or the token budget divided by the tokens of a step (rounded up). With
        a curriculum that does not keep the tokens constant, stage by stage. A resumed run
        (`start` steps done, `seen` tokens trained on, perhaps by another world size) plans
        only what is left of the budget."""
        if self.steps is not None:
            return self.steps
        left, step = self.tokens - seen, start
        if left <= 0:
            return start
        bounds = [s for s, _, _ in self.stages()][1:] + [math.inf]
        for end in bounds:
            if end <= step:
                continue
            per = self.tokens_per_step(world, step)
            n = min(end - step, math.ceil(left / per))
            step, left = step + n, left - n * per
            if left <= 0:
                return int(step)
        return int(step)


OPTIMIZERS = ("adamw", "mixed_muon_adamw")  # the outer (slow-weight) optimizers; the inner ones are ops.INNER_OPTIMIZERS


@dataclass
class OptimConfig(ConfigSection):
    """The `optim:` section (configs/optim/*.yaml extend it as their schema): the one place the
    optimizer's keys, defaults and checks live."""

    SECTION = "optim"

    name: str = "adamw"                  # adamw | mixed_muon_adamw
    lr: float = 3e-3                     # AdamW (for mixed_muon_adamw: the AdamW part)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup: int = 20                     # steps of linear warm-up, then cosine decay
    min_lr_ratio: float = 0.1            # the cosine's floor, as a fraction of lr
    muon_lr: float = 3e-3                # mixed_muon_adamw: the Muon part (update RMS matched to AdamW's)
    muon_momentum: float = 0.95
    muon_impl: str = "auto"              # auto: torch.optim.Muon when present, else newton_schulz

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        _nonneg_int("optim.warmup", self.warmup)
        self.lr = number("optim.lr", self.lr, 0.0, lo_open=True)
        self.weight_decay = number("optim.weight_decay", self.weight_decay, 0.0)
        self.eps = number("optim.eps", self.eps, 0.0, lo_open=True)
        self.min_lr_ratio = number("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be a pair [beta1, beta2], got {self.betas!r}")
        self.betas = [number(f"optim.betas[{i}]", b, 0.0, 1.0, hi_open=True) for i, b in enumerate(self.betas)]
        self.muon_lr = number("optim.muon_lr", self.muon_lr, 0.0, lo_open=True)
        self.muon_momentum = number("optim.muon_momentum", self.muon_momentum, 0.0, 1.0, hi_open=True)
        if self.muon_impl not in ("auto", "newton_schulz"):
            raise ValueError(f"optim.muon_impl must be auto or newton_schulz, got {self.muon_impl!r}")



# ----------------------------------------------------------------------------- Hydra
def register() -> None:
    """Register the typed sections with Hydra (idempotent): TrainConfig as the `train` group's
    `default` (configs/config.yaml's defaults list names it), DataConfig and OptimConfig as the
    `schema` of the `data` and `optim` groups (each configs/data/*.yaml and configs/optim/*.yaml
    extends it), so Hydra knows every key of the three sections."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="train", name="default", node=TrainConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)


def model_overrides(overrides: list[str]) -> list[str]:
    """`model.overrides.K=V` sets any field K of the model's config (configs/model/*.yaml list
    none of them: the model config classes hold every default): rewritten to Hydra's
    `++model.overrides.K=V` (add or replace); a misspelt field is refused by the model config."""
    return [f"++{o}" if o.startswith("model.overrides.") else o for o in overrides]


def compose_config(overrides: list[str], config_dir: str | None = None) -> dict:
    """The resolved config of `python train.py <overrides>` as a plain dict (for scripts and
    tests that run training in-process)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config_dir = config_dir or os.path.join(root, "configs")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose("config", overrides=model_overrides(overrides))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)

"""`train.dry_run=true`: the plan of a run, printed without touching data or devices:
parameters, tokens, steps (derived from train.tokens when it is set), the curriculum's
stages, checkpoints, and an estimate of the memory per GPU.

The memory estimate (per rank) is arithmetic, not a measurement:
- slow state: 16 bytes per parameter (float32 weight and gradient, AdamW's two moments;
  mixed Muon keeps one moment for its matrices, so this is an upper bound), divided by the
  world size under FSDP except for the replicated memory inits (sharding.py);
- FSDP's gathered blocks: the largest block's parameters, twice (the one computing and the
  one prefetched), in bf16 with train.bf16, else float32;
- fast state: exactly the bytes of init_state(micro-batch) (built on the meta device), kept
  twice per micro-batch (before and after the step's inner updates). HOPE's CMS levels are
  per-sequence copies of the CMS weights, so this term grows with the rows a rank carries
  (micro-batch x grad_accum) and usually dominates at the large sizes;
- activations: the Transformer rule of thumb 34 x batch x seq_len x d_model bytes per layer
  in 16-bit (Korthikanti et al., 2022; doubled in float32), for the largest stage; HOPE's and
  Titans' memories differ from attention and are not modelled beyond it. Treat the total as
  an order of magnitude and measure the first steps (torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import os

import torch

from ..models import build_model
from .config import TrainConfig
from .sharding import replicated_parameters

__all__ = ["plan", "print_plan"]

GIB = 1024 ** 3


def _bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors())


def plan(cfg: dict, t: TrainConfig) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "0")) or t.plan_world
    with torch.device("meta"):
        model = build_model(cfg["model"]["name"], cfg["size"]["name"], **(cfg["model"].get("overrides") or {}))
    n = model.num_parameters()
    replicated = replicated_parameters(model) if t.fsdp else 0
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    steps = t.total_steps(world)
    stages = []
    for i, (first, sl, b) in enumerate(t.stages()):
        if first >= steps:
            break
        last = (t.stages()[i + 1][0] if i + 1 < len(t.stages()) else steps)
        last = min(last, steps)
        stages.append({"from_step": first, "to_step": last, "seq_len": sl, "batch_size": b,
                       "tokens_per_step": b * sl * t.grad_accum * world, "tokens": (last - first) * b * sl * t.grad_accum * world})
    tokens = sum(s["tokens"] for s in stages)
    saves = (steps // t.save_every + (steps % t.save_every != 0)) if t.save_every else 0
    w16 = 2 if t.bf16 else 4
    slow = 16 * ((n - replicated) / world + replicated) if t.fsdp else 16 * n
    gathered = 2 * block * w16 if t.fsdp else 0
    d_model, layers = model.config.d_model, len(model.blocks)
    act = max(34 * s["batch_size"] * s["seq_len"] * d_model * layers * (w16 // 2) for s in stages)
    fast = max(_bytes(model.init_state(s["batch_size"])) for s in stages) * 2 * t.grad_accum
    total = slow + gathered + fast + act
    # a checkpoint: float32 weights and AdamW's two moments (12 bytes per parameter) once, plus
    # every rank's fast state (each row's memory: the largest stage's, once per row)
    ck = 12 * n + world * fast / 2
    return {"model": cfg["model"]["name"], "size": cfg["size"]["name"], "parameters": n,
            "replicated_parameters": replicated, "world": world, "fsdp": t.fsdp, "bf16": t.bf16,
            "steps": steps, "tokens": tokens, "token_budget": t.tokens, "stages": stages,
            "save_every": t.save_every, "save_every_minutes": t.save_every_minutes, "checkpoints": saves,
            "keep_last": t.keep_last,
            "memory_gib": {"slow_state": slow / GIB, "gathered_blocks": gathered / GIB, "fast_state": fast / GIB,
                           "activations": act / GIB, "total": total / GIB},
            "checkpoint_gib": ck / GIB, "fits": total / GIB <= t.plan_gpu_gib, "gpu_gib": t.plan_gpu_gib}


def print_plan(cfg: dict, t: TrainConfig) -> dict:
    p = plan(cfg, t)
    m = p["memory_gib"]
    lines = [
        f"plan: {p['model']} size={p['size']} | {p['parameters']:,} parameters"
        + (f" ({p['replicated_parameters']:,} memory-init parameters replicated on every rank)" if p["fsdp"] else ""),
        f"  world {p['world']} ({'FSDP2, sharded optimizer state' if p['fsdp'] else 'DDP' if p['world'] > 1 else 'one process'}"
        f"{', bf16' if p['bf16'] else ''}), optimizer {cfg['optim']['name']}",
        f"  tokens {p['tokens']:,}" + (f" (budget {p['token_budget']:,})" if p["token_budget"] else "")
        + f" in {p['steps']:,} steps",
    ]
    for i, s in enumerate(p["stages"]):
        lines.append(f"  stage {i}: steps {s['from_step']:,}-{s['to_step']:,}, seq_len {s['seq_len']}, "
                     f"batch {s['batch_size']} per micro-batch, {s['tokens_per_step']:,} tokens per step")
    lines.append(f"  checkpoints: {p['checkpoints']} by steps (every {p['save_every']:,})"
                 + (f", plus one every {p['save_every_minutes']:g} minutes of wall time" if p["save_every_minutes"] else "")
                 + f"; keep_last {p['keep_last']}; {p['checkpoint_gib']:.1f} GiB each (weights, optimizer, "
                 "every rank's fast state)")
    lines.append(f"  memory per GPU (estimate): slow state {m['slow_state']:.2f} GiB, gathered blocks "
                 f"{m['gathered_blocks']:.2f} GiB, fast state {m['fast_state']:.2f} GiB, activations "
                 f"{m['activations']:.2f} GiB -> {m['total']:.1f} GiB "
                 f"({'fits' if p['fits'] else 'does NOT fit'} {p['gpu_gib']:g} GiB)")
    print("\n".join(lines), flush=True)
    return p

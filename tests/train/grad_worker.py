"""Run by torchrun in test_fsdp_gradients.py: one training step's gradients of a tiny model under
DDP or FSDP2 (argv: model name, "ddp" or "fsdp", output path), every rank on its own batch;
rank 0 writes the full (gathered) gradients."""

import json
import sys

import torch

from nested_learning import distributed
from nested_learning.models import build_model
from nested_learning.train import sharding

name, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
info = distributed.setup("cpu", "gloo")
torch.manual_seed(0)
model = build_model(name, "tiny", **overrides)
sharded = sharding.wrap(model, info, fsdp=kind == "fsdp")
torch.manual_seed(1 + info.rank)
tokens = torch.randint(0, model.config.vocab_size, (2, 16))
loss, capture, _ = model.train_forward(tokens, model.init_state(2), module=sharded.module)
loss.backward()
sharded.sync_replicated_grads(info.world)
grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
         for n, p in model.named_parameters() if p.grad is not None}
if info.main:
    torch.save({"loss": float(loss.detach()), "grads": grads}, out)
del model, sharded, capture, loss
distributed.cleanup(info)

"""Run by torchrun in test_ddp.py / test_fsdp_checkpoint.py: trains from the JSON config in
argv[1], then writes this rank's slow-weight checksum and loss trace next to the run.

NL_TEST_SIGNAL_AFTER_STEP=N: rank 0 alone sends itself SIGTERM right after step N is logged (a
preemption notice; every rank must stop after the same step, saved). NL_TEST_KILL_AFTER_STEP=N:
every rank SIGKILLs itself right after step N is logged (a
preemption: no clean-up, no save of step N). NL_TEST_DUMP=PATH: after each save, the whole
model and the AdamW state as the live (sharded) run holds them, gathered, written by rank 0 to
PATH.stepN.pt (what a checkpoint must reproduce)."""

import json
import os
import signal
import sys

from nested_learning.train import metrics
from nested_learning.train.interrupt import TrainingInterrupted
from nested_learning.train.loop import run

kill_after = int(os.environ.get("NL_TEST_KILL_AFTER_STEP", "0"))
if kill_after:
    log = metrics.MetricsLog.log

    def log_then_die(self, record):
        log(self, record)
        if record.get("step") == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    metrics.MetricsLog.log = log_then_die

signal_after = int(os.environ.get("NL_TEST_SIGNAL_AFTER_STEP", "0"))
if signal_after:
    log_plain = metrics.MetricsLog.log

    def log_then_signal(self, record):
        log_plain(self, record)
        if record.get("step") == signal_after and os.environ.get("RANK") == "0":
            os.kill(os.getpid(), signal.SIGTERM)  # rank 0 alone: the ranks must agree to stop

    metrics.MetricsLog.log = log_then_signal

dump = os.environ.get("NL_TEST_DUMP")
if dump:
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from nested_learning.train import trainer

    save = trainer.Trainer.save

    def save_then_dump(self):
        path = save(self)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
        model = get_model_state_dict(self.model, options=full)
        optim = get_optimizer_state_dict(self.model, self.opt.optimizers["adamw"], options=full)
        if self.info.main:
            torch.save({"model": model, "optim": optim}, f"{dump}.step{self.step}.pt")
        return path

    trainer.Trainer.save = save_then_dump

cfg = json.load(open(sys.argv[1]))
try:
    summary = run(cfg)
except TrainingInterrupted as err:
    sys.exit(err.exit_code)
rank = int(os.environ["RANK"])
with open(os.path.join(cfg["train"]["out_dir"], f"worker{rank}.json"), "w") as f:
    json.dump({"checksum": summary["param_checksum"], "final_loss": summary.get("final_loss")}, f)

"""Run by torchrun in test_ddp.py: trains from the JSON config in argv[1], then writes this
rank's slow-weight checksum and loss trace next to the run."""

import json
import os
import sys

from nested_learning.train.loop import run

cfg = json.load(open(sys.argv[1]))
summary = run(cfg)
rank = int(os.environ["RANK"])
with open(os.path.join(cfg["train"]["out_dir"], f"worker{rank}.json"), "w") as f:
    json.dump({"checksum": summary["param_checksum"], "final_loss": summary["final_loss"]}, f)

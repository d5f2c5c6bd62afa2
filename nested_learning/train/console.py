"""What a training run tells its user: lines printed through the progress bar (never glued
onto it), by rank 0 only, and copied to the run's train.log."""

from __future__ import annotations

import os
import sys
import time


class Console:
    def __init__(self, out_dir: str, main: bool, progress: bool = True):
        self.main, self.progress = main, progress
        self.path = os.path.join(out_dir, "train.log")
        self.bar = None

    def progress_bar(self, start: int, total: int):
        """The steps start..total-1, under a tqdm bar when the run shows progress."""
        steps = range(start, total)
        if not (self.main and self.progress):
            return steps
        try:
            from tqdm import tqdm
        except ImportError:  # progress bars are a nicety, not a requirement
            return steps
        self.bar = tqdm(steps, initial=start, total=total, desc="train", dynamic_ncols=True)
        return self.bar

    def say(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")

    def warn(self, msg: str) -> None:
        self.say(msg if msg.startswith("warning: ") else f"warning: {msg}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

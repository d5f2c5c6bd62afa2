"""Interrupts during training: SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) are
recorded, not raised, so the step in flight finishes; the trainer then saves a checkpoint at that
step and stops with `TrainingInterrupted`, whose exit code is the convention's 128 + the signal
number (130, 143). A second Ctrl-C while the first is being handled stops at once
(KeyboardInterrupt, as without this). The ranks of a distributed run agree on stopping, so a
signal to one rank stops them all at the same step."""

from __future__ import annotations

import signal
import threading

import torch

from ..distributed import DistInfo

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its step (or saying why it could not)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupts:
    """Inside `with Interrupts() as intr:`, SIGINT and SIGTERM set `intr.signum` instead of
    stopping the process (the previous handlers come back on exit). Only the main thread can
    install handlers; elsewhere this does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved.clear()

    def pending(self, info: DistInfo) -> int | None:
        """The signal to stop on, agreed by every rank (one all-reduce per call when world > 1)."""
        if info.world == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"

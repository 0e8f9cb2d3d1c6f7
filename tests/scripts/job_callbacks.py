"""Test-only callbacks that the tests' jobs load by class path (``--trainer.callbacks+=tests.scripts.job_callbacks.X``).

They change nothing a model learns: ``StepMarker`` prints (and may slow down) optimizer steps so a test can signal a
job while it trains; ``SignalAtStep`` makes rank 0 send itself the preemption signal at a chosen step; ``DieAtStep``
kills the process as a node failure would.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class StepMarker(Callback):
    """After every optimizer step, rank 0 prints ``[step-marker] step N``; every rank then sleeps ``pause_s``."""

    def __init__(self, pause_s: float = 0.0) -> None:
        self.pause_s = pause_s
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            print(f"[step-marker] step {trainer.global_step}", flush=True)
        time.sleep(self.pause_s)


class SignalAtStep(Callback):
    """Rank 0 sends its own process ``signal_name`` once, at the end of optimizer step ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step = step
        self.signum = signal.Signals[signal_name]
        self._sent = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._sent and trainer.global_step == self.step and trainer.is_global_zero:
            self._sent = True
            os.kill(os.getpid(), self.signum)


class DieAtStep(Callback):
    """Emulates a crash (one process only): ends the process at once (exit 7, no clean-up) when optimizer step
    ``step`` has completed, before the next batch trains, i.e. after whatever checkpoints step ``step`` wrote."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os._exit(7)

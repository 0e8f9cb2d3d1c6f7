"""A training progress bar that counts what ``max_steps`` counts: optimizer steps over the whole run.

Lightning's bars count micro-batches of the current epoch against ``max_steps`` (so gradient accumulation shows
``200/100``) and print ``Epoch 0/-2`` for a run bounded by steps. Here the bar's position is the global step and
its total the run's optimizer steps (``max_steps``, else the estimate over ``max_epochs``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class StepProgressBar(TQDMProgressBar):
    """TQDM bar in optimizer steps; the CLI adds it unless a recipe names its own progress bar."""

    @staticmethod
    def total_steps(trainer: L.Trainer) -> int | float:
        return trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.total = convert_inf(self.total_steps(trainer))
        bar.n = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description(f"Epoch {trainer.current_epoch}, optimizer step")
        bar.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable or bar.n == trainer.global_step:  # an accumulation micro-batch: no step yet
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.refresh()

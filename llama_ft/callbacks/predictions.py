"""Predictions as JSON lines, one object per summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from llama_ft.outputs import mark_output_file


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``{id, summary, reference}`` per line; each process writes its part, rank 0 joins them."""

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        rows = [row for batch in predictions for row in batch]
        part = self.output_path.with_name(f"{self.output_path.name}.rank{trainer.global_rank}")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("".join(json.dumps(row) + "\n" for row in rows))
        trainer.strategy.barrier("predictions_written")
        if trainer.global_rank == 0:
            parts = [self.output_path.with_name(f"{self.output_path.name}.rank{r}") for r in range(trainer.world_size)]
            self.output_path.write_text("".join(p.read_text() for p in parts))
            mark_output_file(self.output_path)  # a later run may replace it; anything else there is refused
            for p in parts:
                p.unlink()

"""Predictions as JSON lines, one object per summary, in the run's directory; an earlier file is never overwritten."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from llama_ft.outputs import mark_output_file

DEFAULT_NAME = "predictions.jsonl"


def unused_path(path: Path) -> Path:
    """``path`` if nothing is there, else the first free ``<stem>-1<suffix>``, ``<stem>-2<suffix>``, ...

    A new name rather than a refusal: running ``predict`` again (another checkpoint, other articles) is ordinary, and
    each result is kept beside the earlier ones; the log says which name was taken.
    """
    candidate, n = path, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``{id, summary}`` per line (plus ``reference`` when the data has one); each process writes its part,
    rank 0 joins them.

    Args:
        output_path: the file to write; default ``predictions.jsonl`` in the run's log directory (its version
            directory, beside ``config.yaml``). When the file exists, the next free ``<stem>-<n>.jsonl`` is used.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = None if output_path is None else Path(output_path).expanduser()
        self.written: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Choose the file before any summary is generated; every rank learns rank 0's choice."""
        wanted = self.output_path or Path(trainer.log_dir or trainer.default_root_dir) / DEFAULT_NAME
        chosen = unused_path(wanted) if trainer.is_global_zero else None
        self.written = Path(trainer.strategy.broadcast(str(chosen) if chosen else None))

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        assert self.written is not None
        rows = [row for batch in predictions for row in batch]
        part = self.written.with_name(f".{self.written.name}.rank{trainer.global_rank}")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("".join(json.dumps(row) + "\n" for row in rows))
        trainer.strategy.barrier("predictions_written")
        if trainer.global_rank == 0:
            parts = [self.written.with_name(f".{self.written.name}.rank{r}") for r in range(trainer.world_size)]
            joined = "".join(p.read_text() for p in parts)
            with self.written.open("x") as out:  # exclusive: never replaces a file that appeared meanwhile
                out.write(joined)
            mark_output_file(self.written)  # ours: a later predict may write beside it, nothing else is refused
            for p in parts:
                p.unlink()
            rank_zero_info(f"{joined.count(chr(10))} prediction(s) written to {self.written}")

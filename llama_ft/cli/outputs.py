"""Before a Trainer command builds anything heavy: its outputs must be safe to write and its checkpoint loadable
by the strategy it runs with (see ``llama_ft.outputs`` for the rules)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter

from llama_ft.cli.resume import check_strategy_can_load
from llama_ft.data.sources import SAMPLE_ALIAS, SAMPLE_ROOT
from llama_ft.outputs import check_output_dir, check_output_file, local_sources

HF_EXPORT_NAME = "hf_model"


def run_sources(config: Namespace) -> list[Path]:
    """The local places the command reads: base model, checkpoint, data set and tokenizer."""
    data = [SAMPLE_ROOT if name == SAMPLE_ALIAS else name for name in (config.data.dataset, config.data.tokenizer)]
    return local_sources(config.model.model_name_or_path, config.get("ckpt_path"), *data)


def check_run_outputs(command: str, config: Namespace, trainer: L.Trainer) -> None:
    """fit's Hugging Face export directory and predict's writers' files; the checkpoint against the strategy."""
    ckpt = config.get("ckpt_path")
    check_strategy_can_load(Path(ckpt) if ckpt and Path(ckpt).exists() else None, trainer.strategy)
    sources = run_sources(config)
    if command == "fit":
        out = config.model.hf_export_dir or Path(trainer.log_dir or trainer.default_root_dir) / HF_EXPORT_NAME
        check_output_dir(out, "model.hf_export_dir", sources, config.overwrite)
    if command == "predict":
        for callback in trainer.callbacks:
            path = getattr(callback, "output_path", None)
            if isinstance(callback, BasePredictionWriter) and path is not None:
                check_output_file(path, "predictions output_path", sources, config.overwrite)

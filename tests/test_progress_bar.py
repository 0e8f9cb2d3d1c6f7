"""The training bar counts optimizer steps against max_steps (not micro-batches of the epoch)."""

from __future__ import annotations

from lightning import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from llama_ft.callbacks import StepProgressBar


def _fit(tmp_path, **kwargs) -> StepProgressBar:
    bar = StepProgressBar()
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, callbacks=[bar],
                      limit_val_batches=0, default_root_dir=tmp_path, enable_model_summary=False, **kwargs)
    trainer.fit(BoringModel())
    return bar


def test_the_bar_ends_at_max_steps_with_accumulation(tmp_path):
    bar = _fit(tmp_path, max_steps=5, accumulate_grad_batches=4)  # 20 micro-batches
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (5, 5)
    assert bar.train_progress_bar.desc.startswith("Epoch 0, optimizer step")


def test_an_epoch_bounded_run_counts_all_its_steps(tmp_path):
    bar = _fit(tmp_path, max_epochs=2, limit_train_batches=6, accumulate_grad_batches=3)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 4)


def test_the_cli_uses_it_unless_the_recipe_names_a_bar(tmp_path):
    from lightning.pytorch.callbacks import RichProgressBar

    from llama_ft.cli.lightning_cli import LlamaCLI
    from llama_ft.presets import DEFAULT_RECIPE

    common = ["--config", str(DEFAULT_RECIPE), f"--trainer.default_root_dir={tmp_path}"]
    default = LlamaCLI(args=common, run=False).trainer.progress_bar_callback
    assert isinstance(default, StepProgressBar)
    named = LlamaCLI(args=[*common, "--trainer.callbacks+=RichProgressBar"], run=False).trainer.progress_bar_callback
    assert isinstance(named, RichProgressBar)

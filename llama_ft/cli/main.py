"""Command-line entry: LightningCLI for fit/validate/test/predict, plus the project's own commands."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import llama_ft.parallel  # noqa: F401  (registers the "advanced" strategy in every launched process)
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.module import LlamaFineTuner

from llama_ft.presets import DEFAULT_RECIPE as DEFAULT_CONFIG
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
# Commands that are not Trainer methods: name -> module with ``main(argv: list[str]) -> int``.
EXTRA_COMMANDS = {
    "plan": "llama_ft.cli.plan",
    "slurm": "llama_ft.cli.slurm",
    "export": "llama_ft.cli.export",
}


class LlamaCLI(LightningCLI):
    """LightningCLI bound to LlamaFineTuner and CNNDailyMailDataModule."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            LlamaFineTuner,
            CNNDailyMailDataModule,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
        )


def with_default_config(argv: list[str]) -> list[str]:
    """``python main.py fit`` with no ``--config`` runs the embedded default (configs/default.yaml)."""
    if argv and argv[0] in TRAINER_COMMANDS and not any(a in ("-c", "--config") or a.startswith("--config=")
                                                         for a in argv[1:]):
        return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
    argv = with_default_config(argv)
    if from_command_line:
        # Lightning re-launches sys.argv in each extra process; keep the resolved arguments there too.
        sys.argv[1:] = argv
        LlamaCLI()
    else:
        LlamaCLI(args=argv)
    return 0

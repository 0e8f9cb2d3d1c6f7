"""The LightningCLI program: fit/validate/test/predict plus the plan, slurm and export commands.

Every command parses recipes with the same parser pieces (Trainer, ``LlamaFineTuner``, ``CNNDailyMailDataModule``),
so a recipe means the same thing everywhere and defaults come from the classes' signatures. The extra commands
parse but never instantiate the classes: they read the parsed recipe and do their own job.
"""

from __future__ import annotations

import importlib
import signal
import sys
from types import ModuleType
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_info

import llama_ft.parallel.applying.strategy  # noqa: F401  (registers the "advanced" strategy in every launched process)
from llama_ft.callbacks import JsonlPredictionWriter, StepProgressBar
from llama_ft.cli.outputs import check_run_outputs
from llama_ft.cli.quiet import silence_wrong_messages
from llama_ft.cli.resume import prepare_checkpoint
from llama_ft.cli.usage import OneLineErrors, report
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.errors import ConfigError, LlamaFTError
from llama_ft.module import LlamaFineTuner
from llama_ft.presets import DEFAULT_RECIPE

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
# Commands that are not Trainer methods, each a module with DESCRIPTION, add_arguments(parser) and
# run(config, argv) -> exit code, and optionally SHORTHANDS (option aliases) and check_arguments(argv) (refusals
# before parsing). ``slurm`` runs ``fit`` later, so the embedded default applies to it too.
EXTRA_COMMANDS = {"plan": "llama_ft.cli.plan", "slurm": "llama_ft.cli.slurm", "export": "llama_ft.cli.export"}
EMBEDDED_DEFAULT_COMMANDS = (*TRAINER_COMMANDS, "slurm")


def _extra_command(name: str) -> ModuleType:
    return importlib.import_module(EXTRA_COMMANDS[name])


class OneLineErrorParser(OneLineErrors, LightningArgumentParser):
    """The program's parser: a refused command line is one line (``OneLineErrors``)."""


class LlamaCLI(LightningCLI):
    """LightningCLI bound to LlamaFineTuner and CNNDailyMailDataModule, with the project's own commands added."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.exit_code = 0
        self._argv = list(args if args is not None else sys.argv[1:])
        super().__init__(
            LlamaFineTuner,
            CNNDailyMailDataModule,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_class=OneLineErrorParser,
            parser_kwargs={"description": "Fine-tune Llama on CNN/DailyMail; plan, submit and export the runs."},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Options every command shares: consent to replace outputs, and to override a checkpoint's settings."""
        parser.add_argument("--overwrite", type=bool, nargs="?", const=True, default=False,
                            help="replace an output (HF export, --out, predictions) that llama_ft did not write")
        parser.add_argument("--ckpt_overrides", type=bool, nargs="?", const=True, default=False,
                            help="with --ckpt_path: settings that differ from the checkpoint's win (else an error)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """``main(argv)`` passes the arguments on purpose (Lightning warns when ``sys.argv`` holds others)."""
        self.config = parser.parse_args(args)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's Trainer commands, then each extra command with the recipe arguments plus its own."""
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for name in EXTRA_COMMANDS:
            command = _extra_command(name)
            sub = self.init_parser(description=command.DESCRIPTION)
            self._add_arguments(sub)
            command.add_arguments(sub)
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=command.DESCRIPTION)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        """Add the bar that counts optimizer steps, unless the recipe names a progress bar or turns it off."""
        named = config.get("callbacks") or []
        named = named if isinstance(named, list) else [named]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in (*named, *callbacks)
        ):
            callbacks = [*callbacks, StepProgressBar()]
        try:  # building a Trainer loads nothing: what it refuses here is the recipe's trainer section
            return super()._instantiate_trainer(config, callbacks)
        except (ValueError, MisconfigurationException) as err:
            raise ConfigError(f"trainer settings refused: {' '.join(str(err).split())}") from err

    def after_fit(self) -> None:
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                rank_zero_info(f"checkpoints written to {callback.dirpath} (last: {callback.last_model_path or '-'}, "
                               f"best: {callback.best_model_path or '-'})")

    def after_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, JsonlPredictionWriter):
                rank_zero_info(f"predictions written to {callback.output_path}")

    def _set_seed(self) -> None:
        if self.subcommand not in EXTRA_COMMANDS:  # the extra commands draw no random numbers
            super()._set_seed()

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's, which unpickles the file and lets its hyper-parameters silently win: resolve
        ``last``, check the checkpoint with the allow-lists and refuse settings that conflict with it."""
        command = self.config.get("subcommand")
        if command not in TRAINER_COMMANDS:
            return
        config = self.config[command]
        path = prepare_checkpoint(command, config, config.ckpt_overrides)
        if path is not None or config.get("ckpt_path") == "last":
            config.ckpt_path = None if path is None else str(path)

    def instantiate_classes(self) -> None:
        if self.subcommand not in EXTRA_COMMANDS:
            super().instantiate_classes()
        if self.subcommand in TRAINER_COMMANDS:  # None when built with run=False: nothing will be written
            check_run_outputs(self.subcommand, self.config[self.subcommand], self.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand not in EXTRA_COMMANDS:
            try:
                super()._run_subcommand(subcommand)
            except LlamaFTError:
                # Lightning leaves the processes it launched waiting for this one; a peer's failed collective would
                # end each with a traceback. Stop them, as Lightning does on Ctrl-C; this process reports the error.
                launcher = self.trainer.strategy.launcher
                if isinstance(launcher, _SubprocessScriptLauncher):
                    launcher.kill(signal.SIGKILL)
                raise
            return
        config: Namespace = self.config[subcommand]
        self.exit_code = _extra_command(subcommand).run(config, self._argv[1:])


def with_default_config(argv: list[str]) -> list[str]:
    """``fit`` (and the other commands that train) with no ``--config`` run the embedded default recipe."""
    if argv and argv[0] in EMBEDDED_DEFAULT_COMMANDS and not any(
        a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]
    ):
        return [argv[0], "--config", str(DEFAULT_RECIPE), *argv[1:]]
    return argv


def expand_shorthands(argv: list[str]) -> list[str]:
    """An extra command's ``SHORTHANDS`` (e.g. plan's ``--model NAME``) become the recipe keys they stand for; a
    value that is a YAML file keeps its LightningCLI meaning (the section's config file)."""
    if not argv or argv[0] not in EXTRA_COMMANDS:
        return argv
    shorthands: dict[str, str] = getattr(_extra_command(argv[0]), "SHORTHANDS", {})
    out = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in shorthands:
            value = value if eq else next(args, "")
            out += [flag if value.endswith((".yaml", ".yml")) else shorthands[flag], value]
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code: 2 with one line on stderr for input that cannot work (a refused
    command line, a ``LlamaFTError`` or Lightning's ``MisconfigurationException`` from any stage, in any launched
    process), the traceback instead when LLAMA_FT_DEBUG=1."""
    from_command_line = argv is None
    silence_wrong_messages()
    argv = expand_shorthands(with_default_config(list(sys.argv[1:] if argv is None else argv)))
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            getattr(_extra_command(argv[0]), "check_arguments", lambda _: None)(argv[1:])
        if from_command_line:
            # Lightning re-launches sys.argv in each extra process; keep the resolved arguments there too.
            sys.argv[1:] = argv
            return LlamaCLI().exit_code
        return LlamaCLI(args=argv).exit_code
    except (LlamaFTError, MisconfigurationException) as err:
        return report(err, speak=rank_zero_only.rank == 0)  # every launched process fails alike; the first says why

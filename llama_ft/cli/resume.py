"""What ``--ckpt_path`` means, checked before any class is built: ``last`` is the newest ``last*.ckpt`` of the run
(same logger root and name), continued in that version's directory; the checkpoint is opened only through the
allow-lists of ``llama_ft.checkpoint.safe_pickle``; settings that differ from the ones it was trained with are
listed and refused unless ``--ckpt_overrides`` says the command line wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from llama_ft.checkpoint.atomic import resolve_checkpoint
from llama_ft.checkpoint.safe_pickle import check_checkpoint
from llama_ft.errors import ConfigError

LAST = "last"
# Saved hyper-parameters that must match to continue training: everything that shapes the model or its optimization,
# and the data settings that change what the model reads or in which order. Evaluation needs the same network and
# tokenizer only.
_NOT_COMPARED_MODEL = {"hf_export_dir", "max_new_tokens"}
_FIT_DATA = ("dataset", "tokenizer", "max_length", "global_batch_size", "micro_batch_size", "batching", "loss_on",
             "max_examples_per_split", "min_article_tokens", "seed")
_EVAL_MODEL = ("model_config", "model_name_or_path")
_EVAL_DATA = ("tokenizer",)


def _logger_layout(trainer: Namespace) -> tuple[Path, Namespace | None]:
    """The directory holding the run's version directories, and the logger's init_args when it can be pinned."""
    logger = trainer.get("logger")
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace):
        args = logger.init_args
        save_dir = Path(args.get("save_dir") or root)
        name = args.get("name")
        return (save_dir / name if name else save_dir), args
    return root / "lightning_logs", None


def _explicit_dirpath(trainer: Namespace) -> Path | None:
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, Namespace) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (callback.get("init_args") or Namespace()).get("dirpath")
            if dirpath:
                return Path(dirpath)
    return None


def _last_in(directory: Path) -> list[Path]:
    found = [p for p in directory.glob(f"{LAST}*.ckpt") if not p.name.startswith(".")]
    replaced = resolve_checkpoint(directory / f"{LAST}.ckpt")  # set aside by a crash mid-swap
    return found + ([replaced] if replaced.exists() and replaced not in found else [])


def find_last(trainer: Namespace) -> tuple[Path | None, str]:
    """The newest last checkpoint of the run (pinning the logger's version to its directory) and where it looked."""
    dirpath = _explicit_dirpath(trainer)
    if dirpath is not None:
        found = _last_in(dirpath)
        return (max(found, key=lambda p: p.stat().st_mtime) if found else None), str(dirpath)
    run_root, logger_args = _logger_layout(trainer)
    version = logger_args.get("version") if logger_args is not None else None
    if version is not None:
        name = version if isinstance(version, str) else f"version_{version}"
        found = _last_in(run_root / name / "checkpoints")
        return (max(found, key=lambda p: p.stat().st_mtime) if found else None), str(run_root / name / "checkpoints")
    found = [p for d in run_root.glob("*/checkpoints") for p in _last_in(d)]
    if not found:
        return None, str(run_root / "*" / "checkpoints")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    if logger_args is not None:
        logger_args.version = newest.parent.parent.name  # continue in that version's directory
    return newest, str(run_root)


def _same(a: Any, b: Any) -> bool:
    """Equal as values: a parsed group (``Namespace``) against the plain mapping the checkpoint saved, a list
    against a tuple."""
    a, b = (v.as_dict() if isinstance(v, Namespace) else v for v in (a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def conflicts(command: str, config: Namespace, saved: dict[str, Any]) -> list[str]:
    """``section.key: given X, checkpoint Y`` for every compared setting that differs from the saved one."""
    model_saved = saved.get("hyper_parameters") or {}
    data_saved = saved.get("datamodule_hyper_parameters") or {}
    if command == "fit":
        model_keys = [k for k in model_saved if not k.startswith("_") and k not in _NOT_COMPARED_MODEL]
        data_keys: tuple[str, ...] = _FIT_DATA
    else:
        model_keys, data_keys = list(_EVAL_MODEL), _EVAL_DATA
    found = []
    for section, keys, values in (("model", model_keys, model_saved), ("data", data_keys, data_saved)):
        given = config.get(section) or Namespace()
        for key in keys:
            if key in values and key in given and not _same(given[key], values[key]):
                found.append(f"{section}.{key}: given {given[key]!r}, checkpoint {values[key]!r}")
    return found


def prepare_checkpoint(command: str, config: Namespace, overrides: bool) -> Path | None:
    """Resolve ``config.ckpt_path`` (``last`` included), check the checkpoint safely and compare its settings.

    Returns the checkpoint to load, or None when ``last`` finds none (a first run starts from scratch). Lightning's
    other keywords (``best``, ``hpc``, ``registry``) are left to Lightning.
    """
    given = config.get("ckpt_path")
    if not given or given in ("best", "hpc", "registry") or given.startswith("registry:"):
        return None
    if given == LAST:
        path, where = find_last(config.trainer)
        if path is None:
            rank_zero_info(f"--ckpt_path last: no last checkpoint in {where}; starting from scratch.")
            return None
        rank_zero_info(f"--ckpt_path last: resuming from {path}")
    else:
        path = resolve_checkpoint(Path(given).expanduser())
        if not path.exists():
            raise ConfigError(f"--ckpt_path {given} does not exist; pass a checkpoint that `llama-ft fit` wrote, e.g. "
                              "<log dir>/checkpoints/last.ckpt, or `last` for the newest of the run.")
    saved = check_checkpoint(path)
    found = conflicts(command, config, saved)
    if found and not overrides:
        raise ConfigError(
            f"checkpoint {path} was trained with other settings: {'; '.join(found)}. Give the run's own settings "
            "(e.g. its --config), or pass --ckpt_overrides to make the command line win."
        )
    return path


def check_strategy_can_load(path: Path | None, strategy: Any) -> None:
    """A distributed (sharded) checkpoint directory loads only through ModelParallelStrategy and its subclasses."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if path is not None and path.is_dir() and not isinstance(strategy, ModelParallelStrategy):
        raise ConfigError(
            f"--ckpt_path {path} is a distributed (sharded) checkpoint, which {type(strategy).__name__} cannot load; "
            "run with --trainer.strategy advanced (any number of devices), or turn it into a Hugging Face directory "
            "with `llama-ft export` and pass that as --model.model_name_or_path."
        )

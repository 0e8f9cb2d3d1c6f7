"""``python main.py export --ckpt PATH --out DIR``: any checkpoint ``fit`` wrote → a Hugging Face directory.

Two checkpoint forms exist. Single-device and DDP runs (and the ``advanced`` strategy with
``save_distributed_checkpoint=False``) write one ``torch.save`` file whose ``state_dict`` holds full tensors.
Sharded runs (FSDP, TP, both) write a distributed checkpoint directory: ``.metadata``, one ``__<rank>_0.distcp``
shard file per rank and ``meta.pt`` with everything that is not a tensor. The directory is read here in this one
process, without a process group: the metadata gives every tensor's full shape and ``torch.distributed.checkpoint``
fills it from all shards, whatever the layout was. Optimizer states are never read.

Everything is loaded with ``weights_only=True``: a checkpoint names values, never code to run. The architecture comes
from the hyper-parameters ``LlamaFineTuner`` saved (``model_config`` / ``model_name_or_path``), else from
``--config``; the tokenizer from ``--tokenizer``, else the data module's saved ``tokenizer``, else the recipe's.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llama_ft.checkpoint import partial_path, publish, remove_path, resolve_checkpoint
from llama_ft.data.sources import load_tokenizer
from llama_ft.errors import ConfigError, DataError
from llama_ft.checkpoint.huggingface import save_hf_directory
from llama_ft.module import LlamaFineTuner
from llama_ft.recipe import load_recipe, section_value

DCP_METADATA = ".metadata"
LIGHTNING_METADATA = "meta.pt"
STATE_DICT_KEY = "state_dict"
MODULE_PREFIX = "model."  # LlamaFineTuner keeps the LlamaForCausalLM in ``self.model``
WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, not part of the HF name


@dataclass
class LightningCheckpoint:
    """What export needs from a checkpoint: the module's tensors and the non-tensor metadata."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    def hparam(self, name: str, datamodule: bool = False) -> Any:
        section = self.metadata.get("datamodule_hyper_parameters" if datamodule else "hyper_parameters") or {}
        return section.get(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py export",
        description="Turn a llama_ft checkpoint (single file, FSDP- or TP-sharded directory) into a Hugging Face "
        "directory that LlamaForCausalLM.from_pretrained loads.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint file or distributed checkpoint directory")
    parser.add_argument("--out", required=True, help="directory to write config.json, safetensors and tokenizer to")
    parser.add_argument("--config", help="recipe YAML, used when the checkpoint lacks the model's hyper-parameters")
    parser.add_argument("--tokenizer", help="tokenizer to save with the model (default: the one the run used)")
    return parser


# =============================================================================================================
# Reading
# =============================================================================================================


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{path} holds objects other than tensors and plain values ({err}). llama_ft reads {what} with "
            "torch.load(weights_only=True) so that a checkpoint cannot run code; re-save it with plain "
            "hyper-parameters (strings, numbers, lists, dicts)."
        ) from err


def _read_distributed(path: Path) -> LightningCheckpoint:
    """Full tensors of the module's state from every shard, in this process (no process group needed)."""
    reader = dcp.FileSystemReader(str(path))
    prefix = f"{STATE_DICT_KEY}."
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, storage_reader=reader)
    metadata = _torch_load(path / LIGHTNING_METADATA, LIGHTNING_METADATA)
    return LightningCheckpoint({key[len(prefix):]: value for key, value in state.items()}, metadata)


def _read_file(path: Path) -> LightningCheckpoint:
    checkpoint = _torch_load(path, "checkpoints")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(STATE_DICT_KEY), dict):
        raise ConfigError(
            f"{path} is not a Lightning checkpoint (no {STATE_DICT_KEY!r} mapping). Pass a .ckpt file or a "
            "checkpoint directory that `python main.py fit` wrote (e.g. <log dir>/checkpoints/last.ckpt)."
        )
    state_dict = checkpoint.pop(STATE_DICT_KEY)
    return LightningCheckpoint(state_dict, checkpoint)


def read_checkpoint(path: str | Path) -> LightningCheckpoint:
    """The module state and metadata of a single-file or distributed checkpoint."""
    given = Path(path)
    path = resolve_checkpoint(given)
    if not path.exists():
        raise ConfigError(f"checkpoint {str(given)!r} does not exist; pass the path of a .ckpt file or directory "
                          "that `fit` wrote, e.g. <log dir>/checkpoints/last.ckpt.")
    if path.is_file():
        return _read_file(path)
    if (path / DCP_METADATA).is_file() and (path / LIGHTNING_METADATA).is_file():
        return _read_distributed(path)
    if (path / "config.json").is_file():
        raise ConfigError(f"{path} is already a Hugging Face directory; load it with from_pretrained, or pass "
                          "model.model_name_or_path to fine-tune it.")
    raise ConfigError(
        f"directory {path} is not a distributed Lightning checkpoint: it lacks {DCP_METADATA} and/or "
        f"{LIGHTNING_METADATA}. Pass a checkpoint directory written by `fit` with a sharded strategy, or a .ckpt file."
    )


def hf_weights(checkpoint: LightningCheckpoint, source: str | Path) -> dict[str, torch.Tensor]:
    """The ``LlamaForCausalLM`` tensors under their Hugging Face names (module prefix and wrapper names removed)."""
    weights = {
        key[len(MODULE_PREFIX):].replace(WRAPPER_PREFIX, ""): value
        for key, value in checkpoint.state_dict.items()
        if key.startswith(MODULE_PREFIX)
    }
    if not weights:
        found = sorted(checkpoint.state_dict)[:3]
        raise ConfigError(
            f"checkpoint {source} has no '{MODULE_PREFIX}*' weights (found {found}…); it was not written by "
            "llama_ft's LlamaFineTuner. Export checkpoints of `python main.py fit` runs."
        )
    return weights


# =============================================================================================================
# Rebuilding
# =============================================================================================================


def resolve_llama_config(checkpoint: LightningCheckpoint, recipe: dict[str, Any], source: str | Path) -> LlamaConfig:
    """The architecture the run trained: the checkpoint's hyper-parameters, else the recipe's model section."""
    names = ("model_config", "model_name_or_path")
    values = {name: checkpoint.hparam(name) for name in names}
    if all(v is None for v in values.values()):
        values = {name: section_value(recipe, "model", name) for name in names}
    if all(v is None for v in values.values()):
        raise ConfigError(
            f"checkpoint {source} does not say which model it holds (no model_config / model_name_or_path "
            "hyper-parameters). Pass --config RECIPE.yaml with the recipe the run used."
        )
    return LlamaFineTuner._resolve_config(values["model_config"], values["model_name_or_path"])


def build_model(config: LlamaConfig, weights: dict[str, torch.Tensor], source: str | Path) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` holding exactly ``weights`` (built on the meta device: no second copy in memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    result = model.load_state_dict(weights, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"checkpoint {source} does not fit the model config {config.to_diff_dict()}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}. Pass --config with the recipe "
            "the run used."
        )
    model.tie_weights()
    return model


def resolve_tokenizer(
    explicit: str | None, checkpoint: LightningCheckpoint, recipe: dict[str, Any]
) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """The tokenizer to ship and, when there is none, why. An explicit ``--tokenizer`` that fails is an error."""
    if explicit is not None:
        return load_tokenizer(explicit), None
    name = checkpoint.hparam("tokenizer", datamodule=True) or section_value(recipe, "data", "tokenizer")
    if name is None:
        return None, "the checkpoint names no tokenizer; the export has none (pass --tokenizer to add one)"
    try:
        return load_tokenizer(name), None
    except DataError as err:
        return None, f"the run's tokenizer {name!r} cannot be loaded here ({err}); pass --tokenizer to add one"


def _check_output(out: Path, ckpt: Path) -> None:
    """Refuse to replace anything but an earlier export: the output directory is swapped in whole."""
    if out.resolve() == ckpt.resolve():
        raise ConfigError(f"--out {out} is the checkpoint itself; pick another directory.")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file()):
        raise ConfigError(f"--out {out} exists and is not a Hugging Face directory; pick a new or empty directory.")


def export_checkpoint(ckpt: str | Path, out: str | Path, recipe: str | None = None,
                      tokenizer: str | None = None) -> tuple[Path, str | None]:
    """Write the Hugging Face directory; returns it and a note when no tokenizer could be included.

    The directory is assembled beside ``out`` and swapped in when complete, so an interrupted export never leaves
    a half-written model where a previous export was.
    """
    ckpt, out = Path(ckpt), Path(out)
    _check_output(out, ckpt)
    recipe_data = load_recipe(recipe) if recipe else {}
    checkpoint = read_checkpoint(ckpt)
    weights = hf_weights(checkpoint, ckpt)
    model = build_model(resolve_llama_config(checkpoint, recipe_data, ckpt), weights, ckpt)
    hf_tokenizer, note = resolve_tokenizer(tokenizer, checkpoint, recipe_data)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    remove_path(partial)
    save_hf_directory(model, hf_tokenizer, partial)
    publish(partial, out)
    return out, note


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        out, note = export_checkpoint(args.ckpt, args.out, recipe=args.config, tokenizer=args.tokenizer)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if note:
        print(f"warning: {note}", file=sys.stderr)
    print(f"Hugging Face model written to {out}")
    return 0

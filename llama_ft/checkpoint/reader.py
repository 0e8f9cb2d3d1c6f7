"""Read what ``fit`` saved (a single file, or a distributed checkpoint directory) in one process, weights only.

Single-device and DDP runs write one ``torch.save`` file whose ``state_dict`` holds full tensors. Sharded runs write a
directory: ``.metadata``, one ``__<rank>_0.distcp`` shard file per rank and ``meta.pt`` with everything that is not
a tensor. The metadata gives every tensor's full shape, so ``torch.distributed.checkpoint`` fills it from all shards
without a process group, whatever the layout was. Optimizer states are never read, and every pickle is read with
``weights_only=True``: a checkpoint names values, never code to run.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from llama_ft.checkpoint.atomic import corrupt_checkpoint_error, resolve_checkpoint
from llama_ft.errors import ConfigError

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


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as err:
        error = corrupt_checkpoint_error(path, err)
        if error is None:
            raise
        raise error from err
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

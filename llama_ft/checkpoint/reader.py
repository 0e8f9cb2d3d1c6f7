"""Read what ``fit`` saved (a single file, or a distributed checkpoint directory) in one process, weights only,
one tensor at a time.

Single-device and DDP runs write one ``torch.save`` file whose ``state_dict`` holds full tensors (memory-mapped
here, so only the pages of the tensor being used are read). Sharded runs write a directory: ``.metadata``, one
``__<rank>_0.distcp`` shard file per rank and ``meta.pt`` with everything that is not a tensor. The metadata gives
every tensor's full shape, so ``torch.distributed.checkpoint`` fills one tensor from all shards without a process
group, whatever the layout was. Optimizer states are never read; every pickle is read with ``weights_only=True``,
and ``.metadata`` with the allow-list of ``safe_pickle``: a checkpoint names values, never code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from llama_ft.checkpoint.atomic import resolve_checkpoint
from llama_ft.checkpoint.huggingface import WRAPPER_PREFIX
from llama_ft.checkpoint.safe_pickle import check_dcp_metadata, load_weights_only
from llama_ft.checkpoint.safetensors_stream import TensorSpec
from llama_ft.errors import ConfigError

DCP_METADATA = ".metadata"
LIGHTNING_METADATA = "meta.pt"
STATE_DICT_KEY = "state_dict"
MODULE_PREFIX = "model."  # LlamaFineTuner keeps the LlamaForCausalLM in ``self.model``


@dataclass
class LightningCheckpoint:
    """What export needs from a checkpoint: the module's tensors (shapes now, values on demand, one at a time)
    and the non-tensor metadata."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, Any]
    load: Callable[[str], torch.Tensor]

    def hparam(self, name: str, datamodule: bool = False) -> Any:
        section = self.metadata.get("datamodule_hyper_parameters" if datamodule else "hyper_parameters") or {}
        return section.get(name)


class _MetadataOnceReader(dcp.FileSystemReader):
    """Reads ``.metadata`` once, not once per tensor loaded."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self) -> Metadata:
        return self._metadata


def read_distributed_metadata(path: Path) -> Metadata:
    """The ``.metadata`` of a distributed checkpoint (every tensor's name, full shape, dtype and chunks), checked
    with the allow-list first: torch's reader unpickles it with plain pickle."""
    check_dcp_metadata(path)
    return dcp.FileSystemReader(str(path)).read_metadata()


def _read_distributed(path: Path) -> LightningCheckpoint:
    """Shapes from the metadata; each tensor filled from every shard only when asked for (no process group)."""
    metadata = read_distributed_metadata(path)
    reader = _MetadataOnceReader(path, metadata)
    prefix = f"{STATE_DICT_KEY}."
    specs = {
        key[len(prefix):]: TensorSpec(key[len(prefix):], tuple(meta.size), meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }

    def load(name: str) -> torch.Tensor:
        spec = specs[name]
        tensor = torch.empty(spec.shape, dtype=spec.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load({prefix + name: tensor}, storage_reader=reader, no_dist=True)
        return tensor

    return LightningCheckpoint(specs, load_weights_only(path / LIGHTNING_METADATA), load)


def _read_file(path: Path) -> LightningCheckpoint:
    checkpoint = load_weights_only(path, mmap=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(STATE_DICT_KEY), dict):
        raise ConfigError(
            f"{path} is not a Lightning checkpoint (no {STATE_DICT_KEY!r} mapping). Pass a .ckpt file or a "
            "checkpoint directory that `python main.py fit` wrote (e.g. <log dir>/checkpoints/last.ckpt)."
        )
    state_dict = checkpoint.pop(STATE_DICT_KEY)
    specs = {key: TensorSpec(key, tuple(value.shape), value.dtype) for key, value in state_dict.items()
             if isinstance(value, torch.Tensor)}
    return LightningCheckpoint(specs, checkpoint, state_dict.__getitem__)


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


def hf_tensors(checkpoint: LightningCheckpoint, source: str | Path) -> dict[str, str]:
    """Hugging Face name → checkpoint key of the ``LlamaForCausalLM`` tensors (module prefix and wrapper names
    removed)."""
    names = {
        key[len(MODULE_PREFIX):].replace(WRAPPER_PREFIX, ""): key
        for key in checkpoint.tensors
        if key.startswith(MODULE_PREFIX)
    }
    if not names:
        found = sorted(checkpoint.tensors)[:3]
        raise ConfigError(
            f"checkpoint {source} has no '{MODULE_PREFIX}*' weights (found {found}…); it was not written by "
            "llama_ft's LlamaFineTuner. Export checkpoints of `python main.py fit` runs."
        )
    return names


def stream_tensors(checkpoint: LightningCheckpoint, names: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, tensor)`` pairs in the order of ``names``, each read only when it is next."""
    for hf_name, key in names.items():
        yield hf_name, checkpoint.load(key)

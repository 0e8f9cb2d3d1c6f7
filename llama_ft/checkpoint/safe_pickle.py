"""Read what a user hands in as a checkpoint without ever running code from it.

Single files and ``meta.pt`` go through ``torch.load(weights_only=True)``. A distributed checkpoint's ``.metadata`` is
a plain pickle that torch's ``FileSystemReader`` loads with ``pickle.load``, so it is first unpickled here with an
allow-list: only the types torch's DCP metadata is made of (``torch/distributed/checkpoint/metadata.py``, the
file-system reader's ``_StorageInfo``, dtypes, sizes, layouts, paths; what Lightning's ``ModelParallelStrategy``
checkpoints reference). Anything else is refused with one line, before any torch reader opens the file.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata

from llama_ft.errors import ConfigError

DCP_METADATA = ".metadata"
LIGHTNING_METADATA = "meta.pt"
_PLAIN_TYPES = {
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # rebuilds a layout from its name, e.g. "torch.strided"
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


def _allowed(module: str, name: str) -> Any | None:
    """The object ``module.name`` if a DCP ``.metadata`` may reference it, else None."""
    if module == dcp_metadata.__name__:
        value = getattr(dcp_metadata, name, None)
        return value if isinstance(value, type) and value.__module__ == module else None
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) in _PLAIN_TYPES:
        return getattr(__import__(module, fromlist=[name]), name)
    return None


class _Disallowed(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to a damaged pickle)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        value = _allowed(module, name)
        if value is None:
            raise _Disallowed(f"{module}.{name} is not a checkpoint metadata type")
        return value


def _refusal(path: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"refusing to load {path}: {reason}. A checkpoint must hold only tensors and plain values (llama_ft never "
        "runs code from one); pass a checkpoint that `llama-ft fit` wrote."
    )


def _first_line(err: BaseException) -> str:
    """The part of an error that says what is wrong, on one line (torch's refusals span paragraphs)."""
    text = str(err).strip()
    match = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", text)
    if match:
        return f"it references {match.group(1)}, which is not a tensor or plain value"
    first = text.splitlines()[0] if text else type(err).__name__
    return first.split(". ")[0].rstrip(".")


def check_dcp_metadata(directory: Path) -> None:
    """Unpickle every ``*.metadata`` of a distributed checkpoint with the allow-list (raises on anything else)."""
    for path in sorted(directory.glob(f"*{DCP_METADATA}")):
        try:
            _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except _Disallowed as err:
            raise _refusal(path, _first_line(err)) from err
        except Exception as err:  # a truncated or foreign file: name it, in one line
            raise ConfigError(f"cannot read {path} ({type(err).__name__}: {_first_line(err)}); the distributed "
                              "checkpoint is damaged or was not written by torch.distributed.checkpoint.") from err


def load_weights_only(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` whose refusal or read failure is one line naming the file; ``mmap`` reads
    only the pickled structure (tensors stay on disk), which is how a checkpoint is checked before it is used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ConfigError(f"cannot read checkpoint {path} ({_first_line(err)}); the file is damaged.") from err
        raise _refusal(path, _first_line(err)) from err
    except Exception as err:
        if mmap and "mmap" in str(err):  # a legacy (non-zip) torch.save file cannot be mapped
            return load_weights_only(path, mmap=False)
        raise ConfigError(f"cannot read checkpoint {path} ({type(err).__name__}: {_first_line(err)}); the file is "
                          "damaged (e.g. truncated by a full disk) or is not a torch checkpoint.") from err


def check_checkpoint(path: Path) -> dict[str, Any]:
    """Refuse a checkpoint that would run code or cannot be read; returns its non-tensor metadata (for a file the
    whole pickled mapping with tensors left on disk, for a directory ``meta.pt``)."""
    if path.is_dir():
        if not (path / DCP_METADATA).is_file():
            raise ConfigError(f"directory {path} is not a checkpoint (no {DCP_METADATA}); pass a .ckpt file or a "
                              "checkpoint directory that `llama-ft fit` wrote.")
        check_dcp_metadata(path)
        meta = path / LIGHTNING_METADATA
        loaded = load_weights_only(meta) if meta.is_file() else {}
    else:
        loaded = load_weights_only(path, mmap=True)
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} is not a Lightning checkpoint (it holds a {type(loaded).__name__}, not a mapping);"
                          " pass a checkpoint that `llama-ft fit` wrote.")
    return loaded

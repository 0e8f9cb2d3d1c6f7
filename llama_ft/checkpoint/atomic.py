"""Checkpoints that survive a crash mid-save: write beside the target, then swap the finished one into place.

Lightning overwrites ``last.ckpt`` in place on every save. A process killed halfway leaves a torn file, or — for a
distributed checkpoint, a directory of per-rank shards plus ``meta.pt`` — a mix of old and new shards that loads
wrongly or not at all. Here every save goes to a hidden sibling, ``.<name>.partial``, on the same filesystem, and
only a complete checkpoint is moved onto the target:

- a file is moved with ``os.replace`` (an atomic rename on POSIX);
- a directory is swapped with the old one in a single step (Linux ``renameat2(RENAME_EXCHANGE)``), then the old one,
  now at the partial path, is deleted. So the target is, at every instant, the previous or the new complete
  checkpoint.
- Where the filesystem cannot exchange (e.g. NFS, macOS), the old directory is first renamed to
  ``.<name>.replaced`` and the new one renamed onto the target. A crash between those two renames leaves the target
  missing and the previous checkpoint complete at ``.<name>.replaced``: :func:`resolve_checkpoint` returns it and
  the next save puts it back.

A crash at any other moment leaves at most a stale ``.partial``; the next save in that directory deletes it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llama_ft.errors import ConfigError

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def partial_path(target: str | Path) -> Path:
    """Where a checkpoint is written before it is published: a hidden sibling, so the final rename stays on one
    filesystem (atomic) and Lightning's ``last*.ckpt`` discovery never mistakes it for a checkpoint."""
    target = Path(target)
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def _replaced_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{REPLACED_SUFFIX}")


def remove_path(path: Path) -> None:
    """Delete a file, a symlink or a directory tree; nothing if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def remove_stale_partials(directory: str | Path) -> None:
    """Delete what crashed saves left in ``directory`` (a save in progress is never concurrent with this: call it
    before saving, from the one process that publishes)."""
    directory = Path(directory)
    if directory.is_dir():
        for leftover in directory.glob(f".*{PARTIAL_SUFFIX}"):
            remove_path(leftover)


def resolve_checkpoint(path: str | Path) -> Path:
    """``path``, or the previous checkpoint set aside under it when a crash hit between the two renames of a
    non-exchanging filesystem (see the module docstring). Unchanged when neither exists."""
    path = Path(path)
    replaced = _replaced_path(path)
    if not os.path.lexists(path) and replaced.exists():
        return replaced
    return path


def _fsync(path: Path) -> None:
    """Flush ``path`` (file or directory entry table) to disk, so a published checkpoint survives a node crash too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for item in path.rglob("*"):
            if item.is_file():
                _fsync(item)
    _fsync(path)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where the OS or filesystem can't."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


def publish(partial: str | Path, target: str | Path) -> None:
    """Move the complete checkpoint at ``partial`` onto ``target`` (file or directory) without a moment where
    ``target`` is torn; the checkpoint it replaces is deleted afterwards."""
    partial, target = Path(partial), Path(target)
    _fsync_tree(partial)
    replaced = _replaced_path(target)
    if not os.path.lexists(target) and replaced.exists():
        os.rename(replaced, target)  # put back what a crash between the fallback's two renames left aside
    if not os.path.lexists(target):
        os.rename(partial, target)
    elif partial.is_file() and target.is_file():
        os.replace(partial, target)
    elif _exchange(partial, target):
        remove_path(partial)  # it now holds the previous checkpoint
    else:
        remove_path(replaced)
        os.rename(target, replaced)
        os.rename(partial, target)
        remove_path(replaced)
    _fsync(target.parent)


def corrupt_checkpoint_error(path: str | Path, err: Exception) -> ConfigError | None:
    """The one-line error for a torn or truncated checkpoint file, or None when ``err`` is something else."""
    if isinstance(err, EOFError) or (isinstance(err, RuntimeError) and "PytorchStreamReader" in str(err)):
        return ConfigError(f"checkpoint {path} is truncated or corrupt ({str(err).split('.')[0]}); use another "
                           "checkpoint (e.g. an earlier one of the run) or copy the file again.")
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose single-file saves cannot be torn by a crash (see the module docstring).

    Enable it in a recipe with ``trainer.plugins: [llama_ft.checkpoint.AtomicCheckpointIO]``. Remote URLs
    (``s3://`` …) keep Lightning's own writer: object stores publish an object only once it is complete.
    """

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Lightning's loading; a torn or truncated file is named in one line instead of torch's zip error."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError) as err:
            error = corrupt_checkpoint_error(path, err)
            if error is None:
                raise
            raise error from err

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} got storage_options={storage_options!r} for {path}, but local files take none; "
                "drop storage_options from Trainer.save_checkpoint."
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target.parent)
        partial = partial_path(target)
        with partial.open("wb") as file:
            torch.save(checkpoint, file)
        publish(partial, target)

"""Where this program may write: a new or empty place, or one it wrote before, never what a run reads from.

A directory llama_ft writes holds a marker file (``.llama_ft_output``); a single output file gets a hidden sibling
marker (``.<name>.llama_ft_output``). Anything else already there belongs to the user and is refused before any
work starts, unless the user passes ``--overwrite``. The places a run loads from (base model, checkpoint, data,
tokenizer) are refused even then. Written files get the permissions the user's umask gives (safetensors writes
0600).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from llama_ft.errors import ConfigError

MARKER = ".llama_ft_output"


def _file_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}{MARKER}")


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def local_sources(*names: str | os.PathLike | None) -> list[Path]:
    """The given names that are existing local paths (hub ids and aliases are not places on this disk)."""
    return [Path(n).expanduser().resolve() for n in names if n and Path(n).expanduser().exists()]


def _check_not_a_source(out: Path, option: str, sources: Iterable[Path]) -> None:
    target = out.expanduser().resolve()
    for source in sources:
        if _inside(target, source) or _inside(source, target):
            raise ConfigError(f"{option} {out} would overwrite {source}, which this run reads from; write the output "
                              "to a new directory.")


def check_output_dir(out: str | Path, option: str, sources: Iterable[Path] = (), overwrite: bool = False) -> None:
    """Refuse ``out`` unless it is new, empty or an earlier llama_ft output (or ``overwrite``); never a source."""
    out = Path(out)
    _check_not_a_source(out, option, sources)
    if overwrite or not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ConfigError(f"{option} {out} is an existing file; pass a directory path (or --overwrite to replace it).")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{option} {out} already holds files that llama_ft did not write; pick a new or empty "
                          "directory, or pass --overwrite to replace them.")


def check_output_file(out: str | Path, option: str, sources: Iterable[Path] = (), overwrite: bool = False) -> None:
    """Refuse an existing file at ``out`` unless llama_ft wrote it (or ``overwrite``); never a source."""
    out = Path(out)
    _check_not_a_source(out, option, sources)
    if overwrite or not os.path.lexists(out):
        return
    if out.is_dir():
        raise ConfigError(f"{option} {out} is a directory; pass a file path such as {out / 'predictions.jsonl'}.")
    if out.stat().st_size and not _file_marker(out).is_file():
        raise ConfigError(f"{option} {out} exists and llama_ft did not write it; pick a new file name, or pass "
                          "--overwrite to replace it.")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mark_output_dir(out: str | Path) -> None:
    """Leave the marker in a directory this program wrote, and give its files the umask's permissions."""
    out = Path(out)
    (out / MARKER).write_text("written by llama_ft; a later run may replace this directory's contents\n")
    mask = _umask()
    for path in out.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def mark_output_file(out: str | Path) -> None:
    """Leave the sibling marker of an output file this program wrote."""
    _file_marker(Path(out)).write_text("written by llama_ft\n")

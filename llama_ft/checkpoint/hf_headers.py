"""What a Hugging Face checkpoint directory holds, read from its safetensors headers alone (no tensor is read).

A damaged download, an index that names a missing file, or weights that do not fit the model's architecture are
refused here in one line, before any weight is loaded, on every loading path (``from_pretrained`` on one device,
each rank's slices under the ``advanced`` strategy, the LoRA merged export)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open

from llama_ft.checkpoint.safetensors_stream import INDEX_FILE, SINGLE_FILE
from llama_ft.errors import ConfigError

Shape = tuple[int, ...]


def _index_map(directory: Path) -> dict[str, str]:
    """The index's tensor name → file map, every file a plain name beside the index and present."""
    index = directory / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read {index} ({type(err).__name__}: {err}); it is not a safetensors index with "
                          "a weight_map. Download or convert the checkpoint again.") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index}: weight_map must map tensor names to file names.")
    outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
    if outside:
        raise ConfigError(f"{index} names files outside its directory ({outside[:3]}); an index may only name files "
                          "beside it.")
    absent = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if absent:
        raise ConfigError(f"{directory} lacks {len(absent)} file(s) its index names ({absent[:3]}); the download is "
                          "incomplete. Download the checkpoint again.")
    return weight_map


def _file_shapes(path: Path) -> dict[str, Shape]:
    try:
        with safe_open(path, framework="pt") as file:
            names = file.keys()  # a safe_open handle is not iterable
            return {name: tuple(file.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"cannot read {path} ({type(err).__name__}: {err}); the file is damaged (e.g. a partial "
                          "download) or is not safetensors. Download or convert the checkpoint again.") from err


def checkpoint_shapes(directory: str | Path) -> dict[str, Shape]:
    """Every tensor's shape from the headers; with an index, each name it lists must be in the file it names."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        files = _index_map(directory)
        shapes: dict[str, Shape] = {}
        for file in sorted(set(files.values())):
            in_file = _file_shapes(directory / file)
            listed = [name for name, where in files.items() if where == file]
            absent = [name for name in listed if name not in in_file]
            if absent:
                raise ConfigError(f"{directory / file} lacks {absent[:3]}, which {INDEX_FILE} places there; the "
                                  "checkpoint is damaged. Download the checkpoint again.")
            shapes.update({name: in_file[name] for name in listed})
        return shapes
    if (directory / SINGLE_FILE).is_file():
        return _file_shapes(directory / SINGLE_FILE)
    raise ConfigError(
        f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE}; llama_ft loads safetensors weights only "
        "(safe by default). Convert the checkpoint with transformers' save_pretrained(safe_serialization=True)."
    )


def weight_files(directory: str | Path) -> dict[str, str]:
    """Tensor name → the file holding it, for a directory whose headers ``checkpoint_shapes`` has checked."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        return _index_map(directory)
    return dict.fromkeys(_file_shapes(directory / SINGLE_FILE), SINGLE_FILE)


def refuse_missing(directory: str | Path, missing: set[str], layers: int) -> None:
    """One line naming the model tensors a checkpoint lacks (none: nothing to say)."""
    if missing:
        names = sorted(missing)
        raise ConfigError(f"checkpoint {directory} lacks weights for {names[:5]}{'…' if len(names) > 5 else ''}; "
                          f"is it a Llama checkpoint of this architecture ({layers} layers)?")


def check_weights_fit(directory: str | Path, expected: Mapping[str, Shape], layers: int) -> None:
    """Refuse a checkpoint that lacks one of the model's tensors or holds one in another shape (transformers would
    initialize a missing one at random and train on it)."""
    shapes = checkpoint_shapes(directory)
    refuse_missing(directory, set(expected) - set(shapes), layers)
    wrong = [(name, shapes[name], shape) for name, shape in expected.items() if shapes[name] != shape]
    if wrong:
        name, have, want = wrong[0]
        raise ConfigError(f"checkpoint {directory} holds {name} as {list(have)} where the model needs {list(want)} "
                          f"({len(wrong)} tensor(s) differ); its weights do not fit the model's config. Use the "
                          "checkpoint's own config (leave model.model_config unset) or an undamaged checkpoint.")

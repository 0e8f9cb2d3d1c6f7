"""Write Hugging Face safetensors shards one tensor at a time, so no process ever holds the whole model.

``save_pretrained`` needs the full state dict in memory. Here the names, shapes and dtypes are known up front (from
a distributed checkpoint's metadata, or from a sharded model's DTensors), so each shard's header is written first
and the tensors follow as they arrive: peak memory is the one tensor being written. The layout is the one
``save_pretrained`` produces: ``model.safetensors`` when everything fits in one shard, else
``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``. The same layout can also be
preallocated (headers written, files at their final size) for sharded ranks to fill in place (``rank_writes``).

The file format (an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range, then the raw little-endian bytes) is the public safetensors specification.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_ft.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers 5's ``PreTrainedModel.save_pretrained(max_shard_size="50GB")`` default.
DEFAULT_MAX_SHARD_SIZE = "50GB"

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class TensorSpec:
    """What a header needs before the tensor itself exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """Bytes in ``5GB``, ``500MiB`` or an int (the units ``save_pretrained`` accepts)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    if text.isdigit():
        return int(text)
    raise ConfigError(f"shard size {size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes.")


def plan_shards(specs: list[TensorSpec], max_shard_size: int | str) -> list[list[TensorSpec]]:
    """Tensors in order, cut into files of at most ``max_shard_size`` bytes (a larger tensor gets a file alone)."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in _DTYPE_NAMES:
            raise ConfigError(f"tensor {spec.name} has dtype {spec.dtype}, which safetensors cannot store.")
        entries[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True)
class ShardFile:
    """One output file: its name, its header bytes and the tensors that follow the header, in order."""

    name: str
    header: bytes
    specs: list[TensorSpec]

    @property
    def size(self) -> int:
        return len(self.header) + sum(spec.nbytes for spec in self.specs)

    def data_offsets(self) -> dict[str, int]:
        """Where each tensor's bytes start in the file."""
        offsets, position = {}, len(self.header)
        for spec in self.specs:
            offsets[spec.name] = position
            position += spec.nbytes
        return offsets


def shard_files(specs: list[TensorSpec], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[ShardFile]:
    """The files ``save_pretrained`` would write for ``specs``: names, headers and contents (no I/O)."""
    shards = plan_shards(specs, max_shard_size)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return [ShardFile(name, _header(shard), shard) for name, shard in zip(names, shards, strict=True)]


def write_index(out: Path, files: list[ShardFile]) -> None:
    """``model.safetensors.index.json`` when there are several files (``save_pretrained`` writes none for one)."""
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(spec.nbytes for f in files for spec in f.specs)},
                 "weight_map": {spec.name: f.name for f in files for spec in f.specs}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def preallocate_shards(out_dir: str | Path, files: list[ShardFile]) -> None:
    """Each file with its header and its final size (the data still holes), plus the index, for the ranks to fill
    in place at :meth:`ShardFile.data_offsets`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for shard in files:
        with (out / shard.name).open("wb") as file:
            file.write(shard.header)
            file.truncate(shard.size)
    write_index(out, files)


def _write_tensor(file, spec: TensorSpec, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise RuntimeError(f"{spec.name}: got {tuple(tensor.shape)} {tensor.dtype}, the header says "
                           f"{spec.shape} {spec.dtype}")
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    file.write(memoryview(raw.numpy()))


def write_safetensors_shards(out_dir: str | Path, specs: list[TensorSpec],
                             tensors: Iterable[tuple[str, torch.Tensor]],
                             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write ``tensors`` (yielded in the order of ``specs``, one at a time) as safetensors shards + index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = shard_files(specs, max_shard_size)
    stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    for shard in files:
        with (out / shard.name).open("wb") as file:
            file.write(shard.header)
            for spec in shard.specs:
                got, tensor = next(stream)
                if got != spec.name:
                    raise RuntimeError(f"tensor stream out of order: expected {spec.name}, got {got}")
                _write_tensor(file, spec, tensor)
                del tensor
    write_index(out, files)
    return [out / shard.name for shard in files]

"""Every rank writes the slices it holds straight into the output safetensors files: an export with no gather.

Rank 0 creates each file with its header at its final size (``safetensors_stream.preallocate_shards``); then every
rank opens the files and writes the bytes of its own DTensor shards at their offsets, one local tensor at a time.
No collective moves tensor data, so a rank's memory is its shards plus one local tensor converted for writing
(gathering a tensor over gloo costs a full copy and a second buffer on every rank).

Which rank writes what is the DTensor's own placement: torch's ``compute_local_shape_and_global_offset`` (what
``torch.distributed.checkpoint`` saves by) gives the box of the global tensor a mesh coordinate holds, uneven
``torch.chunk`` splits included (the last ranks may hold fewer rows, or none). On a ``Replicate`` mesh dim (DDP,
HSDP's replicas) only coordinate 0 writes. In the row-major file a box is one contiguous run when only its leading
dim is cut (FSDP, TP ``Shard(0)``), else one run per row of the cut dim's prefix (TP ``Shard(1)``, FSDP × TP).

It needs every rank to see the same output directory; :func:`shared_output_dir` checks that (a multi-node run on
node-local disks fails it, and the caller falls back to gathering).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from llama_ft.checkpoint.safetensors_stream import ShardFile

PROBE = ".llama_ft_shared_probe"

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global offset, shape) of the slice a rank holds


def local_box(global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
              placements: Sequence) -> Box | None:
    """The slice of the global tensor the rank at ``coordinate`` writes: None for a replica (a coordinate other than 0
    on a ``Replicate`` dim: its twin at 0 writes), or when the rank holds no element (an uneven split's last ranks)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    for dim, placement in enumerate(placements):
        if not isinstance(placement, (Replicate, Shard, _StridedShard)):  # _StridedShard: FSDP over TP's dim
            raise RuntimeError(f"cannot export a tensor placed {placement} (a partial sum); reduce it first.")
        if isinstance(placement, Replicate) and coordinate[dim] != 0:
            return None
    shape, offset = _compute_local_shape_and_global_offset(global_shape, mesh_shape, list(coordinate), placements)
    return None if math.prod(shape) == 0 else (tuple(offset), tuple(shape))


def element_runs(global_shape: Sequence[int], box: Box) -> Iterator[tuple[int, int, int]]:
    """The box's contiguous runs in the row-major global tensor, in the box's own row-major order: (global element
    index, local element index, element count). The dims after the last cut one are whole, so each run spans them
    all; the dims before it are iterated."""
    offset, shape = box
    cut = max((d for d in range(len(shape)) if shape[d] != global_shape[d]), default=0)
    strides = [math.prod(global_shape[d + 1:]) for d in range(len(global_shape))]
    length = math.prod(shape[cut:])
    base = sum(o * s for o, s in zip(offset[cut:], strides[cut:], strict=True))
    for local, index in enumerate(itertools.product(*(range(n) for n in shape[:cut]))):
        start = base + sum((o + i) * s for o, i, s in zip(offset, index, strides, strict=False))
        yield start, local * length, length


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while data:
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written


def _my_box(value: torch.Tensor) -> tuple[Box | None, torch.Tensor]:
    """This rank's box of ``value`` and the local data it holds (rank 0 writes a plain tensor whole)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        whole = (tuple(0 for _ in value.shape), tuple(value.shape))
        return (whole if dist.get_rank() == 0 and value.numel() else None), value
    mesh = value.device_mesh
    box = local_box(value.shape, mesh.shape, mesh.get_coordinate(), value.placements)
    local = value.to_local()
    if box is not None and tuple(local.shape) != box[1]:
        raise RuntimeError(f"local shard of shape {tuple(local.shape)}, its placement says {box[1]}")
    return box, local


def write_local_slices(state: dict[str, torch.Tensor], files: list[ShardFile], out_dir: str | Path) -> None:
    """Write this rank's slices of ``state`` into the preallocated ``files``, converting one local tensor at a
    time to the file's dtype, and flush them to disk (another node's rank reads the files next)."""
    out = Path(out_dir)
    for shard in files:
        starts = shard.data_offsets()
        fd = None
        try:
            for spec in shard.specs:
                box, local = _my_box(state[spec.name])
                if box is None:
                    continue
                if fd is None:
                    fd = os.open(out / shard.name, os.O_WRONLY)
                raw = local.detach().to(device="cpu", dtype=spec.dtype).contiguous().reshape(-1).view(torch.uint8)
                data, size = memoryview(raw.numpy()), spec.dtype.itemsize
                for start, local_start, count in element_runs(spec.shape, box):
                    chunk = data[local_start * size:(local_start + count) * size]
                    _pwrite_all(fd, chunk, starts[spec.name] + start * size)
                del raw, data
            if fd is not None:
                os.fsync(fd)
        finally:
            if fd is not None:
                os.close(fd)


def agree(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank when ``what`` failed on any (so none waits forever for a rank that quit)."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if failed:
        raise RuntimeError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")


def _sees(probe: Path, token: str | None) -> bool:
    try:
        return token is not None and probe.read_text() == token
    except OSError:
        return False


def shared_output_dir(out_dir: str | Path) -> bool:
    """Collective: whether every rank sees the directory rank 0 writes (rank 0 leaves a random token in a probe
    file, every rank reads it back). Creates ``out_dir`` on rank 0."""
    probe = Path(out_dir) / PROBE
    token: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            token = [secrets.token_hex(16)]
            probe.write_text(token[0])
        except OSError:
            token = [None]  # rank 0 cannot write there either: the gather path reports it
    dist.broadcast_object_list(token, src=0)
    verdicts: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(verdicts, _sees(probe, token[0]))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    return all(verdicts)

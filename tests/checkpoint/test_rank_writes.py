"""Ranks writing their own slices into preallocated safetensors files: boxes, runs, and when to fall back.

The boxes and runs are checked for every mesh coordinate of each placement without a process group: each rank's
slice of a global tensor is cut out by its box and written by its runs into files laid out by ``preallocate_shards``,
and the files must equal, byte for byte, what the one-process streamed writer produces. The fallback decision
runs in a one-rank gloo group.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from llama_ft.checkpoint import huggingface, rank_writes
from llama_ft.checkpoint.huggingface import save_hf_directory
from llama_ft.checkpoint.rank_writes import element_runs, local_box, shared_output_dir
from llama_ft.checkpoint.safetensors_stream import (
    INDEX_FILE,
    TensorSpec,
    preallocate_shards,
    shard_files,
    write_safetensors_shards,
)
from tests.helpers import free_port, tiny_llama_config

# name → (global shape, dtype, mesh shape, placements): FSDP even and uneven (9 rows over 4: the last rank holds
# none), TP column- and row-wise, FSDP × TP, HSDP and DDP replicas, a 3-D tensor cut in its middle dim.
PLACED = {
    "fsdp": ((8, 6), torch.float32, (4,), [Shard(0)]),
    "fsdp-uneven": ((9, 5), torch.bfloat16, (4,), [Shard(0)]),
    "tp-rowwise": ((6, 10), torch.float16, (2,), [Shard(1)]),
    "fsdp-x-tp": ((7, 10), torch.float32, (2, 2), [Shard(0), Shard(1)]),
    "hsdp": ((10, 3), torch.bfloat16, (2, 2), [Replicate(), Shard(0)]),
    "ddp": ((5, 4), torch.float32, (4, 1), [Replicate(), Shard(0)]),
    "3d-middle": ((3, 8, 4), torch.float32, (4,), [Shard(1)]),
    "norm": ((6,), torch.float32, (4,), [Shard(0)]),
}


def _global(name: str) -> torch.Tensor:
    shape, dtype, _, _ = PLACED[name]
    return torch.randn(shape, generator=torch.Generator().manual_seed(len(name))).to(dtype)


def _slice(tensor: torch.Tensor, box) -> torch.Tensor:
    offset, shape = box
    return tensor[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def test_each_coordinate_writes_its_box_and_the_files_equal_the_streamed_ones(tmp_path):
    tensors = {name: _global(name) for name in PLACED}
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    files = shard_files(specs, max_shard_size=200)  # several files, an index
    assert len(files) > 2
    preallocate_shards(tmp_path / "in_place", files)
    write_safetensors_shards(tmp_path / "streamed", specs, iter(tensors.items()), max_shard_size=200)
    writers: dict[str, list[tuple[int, ...]]] = {}
    for shard in files:
        starts = shard.data_offsets()
        fd = os.open(tmp_path / "in_place" / shard.name, os.O_WRONLY)
        for spec in shard.specs:
            _, _, mesh_shape, placements = PLACED[spec.name]
            raw = tensors[spec.name].contiguous().reshape(-1).view(torch.uint8).numpy()
            for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
                box = local_box(spec.shape, mesh_shape, coordinate, placements)
                if box is None:
                    continue
                writers.setdefault(spec.name, []).append(coordinate)
                local = _slice(tensors[spec.name], box).contiguous().reshape(-1).view(torch.uint8).numpy()
                size = spec.dtype.itemsize
                for start, local_start, count in element_runs(spec.shape, box):
                    chunk = local[local_start * size:(local_start + count) * size]
                    assert bytes(chunk) == bytes(raw[start * size:(start + count) * size])
                    os.pwrite(fd, chunk, starts[spec.name] + start * size)
        os.close(fd)
    for shard in files:
        assert (tmp_path / "in_place" / shard.name).read_bytes() == (tmp_path / "streamed" / shard.name).read_bytes()
    assert (tmp_path / "in_place" / INDEX_FILE).read_text() == (tmp_path / "streamed" / INDEX_FILE).read_text()
    assert writers["fsdp-uneven"] == [(0,), (1,), (2,)]  # chunks of 3, 3, 3 rows: the fourth rank holds none
    assert writers["hsdp"] == [(0, 0), (0, 1)] and writers["ddp"] == [(0, 0)]  # replicas of coordinate 0 only
    assert len(writers["fsdp-x-tp"]) == 4


def test_runs_are_one_per_box_when_rows_are_cut_and_one_per_row_when_columns_are():
    assert list(element_runs((9, 5), ((6, 0), (3, 5)))) == [(30, 0, 15)]
    assert list(element_runs((6, 10), ((0, 5), (6, 5)))) == [(r * 10 + 5, r * 5, 5) for r in range(6)]
    assert list(element_runs((7, 10), ((4, 5), (3, 5)))) == [(45, 0, 5), (55, 5, 5), (65, 10, 5)]
    assert list(element_runs((3, 4), ((0, 0), (3, 4)))) == [(0, 0, 12)]


@pytest.fixture
def one_rank_group():
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ranks_that_do_not_see_the_output_directory_fall_back_to_gathering(tmp_path, monkeypatch, one_rank_group):
    """In place when every rank reads rank 0's probe back; gathered when one cannot; the same files either way."""
    from transformers import LlamaForCausalLM

    from llama_ft.parallel.applying.apply import apply_layout, build_device_mesh, materialize
    from llama_ft.parallel.layout import Layout

    assert shared_output_dir(tmp_path / "probe") and not any((tmp_path / "probe").iterdir())
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False))
    apply_layout(model, Layout(), build_device_mesh(Layout(), "cpu"), param_dtype=None, reduce_dtype=None)
    materialize(model, "cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.to_local().normal_()
    calls: list[str] = []
    write, gather = huggingface.write_local_slices, huggingface.gathered_tensors
    monkeypatch.setattr(huggingface, "write_local_slices", lambda *a: calls.append("in place") or write(*a))
    monkeypatch.setattr(huggingface, "gathered_tensors", lambda state: calls.append("gathered") or gather(state))
    save_hf_directory(model, None, tmp_path / "shared", max_shard_size="20KB")
    monkeypatch.setattr(rank_writes, "_sees", lambda probe, token: False)  # a node with its own disk
    save_hf_directory(model, None, tmp_path / "node_local", max_shard_size="20KB")
    assert calls == ["in place", "gathered"]
    names = sorted(p.name for p in (tmp_path / "shared").glob("model*.safetensors*"))
    assert len(names) > 2 and names == sorted(p.name for p in (tmp_path / "node_local").glob("model*.safetensors*"))
    for name in names:
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "node_local" / name).read_bytes()


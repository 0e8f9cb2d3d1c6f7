"""The streamed safetensors writer: files that safetensors reads back bit for bit, cut as save_pretrained cuts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llama_ft.checkpoint.safetensors_stream import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorSpec,
    parse_size,
    write_safetensors_shards,
)
from llama_ft.errors import ConfigError


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=generator),                          # 8 KiB
        "b.weight": torch.randn(40, 30, generator=generator).to(torch.bfloat16),       # 2.4 KB
        "c.bias": torch.randn(7, generator=generator).to(torch.float16),
        "d.count": torch.arange(5, dtype=torch.int64),
        "e.weight": torch.randn(3, 100, 10, generator=generator),                      # 12 KB
    }


@pytest.mark.parametrize(("limit", "files"), [("1GB", 1), ("10KB", 3)])
def test_shards_read_back_exactly_with_an_index_when_split(tmp_path, limit, files):
    tensors = _tensors()
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    written = write_safetensors_shards(tmp_path, specs, iter(tensors.items()), max_shard_size=limit)
    assert len(written) == files
    read = {}
    for path in written:
        read.update(load_file(path))
    assert read.keys() == tensors.keys()
    assert all(torch.equal(read[name], tensor) and read[name].dtype == tensor.dtype for name, tensor in tensors.items())
    if files == 1:
        assert written[0].name == SINGLE_FILE and not (tmp_path / INDEX_FILE).exists()
    else:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert [p.name for p in written] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_a_stream_that_disagrees_with_its_header_stops(tmp_path):
    spec = TensorSpec("x", (2, 2), torch.float32)
    with pytest.raises(RuntimeError, match="expected x, got y"):
        write_safetensors_shards(tmp_path, [spec], iter([("y", torch.zeros(2, 2))]))


def test_sizes_parse_as_save_pretrained_writes_them():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(1024) == 1024
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size("five gigabytes")

"""Shared fixtures: offline Hub, the bundled tokenizer, tiny Llama configs and hub-layout data folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.data.sources import SAMPLE_ROOT
from llama_ft.data.sources import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

# The bundled sample's README names the 3.0.0 config and its split globs, as the hub repository does.
HUB_README = (SAMPLE_ROOT / "cnn_dailymail" / "README.md").read_text()


def free_port() -> int:
    """A port nobody holds right now (fixed 29500-range ports clash on shared machines)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("sample")


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    config = LlamaConfig(**values)
    config._attn_implementation = "sdpa"
    return config


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return tiny_llama_config()


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer) -> Path:
    """A random-init tiny Llama saved as a Hugging Face directory (safetensors + tokenizer)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    out = tmp_path / "tiny_ckpt"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def make_hub_dir(tmp_path) -> Callable[..., Path]:
    """Write a folder laid out like the hub repository, with the given rows per split."""

    def make(splits: dict[str, list[dict]], name: str = "hub") -> Path:
        root = tmp_path / name
        (root / "3.0.0").mkdir(parents=True)
        (root / "README.md").write_text(HUB_README)
        for split, rows in splits.items():
            columns = sorted({k for r in rows for k in r}) or ["article", "highlights", "id"]
            table = pa.table({c: pa.array([r.get(c) for r in rows], type=pa.string()) for c in columns})
            pq.write_table(table, root / "3.0.0" / f"{split}-00000-of-00001.parquet")
        return root

    return make


def news_rows(n: int, article_words: int = 60, prefix: str = "r") -> list[dict]:
    return [
        {
            "article": " ".join(f"word{(i + j) % 50}" for j in range(article_words)) + " The end.",
            "highlights": f"Story {i} is short .\nIt ends here .",
            "id": f"{prefix}{i:039d}",
        }
        for i in range(n)
    ]

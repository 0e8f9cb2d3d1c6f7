"""Shared fixtures: offline Hub, the bundled tokenizer, tiny Llama configs and hub-layout data folders.

Only fixtures live here; plain helpers (paths, ports, configs, rows) are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch  # noqa: F401  (see below)
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.data.sources import load_tokenizer
from tests.helpers import HUB_README, tiny_llama_config

# Lightning gives its loggers a handler on whatever sys.stderr is when it is first imported. ``import llama_ft`` no
# longer imports it, so the first test to run ``main([...])`` would bind it to pytest's capture of that test, closed
# afterwards ("--- Logging error ---" in every later test's output); importing it here binds the real stream.

# The environment as the session starts. A fit run inside the test process (``main([...])``) leaves Lightning's
# variables behind (LOCAL_RANK, NODE_RANK, MASTER_PORT, …); a later ``main.py fit`` child inheriting LOCAL_RANK
# believes its processes were launched for it and waits for ranks that never start.
_SESSION_ENVIRONMENT = dict(os.environ)


def _restore_session_environment() -> None:
    for key in [k for k in os.environ if k not in _SESSION_ENVIRONMENT and k != "PYTEST_CURRENT_TEST"]:
        del os.environ[key]
    os.environ.update(_SESSION_ENVIRONMENT)


@pytest.fixture(autouse=True)
def _session_environment():
    """Each test starts and ends with the session's environment (pytest's own PYTEST_CURRENT_TEST aside)."""
    _restore_session_environment()
    yield
    _restore_session_environment()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("sample")


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

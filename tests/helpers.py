"""Plain helpers shared by the tests (import them from here; ``tests/conftest.py`` holds only fixtures).

Paths, a free TCP port, a tiny Llama config and made-up news rows. The Hub is kept offline by ``tests/conftest.py``,
which pytest loads before any test module.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import TextIO

from transformers import LlamaConfig

from llama_ft.data.sources import SAMPLE_ROOT

REPO_ROOT = Path(__file__).resolve().parent.parent

# The bundled sample's README names the 3.0.0 config and its split globs, as the hub repository does.
HUB_README = (SAMPLE_ROOT / "cnn_dailymail" / "README.md").read_text()


def free_port() -> int:
    """A port nobody holds right now (fixed 29500-range ports clash on shared machines)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def news_rows(n: int, article_words: int = 60, prefix: str = "r") -> list[dict]:
    return [
        {
            "article": " ".join(f"word{(i + j) % 50}" for j in range(article_words)) + " The end.",
            "highlights": f"Story {i} is short .\nIt ends here .",
            "id": f"{prefix}{i:039d}",
        }
        for i in range(n)
    ]


def wait_or_kill(procs: list[subprocess.Popen], timeout_s: float, log_file: TextIO) -> None:
    """Wait for every launched rank within one shared deadline; kill the stragglers (a hard timeout for
    multi-process tests), noting it in their log."""
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        log_file.write(f"\n[launcher] killed after {timeout_s} s\n")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

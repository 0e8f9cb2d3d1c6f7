"""Checkpoint files: crash-safe writes, reading what ``fit`` saved, Hugging Face import and export."""

from llama_ft.checkpoint.atomic import (
    AtomicCheckpointIO,
    partial_path,
    publish,
    remove_path,
    remove_stale_partials,
    resolve_checkpoint,
)

__all__ = [
    "AtomicCheckpointIO",
    "partial_path",
    "publish",
    "remove_path",
    "remove_stale_partials",
    "resolve_checkpoint",
]

"""llama_ft: fine-tune Llama on CNN/DailyMail with Lightning; ``strategy="advanced"`` picks the parallel layout.

The classes load on first use (PEP 562), so the torch-free parts (planning, ``llama-ft plan`` without a recipe) do not
pay for Lightning, torch and transformers. Using any of them registers ``strategy="advanced"`` with Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_ft.data.datamodule import CNNDailyMailDataModule
    from llama_ft.module import LlamaFineTuner
    from llama_ft.parallel.applying.strategy import AdvancedParallelStrategy

_HOMES = {
    "AdvancedParallelStrategy": "llama_ft.parallel.applying.strategy",
    "CNNDailyMailDataModule": "llama_ft.data.datamodule",
    "LlamaFineTuner": "llama_ft.module",
}
__all__ = ["AdvancedParallelStrategy", "CNNDailyMailDataModule", "LlamaFineTuner"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(_HOMES["AdvancedParallelStrategy"])  # registers strategy="advanced" for Trainer(...)
    return getattr(importlib.import_module(_HOMES[name]), name)

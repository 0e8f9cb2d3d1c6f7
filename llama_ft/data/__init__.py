"""CNN/DailyMail data: sources, prompt template, batching and the LightningDataModule.

The data module loads on first use (PEP 562): the planner reads ``lengths`` without importing Lightning or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_ft.data.datamodule import CNNDailyMailDataModule

__all__ = ["CNNDailyMailDataModule"]


def __getattr__(name: str) -> Any:
    if name != "CNNDailyMailDataModule":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from llama_ft.data.datamodule import CNNDailyMailDataModule

    return CNNDailyMailDataModule

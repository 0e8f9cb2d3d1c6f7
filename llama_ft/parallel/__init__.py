"""Advanced parallelization, in two halves joined by ``layout.Layout``.

``planning/`` decides (specs, accelerators, memory and time models, planner, report; simulate and verify check the
memory model) and imports no torch at module level; ``applying/`` builds what was decided (tensor parallel,
activation checkpointing, FSDP2) and holds the Lightning strategy. ``AdvancedParallelStrategy`` loads on first use
(so planning stays torch-free), which registers ``strategy="advanced"`` with Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_ft.parallel.applying.strategy import AdvancedParallelStrategy

__all__ = ["AdvancedParallelStrategy"]


def __getattr__(name: str) -> Any:
    if name != "AdvancedParallelStrategy":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from llama_ft.parallel.applying.strategy import AdvancedParallelStrategy

    return AdvancedParallelStrategy

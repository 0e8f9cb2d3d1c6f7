"""Advanced parallelization, in two halves joined by ``layout.Layout``.

``planning/`` decides (specs, accelerators, memory and time models, planner, report; simulate and verify check the
memory model) and imports no torch at module level; ``applying/`` builds what was decided (tensor parallel,
activation checkpointing, FSDP2) and holds the Lightning strategy. Importing this package registers
``strategy="advanced"`` with Lightning.
"""

from llama_ft.parallel.applying.strategy import AdvancedParallelStrategy

__all__ = ["AdvancedParallelStrategy"]

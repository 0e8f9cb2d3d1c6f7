"""Advanced parallelization: specs, cost model, planner, report, layout application and the strategy.

Importing this package registers ``strategy="advanced"`` with Lightning.
"""

from llama_ft.parallel.strategy import AdvancedParallelStrategy

__all__ = ["AdvancedParallelStrategy"]

"""The recipe fixes the global batch; accumulation follows from micro-batch and data-parallel size."""

from __future__ import annotations

from llama_ft.errors import ConfigError


def grad_accumulation(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Gradient-accumulation steps that keep ``global_batch_size`` samples per optimizer step.

    Raises ``ConfigError`` naming the micro-batch sizes that would divide, when this one does not.
    """
    if global_batch_size < 1 or micro_batch_size < 1 or dp_size < 1:
        raise ConfigError(
            f"global batch ({global_batch_size}), micro-batch ({micro_batch_size}) and data-parallel size "
            f"({dp_size}) must all be positive integers."
        )
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        fitting = [b for b in range(1, global_batch_size // dp_size + 1) if global_batch_size % (b * dp_size) == 0]
        hint = (
            f"micro-batch sizes that divide it: {fitting}"
            if fitting
            else f"no micro-batch divides it; use a global batch that is a multiple of {dp_size}"
        )
        raise ConfigError(
            f"global batch size {global_batch_size} is not divisible by micro-batch {micro_batch_size} × "
            f"{dp_size} data-parallel replicas = {per_step}. With {dp_size} replicas, {hint}; or set the global "
            f"batch to a multiple of {per_step} (e.g. {per_step * max(1, round(global_batch_size / per_step))})."
        )
    return global_batch_size // per_step


def valid_micro_batch_sizes(global_batch_size: int, dp_size: int) -> list[int]:
    """Micro-batch sizes for which ``grad_accumulation`` is exact."""
    return [b for b in range(1, global_batch_size // dp_size + 1) if global_batch_size % (b * dp_size) == 0]

"""The recipe fixes the global batch; accumulation follows from micro-batch and data-parallel size."""

from __future__ import annotations

from llama_ft.errors import ConfigError

HINT_LIMIT = 64  # micro-batch sizes an error message lists, at most


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
        fitting = valid_micro_batch_sizes(global_batch_size, dp_size, up_to=HINT_LIMIT)
        hint = (
            f"micro-batch sizes up to {HINT_LIMIT} that divide it: {fitting}"
            if fitting
            else f"no micro-batch divides it; use a global batch that is a multiple of {dp_size}"
        )
        raise ConfigError(
            f"global batch size {global_batch_size} is not divisible by micro-batch {micro_batch_size} × "
            f"{dp_size} data-parallel replicas = {per_step}. With {dp_size} replicas, {hint}; or set the global "
            f"batch to a multiple of {per_step} (e.g. {per_step * max(1, round(global_batch_size / per_step))})."
        )
    return global_batch_size // per_step


def valid_micro_batch_sizes(global_batch_size: int, dp_size: int, up_to: int) -> list[int]:
    """Micro-batch sizes up to ``up_to`` for which ``grad_accumulation`` is exact: the divisors of the global batch's
    share per replica (bounded, so any global batch a recipe may hold is answered at once)."""
    if global_batch_size % dp_size:
        return []
    per_replica = global_batch_size // dp_size
    return [b for b in range(1, min(up_to, per_replica) + 1) if per_replica % b == 0]

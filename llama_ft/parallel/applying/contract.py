"""What the ``advanced`` strategy needs from the LightningModule and the LightningDataModule, and nothing more.

The strategy plans from the model's architecture and the recipe's batch, then hands its decision to the data module
by one method call; it sets no attributes on the data module, and on the LightningModule only Lightning's own
``device_mesh`` (as ``ModelParallelStrategy`` does). Both Protocols are structural: ``LlamaFineTuner`` and
``CNNDailyMailDataModule`` satisfy them without importing this module, and so can a user's own classes.

``PlannableModule`` (the LightningModule):
    1. ``llama_config`` — the ``transformers.LlamaConfig`` the planner sizes memory and time for;
    2. ``configure_model()`` — sets ``self.model`` (a ``LlamaForCausalLM``), built under the strategy's meta-device
       context so no rank ever holds the whole unsharded model;
    3. ``initialize_weights()`` — fills ``self.model`` once it is parallelized and materialized (load a checkpoint
       or run the Hugging Face initialization).
    Optionally ``lora`` (``r``, ``target_modules``, ``dropout``; None for full fine-tuning): the planner then models
    a frozen base with adapters and plans no tensor parallelism.

``PlannableData`` (the LightningDataModule):
    1. ``max_length`` — tokens per example, the sequence length planned for;
    2. ``global_batch_size`` — examples per optimizer step over all replicas, which the plan must keep;
    3. ``apply_plan(micro_batch_size, data_parallel_size)`` — called once the plan is known, before ``setup``; the
       data module batches by that micro-batch and keeps the global batch by gradient accumulation. Under
       Lightning's own strategies nobody calls it, and the recipe's micro-batch runs as written.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from llama_ft.errors import ConfigError


@runtime_checkable
class PlannableModule(Protocol):
    """A LightningModule the ``advanced`` strategy can plan for and parallelize (see the module docstring)."""

    llama_config: Any

    def configure_model(self) -> None: ...

    def initialize_weights(self) -> None: ...


@runtime_checkable
class PlannableData(Protocol):
    """A LightningDataModule the ``advanced`` strategy can plan for (see the module docstring)."""

    max_length: int
    global_batch_size: int

    def apply_plan(self, micro_batch_size: int, data_parallel_size: int) -> None: ...


def _members(protocol: type) -> list[str]:
    attributes = list(getattr(protocol, "__annotations__", {}))
    methods = [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
    return attributes + methods


def require(obj: object, protocol: type, role: str, fix: str) -> None:
    """Raise a one-line ``ConfigError`` naming what of ``protocol`` the ``role`` lacks; ``fix`` says what to do."""
    if obj is None:
        raise ConfigError(f"the advanced strategy needs a {role} ({protocol.__name__}) but got none: {fix}.")
    missing = [name for name in _members(protocol) if getattr(obj, name, None) is None]
    if missing:
        raise ConfigError(
            f"the advanced strategy needs the {role} to provide {', '.join(missing)} ({protocol.__name__} in "
            f"{__name__}); {type(obj).__name__} does not: {fix}."
        )

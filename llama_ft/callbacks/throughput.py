"""Tokens/s and MFU a user can read, and the parallel plan checked against the run.

Lightning's ``ThroughputMonitor`` counts the work; this subclass counts only non-padding tokens, takes the device's
peak from the plan's cluster description (or, without a plan, from the planner's accelerator table, which knows the
CPU too), and logs two plain metrics, also on the progress bar:

- ``train/tokens_per_s``: non-padding tokens per second per device (rolling window);
- ``train/mfu``: model FLOPs per second per device over that peak.

After ``warmup_steps`` + ``compare_after_steps`` optimizer steps and at the end of ``fit`` it logs the measured step
time, tokens/s per device, MFU and peak device memory beside the plan's predictions, and the ``advanced`` strategy
adds them to ``plan.json`` as its ``measured`` section.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from llama_ft.callbacks.measurement import StepClock, comparison_lines, measured_values
from llama_ft.errors import ConfigError
from llama_ft.parallel.planning.accelerators import get_accelerator
from llama_ft.parallel.planning.planner import Plan, PlanResult
from llama_ft.parallel.planning.specs import ClusterSpec


def _rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def _real_tokens(batch: dict[str, Any]) -> int:
    return int(batch["num_tokens"])


def _plan_result(trainer: L.Trainer) -> PlanResult | None:
    return getattr(trainer.strategy, "plan_result", None)


def device_peak_flops(trainer: L.Trainer) -> float | None:
    """Dense bf16 peak FLOP/s of one device: the plan's cluster (which honours the user's overrides), else the
    planner's accelerator table for the device in use (its ``cpu`` entry on CPU); None for other device types."""
    result = _plan_result(trainer)
    if result is not None:
        return result.cluster.peak_flops
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return ClusterSpec.detect(1, 1).peak_flops
    if device.type == "cpu":
        return get_accelerator("cpu").peak_flops
    return None


class TokenThroughputMonitor(ThroughputMonitor):
    """Non-padding tokens/s and MFU per device, and predicted vs measured after the first steps and at fit end.

    Args:
        window_size: micro-batches in the rolling window of ``train/tokens_per_s`` and ``train/mfu``.
        warmup_steps: optimizer steps left out of the plan-vs-run comparison (start-up, allocator warm-up).
        compare_after_steps: optimizer steps measured (after the warm-up) before the first comparison is logged.
    """

    def __init__(self, window_size: int = 20, warmup_steps: int = 2, compare_after_steps: int = 5,
                 **kwargs: Any) -> None:
        if window_size < 2 or warmup_steps < 0 or compare_after_steps < 1:
            raise ConfigError(
                f"TokenThroughputMonitor(window_size={window_size}, warmup_steps={warmup_steps}, compare_after_steps="
                f"{compare_after_steps}): window_size must be >= 2, warmup_steps >= 0, compare_after_steps >= 1."
            )
        super().__init__(batch_size_fn=_rows, length_fn=_real_tokens, window_size=window_size, **kwargs)
        self.warmup_steps = warmup_steps
        self.compare_after_steps = compare_after_steps
        self.peak_flops: float | None = None
        self.devices_per_replica = 1
        self.seq_len = 0
        self._clock: StepClock | None = None
        self._fit_steps = 0
        self._last_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """As Lightning's, with the peak from the plan or the planner's table instead of Lightning's device names."""
        result = _plan_result(trainer)
        self.peak_flops = device_peak_flops(trainer)
        # A tensor-parallel group of tp devices works on this replica's tokens together: its FLOPs are set against
        # the peak of tp devices, and its tokens are shared by them.
        self.devices_per_replica = result.chosen.layout.tp if result is not None else 1
        datamodule = getattr(trainer, "datamodule", None)
        self.seq_len = result.train.seq_len if result is not None else int(getattr(datamodule, "max_length", 0))
        self.available_flops = self.peak_flops * self.devices_per_replica if self.peak_flops else None
        stages = [trainer.state.stage]
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            stages.append(RunningStage.VALIDATING)
        for running_stage in stages:
            self._throughputs[running_stage] = Throughput(
                available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs
            )

    # ------------------------------------------------------------------------------------------ training
    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_steps, self._last_step = 0, trainer.global_step
        self._clock = StepClock() if self.warmup_steps == 0 else None

    @rank_zero_only
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._clock is not None:
            self._clock.resume()  # validation and checkpoint saves since the last batch are not training time

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._clock is not None:
            flops = float(getattr(pl_module, "flops_per_batch", 0.0) or 0.0)
            self._clock.add(_real_tokens(batch), _rows(batch), self.seq_len, flops)
        if trainer.global_step == self._last_step:
            return  # mid-accumulation
        self._last_step = trainer.global_step
        self._fit_steps += 1
        self._log_plain_metrics(pl_module)
        if self._fit_steps == self.warmup_steps:
            self._clock = StepClock()
            return
        if self._clock is None:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._clock.steps += 1
        if self._clock.steps == self.compare_after_steps:
            self._report(trainer, "first_steps", f"Plan vs run after {self.compare_after_steps} steps")

    def _log_plain_metrics(self, pl_module: L.LightningModule) -> None:
        """``train/tokens_per_s`` and ``train/mfu`` per device, once the rolling window is full."""
        metrics = self._throughputs[RunningStage.TRAINING].compute()
        plain = {}
        if "device/items_per_sec" in metrics:
            plain["train/tokens_per_s"] = metrics["device/items_per_sec"] / self.devices_per_replica
        if "device/mfu" in metrics:
            plain["train/mfu"] = metrics["device/mfu"]
        for name, value in plain.items():
            pl_module.log(name, value, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        if self._clock is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._clock.pause()

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._clock is None or self._clock.steps == 0:
            rank_zero_info(f"Plan vs run: not measured; the run took {self._fit_steps} optimizer step(s), "
                           f"{self.warmup_steps} of them warm-up.")
            return
        self._report(trainer, "fit", "Plan vs run over the whole fit")

    def _report(self, trainer: L.Trainer, key: str, title: str) -> None:
        """Log predicted vs measured and hand the measured values to the strategy (plan.json), if it keeps a plan."""
        assert self._clock is not None
        measured = measured_values(self._clock, self.warmup_steps, self.devices_per_replica,
                                   self.peak_flops, trainer.strategy.root_device)
        result = _plan_result(trainer)
        plan: Plan | None = result.chosen if result is not None else None
        if plan is not None:
            measured["measured_over_predicted"] = {
                "step_time": float(f"{measured['step_time_s'] / plan.step_time_s:.4g}"),
                "tokens_per_s_per_device": float(
                    f"{measured['tokens_per_s_per_device'] / plan.tokens_per_s_per_device:.4g}"),
            }
        lines = comparison_lines(title if plan else title.replace("Plan vs run", "Measured"), measured, plan,
                                 self.seq_len)
        record = getattr(trainer.strategy, "record_measured", None)
        written = record(key, measured) if record is not None else None
        if written is not None:
            lines.append(f"  (saved in {written} under measured.{key})")
        rank_zero_info("\n".join(lines))

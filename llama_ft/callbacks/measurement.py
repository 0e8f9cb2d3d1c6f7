"""What a run measured, set against what its plan predicted: counters, peak memory, and the comparison's text.

Kept apart from the callback that collects the numbers so the arithmetic and the wording can be read (and tested)
without a Trainer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llama_ft.parallel.planning.planner import Plan
from llama_ft.parallel.planning.units import GiB


@dataclass
class StepClock:
    """Training time and work since it was (re)started; the time validation and checkpointing take is left out.

    ``pause`` when training stops for something else, ``resume`` when it goes on: only the gaps between are counted.
    """

    started_at: float = field(default_factory=time.perf_counter)
    paused_at: float | None = None
    paused_s: float = 0.0
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens this replica trained on
    row_tokens: int = 0  # rows × sequence length: what the plan assumed each row holds
    flops: float = 0.0

    def add(self, tokens: int, rows: int, seq_len: int, flops: float) -> None:
        self.tokens += tokens
        self.row_tokens += rows * seq_len
        self.flops += flops

    def pause(self) -> None:
        if self.paused_at is None:
            self.paused_at = time.perf_counter()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused_s += time.perf_counter() - self.paused_at
            self.paused_at = None

    def elapsed_s(self) -> float:
        end = self.paused_at if self.paused_at is not None else time.perf_counter()
        return end - self.started_at - self.paused_s


def peak_device_memory(device: torch.device) -> dict[str, Any]:
    """The accelerator's own peak counters (GiB) where it keeps them; otherwise a note saying it does not."""
    if device.type == "cuda":
        return {
            "peak_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
            "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 3),
        }
    return {"peak_memory": f"not reported on {device.type}"}


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def measured_values(clock: StepClock, warmup_steps: int, devices_per_replica: int, peak_flops: float | None,
                    device: torch.device) -> dict[str, Any]:
    """Per-device numbers over the clock's steps, as plan.json's ``measured`` section stores them.

    Tokens and FLOPs are this process's replica's; the ``devices_per_replica`` devices of a tensor-parallel group
    share that work, so each device is credited with its part.
    """
    seconds = clock.elapsed_s()
    values = {
        "optimizer_steps": clock.steps,
        "warmup_steps_excluded": warmup_steps,
        "step_time_s": _significant(seconds / clock.steps),
        "tokens_per_s_per_device": _significant(clock.tokens / seconds / devices_per_replica),
        "mfu": _significant(clock.flops / seconds / devices_per_replica / peak_flops) if peak_flops else None,
        "row_fill": _significant(clock.tokens / clock.row_tokens) if clock.row_tokens else None,
        "device_peak_tflops": peak_flops / 1e12 if peak_flops else None,
    }
    return values | peak_device_memory(device)


def _ratio(measured: float, predicted: float) -> str:
    return f"(×{measured / predicted:.3g})" if predicted else ""


def comparison_lines(title: str, measured: dict[str, Any], plan: Plan | None, seq_len: int) -> list[str]:
    """A few aligned lines: predicted vs measured step time, tokens/s per device, MFU and peak memory."""
    fill = measured["row_fill"]
    note = "" if fill is None else f"; real tokens filled {fill:.0%} of the rows' {seq_len} positions"
    note += ", the plan assumes full rows" if fill is not None and plan is not None else ""
    lines = [f"{title} ({measured['optimizer_steps']} optimizer steps after {measured['warmup_steps_excluded']} "
             f"warm-up step(s){note}):"]
    rows = [
        ("step time", plan and f"{plan.step_time_s:.3g} s", f"{measured['step_time_s']:.3g} s",
         plan and _ratio(measured["step_time_s"], plan.step_time_s)),
        ("tokens/s/device", plan and f"{plan.tokens_per_s_per_device:,.0f}",
         f"{measured['tokens_per_s_per_device']:,.0f}",
         plan and _ratio(measured["tokens_per_s_per_device"], plan.tokens_per_s_per_device)),
        ("MFU", plan and f"{plan.mfu:.2%}", "unknown peak" if measured["mfu"] is None else f"{measured['mfu']:.2%}",
         ""),
    ]
    if "peak_memory_allocated_gib" in measured:
        memory = (f"{measured['peak_memory_allocated_gib']:.2f} GiB allocated, "
                  f"{measured['peak_memory_reserved_gib']:.2f} reserved")
    else:
        memory = measured["peak_memory"]
    rows.append(("peak memory", plan and f"{plan.peak_bytes / GiB:.2f} GiB", memory, ""))
    for name, predicted, value, ratio in rows:
        head = f"  {name:<16} predicted {predicted:<12} measured " if plan else f"  {name:<16} measured "
        lines.append(f"{head}{value} {ratio or ''}".rstrip())
    return lines

"""The shape of a parallel layout: what the planner decides and what ``apply`` puts into effect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ActivationCheckpointing = Literal["none", "selective", "full"]
AC_MODES: tuple[ActivationCheckpointing, ...] = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """How one model is spread over ``dp_replicate × dp_shard × tp`` devices.

    ``dp_shard == 1`` with ``dp_replicate > 1`` is plain data parallelism (DDP semantics); ``dp_shard > 1`` shards
    parameters, gradients and optimizer state (FSDP2), and both > 1 is HSDP. ``tp`` splits each layer's matmuls.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    activation_checkpointing: ActivationCheckpointing = "none"
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name} must be >= 1, got {getattr(self, name)}")
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"activation_checkpointing must be one of {AC_MODES}, got {self.activation_checkpointing!r}"
            )

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Number of model replicas that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def kind(self) -> str:
        """The simplicity order used to break near-ties: DDP < FSDP < HSDP < 2D (anything with TP)."""
        if self.tp > 1:
            return "2D" if self.dp_size > 1 else "TP"
        if self.dp_shard > 1:
            return "HSDP" if self.dp_replicate > 1 else "FSDP"
        return "DDP" if self.dp_replicate > 1 else "single"

    def describe(self) -> str:
        """E.g. "FSDP 8 × TP 1, AC none"; pure data parallelism reads "DDP 8", one device "single device"."""
        if self.dp_shard > 1 and self.dp_replicate > 1:
            dp = f"HSDP {self.dp_replicate}×{self.dp_shard} × TP {self.tp}"
        elif self.dp_shard > 1:
            dp = f"FSDP {self.dp_shard} × TP {self.tp}"
        elif self.dp_replicate > 1:
            dp = f"DDP {self.dp_replicate}" + (f" × TP {self.tp}" if self.tp > 1 else "")
        else:
            dp = f"TP {self.tp}" if self.tp > 1 else "single device"
        offload = ", CPU offload" if self.cpu_offload else ""
        return f"{dp}, AC {self.activation_checkpointing}{offload}"

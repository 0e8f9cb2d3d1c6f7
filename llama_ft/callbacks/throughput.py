"""Token throughput and MFU, counting only non-padding tokens."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def _real_tokens(batch: dict[str, Any]) -> int:
    return int(batch["num_tokens"])


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting only non-padding tokens as work; MFU where the device peak is known
    (the module exposes ``flops_per_batch``)."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=_rows, length_fn=_real_tokens, window_size=window_size, **kwargs)

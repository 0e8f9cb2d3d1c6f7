"""A test-only accelerator that jobs load by class path (see tests/parallel/test_strategy_cli.py).

``RecordingCPUAccelerator`` numbers the CPU devices (``cpu:0``, ``cpu:1``, ...; tensors on them are ordinary CPU
tensors) so each process has a device of its own, and prints the device Lightning sets up in each process.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.accelerators import CPUAccelerator

DEVICE_MARKER = "[device]"


class RecordingCPUAccelerator(CPUAccelerator):
    @staticmethod
    def get_parallel_devices(devices: int | str) -> list[torch.device]:
        return [torch.device("cpu", i) for i in range(CPUAccelerator.parse_devices(devices))]

    def setup_device(self, device: torch.device) -> None:
        super().setup_device(device)
        print(f"{DEVICE_MARKER} local rank {os.environ.get('LOCAL_RANK', '0')}: {device}", flush=True)

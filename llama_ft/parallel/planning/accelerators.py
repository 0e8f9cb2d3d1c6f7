"""Known accelerators: the few numbers the planner needs about one device and its links.

Bandwidths are what ring collectives actually reach per device and per direction (bus bandwidth as
``nccl-tests`` reports it), not the datasheet's bidirectional sum, so the cost model can use them as they are.
Memory is the total a process sees (``torch.cuda.get_device_properties().total_memory``-sized), before the
planner's usable fraction is taken.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from llama_ft.errors import ConfigError
from llama_ft.parallel.planning.units import GIGA, TERA, GiB, MiB


@dataclass(frozen=True)
class Accelerator:
    """One device model: memory, dense bf16 peak, and the links a collective runs over."""

    name: str
    memory_bytes: int
    peak_flops: float  # dense bf16 tensor-core FLOP/s (no sparsity)
    intra_node_bandwidth: float  # bytes/s per device per direction inside a node (NVLink, xGMI, PCIe)
    inter_node_bandwidth: float  # bytes/s per device per direction across nodes (InfiniBand / RoCE NIC share)
    memory_bandwidth: float  # HBM bytes/s: bounds element-wise work such as the optimizer step
    description: str = ""
    # Achievable share of peak FLOP/s of a wide model's training matmuls in eager PyTorch (see MATMUL_EFFICIENCY).
    matmul_efficiency: float = 0.45


# Achievable matmul efficiency of eager bf16 training (FSDP2, SDPA flash attention) at large width, fitted on the
# published runs marked "fit" in benchmarks/results/planner_vs_published.md (the step-time model multiplies it by
# hidden / (hidden + CostCoefficients.half_efficiency_width)):
# - A100: torchtitan's docs/performance.md (64 × A100 80GB, FSDP2): Llama 2 13B 61.1% MFU without AC, Llama 3 8B
#   56.8-58.2% with selective AC, Llama 3 70B 51.7% MFU = 69% hardware FLOPs with full AC; IBM's "Maximizing training
#   throughput using PyTorch FSDP" (PyTorch blog, 2024): Llama 2 7B at 57% MFU on 128 A100.
# - H100: torchtitan's benchmarks/llama3_h100_202412_torchtitan.md: Llama 3.1 8B eager FSDP reaches 33-39% MFU on
#   500 W HBM2e H100s (reported against the 989 TFLOP/s SXM peak); H100 runs reach 35-45% MFU eagerly.
# Other devices keep a conservative guess from their generation (H200: H100's compute die; MI300X: below H100
# relative to its peak).
MATMUL_EFFICIENCY = {"a100": 0.84, "h100": 0.55, "h200": 0.55, "l40s": 0.55, "mi300x": 0.40, "cpu": 0.45}

# Memory as the driver reports it (nvidia-smi / rocm-smi totals); FLOP/s from the vendors' dense bf16 figures;
# link numbers are achievable ring bus bandwidth: NVLink4 ~360 GB/s, NVLink3 ~230 GB/s, PCIe Gen4 through the
# host ~20 GB/s, Infinity Fabric ~300 GB/s; one 400 Gb/s NIC per GPU gives ~45 GB/s, 200 Gb/s ~22 GB/s.
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            "h100-80gb", 81559 * MiB, 989 * TERA, 360 * GIGA, 45 * GIGA, 3350 * GIGA,
            "NVIDIA H100 SXM 80GB, NVLink 4, 400 Gb/s InfiniBand per GPU",
        ),
        Accelerator(
            "h200-141gb", 143771 * MiB, 989 * TERA, 360 * GIGA, 45 * GIGA, 4800 * GIGA,
            "NVIDIA H200 SXM 141GB, NVLink 4, 400 Gb/s InfiniBand per GPU",
        ),
        Accelerator(
            "h100-96gb", 95830 * MiB, 989 * TERA, 360 * GIGA, 45 * GIGA, 2400 * GIGA,
            "NVIDIA H100 96GB HBM2e at 500 W (Meta's Grand Teton, torchtitan's benchmarks), 400 Gb/s per GPU",
        ),
        Accelerator(
            "a100-80gb", 81920 * MiB, 312 * TERA, 230 * GIGA, 22 * GIGA, 2039 * GIGA,
            "NVIDIA A100 SXM 80GB, NVLink 3, 200 Gb/s InfiniBand per GPU",
        ),
        Accelerator(
            "a100-40gb", 40960 * MiB, 312 * TERA, 230 * GIGA, 22 * GIGA, 1555 * GIGA,
            "NVIDIA A100 SXM 40GB, NVLink 3, 200 Gb/s InfiniBand per GPU",
        ),
        Accelerator(
            "l40s-48gb", 46068 * MiB, 362 * TERA, 20 * GIGA, 11 * GIGA, 864 * GIGA,
            "NVIDIA L40S 48GB, PCIe Gen4 (no NVLink), 100 Gb/s Ethernet per GPU",
        ),
        Accelerator(
            "mi300x-192gb", 192 * GiB, 1307 * TERA, 300 * GIGA, 45 * GIGA, 5300 * GIGA,
            "AMD Instinct MI300X 192GB, Infinity Fabric, 400 Gb/s RoCE per GPU",
        ),
        Accelerator(
            "cpu", 16 * GiB, 1 * TERA, 5 * GIGA, 1 * GIGA, 50 * GIGA,
            "nominal CPU 'device' for tests and gloo runs: 16 GiB, 1 TFLOP/s",
        ),
    )
}
ACCELERATORS = {name: replace(acc, matmul_efficiency=MATMUL_EFFICIENCY[name.split("-")[0]])
                for name, acc in ACCELERATORS.items()}

# Substrings of ``torch.cuda.get_device_name()`` (lower-cased) and the smallest memory that tells two
# same-named parts apart (A100 40GB vs 80GB), checked in order.
_DEVICE_NAME_PATTERNS: tuple[tuple[str, float, str], ...] = (
    ("h200", 0, "h200-141gb"),
    ("h100", 90, "h100-96gb"),
    ("h100", 0, "h100-80gb"),
    ("a100", 60, "a100-80gb"),
    ("a100", 0, "a100-40gb"),
    ("l40s", 0, "l40s-48gb"),
    ("mi300x", 0, "mi300x-192gb"),
)


def accelerator_names() -> list[str]:
    return sorted(ACCELERATORS)


def get_accelerator(name: str) -> Accelerator:
    """Look up a device by its table name; a wrong name is a config error that lists the right ones."""
    key = name.strip().lower()
    if key in ACCELERATORS:
        return ACCELERATORS[key]
    raise ConfigError(
        f"unknown accelerator {name!r}. Known accelerators: {accelerator_names()}. For another device, give its "
        f"memory and dense bf16 peak instead (plan command: --gpu_memory_gib and --gpu_tflops)."
    )


def match_device_name(device_name: str, memory_bytes: int | None = None) -> Accelerator | None:
    """Map a driver's device name (e.g. "NVIDIA H100 80GB HBM3") to a table entry, or None when unknown."""
    lowered = device_name.lower()
    memory_gib = (memory_bytes or 0) / GiB
    if "a100" in lowered and "40gb" in lowered:
        return ACCELERATORS["a100-40gb"]
    for pattern, min_gib, key in _DEVICE_NAME_PATTERNS:
        if pattern in lowered and (memory_bytes is None or memory_gib >= min_gib):
            return ACCELERATORS[key]
    return None


def no_cuda_driver() -> bool:
    """Whether this machine surely has no CUDA driver, known without importing torch (seconds): macOS, or Linux with
    neither NVIDIA's kernel driver (``/proc/driver/nvidia``) nor WSL's GPU device (``/dev/dxg``)."""
    if sys.platform == "darwin":
        return True
    return sys.platform.startswith("linux") and not any(
        Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/dxg"))


def detect_accelerator_name() -> str | None:
    """Table name of the local device: ``cpu`` without CUDA, None for a GPU the table does not know."""
    if no_cuda_driver():
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    props = torch.cuda.get_device_properties(0)
    match = match_device_name(props.name, props.total_memory)
    return match.name if match else None

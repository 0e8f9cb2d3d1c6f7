"""The plan as a picture: per-device memory by part for the top candidates against the usable line, and their
predicted tokens/s. Headless (matplotlib's Agg backend); imported only when a plot is asked for, so planning itself
never pays for matplotlib."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from llama_ft.errors import ConfigError
from llama_ft.parallel.planning.planner import PlanResult
from llama_ft.parallel.planning.units import GiB

_NOT_MEMORY_TERMS = ("host_bytes", "phase")
PNG_MARK = "llama_ft plan"  # PNG "Software" text: marks a picture this program wrote (and may replace)


def check_plot_path(path: str | Path) -> Path:
    """Refuse, before planning, to replace a file this program did not write."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--plot {out}: the picture is a PNG; give a file name ending in .png.")
    if out.exists() and (not out.is_file() or PNG_MARK.encode() not in out.read_bytes()[:4096]):
        raise ConfigError(f"--plot {out}: the file exists and was not written by `llama-ft plan`; choose another "
                          "name or remove it.")
    return out


def memory_terms(result: PlanResult) -> list[str]:
    """The device-side parts of the memory breakdown, in its own order (whatever the memory model defines)."""
    breakdown = result.chosen.memory
    return [f.name for f in fields(breakdown)
            if f.name not in _NOT_MEMORY_TERMS and isinstance(getattr(breakdown, f.name), (int, float))]


def plot_plan(result: PlanResult, path: str | Path, top: int = 8) -> Path:
    """Write a PNG: stacked memory bars (GiB per device) with the usable line, and predicted tokens/s per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = result.candidates[:top]
    labels = [f"#{i} {p.layout.describe()}\nmb {p.micro_batch_size}×{p.grad_accumulation}, peak at {p.memory.phase}"
              for i, p in enumerate(plans, 1)]
    terms = memory_terms(result)
    usable = result.memory_fraction * result.cluster.device_memory_bytes / GiB
    fig, (mem_ax, speed_ax) = plt.subplots(1, 2, figsize=(14, 2.2 + 0.7 * len(plans)), sharey=True,
                                           gridspec_kw={"width_ratios": [3, 1.4]})
    rows = list(range(len(plans)))
    left = [0.0] * len(plans)
    colors = plt.get_cmap("tab10")
    for k, term in enumerate(terms):
        values = [getattr(p.memory, term) / GiB for p in plans]
        mem_ax.barh(rows, values, left=left, color=colors(k % 10), label=term.replace("_", " "))
        left = [a + b for a, b in zip(left, values, strict=True)]
    mem_ax.axvline(usable, color="black", linestyle="--", label=f"usable {usable:.1f} GiB")
    mem_ax.set_yticks(rows, labels, fontsize=8)
    mem_ax.invert_yaxis()
    mem_ax.set_xlabel("predicted memory per device (GiB)")
    mem_ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=5, frameon=False)
    speeds = [p.tokens_per_s_per_device for p in plans]
    speed_ax.barh(rows, speeds, color=["tab:green" if i == 0 else "tab:gray" for i in rows])
    for i, plan in enumerate(plans):
        speed_ax.text(speeds[i], i, f" {speeds[i]:,.0f} (MFU {plan.mfu:.0%})", va="center", fontsize=7)
    speed_ax.set_xlabel("predicted tokens/s per device (modelled)")
    speed_ax.set_xlim(0, max(speeds) * 1.45)
    fig.suptitle(f"{result.model.name} on {result.cluster.world_size} × {result.cluster.accelerator}: top "
                 f"{len(plans)} of {len(result.candidates)} plans (#1 chosen)", fontsize=10)
    fig.tight_layout()
    out = check_plot_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": PNG_MARK})
    plt.close(fig)
    return out

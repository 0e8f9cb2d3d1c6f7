"""How long planning takes as the cluster grows, against the 1-second target, and what a cold start costs.

Prints two markdown tables: (1) the planner API call (Llama-3-8B and Llama-3-70B on 8 … 4096 H100s), best of a few
repeats so a busy shared machine inflates it less; the global batch grows with the cluster (2 sequences per device,
at least 256) so that every size has layouts to choose from. (2) Wall time of fresh processes, once each: the
planning modules alone (imported without the ``llama_ft`` package's ``__init__``, which loads the Lightning classes
and torch) planning 8B on 8 H100s, the same through a normal ``import llama_ft...``, and the ``llama-ft plan`` command
(which parses the recipe with the same LightningCLI classes as ``fit``, so it imports Lightning and torch). With
``--write`` also writes ``benchmarks/results/planner_speed.md``. Run: ``.venv/bin/python benchmarks/planner_speed.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from llama_ft.errors import PlanError
from llama_ft.parallel.planning.planner import plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec

TARGET_S = 1.0
TARGET_CLI_S = 2.0
DEVICES = (8, 64, 512, 4096)
MODELS = ("llama-3-8b", "llama-3-70b")
REPEATS = 5
RESULT = Path(__file__).resolve().parent / "results" / "planner_speed.md"
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lightning")

# Run in a fresh interpreter: plan 8B on 8 H100s and report which heavy libraries got imported. ``BARE`` replaces the
# two package ``__init__`` modules above the planning package by empty packages, so only planning's own imports load.
COLD_PLAN = """
import sys, time, types
start = time.perf_counter()
if {bare}:
    for name, path in (("llama_ft", "{root}/llama_ft"), ("llama_ft.parallel", "{root}/llama_ft/parallel")):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
from llama_ft.parallel.planning.planner import plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
result = plan_parallelism(ModelSpec.from_preset("llama-3-8b"), ClusterSpec.from_accelerator("h100-80gb", 1, 8),
                          TrainSpec(1024, 256, "bf16-mixed"))
print(time.perf_counter() - start, ",".join(m for m in {heavy} if m in sys.modules) or "none")
"""


def cold_start_rows() -> list[str]:
    """Fresh-process wall times: bare planning, planning through the package, and the CLI command."""
    rows = []
    for label, bare in (("planning modules alone (no package `__init__`)", True),
                        ("`import llama_ft.parallel.planning.planner` (package `__init__` loads Lightning)", False)):
        code = COLD_PLAN.format(bare=bare, root=ROOT, heavy=HEAVY)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                             timeout=300).stdout.split()
        wall = time.perf_counter() - start
        rows.append(f"| {label} | {float(out[0]):.2f} | {wall:.2f} | {wall / TARGET_CLI_S:.2f} | {out[1]} |")
    command = [sys.executable, "-m", "llama_ft", "plan", "--model", "llama-3-8b", "--nodes", "1", "--devices", "8",
               "--gpu", "h100-80gb"]
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - start
    rows.append(f"| `llama-ft plan --model llama-3-8b --nodes 1 --devices 8 --gpu h100-80gb` | – | {wall:.2f} | "
                f"{wall / TARGET_CLI_S:.2f} | torch, lightning (LightningCLI parser) |")
    return rows


def time_one(model: ModelSpec, devices: int) -> tuple[float, str, int]:
    """Best-of-N seconds to plan, the chosen layout, and how many plans were feasible."""
    cluster = ClusterSpec.from_accelerator("h100-80gb", nodes=devices // 8, devices_per_node=8)
    train = TrainSpec(seq_len=1024, global_batch_size=max(256, 2 * devices), precision="bf16-mixed")
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        try:
            result = plan_parallelism(model, cluster, train)
            chosen, count = result.chosen.describe(), len(result.candidates)
        except PlanError as err:
            chosen, count = f"no fit: {str(err)[:60]}…", 0
        best = min(best, time.perf_counter() - start)
    return best, chosen, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="also write the table to benchmarks/results/planner_speed.md (default: print only)")
    args = parser.parse_args(argv)
    rows = ["| model | devices | global batch | plan time (ms) | ratio to 1 s target | feasible plans | chosen |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name in MODELS:
        model = ModelSpec.from_preset(name)
        for devices in DEVICES:
            seconds, chosen, count = time_one(model, devices)
            rows.append(f"| {name} | {devices} | {max(256, 2 * devices)} | {seconds * 1e3:.1f} | "
                        f"{seconds / TARGET_S:.4f} | {count} | {chosen} |")
    table = "\n".join(rows)
    header = ("# Planner speed\n\nBest of 5 runs, `h100-80gb` nodes of 8, sequence 1024, bf16-mixed. "
              "Ratio = plan time / 1 s target (lower is better; < 1 meets the target).\n\n")
    cold = "\n".join([
        "\n\n## Cold start (fresh process, once each; 8B on 8 × H100)\n",
        "Ratio = wall time / 2 s target. \"in process\" is import + plan as timed inside the child; \"wall\" adds "
        "interpreter start-up.\n",
        "| what | in process (s) | wall (s) | ratio to 2 s | heavy libraries imported |",
        "|---|---:|---:|---:|---|",
        *cold_start_rows(),
    ])
    print(header + table + cold)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(header + table + cold + "\n")
        print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""How long planning takes as the cluster grows, against the 1-second target, and what ``llama-ft plan`` costs.

Prints two markdown tables: (1) the planner API call (Llama-3-8B and Llama-3-70B on 8 … 4096 H100s), best of a few
repeats so a busy shared machine inflates it less; the global batch grows with the cluster (2 sequences per device,
at least 256) so that every size has layouts to choose from. (2) Wall time of fresh processes, median of 3 each:
importing the planner through the package and planning 8B on 8 H100s; ``llama-ft plan`` naming no recipe and with
the full recipe (both the fast path: no Lightning, torch or transformers); and, as the baseline, the same recipe
command through the LightningCLI path (what it cost before the fast path read recipes: LightningCLI parses the
recipe with the fit classes, which imports Lightning and torch). Both recipe commands must print the same plan.
With ``--write`` also writes ``benchmarks/results/planner_speed.md``. Run: ``.venv/bin/python
benchmarks/planner_speed.py``.
"""

from __future__ import annotations

import argparse
import statistics
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
COLD_REPEATS = 3
RESULT = Path(__file__).resolve().parent / "results" / "planner_speed.md"
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lightning", "matplotlib")
# Printed to stderr as the child exits: which heavy libraries it imported (costs nothing while it runs).
REPORT_HEAVY = (f"import atexit, sys; atexit.register(lambda: print('heavy:', ','.join(m for m in {HEAVY} "
                "if m in sys.modules) or 'none', file=sys.stderr))\n")
# Import planning through the package (as a user would), plan 8B on 8 H100s.
IMPORT_AND_PLAN = REPORT_HEAVY + """
from llama_ft.parallel.planning.planner import plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
plan_parallelism(ModelSpec.from_preset("llama-3-8b"), ClusterSpec.from_accelerator("h100-80gb", 1, 8),
                 TrainSpec(1024, 256, "bf16-mixed"))
"""
# What the ``llama-ft`` console script runs, and the LightningCLI path alone (the baseline).
CONSOLE_SCRIPT = REPORT_HEAVY + "from llama_ft.cli import main\nsys.exit(main())\n"
LIGHTNING_CLI = REPORT_HEAVY + "from llama_ft.cli.lightning_cli import main\nsys.exit(main())\n"
CLUSTER = ["--nodes", "1", "--devices", "8", "--gpu", "h100-80gb"]
RECIPE = "configs/llama3_8b_cnn_dailymail.yaml"


def cold_run(code: str, args: list[str]) -> tuple[float, str, str]:
    """Wall seconds of one fresh interpreter running ``code`` with ``args``, its stdout and heavy libraries."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=ROOT,
                          timeout=300)
    wall = time.perf_counter() - start
    heavy = next(line for line in proc.stderr.splitlines() if line.startswith("heavy: "))
    return wall, proc.stdout, heavy.removeprefix("heavy: ")


def cold_start_rows() -> list[str]:
    """Median wall of fresh processes: planning through the package, ``plan`` without and with a recipe, and the
    recipe command through LightningCLI."""
    cases = [
        ("import planning through `llama_ft` and plan (API)", IMPORT_AND_PLAN, []),
        ("`llama-ft plan --model llama-3-8b --nodes 1 --devices 8 --gpu h100-80gb` (no recipe)",
         CONSOLE_SCRIPT, ["plan", "--model", "llama-3-8b", *CLUSTER]),
        (f"`llama-ft plan --config {RECIPE} --nodes 1 --devices 8 --gpu h100-80gb`", CONSOLE_SCRIPT,
         ["plan", "--config", RECIPE, *CLUSTER]),
        ("the same recipe command through LightningCLI (baseline)", LIGHTNING_CLI, ["plan", "--config", RECIPE,
                                                                                    *CLUSTER]),
    ]
    measured = []
    for label, code, args in cases:
        runs = [cold_run(code, args) for _ in range(COLD_REPEATS)]
        measured.append((label, [r[0] for r in runs], runs[0][1], runs[0][2]))
    if measured[2][2] != measured[3][2]:
        raise SystemExit("the fast path and the LightningCLI path printed different plans for the recipe")
    baseline = statistics.median(measured[3][1])
    rows = []
    for label, walls, _, heavy in measured:
        median = statistics.median(walls)
        rows.append(f"| {label} | {median:.2f} | {' / '.join(f'{w:.2f}' for w in walls)} | {median / baseline:.3f} | "
                    f"{median / TARGET_CLI_S:.2f} | {heavy} |")
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
        f"\n\n## Cold start (fresh process, median of {COLD_REPEATS}; 8B on 8 × H100)\n",
        "Wall time including interpreter start-up. Ratio to baseline = median / median of the recipe command through "
        "the LightningCLI path (measured in the same run); both recipe commands printed the same plan.\n",
        "| what | median wall (s) | runs (s) | ratio to baseline | ratio to 2 s target | heavy libraries imported |",
        "|---|---:|---|---:|---:|---|",
        *cold_start_rows(),
    ])
    print(header + table + cold)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(header + table + cold + "\n")
        print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()

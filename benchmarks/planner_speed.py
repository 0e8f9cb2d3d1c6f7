"""How long planning takes as the cluster grows, against the 1-second target.

Prints a markdown table (Llama-3-8B and Llama-3-70B on 8 … 4096 H100s); with ``--write`` also writes it to
``benchmarks/results/planner_speed.md``. Run: ``.venv/bin/python benchmarks/planner_speed.py [--write]``.
The global batch grows with the cluster (2 sequences per device, at least 256) so that every size has layouts
to choose from; each time is the best of a few repeats, so a busy shared machine inflates it less.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llama_ft.errors import PlanError
from llama_ft.parallel.planning.planner import plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.presets import load_llama_config

TARGET_S = 1.0
DEVICES = (8, 64, 512, 4096)
MODELS = ("llama-3-8b", "llama-3-70b")
REPEATS = 5
RESULT = Path(__file__).resolve().parent / "results" / "planner_speed.md"


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
        model = ModelSpec.from_llama_config(load_llama_config(name), name=name)
        for devices in DEVICES:
            seconds, chosen, count = time_one(model, devices)
            rows.append(f"| {name} | {devices} | {max(256, 2 * devices)} | {seconds * 1e3:.1f} | "
                        f"{seconds / TARGET_S:.4f} | {count} | {chosen} |")
    table = "\n".join(rows)
    header = ("# Planner speed\n\nBest of 5 runs, `h100-80gb` nodes of 8, sequence 1024, bf16-mixed. "
              "Ratio = plan time / 1 s target (lower is better; < 1 meets the target).\n\n")
    print(header + table)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(header + table + "\n")
        print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()

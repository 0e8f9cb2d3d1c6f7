"""Predicted tokens/s per GPU (and peak memory) against published measurements of real GPU runs.

Every published setup is pinned in the planner (``PlanPins``: TP, shard and replica sizes, checkpointing,
micro-batch, no offload) at the published sequence length and a global batch of micro-batch × data-parallel size, and
the prediction is set beside the measurement. Rows marked "fit" set the time model's constants
(``accelerators.MATMUL_EFFICIENCY``, ``CostCoefficients.half_efficiency_width``); "held out" rows only test them.
Only eager runs (no torch.compile, no float8) are rows. Prints a markdown table; ``--write`` also writes
``benchmarks/results/planner_vs_published.md``. Run: ``.venv/bin/python benchmarks/planner_vs_published.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from llama_ft.errors import PlanError
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.coefficients import DEFAULT_COEFFICIENTS, CostCoefficients
from llama_ft.parallel.planning.memory import estimate_memory
from llama_ft.parallel.planning.planner import PlanPins, plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.step_time import estimate_step_time
from llama_ft.parallel.planning.units import GiB

RESULT = Path(__file__).resolve().parent / "results" / "planner_vs_published.md"
TARGET_ROW, TARGET_MEDIAN, TARGET_MEMORY = 0.20, 0.10, 0.15

# Llama 2 shapes (Meta's model cards; 34B is Code Llama 34B's shape, used by IBM's 34B runs), vocab 32,000.
LLAMA2 = {
    "llama-2-7b": ModelSpec(32, 4096, 32, 32, 128, 11008, 32000, name="llama-2-7b"),
    "llama-2-13b": ModelSpec(40, 5120, 40, 40, 128, 13824, 32000, name="llama-2-13b"),
    "llama-2-34b": ModelSpec(48, 8192, 64, 8, 128, 22016, 32000, name="llama-2-34b"),
    "llama-2-70b": ModelSpec(80, 8192, 64, 8, 128, 28672, 32000, name="llama-2-70b"),
}

# A loss chunk longer than any micro-batch: the whole micro-batch's logits at once, as the published code computes.
WHOLE_LOGITS = 1 << 40


@dataclass(frozen=True)
class Source:
    """Where the numbers come from, the cluster's network as the source states it, and how the published code's step
    differs from llama_ft's (as the cost model's switches), so memory is predicted for the code that ran."""

    name: str
    node_gbps: float | None  # inter-node bandwidth per node the source states; None: the device table's
    coefficients: CostCoefficients = DEFAULT_COEFFICIENTS
    fused_optimizer: bool = True


# torchtitan's train.py (commits 3bae958, 4d88a8a and the Dec-2024 benchmark's ba24697) computes
# ``cross_entropy(pred.flatten(0, 1)...)`` over the whole micro-batch's logits (fp32 upcast since 4d88a8a), and its
# optimizer builder uses foreach AdamW unless ``--optimizer.fused`` (default off). Its reported memory is
# ``max_reserved`` (torchtitan/metrics.py): the allocator's reserve, compared here with tensors + allowance.
TORCHTITAN_STEP = replace(DEFAULT_COEFFICIENTS, loss_chunk_tokens=WHOLE_LOGITS)
# fms-fsdp's mixed-precision policy (fms_fsdp/policies/mixed_precision.py, ``bfSixteen``) reduces gradients in bf16;
# the PyTorch blog states its clusters' networks: 400 Gb/s inter-node on the A100s, 800 Gb/s on the H100s.
FMS_STEP = replace(DEFAULT_COEFFICIENTS, loss_chunk_tokens=WHOLE_LOGITS, bf16_gradient_reduction=True)

TT_2024_04 = Source("torchtitan docs/performance.md (2024-04, commit 3bae958)", None, TORCHTITAN_STEP, False)
TT_2025_01 = Source("torchtitan docs/performance.md (2025-01, commit 4d88a8a)", None, TORCHTITAN_STEP, False)
TT_H100 = Source("torchtitan benchmarks/llama3_h100_202412_torchtitan.md", None, TORCHTITAN_STEP, False)
IBM = Source("fms-fsdp README (IBM, companion of the PyTorch blog 'Maximizing training throughput using PyTorch "
             "FSDP')", 400, FMS_STEP, False)
IBM_BLOG = Source("PyTorch blog 'Maximizing training throughput using PyTorch FSDP' (IBM, 2024), A100 table", 400,
                  FMS_STEP, False)
IBM_BLOG_H100 = Source("PyTorch blog 'Maximizing training throughput using PyTorch FSDP' (IBM, 2024), H100 table", 800,
                       FMS_STEP, False)


@dataclass(frozen=True)
class Published:
    """One published run: where, what, and what it measured."""

    source: Source
    model: str
    gpu: str
    nodes: int
    replicate: int
    shard: int
    tp: int
    ac: str  # the planner's mode; ``ac_note`` says what the run used
    ac_note: str
    micro_batch: int
    seq_len: int
    tokens_per_s: float
    fit: bool
    memory_gib: float | None = None


ROWS = (
    Published(TT_2024_04, "llama-2-13b", "a100-80gb", 8, 1, 64, 1, "none", "none", 2, 4096, 2162, True),
    Published(TT_2024_04, "llama-2-13b", "a100-80gb", 8, 1, 64, 1, "selective", "selective layer", 2, 4096, 1914,
              False),
    Published(TT_2024_04, "llama-2-13b", "a100-80gb", 8, 1, 64, 1, "selective", "selective op", 2, 4096, 1904, False),
    Published(TT_2024_04, "llama-2-70b", "a100-80gb", 8, 1, 64, 1, "selective", "selective op", 1, 4096, 355, False),
    Published(TT_2024_04, "llama-2-70b", "a100-80gb", 8, 1, 64, 1, "full", "full", 2, 4096, 353, False),
    Published(TT_2025_01, "llama-3-8b", "a100-80gb", 8, 1, 64, 1, "selective", "selective layer", 1, 8192, 2904,
              False),
    Published(TT_2025_01, "llama-3-8b", "a100-80gb", 8, 1, 64, 1, "selective", "selective op", 1, 8192, 2973, True),
    Published(TT_2025_01, "llama-3-70b", "a100-80gb", 8, 1, 64, 1, "full", "full", 1, 8192, 331, True),
    Published(TT_2025_01, "llama-3.1-405b", "h100-96gb", 16, 1, 16, 8, "full", "full", 2, 8192, 109, False),
    Published(TT_H100, "llama-3-8b", "h100-96gb", 1, 1, 8, 1, "selective", "selective op", 2, 8192, 5762, True, 82.4),
    Published(TT_H100, "llama-3-8b", "h100-96gb", 16, 1, 128, 1, "selective", "selective op", 2, 8192, 5605, False,
              67.0),
    Published(IBM_BLOG, "llama-2-7b", "a100-80gb", 16, 16, 8, 1, "none", "none", 2, 4096, 3700, False),
    Published(IBM_BLOG, "llama-2-13b", "a100-80gb", 16, 16, 8, 1, "selective", "selective blocks", 2, 4096, 1800,
              False),
    Published(IBM_BLOG, "llama-2-34b", "a100-80gb", 16, 1, 128, 1, "full", "full", 2, 4096, 700, False),
    Published(IBM_BLOG, "llama-2-70b", "a100-80gb", 16, 1, 128, 1, "full", "full", 2, 4096, 370, False),
    Published(IBM, "llama-2-7b", "a100-80gb", 16, 16, 8, 1, "none", "none", 2, 4096, 3760, False),
    Published(IBM, "llama-2-13b", "a100-80gb", 16, 16, 8, 1, "none", "none", 1, 4096, 1700, False),
    Published(IBM, "llama-2-34b", "a100-80gb", 16, 1, 128, 1, "full", "full", 8, 4096, 772, False),
    Published(IBM, "llama-2-70b", "a100-80gb", 16, 1, 128, 1, "full", "full", 6, 4096, 380, False),
    Published(IBM_BLOG_H100, "llama-2-7b", "h100-80gb", 12, 12, 8, 1, "none", "none", 2, 4096, 7500, False),
    Published(IBM_BLOG_H100, "llama-2-13b", "h100-80gb", 12, 12, 8, 1, "selective", "selective blocks", 2, 4096,
              3800, False),
    Published(IBM_BLOG_H100, "llama-2-34b", "h100-80gb", 12, 1, 96, 1, "full", "full", 2, 4096, 1550, False),
    Published(IBM_BLOG_H100, "llama-2-70b", "h100-80gb", 12, 1, 96, 1, "full", "full", 2, 4096, 800, False),
)


def model_spec(name: str) -> ModelSpec:
    return LLAMA2[name] if name in LLAMA2 else ModelSpec.from_preset(name)


def predict(row: Published) -> tuple[float, float, str]:
    """(tokens/s per GPU, peak GiB with the allowance, note) of the pinned setup, for the published code's step on the
    source's network; a setup predicted not to fit is still timed."""
    model, source = model_spec(row.model), row.source
    cluster = ClusterSpec.from_accelerator(row.gpu, row.nodes, (row.replicate * row.shard * row.tp) // row.nodes)
    if source.node_gbps is not None:
        cluster = cluster.with_node_network(source.node_gbps)
    dp = row.replicate * row.shard
    train = TrainSpec(row.seq_len, row.micro_batch * dp, "bf16-mixed", fused_optimizer=source.fused_optimizer)
    pins = PlanPins(row.tp, row.shard, row.replicate, row.ac, row.micro_batch, False)
    coeffs = source.coefficients
    try:
        plan = plan_parallelism(model, cluster, train, pins, memory_fraction=1.0, coeffs=coeffs).chosen
        return plan.tokens_per_s_per_device, plan.peak_bytes / GiB, ""
    except PlanError:
        layout = Layout(row.replicate, row.shard, row.tp, row.ac, False)  # type: ignore[arg-type]
        memory = estimate_memory(model, train, layout, row.micro_batch, coeffs)
        time = estimate_step_time(model, cluster, train, layout, row.micro_batch, 1, coeffs)
        return (train.tokens_per_step / (time.total_s * cluster.world_size), memory.total / GiB,
                "predicted not to fit")


def layout_text(row: Published) -> str:
    dp = f"HSDP {row.replicate}×{row.shard}" if row.replicate > 1 else f"FSDP {row.shard}"
    return dp + (f" × TP {row.tp}" if row.tp > 1 else "")


def build_table() -> tuple[str, dict[str, float]]:
    lines = ["| # | source | model | GPUs | layout | AC | mb | seq | measured tok/s/GPU | predicted | ratio | "
             "role | measured GiB | predicted GiB | note |",
             "|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    errors: dict[str, list[float]] = {"fit": [], "held out": []}
    memory_errors = []
    for i, row in enumerate(ROWS, 1):
        tokens, gib, note = predict(row)
        ratio = tokens / row.tokens_per_s
        role = "fit" if row.fit else "held out"
        errors[role].append(abs(ratio - 1))
        measured_gib = f"{row.memory_gib:.1f}" if row.memory_gib else "–"
        if row.memory_gib:
            memory_errors.append(gib / row.memory_gib - 1)
            note = (note + "; " if note else "") + f"memory {gib / row.memory_gib - 1:+.0%}"
        world = row.replicate * row.shard * row.tp
        lines.append(f"| {i} | {row.source.name} | {row.model} | {world} × {row.gpu} ({row.nodes} nodes) | "
                     f"{layout_text(row)} | {row.ac_note} | {row.micro_batch} | {row.seq_len} | "
                     f"{row.tokens_per_s:,.0f} | {tokens:,.0f} | {ratio:.2f} | {role} | {measured_gib} | {gib:.1f} | "
                     f"{note} |")
    every = errors["fit"] + errors["held out"]
    stats = {"median": statistics.median(every), "worst": max(every),
             "median_held_out": statistics.median(errors["held out"]), "within": sum(e <= TARGET_ROW for e in every),
             "rows": len(every), "worst_memory": max((abs(e) for e in memory_errors), default=0.0)}
    return "\n".join(lines), stats


def summary(stats: dict[str, float]) -> str:
    return (f"Median |error| {stats['median']:.1%} (held-out rows {stats['median_held_out']:.1%}; target ≤ "
            f"{TARGET_MEDIAN:.0%}); worst row {stats['worst']:.1%} (target ≤ {TARGET_ROW:.0%}); "
            f"{stats['within']:.0f} of {stats['rows']:.0f} rows within ±{TARGET_ROW:.0%}. Worst memory error where "
            f"published: {stats['worst_memory']:.0%} (target ±{TARGET_MEMORY:.0%}).")


HEADER = """# Planner vs published GPU runs

Each row is a published eager bf16 run (no torch.compile, no float8), pinned in the planner (`PlanPins`) at its
layout, activation checkpointing, micro-batch and sequence length; ratio = predicted / measured tokens/s per GPU.
"fit" rows set the time model's constants (`MATMUL_EFFICIENCY` per accelerator, `half_efficiency_width`); "held out"
rows test them. "selective" runs (torchtitan's per-layer or per-op SAC, IBM's checkpointing of a share of the blocks:
its HFU/MFU of 0.59/0.51 means about half the forward re-run) are planned as this project's selective mode (about half
the forward recomputed). H100 96GB rows ran at 500 W; their MFU is reported against the SXM peak, as the sources do.

Each source is predicted for the code that ran, through the cost model's switches (`CostCoefficients`, `TrainSpec`):
torchtitan computes the loss over the whole micro-batch's logits (no chunking) with foreach AdamW, and reports
`max_reserved` memory, compared here with predicted tensors plus the planner's allowance; IBM's fms-fsdp also reduces
gradients in bf16. Network: the device table's for torchtitan (A100: 200 Gb/s InfiniBand per GPU, H100: 400 Gb/s per
GPU, as torchtitan's H100 hosts report), the blog's for IBM (400 Gb/s per node on the 128 A100s, 800 Gb/s on the 96
H100s). Layouts the blog's table leaves out are the README's for the same sizes (HSDP over nodes for 7B and 13B, FSDP
over all GPUs for 34B and 70B). Other memory columns are this project's model of the published setup where the source
gives no figure, for reference. Sources: torchtitan (github.com/pytorch/torchtitan, the files and commits named),
IBM's fms-fsdp README and the PyTorch blog post "Maximizing training throughput using PyTorch FSDP" (both tables).

Caveats: the 405B row's training config sets compile = true while its table row lists no optimizations (kept, held
out). Compute that overlaps a collective is slowed by 18.9% (`CostCoefficients.overlap_compute_slowdown`, taken from
arXiv 2507.03114's measurements, not fitted here); without it IBM's README 13B HSDP row at micro-batch 1 without
checkpointing was predicted 24% fast, as its inter-node all-reduce overlaps most of the backward. That row is still
the worst (+15%): it measured slower than the blog's 13B on the same cluster at micro-batch 2 with half the blocks
recomputed (1,800 tok/s), a cost per micro-batch the model only partly explains.
Regenerate: `python benchmarks/planner_vs_published.py --write`.

"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="also write benchmarks/results/planner_vs_published.md (default: print only)")
    args = parser.parse_args(argv)
    table, stats = build_table()
    text = HEADER + summary(stats) + "\n\n" + table + "\n"
    print(text)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)
        print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()

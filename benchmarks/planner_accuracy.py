"""How close the cost model's predicted peak memory per device is to the fake-tensor simulation of the real step.

For every row of a grid (model × world size × sequence × micro-batch × activation checkpointing, bf16-mixed, FSDP over
the whole world, plus a few HSDP and FSDP × TP rows; Llama-3-70B on a smaller grid of its own) this prints the
planner's predicted peak per rank next to the peak
:func:`~llama_ft.parallel.planning.simulate.simulate_peak_memory` measures, and the error in percent; the target is
every row within ±10 %. With ``--write`` the default grid's table also goes to
``benchmarks/results/planner_accuracy.md`` (``--quick`` and ``--models`` runs only ever print theirs). ``--lora`` runs
the LoRA grid instead (peft adapters on a frozen base, ``LORA_ROWS``); with ``--write`` it replaces only the LoRA
section of that file.

The prediction compared is the cost model's peak *without* its allowance (workspace + fragmentation): the simulation
counts tensors only, so it has no allocator fragmentation and no cuBLAS/NCCL workspaces. The planner still adds the
allowance when it decides what fits.

Simulations are cached as JSON under ``benchmarks/results/cache/`` (keyed by model config, layout, micro-batch,
sequence, precision and the torch/transformers versions), so a rerun after a cost-model change takes seconds; a
fresh run takes about 15-25 minutes on 2 cores (``--quick``: a few minutes).

Run: ``.venv/bin/python benchmarks/planner_accuracy.py [--models llama-3-8b ...] [--quick] [--lora] [--jobs 2]
[--refresh] [--write]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.memory import MemoryBreakdown, estimate_memory
from llama_ft.parallel.planning.simulate import SimulationResult, simulate_peak_memory
from llama_ft.parallel.planning.specs import LoraSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.units import GiB
from llama_ft.presets import load_llama_config

MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3-8b", "llama-3-70b")
LARGE_MODELS = ("llama-3-70b",)  # about 2 minutes a simulation: a smaller grid of their own
WORLD_SIZES = (8, 64)
SEQ_LENS = (1024, 4096)
MICRO_BATCHES = (1, 2)
AC_MODES = ("none", "full")
PRECISION = "bf16-mixed"
TOLERANCE = 0.10
RESULTS = Path(__file__).resolve().parent / "results"
RESULT = RESULTS / "planner_accuracy.md"
CACHE = RESULTS / "cache"
TIMEOUT_S = 900.0
# What the simulated step runs, beyond the key's sizes: a change here makes every cached simulation stale.
IMPLEMENTATION = ("llama_ft.loss (chunked; loss parallel under TP), sequence-parallel TP, "
                  "selective = every other matmul")


@dataclass(frozen=True)
class Case:
    """One row: a model, a layout and the micro-batch shape it is simulated at."""

    model: str
    layout: Layout
    micro_batch: int
    seq_len: int
    lora: LoraSpec | None = None
    optimizer: str = "fused"  # AdamW as the fine-tuner runs it on CUDA; "foreach" is its CPU choice


# LoRA as the recipe runs it (q_proj, v_proj, rank 64), with and without adapter dropout: one GPU, FSDP, HSDP.
_QV64 = LoraSpec(64)
LORA_ROWS = (
    Case("llama-3-8b", Layout(activation_checkpointing="none"), 1, 1024, _QV64),
    Case("llama-3-8b", Layout(activation_checkpointing="full"), 1, 1024, _QV64),
    Case("llama-3-8b", Layout(dp_shard=8, activation_checkpointing="none"), 1, 1024, _QV64),
    Case("llama-3-8b", Layout(dp_shard=8, activation_checkpointing="none"), 1, 1024, LoraSpec(64, dropout=0.05)),
    Case("llama-3-8b", Layout(dp_shard=8, activation_checkpointing="selective"), 1, 1024, _QV64),
    Case("llama-3-8b", Layout(dp_shard=8, activation_checkpointing="full"), 2, 1024, _QV64),
    Case("llama-3-8b", Layout(dp_shard=8, activation_checkpointing="full"), 1, 4096, _QV64),
    Case("llama-3-8b", Layout(dp_replicate=2, dp_shard=4, activation_checkpointing="none"), 1, 1024, _QV64),
    Case("llama-3.2-1b", Layout(dp_shard=8, activation_checkpointing="none"), 2, 1024,
         LoraSpec(8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))),
    Case("llama-3-70b", Layout(dp_shard=8, activation_checkpointing="full"), 1, 1024, _QV64),
)


def fsdp_rows(model: str, quick: bool) -> list[Case]:
    """FSDP over the whole world: the main row type (quick: world 8 and micro-batch 1 only)."""
    worlds = WORLD_SIZES[:1] if quick else WORLD_SIZES
    batches = MICRO_BATCHES[:1] if quick else MICRO_BATCHES
    return [Case(model, Layout(dp_shard=world, activation_checkpointing=ac), b, s)
            for world in worlds for s in SEQ_LENS for b in batches for ac in AC_MODES]


def other_layout_rows(model: str, quick: bool) -> list[Case]:
    """HSDP 8 × 8 (world 64) and FSDP 4 × TP 2 (world 8), at sequence 1024 and micro-batch 1."""
    layouts = [Layout(dp_shard=4, tp=2)] if quick else [Layout(dp_replicate=8, dp_shard=8), Layout(dp_shard=4, tp=2)]
    return [Case(model, Layout(lay.dp_replicate, lay.dp_shard, lay.tp, ac), 1, 1024)
            for lay in layouts for ac in AC_MODES]


def large_model_rows(model: str, quick: bool) -> list[Case]:
    """FSDP 64 at both sequence lengths and FSDP 8 × TP 8 at 1024, micro-batch 1 (quick: FSDP 64 at 1024)."""
    seqs = SEQ_LENS[:1] if quick else SEQ_LENS
    rows = [Case(model, Layout(dp_shard=64, activation_checkpointing=ac), 1, s) for s in seqs for ac in AC_MODES]
    if not quick:
        rows += [Case(model, Layout(dp_shard=8, tp=8, activation_checkpointing=ac), 1, 1024) for ac in AC_MODES]
    return rows


def lean_rows(model: str, quick: bool) -> list[Case]:
    """What the lean step changed (issue 10), at sequence 4096 where it shows: op-level selective checkpointing,
    sequence + loss parallel TP (FSDP 4 × TP 2), and foreach AdamW (the CPU choice) beside the fused default."""
    rows = [Case(model, Layout(dp_shard=8, activation_checkpointing="selective"), 1, 4096),
            Case(model, Layout(dp_shard=4, tp=2, activation_checkpointing="full"), 1, 4096)]
    if not quick:
        rows += [Case(model, Layout(dp_shard=4, tp=2, activation_checkpointing="selective"), 1, 4096),
                 Case(model, Layout(dp_shard=8, activation_checkpointing="full"), 1, 1024, optimizer="foreach")]
    return rows


def large_model_lean_rows(model: str, quick: bool) -> list[Case]:
    """The published 405B shape scaled to 70B: FSDP 8 × TP 8, full checkpointing, sequence 8192."""
    return [] if quick else [Case(model, Layout(dp_shard=8, tp=8, activation_checkpointing="full"), 1, 8192)]


def grid(models: list[str], quick: bool, lean_only: bool = False) -> list[Case]:
    if lean_only:
        return [case for model in models
                for case in (large_model_lean_rows(model, quick) if model in LARGE_MODELS else lean_rows(model, quick))]
    cases = []
    for model in models:
        if model in LARGE_MODELS:
            cases += [*large_model_rows(model, quick), *large_model_lean_rows(model, quick)]
        else:
            cases += [*fsdp_rows(model, quick), *other_layout_rows(model, quick), *lean_rows(model, quick)]
    return cases


# =============================================================================================================
# Simulation, cached on disk
# =============================================================================================================


def cache_path(case: Case) -> Path:
    """A file name people can read, plus a hash of everything the simulated peak depends on."""
    key = {
        "config": load_llama_config(case.model).to_dict(),
        "layout": asdict(case.layout),
        "micro_batch": case.micro_batch,
        "seq_len": case.seq_len,
        "precision": PRECISION,
        "attention": "sdpa",
        "optimizer": case.optimizer,
        "implementation": IMPLEMENTATION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if case.lora is not None:  # only LoRA rows carry the key: the full fine-tuning rows keep their cache files
        key["lora"] = asdict(case.lora)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    lay = case.layout
    shape = f"r{lay.dp_replicate}s{lay.dp_shard}t{lay.tp}-{lay.activation_checkpointing}"
    shape += f"-lora{case.lora.rank}" if case.lora is not None else ""
    return CACHE / f"{case.model}-{shape}-b{case.micro_batch}-s{case.seq_len}-{case.optimizer}-{digest}.json"


def load_cached(case: Case) -> SimulationResult | None:
    path = cache_path(case)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["layout"] = Layout(**data["layout"])
    data.pop("lora", None)
    return SimulationResult(**data)


def simulate(case: Case, refresh: bool) -> SimulationResult:
    """The cached simulation of ``case``, or a fresh one (stored for next time)."""
    cached = None if refresh else load_cached(case)
    if cached is not None:
        return cached
    result = simulate_peak_memory(case.model, case.layout, case.micro_batch, case.seq_len, precision=PRECISION,
                                  lora=case.lora, optimizer=case.optimizer, timeout_s=TIMEOUT_S)
    CACHE.mkdir(parents=True, exist_ok=True)
    cache_path(case).write_text(json.dumps({**asdict(result), "layout": asdict(case.layout)}, indent=1))
    print(f"  simulated {result.describe()}", file=sys.stderr, flush=True)
    return result


# =============================================================================================================
# Table
# =============================================================================================================


def predict(case: Case) -> MemoryBreakdown:
    """The cost model's peak for the same model, layout and micro-batch, one micro-batch per step as simulated."""
    spec = ModelSpec.from_llama_config(load_llama_config(case.model), name=case.model)
    train = TrainSpec(case.seq_len, case.micro_batch * case.layout.dp_size, PRECISION, lora=case.lora,
                      fused_optimizer=case.optimizer == "fused")
    return estimate_memory(spec, train, case.layout, case.micro_batch)


def row(case: Case, result: SimulationResult) -> tuple[str, float]:
    """A markdown row and the signed relative error of the prediction without its allowance."""
    memory = predict(case)
    error = memory.tensors / result.peak_bytes - 1
    mark = "" if abs(error) <= TOLERANCE else " ⚠"
    lay = case.layout
    if case.lora is not None:
        lora = case.lora
        targets = "q,v" if lora.target_modules == ("q_proj", "v_proj") else "all"
        dropout = f", dropout {lora.dropout}" if lora.dropout else ""
        return (f"| {case.model} | r{lora.rank} {targets}{dropout} | {lay.world_size} | "
                f"{lay.describe().replace(' × TP 1', '')} | {case.seq_len} | {case.micro_batch} | "
                f"{memory.tensors / GiB:.2f} | {result.peak_bytes / GiB:.2f} | {error:+.1%}{mark} | {memory.phase} |",
                error)
    describe = lay.describe().replace(" × TP 1", "")
    describe += f", {case.optimizer} AdamW" if case.optimizer != "fused" else ""
    return (f"| {case.model} | {lay.world_size} | {describe} | {case.seq_len} | "
            f"{case.micro_batch} | {memory.tensors / GiB:.2f} | {result.peak_bytes / GiB:.2f} | {error:+.1%}{mark} | "
            f"{memory.phase} |", error)


def table(cases: list[Case], results: list[SimulationResult]) -> tuple[str, list[float]]:
    rows = ["| model | world | layout | seq | micro-batch | predicted GiB | simulated GiB | error | peak (predicted) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    if cases and cases[0].lora is not None:
        rows = ["| model | LoRA | world | layout | seq | micro-batch | predicted GiB | simulated GiB | error | "
                "peak (predicted) |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    errors = []
    for case, result in zip(cases, results, strict=True):
        line, error = row(case, result)
        rows.append(line)
        errors.append(error)
    return "\n".join(rows), errors


def summary(errors: list[float], cases: list[Case], results: list[SimulationResult], elapsed_s: float,
            simulated: int) -> str:
    """Worst error, rows outside the tolerance, and what the simulations cost (this run, and from scratch)."""
    outside = [c for c, e in zip(cases, errors, strict=True) if abs(e) > TOLERANCE]
    worst = max(errors, key=abs)
    from_scratch = sum(r.total_s for r in results)
    run = (f"{simulated} rows simulated, wall time {elapsed_s / 60:.1f} min" if simulated else
           "every row read from the cache")
    return (f"{len(cases)} rows, max |error| {abs(worst):.1%}, {len(outside)} outside ±{TOLERANCE:.0%}. This run: "
            f"{run}. Simulating every row from scratch costs {from_scratch / 60:.0f} min of single-process time "
            "(split over `--jobs`).")


HEADER = """# Planner accuracy: predicted vs simulated peak memory per rank

Predicted: the cost model's peak per device **without** its allowance (workspace and fragmentation), which the
simulation cannot see; the planner adds the allowance when it decides what fits. "Peak (predicted)" names the moment
of the step the cost model finds largest. Simulated: the real training step (HF `LlamaForCausalLM` with SDPA, FSDP2 as
`apply.py` configures it: fp32 sharded parameters, bf16 all-gather, fp32 reduce-scatter; TP with sequence and loss
parallelism; the loss of `llama_ft/loss.py`, chunked without TP; selective checkpointing op by op; fused AdamW unless
the row says foreach; two iterations of one micro-batch each) at full size on fake tensors with a fake process group
and `FSDPMemTracker`
(`llama_ft/parallel/simulate.py`), rank 0. The simulated SDPA is the CPU kernel's: it keeps repeated K/V heads and an
s×s bias per layer, as CUDA kernels do for padded (masked) batches, which is the cost model's default. Error =
predicted / simulated − 1; the target is ±{tolerance:.0%} on every row. GiB = 2^30 bytes. The cost model's phases were
calibrated on these rows (Llama-3-70B's excepted); simulations it was not fitted to (selective checkpointing, TP 8,
DDP, gradient accumulation, bf16-true and 32-true) are checked in `tests/parallel/test_memory.py`.

"""

LORA_MARKER = "\n## LoRA\n"
LORA_HEADER = """
## LoRA

The same comparison with peft's LoRA adapters injected as `fit` injects them (frozen base stored and gathered like
full fine-tuning's weights, no base gradients or optimizer states, only the adapters in AdamW), predicted by
`llama_ft/parallel/planning/lora_memory.py`. Written by `--lora --write`, which replaces only this section.

"""


def write_lora_section(text: str) -> None:
    """Replace (or add) the LoRA section at the end of the results file, leaving the rest as it is."""
    current = RESULT.read_text() if RESULT.is_file() else ""
    kept = current.split(LORA_MARKER)[0].rstrip("\n") + "\n"
    RESULT.write_text(kept + LORA_HEADER + text + "\n")


LEAN_SECTION = "## Rows of the lean step\n\n"
LEAN_INTRO = """Sequence 4096 unless stated, where the changes show: op-level selective checkpointing (every
other matmul kept), FSDP 4 × TP 2 with sequence and loss parallelism, foreach AdamW (the fine-tuner's CPU choice)
beside the fused default, and Llama-3-70B as FSDP 8 × TP 8 at sequence 8192 (the published Llama-3.1-405B shape,
scaled down), simulated with the step as it is now. The table above predates that step (HF's loss, TP without
sequence or loss parallelism, selective keeping every matmul, foreach AdamW) wherever it differs: rows over 1,024
tokens per micro-batch, TP rows and optimizer-step peaks. A full `--write` run re-simulates every row (about two
hours on two busy cores) and folds these rows into one table. Regenerate this section alone with `--lean --write`.

"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model presets (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="world 8, micro-batch 1, one non-FSDP layout")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="simulations run at once, each a single-threaded process (default: %(default)s)")
    parser.add_argument("--lean", action="store_true",
                        help="only the rows of the lean step (selective op by op, sequence/loss-parallel TP, foreach "
                             "AdamW); with --write they replace the file's section of their own, the rest is kept")
    parser.add_argument("--refresh", action="store_true", help="ignore the cache and simulate every row again")
    parser.add_argument("--lora", action="store_true", help="the LoRA grid (LORA_ROWS) instead of the default one")
    parser.add_argument("--write", action="store_true",
                        help="also write the table to benchmarks/results/planner_accuracy.md (default grid only; "
                             "default: print only)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cases = list(LORA_ROWS) if args.lora else grid(args.models, args.quick, args.lean)
    missing = sum(1 for c in cases if args.refresh or load_cached(c) is None)
    print(f"{len(cases)} rows, {missing} to simulate", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda c: simulate(c, args.refresh), cases))
    text, errors = table(cases, results)
    footer = summary(errors, cases, results, time.perf_counter() - start, missing)
    command = " ".join(["benchmarks/planner_accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    footer += f"\n\nCommand: `.venv/bin/python {command}` (simulations are cached in `benchmarks/results/cache/`)."
    print(text)
    print(footer)
    partial = args.quick or args.models != list(MODELS)
    if args.write and args.lora:
        write_lora_section(text + "\n\n" + footer)
    elif args.write and partial:  # a partial grid must not replace the committed table
        print(f"(a partial grid: {RESULT.relative_to(RESULTS.parent.parent)} left as it was)", file=sys.stderr)
    elif args.write:  # the LoRA section, if any, stays
        old = RESULT.read_text() if RESULT.is_file() else ""
        lora = LORA_MARKER + old.partition(LORA_MARKER)[2] if LORA_MARKER in old else ""
        if args.lean:
            main_table = old.partition(LORA_MARKER)[0].split(LEAN_SECTION)[0].rstrip()
            body = main_table + "\n\n" + LEAN_SECTION + LEAN_INTRO + text + "\n\n" + footer + "\n"
        else:  # the full grid has the lean rows too: their own section goes
            body = HEADER.format(tolerance=TOLERANCE) + text + "\n\n" + footer + "\n"
        RESULT.write_text(body + lora)
    return 0 if all(abs(e) <= TOLERANCE for e in errors) else 1


if __name__ == "__main__":
    sys.exit(main())

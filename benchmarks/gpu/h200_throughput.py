"""One H200: tokens/s and MFU of the tutorial's plain loop against ``LlamaFineTuner`` under ``strategy="advanced"``,
and measured peak memory against the planner's prediction, with activation checkpointing off and on.

Target: the Lightning side keeps >= 0.97 × the plain loop's tokens/s (the CPU overhead target of
``benchmarks/overhead.py``, now at real scale); measured peak memory is reported as a ratio to the planner's
prediction (a ratio <= 1 means the planner's feasibility check was safe; close to 1 means it is also tight).

Model: the ``llama-3.2-1b`` preset (1.24 B parameters, tied embeddings), random init, sequence 2048, bf16 compute
with fp32 master weights, SDPA attention (flash kernel: batches are unpadded rows), fused AdamW. Data: synthetic
random-token micro-batches (every token real, labels = inputs as in the tutorial), pre-built once and shared.
- Plain loop (the tutorial's, the baseline): ``model(input_ids, attention_mask, labels)`` under
  ``torch.autocast(bfloat16)`` → ``backward`` → fused ``AdamW.step`` → ``zero_grad``; AC on = Hugging Face
  ``gradient_checkpointing_enable`` (non-reentrant).
- Lightning: ``Trainer(accelerator="gpu", devices=1, strategy=AdvancedParallelStrategy(...pins),
  precision="bf16-mixed")`` — the ``advanced`` strategy with the layout pinned to one device, AC none/full and the
  micro-batch, so both sides run the same work; bare Trainer (no logger, checkpointing, progress bar, summary).
- Memory: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` from a reset before each model is built,
  against ``llama_ft.parallel`` (coefficients with ``padding_mask=False`` to match the unpadded rows; the strategy's
  own default prediction is shown too) (``ModelSpec.from_llama_config``, ``ClusterSpec.from_accelerator("h200-141gb", 1,
  1)``, ``TrainSpec(seq_len=2048, global_batch_size=micro-batch, precision="bf16-mixed")``, ``plan_parallelism``
  with the same pins). The planner models the Lightning run (FSDP2 on one device); the plain-loop row's prediction
  is ``estimate_memory`` with ``fsdp_for_every_layout=False`` (autocast weight copies, no FSDP buffers).
- MFU = tokens/s × FLOPs per token (``step_time.flops_per_token``: 6 per matmul weight + attention) / 989 TFLOP/s;
  recomputation is not counted as useful work.

Budget (fits in 8 minutes): each of the 4 runs (plain/Lightning × AC none/full) builds its model, takes
``--warmup`` (3) untimed steps then ``--steps`` (20) timed steps, about 30-45 s per run at ~0.3-0.45 s a step;
imports and CUDA start ~30 s; about 3-4 minutes in all. A global guard (``--budget-s``, 390 s counted after the
imports, so under 7.5 minutes in all) skips a run that the longest run so far says would not finish and stops a run
early (timing the steps done). A run that fails (e.g. out of memory) is
reported in its row and the others still run; the exit status is then 1.

Run from the repo root on the H200 machine. It prints the table; it writes it to ``$OUT/h200_throughput.md`` when
``OUT`` is set, else with ``--write`` to ``benchmarks/results/h200_throughput.md``, else nowhere::

    python benchmarks/gpu/h200_throughput.py --write

``--smoke`` runs the same code on the CPU with ``llama-tiny``, sequence 128 and a few steps (about a minute) to check
the script end to end; its table goes to ``$OUT`` (or, with ``--write``, a temporary directory), never to
``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from llama_ft.module import LlamaFineTuner
from llama_ft.parallel.applying.strategy import AdvancedParallelStrategy
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.coefficients import DEFAULT_COEFFICIENTS
from llama_ft.parallel.planning.memory import estimate_memory
from llama_ft.parallel.planning.planner import PlanPins, plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.step_time import flops_per_token
from llama_ft.parallel.planning.units import GiB
from llama_ft.presets import load_llama_config

START = time.monotonic()  # after the imports (20-40 s on a fresh machine), which the budget leaves room for
RESULTS = Path(__file__).resolve().parent.parent / "results"
TARGET = 0.97
AC_MODES = ("none", "full")
LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class Setup:
    """What one invocation measures."""

    model: str
    seq_len: int
    micro_batch: int
    warmup: int
    steps: int
    device: str
    accelerator: str  # the planner's device table entry (peak FLOP/s, memory)
    budget_s: float
    smoke: bool
    write: bool  # --write: the table goes to benchmarks/results (smoke: a temporary directory) when $OUT is unset


@dataclass
class Measured:
    """One run's result; ``error`` set when it failed or was skipped."""

    side: str
    ac: str
    tokens_per_s: float | None = None
    steps_timed: int = 0
    peak_allocated: float | None = None
    peak_reserved: float | None = None
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> Setup:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, llama-tiny, sequence 128, a few steps")
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per step (default 8; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; smoke 2)")
    parser.add_argument("--budget-s", type=float, default=390.0, help="time guard, seconds after the imports")
    parser.add_argument("--write", action="store_true",
                        help="write the table to benchmarks/results/h200_throughput.md (smoke: a temporary directory) "
                             "when OUT is not set (default: print only; $OUT/h200_throughput.md when OUT is set)")
    args = parser.parse_args(argv)
    if args.smoke:
        return Setup("llama-tiny", 128, args.micro_batch or 2, args.warmup or 1, args.steps or 2, "cpu", "cpu",
                     args.budget_s, True, args.write)
    return Setup("llama-3.2-1b", 2048, args.micro_batch or 8, args.warmup or 3, args.steps or 20, "cuda",
                 "h200-141gb", args.budget_s, False, args.write)


# ----------------------------------------------------------------------------------------------------- timing
class StepClock:
    """Marks the start of timed step ``warmup`` and of step ``warmup + steps`` (synchronizing the device only
    there), and stops early when the global budget runs out."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.begin: float | None = None
        self.end: float | None = None
        self.steps_timed = 0

    def _sync(self) -> None:
        if self.setup.device == "cuda":
            torch.cuda.synchronize()

    def at_step_start(self, index: int) -> bool:
        """Call at the start of step ``index``; returns False when the run should stop (timed steps done or out of
        time)."""
        first = self.setup.warmup
        if index == first:
            self._sync()
            self.begin = time.perf_counter()
            return True
        out_of_time = time.monotonic() - START > self.setup.budget_s
        if index > first and (index == first + self.setup.steps or out_of_time):
            self._sync()
            self.end = time.perf_counter()
            self.steps_timed = index - first
            return False
        return not (out_of_time and index < first)

    def tokens_per_s(self, tokens_per_step: int) -> float | None:
        if self.begin is None or self.end is None or self.steps_timed == 0:
            return None
        return tokens_per_step * self.steps_timed / (self.end - self.begin)


class ClockCallback(L.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if not self.clock.at_step_start(idx):
            trainer.should_stop = True


# ------------------------------------------------------------------------------------------------------- data
def synthetic_batches(setup: Setup, vocab_size: int) -> list[dict[str, Any]]:
    """Random full-length rows (no padding); labels = inputs, as in the tutorial."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(setup.warmup + setup.steps + 1):
        ids = torch.randint(0, vocab_size, (setup.micro_batch, setup.seq_len), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                        "num_tokens": ids.numel()})
    return batches


class SyntheticTokens(L.LightningDataModule):
    """What the ``advanced`` strategy plans from (``PlannableData``: sequence length, global batch, ``apply_plan``)."""

    def __init__(self, batches: list[dict[str, Any]], setup: Setup) -> None:
        super().__init__()
        self.batches = batches
        self.max_length = setup.seq_len
        self.global_batch_size = setup.micro_batch
        self.micro_batch_size = setup.micro_batch

    def apply_plan(self, micro_batch_size: int, data_parallel_size: int) -> None:
        """The strategy's plan; the layout is pinned to one device at this micro-batch, so it must be that one."""
        if (micro_batch_size, data_parallel_size) != (self.micro_batch_size, 1):
            raise RuntimeError(f"planned micro-batch {micro_batch_size} × {data_parallel_size} replicas; the run is "
                               f"pinned to {self.micro_batch_size} × 1")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda batch: batch)


# --------------------------------------------------------------------------------------------------- the runs
def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def read_peaks(setup: Setup, result: Measured) -> None:
    if setup.device == "cuda":
        result.peak_allocated = torch.cuda.max_memory_allocated()
        result.peak_reserved = torch.cuda.max_memory_reserved()


def run_plain(setup: Setup, ac: str, batches: list[dict[str, Any]]) -> Measured:
    """The tutorial's loop: fp32 weights, bf16 autocast, fused AdamW (on CUDA), HF gradient checkpointing for AC."""
    result = Measured("plain loop (tutorial)", ac)
    free_memory()
    config = load_llama_config(setup.model)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = LlamaForCausalLM(config).train()
    model.config.use_cache = False
    if ac == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=setup.device == "cuda")
    clock = StepClock(setup)
    for index, batch in enumerate(DataLoader(batches, batch_size=None, collate_fn=lambda b: b)):
        if not clock.at_step_start(index):
            break
        batch = {k: v.to(setup.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(setup.device, dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    read_peaks(setup, result)
    result.tokens_per_s = clock.tokens_per_s(setup.micro_batch * setup.seq_len)
    result.steps_timed = clock.steps_timed
    del model, optimizer
    return result


def strategy_for(setup: Setup, ac: str) -> AdvancedParallelStrategy:
    return AdvancedParallelStrategy(tp_size=1, dp_shard_size=1, dp_replicate_size=1, activation_checkpointing=ac,
                                    micro_batch_size=setup.micro_batch, cpu_offload=False,
                                    accelerator_name=setup.accelerator)


def run_lightning(setup: Setup, ac: str, batches: list[dict[str, Any]], root: str) -> Measured:
    """LlamaFineTuner under Trainer(strategy="advanced", precision="bf16-mixed"), bare."""
    result = Measured('Lightning, strategy="advanced"', ac)
    free_memory()
    module = LlamaFineTuner(model_config=setup.model, learning_rate=LEARNING_RATE, attn_implementation="sdpa")
    module.on_train_end = lambda: None  # no Hugging Face export of a random model
    clock = StepClock(setup)
    trainer = L.Trainer(
        accelerator="gpu" if setup.device == "cuda" else "cpu", devices=1, strategy=strategy_for(setup, ac),
        precision="bf16-mixed", max_steps=len(batches), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[ClockCallback(clock)], default_root_dir=root,
    )
    torch.manual_seed(0)
    trainer.fit(module, datamodule=SyntheticTokens(batches, setup))
    read_peaks(setup, result)
    result.tokens_per_s = clock.tokens_per_s(setup.micro_batch * setup.seq_len)
    result.steps_timed = clock.steps_timed
    del trainer, module
    return result


# ------------------------------------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class Prediction:
    """Planner predictions in bytes. ``*_tracked`` leave out the workspace/fragmentation allowance, for comparison
    with ``max_memory_allocated``; totals compare with ``max_memory_reserved``."""

    lightning_default: float  # what the strategy itself predicts (default coefficients: padded batches)
    lightning: float  # coefficients matching these batches (unpadded rows: no mask copies, grouped K/V)
    lightning_tracked: float
    plain: float
    plain_tracked: float
    tokens_per_s: float
    mfu: float


def predict(setup: Setup, ac: str) -> Prediction:
    config = load_llama_config(setup.model)
    model = ModelSpec.from_llama_config(config, name=setup.model)
    cluster = ClusterSpec.from_accelerator(setup.accelerator, 1, 1)
    train = TrainSpec(seq_len=setup.seq_len, global_batch_size=setup.micro_batch, precision="bf16-mixed")
    pins = PlanPins(tp_size=1, dp_shard_size=1, dp_replicate_size=1, activation_checkpointing=ac,
                    micro_batch_size=setup.micro_batch, cpu_offload=False)
    default = plan_parallelism(model, cluster, train, pins=pins).chosen
    unpadded = replace(DEFAULT_COEFFICIENTS, padding_mask=False)
    matched = plan_parallelism(model, cluster, train, pins=pins, coeffs=unpadded).chosen.memory
    plain = estimate_memory(model, train, Layout(1, 1, 1, ac), setup.micro_batch,
                            replace(unpadded, fsdp_for_every_layout=False))
    return Prediction(default.memory.total, matched.total, matched.total - matched.allowance, plain.total,
                      plain.total - plain.allowance, default.tokens_per_s_per_device, default.mfu)


# ------------------------------------------------------------------------------------------------------ table
def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GiB:.1f}"


def build_table(setup: Setup, results: list[Measured], predictions: dict[str, Prediction]) -> str:
    model = ModelSpec.from_llama_config(load_llama_config(setup.model), name=setup.model)
    flops = flops_per_token(model, setup.seq_len)
    peak = ClusterSpec.from_accelerator(setup.accelerator, 1, 1).peak_flops
    rows = ["| AC | side | tokens/s | ratio vs plain loop | target | MFU | planner tokens/s (MFU) | peak allocated GiB "
            "| peak reserved GiB | planner peak GiB: strategy default; unpadded (w/o allowance) | reserved / planner "
            "unpadded | allocated / planner w/o allowance |", "|---|---|" + "---:|" * 10]
    for ac in AC_MODES:
        plain = next((r for r in results if r.ac == ac and r.side.startswith("plain")), None)
        for result in (r for r in results if r.ac == ac):
            pred = predictions.get(ac)
            if result.error is not None or result.tokens_per_s is None:
                blank = " — |" * 10
                rows.append(f"| {ac} | {result.side} |{blank} {result.error or 'no steps'} |")
                continue
            is_plain = result.side.startswith("plain")
            if is_plain:
                ratio, target = "1.000 (baseline)", "—"
            elif plain is not None and plain.tokens_per_s:
                value = result.tokens_per_s / plain.tokens_per_s
                ratio, target = f"**{value:.3f}**", f"≥ {TARGET} ({'met' if value >= TARGET else 'MISSED'})"
            else:
                ratio, target = "n/a (no baseline)", "—"
            default, predicted, tracked = ((None, pred.plain, pred.plain_tracked) if is_plain else
                                           (pred.lightning_default, pred.lightning, pred.lightning_tracked)
                                           ) if pred else (None, None, None)
            reserved_ratio = (f"{result.peak_reserved / predicted:.2f}" if result.peak_reserved and predicted
                              else "n/a")
            allocated_ratio = (f"{result.peak_allocated / tracked:.2f}" if result.peak_allocated and tracked
                               else "n/a")
            planner_speed = f"{pred.tokens_per_s:,.0f} ({pred.mfu:.1%})" if pred and not is_plain else "—"
            rows.append(
                f"| {ac} | {result.side} | {result.tokens_per_s:,.0f} | {ratio} | {target} | "
                f"{result.tokens_per_s * flops / peak:.1%} | {planner_speed} | {gib(result.peak_allocated)} | "
                f"{gib(result.peak_reserved)} | {gib(default) if default else '—'}; {gib(predicted)} "
                f"({gib(tracked)}) | {reserved_ratio} | {allocated_ratio} |")
    return "\n".join(rows)


def device_name(setup: Setup) -> str:
    if setup.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GiB:.0f} GiB"
    return "CPU (smoke mode)"


def output_path(setup: Setup) -> Path | None:
    """``$OUT`` when set; else, with ``--write``, benchmarks/results (smoke: a temporary directory); else None."""
    name = "h200_throughput_smoke.md" if setup.smoke else "h200_throughput.md"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    if not setup.write:
        return None
    if setup.smoke:
        return Path(tempfile.mkdtemp(prefix="h200_smoke_")) / name
    return RESULTS / name


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    setup = parse_args(argv)
    quiet()
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on the H200 machine, or use --smoke on a CPU", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    vocab = load_llama_config(setup.model).vocab_size
    batches = synthetic_batches(setup, vocab)
    predictions: dict[str, Prediction] = {}
    results: list[Measured] = []
    failed = False
    longest_run = 0.0
    with tempfile.TemporaryDirectory(prefix="h200_bench_") as root:
        for ac in AC_MODES:
            try:
                predictions[ac] = predict(setup, ac)
            except Exception as err:  # the measurement is still worth having
                print(f"planner failed for AC {ac}: {err}", file=sys.stderr)
            for side, runner in (("plain loop (tutorial)", lambda ac=ac: run_plain(setup, ac, batches)),
                                 ('Lightning, strategy="advanced"',
                                  lambda ac=ac: run_lightning(setup, ac, batches, root))):
                elapsed = time.monotonic() - START
                if elapsed + longest_run > setup.budget_s:
                    results.append(Measured(side, ac, error=f"skipped: time guard ({elapsed:.0f} s of "
                                                             f"{setup.budget_s:.0f} s used)"))
                    continue
                run_start = time.monotonic()
                try:
                    results.append(runner())
                except Exception as err:
                    failed = True
                    traceback.print_exc()
                    results.append(Measured(side, ac, error=f"{type(err).__name__}: {str(err)[:120]}"))
                longest_run = max(longest_run, time.monotonic() - run_start)
                free_memory()
                last = results[-1]
                speed = f"{last.tokens_per_s:.0f} tokens/s" if last.tokens_per_s else last.error
                print(f"[{time.monotonic() - START:5.0f} s] AC {ac:4s} {side}: {speed} "
                      f"(peak allocated {gib(last.peak_allocated)} GiB)", flush=True)
    table = build_table(setup, results, predictions)
    header = (
        f"# {'SMOKE (CPU, not a measurement) — ' if setup.smoke else ''}Throughput on one H200\n\n"
        f"Device: {device_name(setup)}. Model `{setup.model}` (random init), sequence {setup.seq_len}, micro-batch "
        f"{setup.micro_batch} (global batch = micro-batch, no accumulation), bf16 compute with fp32 master weights, "
        f"SDPA, fused AdamW; synthetic unpadded rows. Each run: {setup.warmup} warm-up + {setup.steps} timed steps "
        f"(steps actually timed: {', '.join(str(r.steps_timed) for r in results)}). Ratio = Lightning tokens/s / "
        "plain-loop tokens/s at the same AC. MFU = tokens/s × FLOPs/token (6 per matmul weight + attention, no "
        f"recompute) / peak of `{setup.accelerator}`. Planner: `plan_parallelism` pinned to the same layout "
        "(Lightning rows; the plain row uses `estimate_memory` with `fsdp_for_every_layout=False`); \"strategy "
        "default\" is what the strategy predicts (it assumes padded batches), \"unpadded\" sets "
        "`padding_mask=False` to match these rows; the allowance is its workspace + fragmentation term. Total wall "
        f"time {time.monotonic() - START:.0f} s (budget {setup.budget_s:.0f} s).\n\n"
    )
    print(table)
    out = output_path(setup)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(header + table + "\n")
        print(f"\nwritten to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

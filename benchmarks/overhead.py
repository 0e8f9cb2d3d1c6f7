"""What Lightning costs: tokens/s of ``LlamaFineTuner`` under a ``Trainer`` against the tutorial's plain loop.

Target: Lightning tokens/s >= 0.97 × the plain loop's (at most 3% overhead).

Both sides train the same random-init ``llama-tiny`` preset (2 layers, hidden 128, vocabulary 4,096; fp32, SDPA)
from the same seed, on the same pre-collated micro-batches (the bundled sample through ``CNNDailyMailDataModule``,
``length_grouped``, 8 rows, max_length 512), served by the same ``DataLoader``, with the same torch thread count.
The plain loop is the tutorial's: ``model(input_ids, attention_mask, labels)`` → ``loss.backward()`` →
``AdamW.step()`` → ``zero_grad()``. Lightning runs twice: bare (no progress bar, logger, checkpointing, model
summary) and with the recipe's extras (``llama_ft/presets/default.yaml``: progress bar, TensorBoard logger every 5
steps, ``ModelCheckpoint``, ``LearningRateMonitor``, ``TokenThroughputMonitor``, model summary). Gradient clipping is
off everywhere, so the arithmetic is the same on every side.

Why ``llama-tiny``: on one core of this CPU one of its steps takes about 0.25 s, the order of a real GPU step of a
1-8 B model (0.3-1 s), so Lightning's fixed per-step Python cost weighs about as much as it would there; a smaller model
would exaggerate it and a larger one hide it (and take longer to measure).

Only non-padding tokens count (the batches' ``num_tokens``). The plain loop and Lightning are interleaved step by
step, so load on this shared machine hits both alike: a callback runs one plain-loop step (on a second model and
optimizer) at the start of every Lightning batch, and Lightning's clock runs from after that step to the start of
its next batch, so a Lightning step's time includes all its hooks, logging and data fetching. ``WARMUP`` steps of
each are untimed; ratio = plain-loop seconds / Lightning seconds over the same ``TIMED`` steps (= tokens/s ratio,
the tokens being the same), pooled over ``ROUNDS`` rounds. Torch runs one thread and the headline is on process CPU
time (wall time beside it). A separate, untimed run under Lightning's ``SimpleProfiler`` says which hooks cost the
recipe's extra time. Prints the table; ``--write`` also writes it to ``benchmarks/results/overhead.md``.
Run: ``.venv/bin/python benchmarks/overhead.py [--write]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from llama_ft.callbacks import TokenThroughputMonitor
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.module import LlamaFineTuner
from llama_ft.presets import load_llama_config

MODEL = "llama-tiny"
THREADS = 1
MICRO_BATCH = 8
MAX_LENGTH = 512
LEARNING_RATE = 1e-3
WARMUP = 3
TIMED = 12
ROUNDS = 2
TARGET = 0.97
SIDES = ("bare", "recipe")
SIDE_LABELS = {"bare": "Lightning, bare", "recipe": "Lightning, recipe callbacks"}
RESULT = Path(__file__).resolve().parent / "results" / "overhead.md"


class Clock:
    """Intervals of (CPU seconds of this process, wall seconds), one per step."""

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float]] = []
        self._start: tuple[float, float] | None = None

    def start(self) -> None:
        self._start = (time.process_time(), time.perf_counter())

    def stop(self) -> None:
        if self._start is not None:
            cpu, wall = self._start
            self.intervals.append((time.process_time() - cpu, time.perf_counter() - wall))
            self._start = None

    def timed(self) -> tuple[float, float]:
        """CPU and wall seconds of steps WARMUP … WARMUP + TIMED - 1."""
        steps = self.intervals[WARMUP : WARMUP + TIMED]
        if len(steps) != TIMED:
            raise RuntimeError(f"expected {TIMED} timed steps after {WARMUP} warm-up steps, got {len(steps)}")
        return sum(c for c, _ in steps), sum(w for _, w in steps)


def plain_model() -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    """The tutorial's model and optimizer."""
    torch.manual_seed(0)
    config = load_llama_config(MODEL)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).train()
    model.config.use_cache = False
    return model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)


def plain_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    """One step of the tutorial's loop."""
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


class InterleavedPlainLoop(L.Callback):
    """At each Lightning batch start: stop Lightning's clock, run one plain-loop step on the same batch (timed on its
    own clock), restart Lightning's clock. First in the callback list, so every other hook falls on Lightning's side."""

    def __init__(self) -> None:
        self.model, self.optimizer = plain_model()
        self.plain, self.lightning = Clock(), Clock()
        self.threads: set[int] = set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.lightning.stop()
        self.threads.add(torch.get_num_threads())
        self.plain.start()
        plain_step(self.model, self.optimizer, batch)
        self.plain.stop()
        self.lightning.start()


def precollated_batches(cache_dir: str) -> list[dict[str, Any]]:
    """The first WARMUP + TIMED + 1 training micro-batches of the sample, collated once."""
    dm = CNNDailyMailDataModule(dataset="sample", tokenizer="sample", max_length=MAX_LENGTH,
                                global_batch_size=MICRO_BATCH, micro_batch_size=MICRO_BATCH,
                                batching="length_grouped", cache_dir=cache_dir)
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == WARMUP + TIMED + 1:
            return batches
    raise RuntimeError("the sample has too few micro-batches for this benchmark")


def lightning_trainer(side: str, root: str, callbacks: list[L.Callback], steps: int, **extra: Any) -> L.Trainer:
    if side == "recipe":
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root, save_last=True),
                     LearningRateMonitor(logging_interval="step"), TokenThroughputMonitor()]
        options: dict[str, Any] = dict(logger=TensorBoardLogger(root, name="overhead"), log_every_n_steps=5,
                                       default_root_dir=root)
    else:
        options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=callbacks, **options, **extra)


def fine_tuner() -> LlamaFineTuner:
    module = LlamaFineTuner(model_config=MODEL, learning_rate=LEARNING_RATE)
    module.on_train_end = lambda: None  # the Hugging Face export runs after training; not a per-step cost
    return module


def run_interleaved(batches: list[dict[str, Any]], side: str, root: str) -> InterleavedPlainLoop:
    plain = InterleavedPlainLoop()
    trainer = lightning_trainer(side, root, [plain], len(batches))
    torch.manual_seed(0)  # the same initial weights as the plain loop's model
    trainer.fit(fine_tuner(), train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return plain


def hook_costs(batches: list[dict[str, Any]], root: str, top: int = 6) -> str:
    """Per-step milliseconds of the costliest callback/logger hooks of the recipe run (SimpleProfiler, untimed)."""
    profiler = SimpleProfiler()
    trainer = lightning_trainer("recipe", root, [], len(batches), profiler=profiler)
    trainer.fit(fine_tuner(), train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    steps = len(batches)
    costs: dict[str, float] = {}
    for name, durations in profiler.recorded_durations.items():
        if name.startswith("[Callback]") and "on_train_batch" in name:
            callback, hook = name.removeprefix("[Callback]").rsplit(".", 1)
            label = f"{callback.split('{')[0]}.{hook}"  # ModelCheckpoint's name carries its whole config
            costs[label] = costs.get(label, 0.0) + sum(durations) / steps
    ranked = [item for item in sorted(costs.items(), key=lambda item: -item[1])[:top] if item[1] >= 1e-5]
    return "; ".join(f"`{name}` {seconds * 1e3:.2f} ms" for name, seconds in ranked)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="also write the table to benchmarks/results/overhead.md (default: print only)")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(THREADS)
    plain_cpu = {side: 0.0 for side in SIDES}
    plain_wall = dict(plain_cpu)
    light_cpu, light_wall = dict(plain_cpu), dict(plain_cpu)
    per_round: dict[str, list[float]] = {side: [] for side in SIDES}
    threads: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="overhead_") as tmp:
        batches = precollated_batches(str(Path(tmp) / "cache"))
        tokens = sum(b["num_tokens"] for b in batches[WARMUP : WARMUP + TIMED])
        for round_index in range(ROUNDS):
            for side in SIDES if round_index % 2 == 0 else SIDES[::-1]:
                run = run_interleaved(batches, side, tmp)
                threads |= run.threads
                (p_cpu, p_wall), (l_cpu, l_wall) = run.plain.timed(), run.lightning.timed()
                plain_cpu[side] += p_cpu
                plain_wall[side] += p_wall
                light_cpu[side] += l_cpu
                light_wall[side] += l_wall
                per_round[side].append(p_cpu / l_cpu)
        hooks = hook_costs(batches, tmp)
    if threads != {THREADS}:
        raise RuntimeError(f"torch thread count changed during the runs: {sorted(threads)}")

    all_tokens = tokens * ROUNDS
    rows = ["| side | Lightning tokens/CPU-s | plain loop tokens/CPU-s (same steps) | ratio (CPU) | ratio (wall) | "
            "per-round ratios (CPU) | target | verdict |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for side in SIDES:
        ratio = plain_cpu[side] / light_cpu[side]
        rounds_text = ", ".join(f"{r:.3f}" for r in per_round[side])
        wall_ratio = plain_wall[side] / light_wall[side]
        rows.append(f"| {SIDE_LABELS[side]} | {all_tokens / light_cpu[side]:,.0f} | "
                    f"{all_tokens / plain_cpu[side]:,.0f} | **{ratio:.3f}** | {wall_ratio:.3f} | {rounds_text} | "
                    f"≥ {TARGET} | {'met' if ratio >= TARGET else 'MISSED'} |")
    table = "\n".join(rows)
    widths = [b["input_ids"].shape[1] for b in batches[WARMUP : WARMUP + TIMED]]
    per_step_gap = (light_cpu["recipe"] - light_cpu["bare"] - plain_cpu["recipe"] + plain_cpu["bare"]) / (
        ROUNDS * TIMED)
    step_s = light_cpu["bare"] / (ROUNDS * TIMED)
    ratios = [r for side in SIDES for r in per_round[side]]
    spread = max(ratios) - min(ratios)
    note = (
        "# Lightning overhead\n\n"
        f"`{MODEL}` (fp32, SDPA), torch threads {THREADS}, micro-batches of {MICRO_BATCH} rows ({WARMUP} warm-up + "
        f"{TIMED} timed steps, widths {widths}, {tokens:,} real tokens) × {ROUNDS} rounds per side. The plain loop "
        "(the tutorial's, the baseline) runs interleaved step by step with each Lightning run, on the same batches. "
        "Ratio = plain-loop time / Lightning time over the same steps = Lightning tokens/s ÷ plain-loop tokens/s; "
        "headline on process CPU time (wall beside it; this machine's cores are shared). Bare: no progress bar, "
        "logger, checkpointing or model summary. Recipe callbacks: the default progress bar, TensorBoard every 5 "
        "steps, ModelCheckpoint (it writes after the timed steps), LearningRateMonitor, TokenThroughputMonitor.\n\n"
        f"Recipe − bare: {per_step_gap * 1e3:+.1f} ms CPU per step on a {step_s * 1e3:.0f} ms step (the per-round "
        f"ratios spread over {spread:.1%}, so differences below that are noise). What the recipe adds per step "
        f"(SimpleProfiler, separate untimed run): callback hooks {hooks}; and work in background threads, which "
        "process CPU time counts: the RichProgressBar's refresh thread and TensorBoard's async event writer.\n\n"
    )
    print(note + table)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(note + table + "\n")
        print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""How long training stops for each checkpoint save: synchronous against background (``async_checkpoint``) saves.

Target: a background save stalls training at most half as long as a synchronous one.

Two CPU processes (gloo) fine-tune a random-init 63 M-parameter Llama (hidden 768, 8 layers, MLP 2048, vocabulary
8,192; fp32, AdamW) with the ``advanced`` strategy pinned to FSDP over both ranks, on the bundled sample (max_length
160, one row per micro-batch, global batch 2). ``ModelCheckpoint`` saves ``last.ckpt`` every 3 optimizer steps, 4
saves in 12 steps; each checkpoint (weights + AdamW moments + Lightning's state) is about 0.75 GB. The two runs —
``async_checkpoint=False`` then ``True`` — share the processes, data and seed. The stall of a save is the wall time
of the strategy's ``save_checkpoint`` call on rank 0: synchronous, the whole write and publish; in the background,
the copy of the shards into host memory, the plan, and waiting for the previous background save if it has not
finished. Ratio = median background stall / median synchronous stall (lower is better). The fit's wall time is
beside it: the background writer shares the 2 cores with training. Prints the table; ``--write`` also writes it to
``benchmarks/results/checkpoint_stall.md``. Run: ``.venv/bin/python benchmarks/checkpoint_stall.py [--write]``
(about 2 minutes on 2 cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT = Path(__file__).resolve().parent / "results" / "checkpoint_stall.md"
MODEL = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
STEPS, EVERY = 12, 3
TARGET = 0.5


def run(async_checkpoint: bool, root: Path) -> dict[str, Any] | None:
    """One fit; rank 0 returns the stalls of its saves and the fit's wall time."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from llama_ft import AdvancedParallelStrategy, CNNDailyMailDataModule, LlamaFineTuner

    class TimedStrategy(AdvancedParallelStrategy):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.stalls: list[float] = []

        def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            super().save_checkpoint(*args, **kwargs)
            self.stalls.append(time.perf_counter() - start)

    class NoExport(LlamaFineTuner):
        def on_train_end(self) -> None:
            pass

    torch.manual_seed(0)
    config = root / "model.json"
    if not config.exists():  # rank 1, started by Lightning later, finds rank 0's file
        config.write_text(json.dumps({"model_type": "llama", **MODEL}))
    strategy = TimedStrategy(dp_shard_size=2, tp_size=1, dp_replicate_size=1, micro_batch_size=1,
                             activation_checkpointing="none", async_checkpoint=async_checkpoint)
    data = CNNDailyMailDataModule(dataset="sample", tokenizer="sample", max_length=160, global_batch_size=2,
                                  micro_batch_size=1, cache_dir=str(root / "cache"))
    checkpoints = ModelCheckpoint(dirpath=root / f"ckpt-{async_checkpoint}", every_n_train_steps=EVERY,
                                  save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, precision="32-true",
                        logger=False, callbacks=[checkpoints], limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    start = time.perf_counter()
    trainer.fit(NoExport(model_config=str(config), learning_rate=1e-4), data)
    wall = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (root / f"ckpt-{async_checkpoint}" / "last.ckpt").rglob("*"))
    if trainer.global_rank != 0:
        return None
    return {"stalls": strategy.stalls, "wall": wall, "bytes": size}


def table(sync: dict[str, Any], background: dict[str, Any]) -> str:
    rows = ["| saves | median stall (s) | each save's stall (s) | fit wall time (s) | checkpoint (GB) |",
            "|---|---|---|---|---|"]
    for name, result in (("synchronous", sync), ("background (`async_checkpoint: true`)", background)):
        stalls = ", ".join(f"{s:.2f}" for s in result["stalls"])
        rows.append(f"| {name} | {statistics.median(result['stalls']):.2f} | {stalls} | {result['wall']:.1f} | "
                    f"{result['bytes'] / 1e9:.2f} |")
    ratio = statistics.median(background["stalls"]) / statistics.median(sync["stalls"])
    verdict = "met" if ratio <= TARGET else "MISSED"
    return "\n".join(rows) + f"\n\nratio (background / synchronous median stall): {ratio:.2f} — target ≤ {TARGET}: " \
                             f"{verdict}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"also write the table to {RESULT}")
    args = parser.parse_args(argv)
    if "MASTER_PORT" not in os.environ:  # Lightning's launcher passes it on to rank 1
        with socket.socket() as sock:
            sock.bind(("", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(os.environ.setdefault("CHECKPOINT_STALL_DIR", tempfile.mkdtemp(prefix="checkpoint_stall-")))
    sync = run(False, root)
    background = run(True, root)
    if sync is None or background is None:
        return
    shutil.rmtree(root, ignore_errors=True)
    note = ("# Training stall per checkpoint save: synchronous against background saves\n\nFrom "
            "`benchmarks/checkpoint_stall.py`: 2 CPU processes, FSDP, a 63 M-parameter Llama with AdamW, a save "
            f"every {EVERY} steps. Stall = wall time of the strategy's `save_checkpoint` on rank 0.\n\n")
    text = note + table(sync, background)
    print(text)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text + "\n")


if __name__ == "__main__":
    main()

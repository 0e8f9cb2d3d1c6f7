"""Run ``Trainer.fit`` for several pinned layouts in one set of processes and record what parity needs.

Launched by tests/parallel/test_strategy_parity.py as a script (Lightning re-launches ``sys.argv`` for the
other ranks). Rank 0 writes, per layout, the mean loss of every optimizer step over the whole global batch and
the final full weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch

import llama_ft.loss
from llama_ft import AdvancedParallelStrategy, CNNDailyMailDataModule, LlamaFineTuner
from llama_ft.checkpoint.huggingface import full_state_dict
from llama_ft.lora import LoraSettings

llama_ft.loss.LOSS_CHUNK_TOKENS = 16  # rows of up to 64 tokens: the layouts without TP run the loss in chunks

LAYOUTS = {
    "single": {},
    "ddp": {"dp_replicate_size": 2, "dp_shard_size": 1, "tp_size": 1},
    "fsdp": {"dp_replicate_size": 1, "dp_shard_size": 2, "tp_size": 1},
    "tp": {"dp_replicate_size": 1, "dp_shard_size": 1, "tp_size": 2},
    "fsdp_tp": {"dp_replicate_size": 1, "dp_shard_size": 2, "tp_size": 2},
    "hsdp": {"dp_replicate_size": 2, "dp_shard_size": 2, "tp_size": 1},
}


class StepLosses(L.Callback):
    """Micro-batch losses of this rank, grouped by optimizer step."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = batch_idx // trainer.accumulate_grad_batches
        self.losses.setdefault(step, []).append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


class NoExport(LlamaFineTuner):
    """Export is tested elsewhere; keep runs short."""

    def on_train_end(self) -> None:
        pass


def run(name: str, ac: str, args: argparse.Namespace) -> dict | None:
    dm = CNNDailyMailDataModule(dataset=args.data, tokenizer="sample", max_length=64, global_batch_size=4,
                                micro_batch_size=1, cache_dir=args.cache)
    lora = None
    if args.lora_r:  # adapters start from torch.initial_seed(): the same seed in every run
        L.seed_everything(0)
        lora = LoraSettings(r=args.lora_r, alpha=2.0 * args.lora_r, dropout=0.0, target_modules=["q_proj", "v_proj"])
    # 1e-3, not 1e-2: AdamW divides by sqrt(v), so at 1e-2 a gradient entry that is float32 rounding noise (loss
    # parallelism sums the softmax over shards in another order) moves its weight by up to 1e-2 and the comparison
    # measures that noise rather than the layout.
    module = NoExport(model_name_or_path=args.checkpoint, learning_rate=1e-3, hf_export_dir=None, lora=lora)
    if name == "single":
        strategy, devices = "auto", 1
    else:
        strategy = AdvancedParallelStrategy(activation_checkpointing=ac, micro_batch_size=1, **LAYOUTS[name])
        devices = args.devices
    recorder = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps,
                        precision="32-true", gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder], default_root_dir=args.root)
    trainer.fit(module, dm)
    local = [sum(v) / len(v) for _, v in sorted(recorder.losses.items())]
    gathered = trainer.strategy.all_gather(torch.tensor(local)).reshape(-1, len(local))
    weights = full_state_dict(module.model)
    if trainer.global_rank != 0:
        return None
    torch.save(weights, Path(args.out).with_suffix(f".{name}.{ac}.pt"))
    # Data-parallel ranks saw different micro-batches; TP ranks saw the same ones: averaging all ranks is the
    # global-batch mean in both cases because each TP group holds identical values.
    return {"losses": gathered.mean(0).tolist(), "world": trainer.world_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--checkpoint", "--data", "--cache", "--out", "--root"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank on q_proj and v_proj (0: full fine-tuning)")
    parser.add_argument("--runs", required=True, help="comma-separated layout:ac, e.g. ddp:none,fsdp:full")
    args = parser.parse_args()
    results = {}
    for spec in args.runs.split(","):
        name, ac = spec.split(":")
        result = run(name, ac, args)
        if result is not None:
            results[spec] = result
    if results:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()

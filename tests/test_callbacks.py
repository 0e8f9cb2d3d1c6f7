"""Throughput counts real tokens only; MFU comes from the module's FLOPs where the device peak is known."""

from __future__ import annotations

import csv

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from llama_ft.callbacks import TokenThroughputMonitor
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.module import LlamaFineTuner
from tests.helpers import news_rows


class _Tokens(L.Callback):
    def __init__(self) -> None:
        self.real, self.computed = 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.real += batch["num_tokens"]
        self.computed += batch["input_ids"].numel()


def test_throughput_counts_non_padding_tokens(make_hub_dir, tmp_path):
    rows = news_rows(12, article_words=20) + news_rows(12, article_words=70, prefix="l")
    data = make_hub_dir({"train": rows, "validation": news_rows(2, prefix="v"), "test": news_rows(2)})
    dm = CNNDailyMailDataModule(dataset=str(data), tokenizer="sample", max_length=128, global_batch_size=4,
                                micro_batch_size=4, batching="pad_to_max", cache_dir=str(tmp_path / "c"))
    tokens = _Tokens()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
                        logger=CSVLogger(tmp_path), callbacks=[tokens, TokenThroughputMonitor(window_size=2)])
    module = LlamaFineTuner(model_config="llama-tiny", hf_export_dir=str(tmp_path / "hf"))
    trainer.fit(module, dm)
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        logged = [float(r["train/lengths"]) for r in csv.DictReader(f) if r.get("train/lengths")]
    assert logged[-1] == tokens.real
    assert tokens.real < tokens.computed  # pad_to_max padded; none of the padding was counted
    assert module.flops_per_batch > 0


def test_training_flops_follow_palm():
    module = LlamaFineTuner(model_config="llama-tiny")
    module.configure_model()
    c = module.llama_config
    n = sum(p.numel() for p in module.model.parameters()) - c.vocab_size * c.hidden_size
    expected = (6 * n + 12 * c.num_hidden_layers * c.hidden_size * 100) * 50
    assert module.training_flops(tokens=50, seq_len=100) == pytest.approx(expected)

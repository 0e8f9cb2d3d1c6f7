"""Throughput counts real tokens only; MFU uses the plan's (or the planner's table's) device peak; the plan is
checked against the run."""

from __future__ import annotations

import csv
import logging

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

from llama_ft.callbacks import TokenThroughputMonitor
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.errors import ConfigError
from llama_ft.module import LlamaFineTuner
from llama_ft.parallel.planning.planner import plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from tests.helpers import news_rows

CPU_PEAK_FLOPS = 1e12  # the planner's nominal CPU entry


class _Tokens(L.Callback):
    """Real and computed tokens of every micro-batch, and the module's FLOPs per optimizer step."""

    def __init__(self) -> None:
        self.real, self.computed = 0, 0
        self.per_step: list[tuple[int, float]] = []  # (real tokens, FLOPs) summed per optimizer step
        self._tokens, self._flops = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.real += batch["num_tokens"]
        self.computed += batch["input_ids"].numel()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch["num_tokens"]
        self._flops += pl_module.flops_per_batch
        if len(self.per_step) < trainer.global_step:
            self.per_step.append((self._tokens, self._flops))
            self._tokens, self._flops = 0, 0.0


class _PlannedStrategy(SingleDeviceStrategy):
    """One CPU device with a plan, as the advanced strategy keeps one; records what the monitor hands back."""

    def __init__(self, plan_result) -> None:
        super().__init__(device="cpu")
        self.plan_result = plan_result
        self.recorded: dict[str, dict] = {}

    def record_measured(self, key, values):
        self.recorded[key] = values
        return None


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


def test_the_plan_is_checked_against_the_run(make_hub_dir, tmp_path, caplog):
    rows = news_rows(24, article_words=12)
    data = make_hub_dir({"train": rows, "validation": news_rows(2, prefix="v"), "test": news_rows(2)})
    dm = CNNDailyMailDataModule(dataset=str(data), tokenizer="sample", max_length=128, global_batch_size=4,
                                micro_batch_size=2, cache_dir=str(tmp_path / "c"))
    module = LlamaFineTuner(model_config="llama-tiny", hf_export_dir=str(tmp_path / "hf"))
    plan = plan_parallelism(ModelSpec.from_llama_config(module.llama_config), ClusterSpec.from_accelerator("cpu", 1, 1),
                            TrainSpec(128, 4, "32-true"))
    strategy, tokens = _PlannedStrategy(plan), _Tokens()
    monitor = TokenThroughputMonitor(window_size=2, warmup_steps=1, compare_after_steps=2)
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, max_steps=4, limit_val_batches=1, val_check_interval=4,
                        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                        log_every_n_steps=1, logger=CSVLogger(tmp_path), callbacks=[tokens, monitor])
    with caplog.at_level(logging.INFO):
        trainer.fit(module, dm)
    assert list(strategy.recorded) == ["first_steps", "fit"]
    first, whole = strategy.recorded["first_steps"], strategy.recorded["fit"]
    assert (first["optimizer_steps"], whole["optimizer_steps"], whole["warmup_steps_excluded"]) == (2, 3, 1)
    # The counts are the micro-batches after the warm-up step, per device (one device, no tensor parallelism).
    measured_tokens = sum(t for t, _ in tokens.per_step[1:])
    measured_flops = sum(f for _, f in tokens.per_step[1:])
    seconds = whole["step_time_s"] * 3
    assert whole["tokens_per_s_per_device"] == pytest.approx(measured_tokens / seconds, rel=2e-3)
    assert whole["mfu"] == pytest.approx(measured_flops / seconds / CPU_PEAK_FLOPS, rel=2e-3)
    assert 0 < whole["row_fill"] < 1 and whole["peak_memory"] == "not reported on cpu"
    assert whole["measured_over_predicted"]["step_time"] == pytest.approx(
        whole["step_time_s"] / plan.chosen.step_time_s, rel=1e-2)
    log = caplog.text
    assert "Plan vs run after 2 steps" in log and "Plan vs run over the whole fit" in log
    assert f"predicted {plan.chosen.tokens_per_s_per_device:,.0f}" in log
    # Plain names, per device, on the progress bar and in the logger.
    assert {"train/tokens_per_s", "train/mfu"} <= set(trainer.progress_bar_metrics)
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/mfu")]
    assert logged and all(0 < float(r["train/mfu"]) < 1 for r in logged)


def test_monitor_refuses_settings_that_cannot_measure():
    with pytest.raises(ConfigError, match="compare_after_steps >= 1"):
        TokenThroughputMonitor(compare_after_steps=0)

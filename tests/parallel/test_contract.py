"""The advanced strategy's Protocols: ours satisfy them, and what a user's classes lack is named in one line."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from llama_ft import AdvancedParallelStrategy, CNNDailyMailDataModule, LlamaFineTuner
from llama_ft.errors import ConfigError
from llama_ft.parallel.applying.contract import PlannableData, PlannableModule, require


def test_the_projects_module_and_data_module_satisfy_the_protocols():
    assert isinstance(LlamaFineTuner(model_config="llama-tiny"), PlannableModule)
    assert isinstance(CNNDailyMailDataModule(dataset="sample", tokenizer="sample"), PlannableData)
    assert not isinstance(BoringModel(), PlannableModule)
    assert not isinstance(L.LightningDataModule(), PlannableData)


def test_what_a_data_module_lacks_is_named_in_one_line():
    class Partial(L.LightningDataModule):
        max_length = 512

    with pytest.raises(ConfigError) as error:
        require(Partial(), PlannableData, "data module", "add them")
    message = str(error.value)
    assert "global_batch_size, apply_plan" in message and "Partial does not" in message
    assert "\n" not in message


def _attached(module: L.LightningModule) -> AdvancedParallelStrategy:
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=AdvancedParallelStrategy(), logger=False,
                        enable_checkpointing=False)
    module.trainer = trainer
    trainer.strategy.connect(module)
    return trainer.strategy


def test_the_strategy_refuses_a_module_without_the_protocol_before_planning():
    with pytest.raises(ConfigError, match=r"LightningModule to provide llama_config, initialize_weights .*BoringModel"):
        _attached(BoringModel()).make_plan()


def test_the_strategy_refuses_bare_dataloaders_before_planning():
    with pytest.raises(ConfigError, match=r"needs a data module \(PlannableData\) but got none"):
        _attached(LlamaFineTuner(model_config="llama-tiny")).make_plan()


def test_the_strategy_plans_real_tokens_per_row_and_the_given_node_network():
    strategy = AdvancedParallelStrategy(inter_node_gbps=800)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False)
    module = LlamaFineTuner(model_config="llama-tiny")
    module.trainer = trainer
    trainer.strategy.connect(module)
    trainer.datamodule = CNNDailyMailDataModule(dataset="abisee/cnn_dailymail", batching="pad_to_max")
    train = strategy.train_spec()
    assert train.pads_to_max and 800 < (train.mean_tokens_per_row or 0) < 900  # CNN/DailyMail rows at 1,024
    assert strategy.cluster_spec().node_network_bandwidth == pytest.approx(800 / 8 * 0.9 * 1e9)

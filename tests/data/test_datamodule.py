"""CNNDailyMailDataModule: loading from hub-layout folders offline, caching, and bad input."""

from __future__ import annotations

import pytest

import llama_ft.data.prompt as prompt_module
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.errors import ConfigError, DataError
from tests.conftest import news_rows


def _dm(dataset, tmp_path, **kwargs) -> CNNDailyMailDataModule:
    defaults = dict(tokenizer="sample", max_length=256, global_batch_size=4, micro_batch_size=2,
                    cache_dir=str(tmp_path / "cache"))
    return CNNDailyMailDataModule(dataset=str(dataset), **{**defaults, **kwargs})


def test_bundled_sample_loads_offline_from_its_hub_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = _dm("sample", tmp_path, max_examples_per_split=40)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 40 and len(dm.splits["validation"]) == 40
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())


def test_local_folder_and_all_three_modes_produce_batches(make_hub_dir, tmp_path):
    root = make_hub_dir({"train": news_rows(12), "validation": news_rows(5, prefix="v"), "test": news_rows(3)})
    for mode in ("pad_to_max", "length_grouped", "packed"):
        dm = _dm(root, tmp_path, batching=mode)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert len(batches) == 6
        width = batches[0]["input_ids"].shape[1]
        assert (width == 256) if mode == "pad_to_max" else (width < 256)


def test_second_setup_reads_the_tokenization_cache(make_hub_dir, tmp_path, monkeypatch):
    root = make_hub_dir({"train": news_rows(20), "validation": news_rows(4, prefix="v"), "test": news_rows(2)})
    _dm(root, tmp_path).setup("fit")
    calls = []
    original = prompt_module.tokenize_examples
    monkeypatch.setattr(
        "llama_ft.data.datamodule.tokenize_examples", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    dm = _dm(root, tmp_path)
    dm.setup("fit")
    assert calls == []
    assert len(dm.splits["train"]) == 20
    # A different max_length is a different tokenization: the cache must not be reused.
    _dm(root, tmp_path, max_length=200).setup("fit")
    assert calls


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _dm(tmp_path / "nowhere", tmp_path).setup("fit")


def test_unreachable_hub_id_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"(?s)abisee/cnn_dailymail.*offline.*data\.dataset=DIR"):
        _dm("abisee/cnn_dailymail", tmp_path).setup("fit")


def test_missing_columns(make_hub_dir, tmp_path):
    rows = [{"article": "a b c", "id": "1"}]
    root = make_hub_dir({"train": rows, "validation": rows, "test": rows})
    with pytest.raises(DataError, match=r"lacks column\(s\) \['highlights'\]"):
        _dm(root, tmp_path).setup("fit")


def test_empty_split(make_hub_dir, tmp_path):
    root = make_hub_dir({"train": news_rows(4), "validation": [], "test": news_rows(2)})
    with pytest.raises(DataError, match=r"'validation'.*is empty"):
        _dm(root, tmp_path).setup("fit")


def test_max_length_too_small_fails_before_tokenizing(make_hub_dir, tmp_path, monkeypatch):
    root = make_hub_dir({"train": news_rows(4), "validation": news_rows(2), "test": news_rows(2)})
    monkeypatch.setattr("llama_ft.data.datamodule.tokenize_examples", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(DataError, match="max_length=24 is too small"):
        _dm(root, tmp_path, max_length=24).setup("fit")


def test_global_batch_not_divisible_names_the_values_that_work(make_hub_dir, tmp_path):
    from lightning import Trainer

    root = make_hub_dir({"train": news_rows(8), "validation": news_rows(2), "test": news_rows(2)})
    dm = _dm(root, tmp_path, global_batch_size=6, micro_batch_size=4)
    dm.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match=r"not divisible.*\[1, 2, 3, 6\]"):
        dm.setup("fit")


def test_bad_mode_names_are_refused_at_construction():
    with pytest.raises(ConfigError, match="batching"):
        CNNDailyMailDataModule(batching="bucketed")
    with pytest.raises(ConfigError, match="loss_on"):
        CNNDailyMailDataModule(loss_on="prompt")

"""CNNDailyMailDataModule: loading from hub-layout folders offline, caching, and bad input."""

from __future__ import annotations

import pytest

import llama_ft.data.prompt as prompt_module
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.errors import ConfigError, DataError
from tests.helpers import news_rows


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


def _trainer(**kwargs):
    from lightning import Trainer

    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kwargs)


def test_a_plan_changes_micro_batch_and_accumulation_but_not_the_global_batch(make_hub_dir, tmp_path):
    root = make_hub_dir({"train": news_rows(8), "validation": news_rows(2), "test": news_rows(2)})
    dm = _dm(root, tmp_path, global_batch_size=4, micro_batch_size=2, val_every_n_steps=3)
    dm.trainer = trainer = _trainer()
    dm.setup("fit")
    assert trainer.accumulate_grad_batches == 2 and trainer.val_check_interval == 6  # the recipe's micro-batch
    dm.apply_plan(micro_batch_size=1, data_parallel_size=1)
    dm.setup("fit")
    assert trainer.accumulate_grad_batches == 4 and trainer.val_check_interval == 12
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 1
    dm.teardown("fit")  # the next Trainer run plans again, or runs the recipe's micro-batch
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 2


def test_a_plan_that_cannot_hold_the_global_batch_is_refused(tmp_path):
    dm = _dm("sample", tmp_path, global_batch_size=4)
    with pytest.raises(ConfigError, match=r"not divisible by micro-batch 3 × 1"):
        dm.apply_plan(micro_batch_size=3, data_parallel_size=1)


def test_the_checkpointed_position_resumes_the_training_loader_in_the_same_order(make_hub_dir, tmp_path):
    root = make_hub_dir({"train": news_rows(12), "validation": news_rows(2), "test": news_rows(2)})
    straight = _dm(root, tmp_path, micro_batch_size=1)
    straight.setup("fit")
    loader = straight.train_dataloader()
    loader.sampler.set_epoch(1)
    expected = [b["input_ids"] for b in loader][5:]

    resumed = _dm(root, tmp_path, micro_batch_size=1)
    resumed.setup("fit")
    resumed.load_state_dict({"epoch": 1, "micro_batches_done": 5, "micro_batch_size": 1, "data_parallel_size": 1})
    got = [b["input_ids"] for b in resumed.train_dataloader()]
    assert len(got) == len(expected) == 7
    assert all(a.equal(b) for a, b in zip(got, expected, strict=True))


def test_the_state_counts_the_micro_batches_training_consumed(make_hub_dir, tmp_path):
    from lightning import Callback

    from llama_ft.module import LlamaFineTuner

    class Positions(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = trainer.datamodule.state_dict()
            self.seen.append((state["epoch"], state["micro_batches_done"]))

    root = make_hub_dir({"train": news_rows(6, article_words=20), "validation": news_rows(2), "test": news_rows(2)})
    dm = _dm(root, tmp_path, max_length=96, global_batch_size=2, micro_batch_size=1, val_every_n_steps=1)
    positions = Positions()
    trainer = _trainer(max_steps=4, limit_val_batches=1, num_sanity_val_steps=1, callbacks=[positions])
    trainer.fit(LlamaFineTuner(model_config="llama-tiny", hf_export_dir=str(tmp_path / "export")), dm)
    # 6 micro-batches per epoch, 2 per step; validation in between does not count; the last one of an epoch is
    # saved as the start of the next.
    assert positions.seen == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0), (1, 1), (1, 2)]


def test_rows_without_article_or_highlights_are_dropped_with_a_count(make_hub_dir, tmp_path):
    rows = news_rows(6)
    rows[1]["article"], rows[2]["highlights"], rows[3]["highlights"] = None, "  \n ", ""
    root = make_hub_dir({"train": rows, "validation": news_rows(2, prefix="v"), "test": news_rows(2, prefix="t")})
    dm = _dm(root, tmp_path)
    with pytest.warns(UserWarning, match=r"3 of 6 train rows .* dropped: their article or highlights is missing"):
        dm.setup("fit")
    assert sorted(dm.splits["train"]["id"]) == sorted(rows[i]["id"] for i in (0, 4, 5))


def test_pad_id_and_tokenizer_hash_are_computed_once(make_hub_dir, tmp_path, monkeypatch):
    """Both cost seconds with a 128k-vocabulary tokenizer: once per data module, not per batch or per split."""
    import llama_ft.data.datamodule as datamodule_module

    calls = {"pad": 0, "hash": 0}
    choose, fingerprint = datamodule_module.choose_pad_token_id, datamodule_module.tokenizer_fingerprint

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(datamodule_module, "choose_pad_token_id", counting("pad", choose))
    monkeypatch.setattr(datamodule_module, "tokenizer_fingerprint", counting("hash", fingerprint))
    splits = {"train": news_rows(8), "validation": news_rows(4, prefix="v"), "test": news_rows(4, prefix="t")}
    dm = _dm(make_hub_dir(splits), tmp_path, micro_batch_size=1)
    dm.prepare_data()  # three splits
    dm.setup("fit")
    dm.setup("test")
    batches = list(dm.test_dataloader()) + list(dm.val_dataloader())
    pad_ids = {dm.pad_token_id for _ in batches}
    assert len(batches) == 8 and pad_ids == {choose(dm.tokenizer)}
    assert calls == {"pad": 1, "hash": 1}

"""The bundled synthetic CNN/DailyMail sample and tokenizer: loadable offline, well-formed, reproducible."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llama_ft.presets import PRESETS_DIR
from tools.make_sample import (
    SAMPLE_CONFIG_NAME,
    SAMPLE_DATASET_DIR,
    SAMPLE_DIR,
    SAMPLE_TOKENIZER_DIR,
    SPLIT_FILES,
    write_sample,
)

TINY_MODEL_PRESET = PRESETS_DIR / "llama-tiny.json"
COLUMNS = ["article", "highlights", "id"]
EXPECTED_ROWS = {"train": 3000, "validation": 300, "test": 300}
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(10)),
]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbid the Hub: env vars for fresh imports, module flags for the already-imported libraries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def dataset() -> datasets.DatasetDict:
    """The shipped splits, read straight from their parquet files."""
    config_dir = SAMPLE_DATASET_DIR / SAMPLE_CONFIG_NAME
    return datasets.DatasetDict(
        {
            split: datasets.Dataset(pq.read_table([config_dir / f"{stem}.parquet" for stem in stems]))
            for split, stems in SPLIT_FILES.items()
        }
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(SAMPLE_TOKENIZER_DIR)


def test_hub_layout_loads_with_config_name_offline(offline: None, tmp_path: Path) -> None:
    loaded = datasets.load_dataset(str(SAMPLE_DATASET_DIR), SAMPLE_CONFIG_NAME, cache_dir=str(tmp_path))

    assert set(loaded) == {"train", "validation", "test"}
    for split, rows in EXPECTED_ROWS.items():
        assert loaded[split].column_names == COLUMNS
        assert loaded[split].num_rows == rows


def test_parquet_files_load_with_the_parquet_builder(offline: None, tmp_path: Path) -> None:
    config_dir = SAMPLE_DATASET_DIR / SAMPLE_CONFIG_NAME
    data_files = {
        split: [str(config_dir / f"{stem}.parquet") for stem in stems] for split, stems in SPLIT_FILES.items()
    }

    loaded = datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(tmp_path))

    assert {split: loaded[split].num_rows for split in loaded} == EXPECTED_ROWS
    assert len(SPLIT_FILES["train"]) == 3
    assert all(pq.read_metadata(config_dir / f"{stem}.parquet").num_rows == 1000 for stem in SPLIT_FILES["train"])


def test_sample_stays_small() -> None:
    total = sum(path.stat().st_size for path in SAMPLE_DATASET_DIR.rglob("*.parquet"))
    assert total < 5_000_000


def test_ids_are_unique_sha1_hex(dataset: datasets.DatasetDict) -> None:
    ids = [row_id for split in dataset.values() for row_id in split["id"]]
    assert len(ids) == len(set(ids)) == sum(EXPECTED_ROWS.values())
    assert all(re.fullmatch(r"[0-9a-f]{40}", row_id) for row_id in ids)


def test_every_highlight_is_a_sentence_of_its_article(dataset: datasets.DatasetDict) -> None:
    for split in dataset.values():
        for article, highlights in zip(split["article"], split["highlights"], strict=True):
            lines = highlights.split("\n")
            assert 2 <= len(lines) <= 3
            for line in lines:
                assert line.endswith(" .")
                assert line[: -len(" .")] + "." in article


def test_tokenizer_matches_the_tiny_model_preset(tokenizer: PreTrainedTokenizerBase) -> None:
    preset = json.loads(TINY_MODEL_PRESET.read_text())

    assert tokenizer.vocab_size == len(tokenizer) == preset["vocab_size"] == 4096
    assert tokenizer.bos_token_id == preset["bos_token_id"] == 0
    assert tokenizer.eos_token_id == preset["eos_token_id"] == 1
    assert tokenizer.convert_ids_to_tokens(list(range(16))) == LLAMA3_SPECIAL_TOKENS


def test_tokenizer_is_llama3_like(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.pad_token is None
    ids = tokenizer('The mayor said: "Enough is enough!"')["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids[1:]) == 'The mayor said: "Enough is enough!"'
    # The prompt markers are plain text, not special tokens.
    marker_ids = tokenizer("[SUMMARIZE] text [/SUMMARIZE]", add_special_tokens=False)["input_ids"]
    assert all(token_id >= len(LLAMA3_SPECIAL_TOKENS) for token_id in marker_ids)
    assert tokenizer.decode(marker_ids) == "[SUMMARIZE] text [/SUMMARIZE]"


def test_tokenizer_round_trips_text(tokenizer: PreTrainedTokenizerBase, dataset: datasets.DatasetDict) -> None:
    texts = [*dataset["validation"]["article"], *dataset["validation"]["highlights"]]
    for text, ids in zip(texts, tokenizer(texts)["input_ids"], strict=True):
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_lengths_exercise_short_and_truncated_articles(
    tokenizer: PreTrainedTokenizerBase, dataset: datasets.DatasetDict
) -> None:
    article_lengths = [len(ids) for ids in tokenizer(list(dataset["train"]["article"]))["input_ids"]]
    highlight_lengths = [len(ids) for ids in tokenizer(list(dataset["train"]["highlights"]))["input_ids"]]

    assert 80 <= statistics.median(article_lengths) <= 350
    assert 0.02 <= sum(length > 600 for length in article_lengths) / len(article_lengths) <= 0.10
    assert 20 <= statistics.median(highlight_lengths) <= 60


def test_regeneration_is_identical_to_the_shipped_files(tmp_path: Path) -> None:
    write_sample(tmp_path)

    shipped = sorted(path.relative_to(SAMPLE_DIR) for path in SAMPLE_DIR.rglob("*") if path.is_file())
    rebuilt = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file())
    assert rebuilt == shipped
    for relative in shipped:
        if relative.suffix == ".parquet":
            assert pq.read_table(tmp_path / relative).equals(pq.read_table(SAMPLE_DIR / relative)), relative
        assert (tmp_path / relative).read_bytes() == (SAMPLE_DIR / relative).read_bytes(), relative

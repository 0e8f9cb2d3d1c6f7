"""A local data folder is cached by its files' content (paths, sizes, modification times), never by its name."""

from __future__ import annotations

import os

from llama_ft.data.sources import load_splits
from tests.helpers import news_rows

SPLITS = ("train", "validation")


def test_another_folder_with_the_same_name_is_read_afresh(make_hub_dir, tmp_path):
    cache = str(tmp_path / "cache")
    first = make_hub_dir({"train": news_rows(6), "validation": news_rows(2, prefix="a")}, name="one/cnn_dailymail")
    second = make_hub_dir({"train": news_rows(9), "validation": news_rows(3, prefix="b")}, name="two/cnn_dailymail")
    assert load_splits(str(first), SPLITS, cache)["validation"]["id"][0].startswith("a")
    loaded = load_splits(str(second), SPLITS, cache)
    assert len(loaded["train"]) == 9 and loaded["validation"]["id"][0].startswith("b")


def test_a_folder_edited_in_place_is_read_afresh(make_hub_dir, tmp_path):
    cache = str(tmp_path / "cache")
    root = make_hub_dir({"train": news_rows(6), "validation": news_rows(2, prefix="old")})
    assert load_splits(str(root), SPLITS, cache)["validation"]["id"][0].startswith("old")
    edited = tmp_path / "edited"
    make_hub_dir({"train": news_rows(6), "validation": news_rows(2, prefix="new")}, name="edited")
    target = root / "3.0.0" / "validation-00000-of-00001.parquet"
    before = target.stat()
    os.replace(edited / "3.0.0" / "validation-00000-of-00001.parquet", target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with its old modification time
    assert load_splits(str(root), SPLITS, cache)["validation"]["id"][0].startswith("new")

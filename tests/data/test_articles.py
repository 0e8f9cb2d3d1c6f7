"""A user's own articles: JSON lines or one article per line, and one clear line for each kind of mistake."""

from __future__ import annotations

import json

import pytest

from llama_ft.data import CNNDailyMailDataModule
from llama_ft.data.articles import read_articles
from llama_ft.data.prompt import DEFAULT_PROMPT, PromptFormat, tokenize_prompts
from llama_ft.errors import DataError


def test_json_lines_keep_given_ids_and_name_the_others_by_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": "a1", "article": " First story. ", "extra": 1}) + "\n\n"
                    + json.dumps({"article": "Second\nstory with a paragraph."}) + "\n")
    assert read_articles(path) == [{"id": "a1", "article": "First story."},
                                   {"id": "line-3", "article": "Second\nstory with a paragraph."}]


def test_text_is_one_article_per_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("The council met.\n\n   \nThe river rose.\n")
    assert read_articles(path) == [{"id": "line-1", "article": "The council met."},
                                   {"id": "line-4", "article": "The river rose."}]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", '{"article": "ok"}\n{"article": oops}\n', "bad.jsonl:2 is not valid JSON"),
    ("bad.jsonl", '{"id": "x", "text": "no article"}\n', "bad.jsonl:1 has no non-empty string field 'article'"),
    ("bad.jsonl", '{"id": "x", "article": "a"}\n{"id": "x", "article": "b"}\n', "repeats id 'x' (first on line 1)"),
    ("bad.jsonl", '{"id": [1], "article": "a"}\n', "'id' must be a string or an integer"),
    ("empty.txt", "\n\n", "holds no articles"),
])
def test_mistakes_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_articles(path)


def test_a_missing_file_is_refused_when_the_data_module_is_built(tmp_path):
    with pytest.raises(DataError, match="is not a file"):
        CNNDailyMailDataModule(predict_file=str(tmp_path / "nowhere.txt"))


def test_prompts_cut_the_article_to_fit_and_follow_the_format(tokenizer):
    article = " ".join(f"word{i}" for i in range(400))
    out = tokenize_prompts({"article": [article, "Short one."]}, tokenizer, max_length=64, prompt=DEFAULT_PROMPT)
    assert out["length"][0] == len(out["input_ids"][0]) == 64
    assert tokenizer.decode(out["input_ids"][1], skip_special_tokens=True) == "[SUMMARIZE] Short one. [/SUMMARIZE]\n"
    other = tokenize_prompts({"article": ["Short one."]}, tokenizer, 64, PromptFormat("[BRIEF] ", " [/BRIEF]\n"))
    assert tokenizer.decode(other["input_ids"][0], skip_special_tokens=True) == "[BRIEF] Short one. [/BRIEF]\n"

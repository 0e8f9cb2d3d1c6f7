"""The prompt template, truncation that spares the summary, padding and label masks."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from llama_ft.data.batching import IGNORE_INDEX, Collator
from llama_ft.data.prompt import choose_pad_token_id, template_tokens, tokenize_examples
from llama_ft.errors import ConfigError


def _one(tokenizer, article: str, highlights: str, max_length: int = 256) -> dict:
    out = tokenize_examples(
        {"article": [article], "highlights": [highlights]}, tokenizer, max_length=max_length, min_article_tokens=4
    )
    return {k: v[0] for k, v in out.items()} | {"id": "x", "highlights": highlights}


def test_layout_is_template_article_summary_then_real_eos(tokenizer):
    ex = _one(tokenizer, "The council met on Monday.", "Council met .")
    ids = ex["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == "[SUMMARIZE] The council met on Monday. [/SUMMARIZE]\nCouncil met ."
    assert "</s>" not in tokenizer.decode(ids)
    assert tokenizer.decode(ids[ex["prompt_length"] : -1]) == "Council met ."


def test_truncation_cuts_the_article_and_keeps_the_whole_summary(tokenizer):
    article = " ".join(f"Sentence number {i} says something about the weather." for i in range(600))
    assert len(tokenizer(article)["input_ids"]) > 5000
    summary = "The weather was discussed at great length .\nNobody agreed ."
    ex = _one(tokenizer, article, summary, max_length=128)
    assert ex["length"] == len(ex["input_ids"]) == 128
    assert tokenizer.decode(ex["input_ids"][ex["prompt_length"] : -1]) == summary
    assert tokenizer.decode(ex["input_ids"][: ex["prompt_length"]], skip_special_tokens=True).endswith(
        " [/SUMMARIZE]\n"
    )


def test_summary_that_leaves_no_room_is_marked_empty(tokenizer):
    ex = _one(tokenizer, "Short article.", " ".join(["long summary words"] * 100), max_length=64)
    assert ex["length"] == 0 and ex["input_ids"] == []


def test_pad_token_is_a_reserved_special_token_never_seen_in_text(tokenizer):
    assert tokenizer.pad_token_id is None  # like Llama 3
    pad = choose_pad_token_id(tokenizer)
    assert pad in tokenizer.all_special_ids or "pad" in tokenizer.convert_ids_to_tokens(pad)
    assert pad not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    text_ids = tokenizer("Wow! A story with exclamation marks! And numbers 0, 1, 2.")["input_ids"][1:]
    assert pad not in text_ids
    assert pad != 0 or tokenizer.convert_ids_to_tokens(0) != "!"


def test_pad_falls_back_to_eos_when_no_special_token_is_free(tokenizer):
    class Plain:
        pad_token_id = None
        eos_token_id = 7
        all_special_ids = (7,)
        added_tokens_decoder: ClassVar[dict] = {}

        def get_vocab(self):
            return {"</s>": 7, "a": 8}

    assert choose_pad_token_id(Plain()) == 7
    assert choose_pad_token_id(tokenizer) != tokenizer.eos_token_id


def test_missing_eos_is_a_config_error(tokenizer):
    class NoEos:
        eos_token_id = None
        name_or_path = "no-eos"

    with pytest.raises(ConfigError, match="no EOS"):
        template_tokens(NoEos())


@pytest.mark.parametrize("loss_on", ["summary", "all"])
def test_labels_mask_padding_always_and_prompt_for_summary_mode(tokenizer, loss_on):
    a = _one(tokenizer, "First article with several words in it.", "First summary .")
    b = _one(tokenizer, "Second.", "Second summary is here .")
    pad = choose_pad_token_id(tokenizer)
    batch = Collator(pad_token_id=pad, mode="length_grouped", max_length=256, loss_on=loss_on)(([[a], [b]], False))
    for row, ex in enumerate((a, b)):
        n = ex["length"]
        labels, mask, ids = batch["labels"][row], batch["attention_mask"][row], batch["input_ids"][row]
        assert torch.all(labels[n:] == IGNORE_INDEX) and torch.all(mask[n:] == 0) and torch.all(ids[n:] == pad)
        assert torch.all(mask[:n] == 1)
        first = ex["prompt_length"] if loss_on == "summary" else 1
        assert torch.all(labels[:first] == IGNORE_INDEX)
        assert torch.equal(labels[first:n], ids[first:n])
    assert batch["num_tokens"] == a["length"] + b["length"]

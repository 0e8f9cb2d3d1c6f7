"""`predict` on a user's own articles with an exported model: the stored prompt, {id, summary}, no overwriting."""

from __future__ import annotations

import json

import lightning as L

from llama_ft.callbacks import JsonlPredictionWriter
from llama_ft.callbacks.predictions import unused_path
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.data.prompt import PROMPT_FILENAME, PromptFormat
from llama_ft.module import LlamaFineTuner


class _Prompts(L.Callback):
    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        for ids, mask in zip(batch["prompt_ids"], batch["prompt_attention_mask"], strict=True):
            self.prompts.append(ids[mask.bool()].tolist())


def test_predict_on_an_exported_directory_uses_its_stored_prompt(tiny_checkpoint, tokenizer, tmp_path):
    stored = PromptFormat(prefix="[BRIEF] ", suffix=" [/BRIEF]\n")
    (tiny_checkpoint / PROMPT_FILENAME).write_text(json.dumps(stored.to_json(tokenizer)))
    articles = tmp_path / "mine.jsonl"
    articles.write_text('{"id": "a1", "article": "The council met."}\n{"article": "The river rose."}\n')
    output = tmp_path / "out" / "summaries.jsonl"

    def predict() -> _Prompts:
        # The default dataset (the hub's CNN/DailyMail) is never touched: the Hub is offline in the tests.
        dm = CNNDailyMailDataModule(tokenizer=str(tiny_checkpoint), max_length=64, micro_batch_size=2,
                                    predict_file=str(articles))
        module = LlamaFineTuner(model_name_or_path=str(tiny_checkpoint), max_new_tokens=3)
        prompts = _Prompts()
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            callbacks=[prompts, JsonlPredictionWriter(output_path=str(output))])
        trainer.predict(module, datamodule=dm, return_predictions=False)
        return prompts

    prompts = predict()
    decoded = sorted(tokenizer.decode(p, skip_special_tokens=True) for p in prompts.prompts)
    assert decoded == ["[BRIEF] The council met. [/BRIEF]\n", "[BRIEF] The river rose. [/BRIEF]\n"]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a1", "line-2"]
    assert all(set(r) == {"id", "summary"} and isinstance(r["summary"], str) for r in rows)

    first = output.read_text()
    predict()  # a second run keeps the first file and takes the next free name
    assert output.read_text() == first
    assert (output.parent / "summaries-1.jsonl").read_text().count("\n") == 2
    written = sorted(p.name for p in output.parent.iterdir() if not p.name.startswith("."))  # markers are hidden
    assert written == ["summaries-1.jsonl", "summaries.jsonl"]


def test_unused_path_never_returns_an_existing_file(tmp_path):
    target = tmp_path / "predictions.jsonl"
    assert unused_path(target) == target
    target.write_text("mine")
    (tmp_path / "predictions-1.jsonl").write_text("mine too")
    assert unused_path(target) == tmp_path / "predictions-2.jsonl"

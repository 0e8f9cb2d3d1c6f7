"""LlamaFineTuner against the tutorial's plain loop, its Hugging Face export, and refusals of bad models."""

from __future__ import annotations

import itertools
import json

import lightning as L
import pytest
import torch
from transformers import LlamaForCausalLM

from llama_ft.data import CNNDailyMailDataModule
from llama_ft.errors import ConfigError
from llama_ft.module import LlamaFineTuner
from tests.helpers import news_rows


class _FirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}


def _fit_one_step(checkpoint, data_dir, tmp_path) -> tuple[LlamaFineTuner, dict, float]:
    dm = CNNDailyMailDataModule(dataset=str(data_dir), tokenizer="sample", max_length=96, global_batch_size=2,
                                micro_batch_size=2, batching="pad_to_max", loss_on="all",
                                cache_dir=str(tmp_path / "cache"))
    module = LlamaFineTuner(model_name_or_path=str(checkpoint), learning_rate=1e-3,
                            hf_export_dir=str(tmp_path / "export"))
    grab = _FirstBatch()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[grab], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, dm)
    return module, grab.batch, float(trainer.callback_metrics["train_loss"])


def test_one_step_matches_the_tutorial_loop(tiny_checkpoint, make_hub_dir, tmp_path):
    data = make_hub_dir({"train": news_rows(8), "validation": news_rows(2, prefix="v"), "test": news_rows(2)})
    module, batch, lightning_loss = _fit_one_step(tiny_checkpoint, data, tmp_path)

    # The tutorial: model(input_ids, attention_mask, labels) -> loss.backward() -> AdamW step.
    model = LlamaForCausalLM.from_pretrained(tiny_checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    loss.backward()
    optimizer.step()

    assert lightning_loss == pytest.approx(loss.item(), abs=1e-6)
    trained = dict(module.model.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(trained[name].detach(), param.detach(), atol=1e-6, rtol=0)


def test_fit_leaves_a_hugging_face_directory_with_identical_logits(tiny_checkpoint, make_hub_dir, tmp_path):
    data = make_hub_dir({"train": news_rows(8), "validation": news_rows(2, prefix="v"), "test": news_rows(2)})
    module, batch, _ = _fit_one_step(tiny_checkpoint, data, tmp_path)
    export = tmp_path / "export"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert json.loads((export / "tokenizer_config.json").read_text())
    reloaded = LlamaForCausalLM.from_pretrained(export).eval()
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)
    original = LlamaForCausalLM.from_pretrained(tiny_checkpoint)
    assert not torch.equal(original.lm_head.weight, reloaded.lm_head.weight)  # it did train


def test_non_llama_model_config_is_refused(tmp_path):
    config = tmp_path / "gpt2.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConfigError, match=r"'gpt2' model.*Llama"):
        LlamaFineTuner(model_config=str(config))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="llama-3-8b"):
        LlamaFineTuner(model_config="llama-9-huge")


def test_tokenizer_larger_than_the_embedding_is_refused_before_tokenizing(make_hub_dir, tmp_path, monkeypatch):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"model_type": "llama", "vocab_size": 1000, "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}))
    data = make_hub_dir({"train": news_rows(4), "validation": news_rows(2), "test": news_rows(2)})
    monkeypatch.setattr("llama_ft.data.datamodule.tokenize_examples", lambda *a, **k: pytest.fail("tokenized"))
    dm = CNNDailyMailDataModule(dataset=str(data), tokenizer="sample", cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="4096 tokens but the model's embedding has 1000 rows"):
        trainer.fit(LlamaFineTuner(model_config=str(small)), dm)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    module = LlamaFineTuner(model_config="llama-tiny", lr_schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)

    class _Trainer:
        estimated_stepping_batches = 20

    module._trainer = _Trainer()
    factors = [module._lr_factor(s) for s in range(21)]
    assert factors[0] == pytest.approx(0.25) and factors[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[20] == pytest.approx(0.1)

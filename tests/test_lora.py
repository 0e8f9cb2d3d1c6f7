"""LoRA end to end on one process: the embedded default with ``--model.lora.r 8``; on a pretrained base under the
``advanced`` strategy, a checkpoint of adapters only (plus the base's name), exact resume, and both exports (merged
Hugging Face model, peft adapter directory) giving the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from llama_ft.checkpoint.reader import read_checkpoint
from llama_ft.cli import main
from llama_ft.errors import ConfigError
from llama_ft.lora import LoraSettings, is_adapter_key
from tests.helpers import tiny_llama_config

RUN_TIMEOUT_S = 300


def _fit(root: Path, *extra: str) -> None:
    assert main(["fit", f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
          "--trainer.logger.init_args.name=tb", "--trainer.logger.init_args.version=run",
          f"--data.cache_dir={root.parent / 'cache'}", "--data.max_examples_per_split=16", "--data.max_length=128",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          f"--model.hf_export_dir={root / 'trained_hf'}", *extra]) == 0


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_lora_settings_refuse_bad_values():
    for bad, message in (({"r": 0}, "model.lora.r=0"), ({"target_modules": ["qkv"]}, "unknown: ['qkv']"),
                         ({"dropout": 1.0}, "model.lora.dropout")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            LoraSettings(**bad)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_embedded_default_runs_with_lora_rank_8(tmp_path):
    _fit(tmp_path / "run", "--model.lora.r", "8", "--trainer.fast_dev_run=2")
    merged = load_file(tmp_path / "run" / "trained_hf" / "model.safetensors")
    assert merged and not any("lora" in key or "base_layer" in key for key in merged)  # adapters merged in
    assert torch.isfinite(_logits(LlamaForCausalLM.from_pretrained(tmp_path / "run" / "trained_hf"))).all()


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tokenizer):
    """A pretrained tiny base; LoRA under the advanced strategy for 4 steps straight, and for 2 then resumed to 4."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = root / "base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    args = ["--model.model_config=null", f"--model.model_name_or_path={base}", "--data.tokenizer=sample",
            "--model.lora.r=4", "--model.lora.dropout=0", "--model.lora.target_modules=[q_proj,v_proj]",
            "--model.lr_schedule=constant", "--model.learning_rate=0.01", "--data.global_batch_size=4",
            "--data.micro_batch_size=2", "--data.val_every_n_steps=2", "--trainer.strategy=advanced"]
    _fit(root / "straight", *args, "--trainer.max_steps=4")
    _fit(root / "resumed", *args, "--trainer.max_steps=2")
    _fit(root / "resumed", *args, "--trainer.max_steps=4",
         f"--ckpt_path={root / 'resumed' / 'tb' / 'run' / 'checkpoints' / 'last.ckpt'}")
    return root


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_lora_checkpoint_holds_adapters_and_resumes_exactly(lora_runs):
    last = lora_runs / "straight" / "tb" / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a distributed checkpoint: resuming it took the partial load (base from its own name)
    checkpoint = read_checkpoint(last)
    assert checkpoint.tensors and all(is_adapter_key(key) for key in checkpoint.tensors)
    assert checkpoint.metadata["lora_base"] == str(lora_runs / "base")
    assert checkpoint.hparam("lora")["r"] == 4
    straight = load_file(lora_runs / "straight" / "trained_hf" / "model.safetensors")
    resumed = load_file(lora_runs / "resumed" / "trained_hf" / "model.safetensors")
    base = load_file(lora_runs / "base" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) <= 1e-6
    moved = [k for k in straight if not torch.equal(straight[k], base[k])]
    assert moved and all("q_proj" in k or "v_proj" in k for k in moved)  # only adapted projections changed


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_lora_export_merged_and_adapter_only_give_the_trained_logits(lora_runs):
    last = lora_runs / "straight" / "tb" / "run" / "checkpoints" / "last.ckpt"
    merged_dir, adapter_dir = lora_runs / "merged", lora_runs / "adapter"
    assert main(["export", "--ckpt", str(last), "--out", str(merged_dir)]) == 0
    assert main(["export", "--ckpt", str(last), "--out", str(adapter_dir), "--adapter_only", "true"]) == 0
    trained = _logits(LlamaForCausalLM.from_pretrained(lora_runs / "straight" / "trained_hf"))
    assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(merged_dir)), trained)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora_runs / "base"), adapter_dir)
    torch.testing.assert_close(_logits(peft_model), trained, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(LlamaForCausalLM.from_pretrained(lora_runs / "base")), trained, atol=1e-3)

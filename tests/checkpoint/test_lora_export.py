"""A LoRA run's merged export, streamed a tensor at a time, equals peft's ``merge_and_unload`` tensor for tensor.

The merge itself (every projection adapted, alpha / r not 1, fp32 and bf16 bases and adapters); ``export`` of a
checkpoint holding a random-init base and of one holding only adapters (the base read from its Hugging Face
directory, one tensor alive at a time), with peft's whole-model paths made to fail; and the fit-end export of an
FSDP-sharded model (2 gloo ranks, activation checkpointing, tied embeddings).

Run as a script, this file is one rank of that launch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import get_peft_model
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.checkpoint.huggingface import hf_state_dict
from llama_ft.checkpoint.lora_export import save_merged_hf_directory
from llama_ft.checkpoint.safetensors_stream import INDEX_FILE
from llama_ft.errors import ConfigError
from llama_ft.lora import LLAMA_PROJECTIONS, LoraSettings, inject_lora, is_adapter_key, merged_weights, to_hf_names
from llama_ft.outputs import MARKER

SETTINGS = LoraSettings(r=3, alpha=7.0, dropout=0.0, target_modules=list(LLAMA_PROJECTIONS))
LAUNCH_TIMEOUT_S = 240


def config(tied: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def trained_lora(cfg: LlamaConfig, base_dtype: torch.dtype = torch.float32,
                 adapter_dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A Llama with adapters on every projection, ``B`` non-zero (as after training)."""
    torch.manual_seed(11)
    model = LlamaForCausalLM(cfg).to(base_dtype)
    inject_lora(model, SETTINGS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key(name):
                param.data = (torch.randn(param.shape) * 0.05).to(adapter_dtype)
    return model


def peft_merged(cfg: LlamaConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's own answer: a PeftModel of the same weights, ``merge_and_unload``, Hugging Face names."""
    peft_model = get_peft_model(LlamaForCausalLM(cfg), SETTINGS.peft_config())
    copy = {name: value.clone() for name, value in state.items()}  # merge_and_unload adds in place
    peft_model.base_model.model.load_state_dict(copy, assign=True)
    peft_model.base_model.model.tie_weights()
    return hf_state_dict(peft_model.merge_and_unload())


def read_exported(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert float((got[name].float() - value.float()).abs().max()) <= 1e-6, name


@pytest.mark.parametrize("base_dtype, adapter_dtype", [(torch.float32, torch.float32),
                                                       (torch.bfloat16, torch.float32),
                                                       (torch.bfloat16, torch.bfloat16)])
def test_streaming_merge_equals_peft_merge_and_unload(base_dtype, adapter_dtype):
    cfg = config()
    model = trained_lora(cfg, base_dtype, adapter_dtype)
    base, adapters = to_hf_names(model.state_dict())
    expected = peft_merged(cfg, model.state_dict())
    merged = dict(merged_weights(iter(base.items()), adapters, cfg, SETTINGS))
    assert list(merged) == list(expected)  # export order kept
    assert_same_tensors(merged, expected)
    changed = {name.split(".")[-2] for name in merged if not torch.equal(merged[name], base[name])}
    assert changed == set(LLAMA_PROJECTIONS)  # every adapted projection moved, nothing else


def test_adapters_that_do_not_fit_the_settings_are_refused_before_any_base_tensor():
    cfg = config()
    adapters = to_hf_names(trained_lora(cfg).state_dict())[1]
    narrower = dataclasses.replace(SETTINGS, r=2)

    def no_base():
        raise AssertionError("a base tensor was read")
        yield

    with pytest.raises(ConfigError, match=r"adapters do not fit model\.lora=.*other shapes \['model\."):
        merged_weights(no_base(), adapters, cfg, narrower)


def _lora_checkpoint(root: Path, base_in_checkpoint: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Lightning checkpoint as fit saves it: a random-init (tied, fp32) base saved whole, or only the adapters of
    a pretrained (untied, bf16) base named by ``model_name_or_path``. Returns it and peft's merged tensors."""
    cfg = config(tied=base_in_checkpoint)
    model = trained_lora(cfg, torch.float32 if base_in_checkpoint else torch.bfloat16)
    state = model.state_dict()
    hparams = {"lora": SETTINGS.as_dict(), "model_config": None, "model_name_or_path": None}
    if base_in_checkpoint:
        cfg.to_json_file(root / "tiny.json")
        hparams["model_config"] = str(root / "tiny.json")
        saved = state
    else:
        base, _ = to_hf_names(state)
        plain = LlamaForCausalLM(cfg).to(torch.bfloat16)
        plain.load_state_dict(base)
        plain.save_pretrained(root / "base", max_shard_size="100KB")  # several files and an index
        hparams["model_name_or_path"] = str(root / "base")
        saved = {name: value for name, value in state.items() if is_adapter_key(name)}
    ckpt = root / "last.ckpt"
    torch.save({"state_dict": {f"model.{name}": value for name, value in saved.items()},
                "hyper_parameters": hparams, "global_step": 4}, ckpt)
    return ckpt, peft_merged(cfg, state)


@pytest.mark.parametrize("base_in_checkpoint", [True, False], ids=["base-in-checkpoint", "base-from-hf-directory"])
def test_export_merges_tensor_by_tensor_without_building_the_model(tmp_path, monkeypatch, base_in_checkpoint):
    import llama_ft.cli.export as export_module  # here: the launched ranks need no CLI
    from llama_ft.cli import main

    ckpt, expected = _lora_checkpoint(tmp_path, base_in_checkpoint)

    def whole_model(*args, **kwargs):
        raise AssertionError("the merged export built the whole model")

    for owner, name in ((LoraModel, "merge_and_unload"), (export_module, "build_peft_model"),
                        (export_module, "read_safetensors")):
        monkeypatch.setattr(owner, name, whole_model)
    alive: set[str] = set()
    peak = [0]
    read_hf_directory = export_module.read_hf_directory

    def counting_reader(directory):  # how many base tensors read from the directory are alive at once
        checkpoint = read_hf_directory(directory)

        def load(name: str) -> torch.Tensor:
            tensor = checkpoint.load(name)
            alive.add(name)
            weakref.finalize(tensor, alive.discard, name)
            peak[0] = max(peak[0], len(alive))
            return tensor

        return dataclasses.replace(checkpoint, load=load)

    monkeypatch.setattr(export_module, "read_hf_directory", counting_reader)
    out = tmp_path / "merged"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--max_shard_size", "100KB"]) == 0
    assert (out / INDEX_FILE).is_file() and (out / MARKER).is_file() and (out / "README.md").is_file()
    assert_same_tensors(read_exported(out), expected)
    assert peak[0] == (0 if base_in_checkpoint else 2)  # the tensor being written and the next one read


def run_rank(root: Path) -> None:
    """One rank: the same trained model on every rank, FSDP-sharded over 2 ranks with activation checkpointing,
    then the fit-end merged export; rank 0 also saves the unsharded weights for the parent's reference."""
    from llama_ft.parallel.applying.apply import apply_layout, build_device_mesh
    from llama_ft.parallel.layout import Layout

    model = trained_lora(config(tied=True))
    if dist.get_rank() == 0:
        torch.save(model.state_dict(), root / "trained.pt")
    layout = Layout(dp_shard=2, activation_checkpointing="full")
    apply_layout(model, layout, build_device_mesh(layout, "cpu"), param_dtype=None, reduce_dtype=None)
    written = save_merged_hf_directory(model, SETTINGS, None, root / "merged", max_shard_size="100KB")
    assert (written is not None) == (dist.get_rank() == 0)
    dist.barrier()  # leave together: a rank tearing down gloo while its peer still writes can abort at exit


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fit_end_export_of_a_sharded_lora_model_equals_peft_merge(tmp_path):
    from tests.helpers import wait_or_kill

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "launch.log").open("w") as log:
        procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(store.port), str(tmp_path)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT) for rank in range(2)]
        wait_or_kill(procs, LAUNCH_TIMEOUT_S, log)
    del store
    output = (tmp_path / "launch.log").read_text()
    assert all(proc.returncode == 0 for proc in procs), output[-4000:]
    cfg = config(tied=True)
    expected = peft_merged(cfg, torch.load(tmp_path / "trained.pt", weights_only=True))
    assert (tmp_path / "merged" / INDEX_FILE).is_file()
    assert_same_tensors(read_exported(tmp_path / "merged"), expected)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for arg, kind in (("rank", int), ("port", int), ("root", Path)):
        parser.add_argument(arg, type=kind)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tcp_store = dist.TCPStore("127.0.0.1", args.port, 2, is_master=False)
    dist.init_process_group("gloo", store=tcp_store, rank=args.rank, world_size=2)
    try:
        run_rank(args.root)
    finally:
        dist.destroy_process_group()

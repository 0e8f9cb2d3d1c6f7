"""Export: every checkpoint form `fit` writes → a Hugging Face directory whose logits equal the trained model's.

Each run trains 4 optimizer steps and validates (so checkpoints) at steps 2 and 4: ``last.ckpt`` holds the final
weights, the same weights ``fit`` itself writes to ``hf_export_dir`` at the end. Both directories are loaded with
``LlamaForCausalLM.from_pretrained`` and must give bit-identical logits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_ft.checkpoint.model_card import DIRECTORY_PLACEHOLDER
from llama_ft.cli import main
from llama_ft.data.prompt import DEFAULT_PROMPT, PROMPT_FILENAME, read_prompt_format, tokenize_prompts
from llama_ft.data.sources import load_tokenizer
from llama_ft.presets import PRESETS_DIR
from tests.helpers import REPO_ROOT, free_port

RUN_TIMEOUT_S = 300
ADVANCED = "--trainer.strategy=llama_ft.parallel.AdvancedParallelStrategy"


def _fit_args(root: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.name=tb", "--trainer.logger.init_args.version=run",
        f"--data.cache_dir={root / 'cache'}", "--data.max_examples_per_split=16", "--data.max_length=128",
        "--data.global_batch_size=4", "--data.micro_batch_size=2", "--data.val_every_n_steps=2",
        "--trainer.max_steps=4", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--model.hf_export_dir={root / 'trained_hf'}", *extra,
    ]


def _fit_on_two_processes(root: Path, *extra: str) -> None:
    """Lightning's own launcher, watchdog on: ranks finishing at different times must not look like a death."""
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = _fit_args(root, "--trainer.devices=2", ADVANCED, "--trainer.callbacks+=llama_ft.callbacks.PeerWatchdog",
                     *extra)
    proc = subprocess.run([sys.executable, "main.py", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "llama_ft.callbacks.watchdog" not in proc.stderr, proc.stderr[-4000:]


def _chosen_layout(root: Path) -> dict:
    return json.loads((root / "tb" / "run" / "plan.json").read_text())["chosen"]


def _logits(directory: Path) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_round_trip(root: Path, expect_sharded: bool) -> Path:
    last = root / "tb" / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() == expect_sharded
    out = root / "exported"
    assert main(["export", "--ckpt", str(last), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    for directory in (out, root / "trained_hf"):  # llama-ft export and the export at the end of fit
        card = (directory / "README.md").read_text()
        assert "| training | 4 optimizer steps |" in card and "| final validation loss | " in card, card
        assert read_prompt_format(directory) == DEFAULT_PROMPT
    assert torch.equal(_logits(out), _logits(root / "trained_hf"))
    assert not list(last.parent.glob(".*.partial")), "a save left its partial behind"
    return out


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_single_device_checkpoint_round_trip(tmp_path):
    main(_fit_args(tmp_path, "--trainer.plugins=llama_ft.checkpoint.AtomicCheckpointIO"))
    _assert_round_trip(tmp_path, expect_sharded=False)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_fsdp_checkpoint_round_trip(tmp_path):
    """FSDP over 2 ranks with full activation checkpointing (wrapped layer names) → one HF directory."""
    _fit_on_two_processes(tmp_path, "--trainer.strategy.dp_shard_size=2", "--trainer.strategy.tp_size=1",
                          "--trainer.strategy.dp_replicate_size=1", "--trainer.strategy.activation_checkpointing=full")
    chosen = _chosen_layout(tmp_path)
    assert (chosen["dp_shard"], chosen["tp"], chosen["activation_checkpointing"]) == (2, 1, "full")
    _assert_round_trip(tmp_path, expect_sharded=True)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_tensor_parallel_checkpoint_round_trip_with_tied_embeddings(tmp_path):
    config = json.loads((PRESETS_DIR / "llama-tiny.json").read_text()) | {"tie_word_embeddings": True}
    config_path = tmp_path / "llama-tiny-tied.json"
    config_path.write_text(json.dumps(config))
    _fit_on_two_processes(tmp_path, "--trainer.strategy.tp_size=2", "--trainer.strategy.dp_shard_size=1",
                          "--trainer.strategy.dp_replicate_size=1", f"--model.model_config={config_path}")
    assert (_chosen_layout(tmp_path)["tp"], _chosen_layout(tmp_path)["dp_shard"]) == (2, 1)
    out = _assert_round_trip(tmp_path, expect_sharded=True)
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# -------------------------------------------------------------------------------------------------- errors


def _made_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _lightning_file(path: Path, **checkpoint) -> Path:
    torch.save(checkpoint, path)
    return path


def test_export_errors_say_what_is_wrong(tmp_path, tiny_checkpoint, capsys):
    cases = {
        "does not exist": tmp_path / "missing.ckpt",
        "not a Lightning checkpoint": _lightning_file(tmp_path / "plain.ckpt", weights=torch.zeros(2)),
        "already a Hugging Face directory": tiny_checkpoint,
        "not a distributed Lightning checkpoint": _made_dir(tmp_path / "some_dir"),
        "not written by llama_ft": _lightning_file(tmp_path / "other.ckpt", state_dict={"net.weight": torch.zeros(2)}),
        "Pass --config RECIPE.yaml": _lightning_file(
            tmp_path / "nohp.ckpt", state_dict={"model.lm_head.weight": torch.zeros(2)}
        ),
    }
    for message, ckpt in cases.items():
        assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err, message


def test_export_refuses_to_overwrite_a_directory_that_is_no_export(tmp_path, capsys):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["export", "--ckpt", str(tmp_path / "any.ckpt"), "--out", str(keep)]) == 2
    assert "already holds files that llama_ft did not write" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "mine"


def test_recipe_supplies_the_model_when_the_checkpoint_has_no_hyper_parameters(tmp_path, capsys):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaForCausalLM.config_class.from_json_file(PRESETS_DIR / "llama-tiny.json"))
    ckpt = _lightning_file(tmp_path / "bare.ckpt", state_dict={f"model.{k}": v for k, v in model.state_dict().items()})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  model_config: llama-tiny\ndata:\n  tokenizer: sample\n")
    out = tmp_path / "out"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--config", str(recipe)]) == 0
    assert "warning:" not in capsys.readouterr().err and (out / "tokenizer.json").is_file()
    exported = LlamaForCausalLM.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key


def test_export_explains_itself_and_its_card_code_generates_a_summary(tmp_path):
    """Model card with the run's facts, generation settings with the tokenizer's ids, the prompt; the card's
    transformers code runs as written and prompts exactly as llama_ft trained."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaForCausalLM.config_class.from_json_file(PRESETS_DIR / "llama-tiny.json"))
    checkpoint_path = _lightning_file(
        tmp_path / "run.ckpt",
        state_dict={f"model.{k}": v for k, v in model.state_dict().items()},
        hyper_parameters={"model_config": "llama-tiny", "learning_rate": 0.003, "max_new_tokens": 5},
        datamodule_hyper_parameters={"dataset": "sample", "tokenizer": "sample", "max_length": 128},
        global_step=7,
        callbacks={"ModelCheckpoint{'monitor': 'val_loss'}": {"monitor": "val_loss",
                                                            "current_score": torch.tensor(2.5)}},
    )
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(checkpoint_path), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    for fact in ("random initialization, architecture `llama-tiny`", "bundled synthetic", "| training | 7 optimizer",
                 "| final validation loss | 2.5000", "ROUGE | not measured", "`model.learning_rate`: 0.003",
                 "`data.max_length`: 128", "{bos}[SUMMARIZE] {article} [/SUMMARIZE]\\n", PROMPT_FILENAME):
        assert fact in card, fact
    tokenizer = load_tokenizer("sample")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["max_new_tokens"] == 5
    assert generation["pad_token_id"] not in (None, 0) and generation["do_sample"] is False
    assert read_prompt_format(out) == DEFAULT_PROMPT

    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    namespace: dict = {}
    exec(code.replace(DIRECTORY_PLACEHOLDER, str(out)), namespace)
    prompt_ids = namespace["inputs"]["input_ids"][0].tolist()
    assert prompt_ids == tokenize_prompts({"article": [namespace["article"]]}, tokenizer, 10_000,
                                          DEFAULT_PROMPT)["input_ids"][0]
    generated = namespace["output"].shape[1] - len(prompt_ids)
    assert 1 <= generated <= 5 and isinstance(namespace["summary"], str)
def test_export_cuts_large_models_into_indexed_shards(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaForCausalLM.config_class.from_json_file(PRESETS_DIR / "llama-tiny.json"))
    ckpt = _lightning_file(tmp_path / "bare.ckpt", state_dict={f"model.{k}": v for k, v in model.state_dict().items()},
                           hyper_parameters={"model_config": "llama-tiny"})
    out = tmp_path / "out"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--max_shard_size", "1MB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    exported = LlamaForCausalLM.from_pretrained(out)
    assert all(torch.equal(exported.state_dict()[key], value) for key, value in model.state_dict().items())

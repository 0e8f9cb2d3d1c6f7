"""Hostile and careless input through every command: checkpoints that would run code, outputs that would destroy the
user's files, checkpoints that do not fit the run, damaged or mismatched base models. Each case exits 2 with one
``error:`` line (or ends in the safe outcome it names), never runs the payload, and leaves every file of the user's
folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from jsonargparse import Namespace
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.checkpoint.safe_pickle import check_dcp_metadata
from llama_ft.cli import main
from llama_ft.cli.resume import find_last
from llama_ft.data import CNNDailyMailDataModule
from llama_ft.errors import ConfigError
from llama_ft.module import LlamaFineTuner
from llama_ft.outputs import MARKER
from llama_ft.presets import DEFAULT_RECIPE, PRESETS_DIR


class _Payload:
    """Unpickled by plain ``pickle``, this creates ``marker``: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _default_hparams() -> tuple[dict, dict]:
    """The hyper-parameters a run of the embedded default saves (what its checkpoints hold)."""
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    return dict(LlamaFineTuner(**recipe["model"]).hparams), dict(CNNDailyMailDataModule(**recipe["data"]).hparams)


def _lightning_file(path: Path, model: dict, data: dict, state: dict | None = None) -> Path:
    torch.save({"state_dict": state or {"model.w": torch.zeros(2)}, "hyper_parameters": model,
                "datamodule_hyper_parameters": data, "epoch": 0, "global_step": 1}, path)
    return path


def _dcp_dir(path: Path, model: dict, data: dict) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"state_dict": {"model.w": torch.zeros(2)}}, checkpoint_id=path)
    torch.save({"hyper_parameters": model, "datamodule_hyper_parameters": data, "epoch": 0, "global_step": 1},
               path / "meta.pt")
    return path


def _damaged_base_models(root: Path, model: LlamaForCausalLM, marker: Path) -> Namespace:
    """Copies of a base model as downloads and hands leave them: cut short, a tensor lost or reshaped, an index
    naming a file that is not there or one outside the folder, a header claiming exabytes, a pickle instead."""
    d = Namespace()
    for name in ("truncated", "missing", "reshaped", "huge_header", "outside_index"):
        setattr(d, name, root / name)
        model.save_pretrained(root / name)
    weights = d.truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    state = load_file(d.missing / "model.safetensors")
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, d.missing / "model.safetensors", metadata={"format": "pt"})
    state = load_file(d.reshaped / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(state, d.reshaped / "model.safetensors", metadata={"format": "pt"})
    weights = d.huge_header / "model.safetensors"
    weights.write_bytes((2**62).to_bytes(8, "little") + weights.read_bytes()[8:])
    names = load_file(d.outside_index / "model.safetensors")
    (d.outside_index / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, "../base_model/model.safetensors")}))
    d.incomplete = root / "incomplete"
    model.save_pretrained(d.incomplete, max_shard_size="200KB")
    sorted(d.incomplete.glob("model-*.safetensors"))[-1].unlink()
    d.pickle_only = root / "pickle_only"
    d.pickle_only.mkdir()
    (d.pickle_only / "config.json").write_text((d.missing / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, d.pickle_only / "pytorch_model.bin")
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Namespace:
    """A user's folder (base model, data, notes, good and hostile checkpoints) and a scratch folder for runs."""
    user, runs = tmp_path_factory.mktemp("user"), tmp_path_factory.mktemp("runs")
    w = Namespace(user=user, runs=runs, marker=user / "PWNED")
    model_hp, data_hp = _default_hparams()
    w.evil_file = user / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(w.marker)}, w.evil_file)
    w.good_dcp = _dcp_dir(user / "sharded.ckpt", model_hp, data_hp)
    w.evil_dcp = _dcp_dir(user / "evil_sharded.ckpt", model_hp, data_hp)
    (w.evil_dcp / ".metadata").write_bytes(pickle.dumps(_Payload(w.marker)))
    w.evil_meta_dcp = _dcp_dir(user / "evil_meta.ckpt", model_hp, data_hp)
    torch.save({"hyper_parameters": _Payload(w.marker)}, w.evil_meta_dcp / "meta.pt")
    w.truncated_dcp = _dcp_dir(user / "truncated_sharded.ckpt", model_hp, data_hp)
    metadata = w.truncated_dcp / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    w.good_file = _lightning_file(user / "good.ckpt", model_hp, data_hp)
    w.truncated_file = user / "truncated.ckpt"
    w.truncated_file.write_bytes(w.good_file.read_bytes()[:300])
    w.conflicting_file = _lightning_file(user / "other_run.ckpt", {**model_hp, "learning_rate": 0.1},
                                         {**data_hp, "max_length": 256})
    w.other_tokenizer_file = _lightning_file(user / "other_tok.ckpt", model_hp, {**data_hp, "tokenizer": "gpt2"})
    w.conflicting_dcp = _dcp_dir(user / "other_run_sharded.ckpt", {**model_hp, "warmup_steps": 3}, data_hp)
    # A trained tiny model as `fit` would checkpoint it (its weights match the llama-tiny preset).
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig.from_json_file(PRESETS_DIR / "llama-tiny.json"))
    w.trained = _lightning_file(user / "trained.ckpt", model_hp, data_hp,
                                {f"model.{k}": v for k, v in tiny.state_dict().items()})
    w.base_model = user / "base_model"
    tiny.save_pretrained(w.base_model)
    w.damaged = _damaged_base_models(user / "damaged", tiny, w.marker)
    w.data = user / "cnn_dailymail"
    (w.data / "3.0.0").mkdir(parents=True)
    w.parquet = w.data / "3.0.0" / "validation-00000-of-00001.parquet"
    w.parquet.write_bytes(b"not really parquet, but the user's file")
    w.notes = user / "notes"
    w.notes.mkdir()
    (w.notes / "LICENSE").write_text("the user's licence\n")
    (w.notes / "config.json").write_text("{}\n")
    w.notes_file = user / "notes.txt"
    w.notes_file.write_text("the user's notes\n")
    last = runs / "resume" / "tiny" / "version_0" / "checkpoints"
    last.mkdir(parents=True)
    w.evil_last = last / "last.ckpt"
    w.evil_last.write_bytes(w.evil_file.read_bytes())
    return w


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_args(w: Namespace, command: str, *extra: str) -> list[str]:
    return [command, f"--trainer.default_root_dir={w.runs}", f"--trainer.logger.init_args.save_dir={w.runs}",
            f"--data.cache_dir={w.runs / 'cache'}", *extra]


CASES = {
    # 1. a checkpoint never runs code: every entry point, single files and distributed directories
    "export-dcp-metadata": (lambda w: ["export", "--ckpt", str(w.evil_dcp), "--out", str(w.runs / "o")],
                            "is not a checkpoint metadata type"),
    "export-dcp-meta.pt": (lambda w: ["export", "--ckpt", str(w.evil_meta_dcp), "--out", str(w.runs / "o")],
                           "it references posix.system"),
    "export-file": (lambda w: ["export", "--ckpt", str(w.evil_file), "--out", str(w.runs / "o")],
                    "it references posix.system"),
    "fit-dcp-advanced": (lambda w: _run_args(w, "fit", f"--ckpt_path={w.evil_dcp}", "--trainer.strategy=advanced"),
                         "is not a checkpoint metadata type"),
    "fit-dcp-auto": (lambda w: _run_args(w, "fit", f"--ckpt_path={w.evil_dcp}"), "is not a checkpoint metadata type"),
    "fit-file": (lambda w: _run_args(w, "fit", f"--ckpt_path={w.evil_file}"), "it references posix.system"),
    "fit-last": (lambda w: ["fit", f"--trainer.logger.init_args.save_dir={w.runs / 'resume'}",
                            f"--trainer.default_root_dir={w.runs / 'resume'}", "--ckpt_path=last"],
                 "it references posix.system"),
    "validate-file": (lambda w: _run_args(w, "validate", f"--ckpt_path={w.evil_file}"), "it references posix.system"),
    "validate-dcp-meta.pt": (lambda w: _run_args(w, "validate", f"--ckpt_path={w.evil_meta_dcp}"),
                             "it references posix.system"),
    "test-dcp": (lambda w: _run_args(w, "test", f"--ckpt_path={w.evil_dcp}", "--trainer.strategy=advanced"),
                 "is not a checkpoint metadata type"),
    "predict-file": (lambda w: _run_args(w, "predict", f"--ckpt_path={w.evil_file}"), "it references posix.system"),
    "slurm-ckpt": (lambda w: ["slurm", "--dry_run", "--devices", "1", f"--ckpt_path={w.evil_file}"],
                   "is set by the script"),
    "fit-truncated-file": (lambda w: _run_args(w, "fit", f"--ckpt_path={w.truncated_file}"),
                           "cannot read checkpoint"),
    "export-truncated-metadata": (lambda w: ["export", "--ckpt", str(w.truncated_dcp), "--out", str(w.runs / "o")],
                                  "cannot read"),
    # a damaged or mismatched base model: one line before any tokenizing or weight loading, on every strategy
    "fit-base-truncated": (lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.damaged.truncated}"),
                           "the file is damaged (e.g. a partial download)"),
    "fit-base-huge-header-advanced": (
        lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.damaged.huge_header}",
                            "--trainer.strategy=advanced"), "header too large"),
    "fit-base-missing-tensor": (lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.damaged.missing}"),
                                "lacks weights for ['model.layers.1.self_attn.q_proj.weight']"),
    "fit-base-reshaped-tensor-advanced": (
        lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.damaged.reshaped}",
                            "--trainer.strategy=advanced"),
        "holds model.layers.0.mlp.up_proj.weight as [351, 128] where the model needs [352, 128]"),
    "fit-base-index-names-absent-file": (
        lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.damaged.incomplete}"),
        "the download is incomplete"),
    "fit-base-index-names-file-outside": (
        lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.damaged.outside_index}",
                            "--trainer.strategy=advanced"), "names files outside its directory"),
    "fit-base-pickle-only": (lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.damaged.pickle_only}"),
                             "llama_ft loads safetensors weights only"),
    # 2. outputs never destroy what llama_ft did not write; a run's sources are never outputs
    "fit-export-into-base-model": (lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.base_model}",
                                                       f"--model.hf_export_dir={w.base_model}"),
                                   "which this run reads from"),
    "fit-export-into-base-model-overwrite": (
        lambda w: _run_args(w, "fit", f"--model.model_name_or_path={w.base_model}",
                            f"--model.hf_export_dir={w.base_model}", "--overwrite"),
        "which this run reads from"),
    "fit-export-into-user-folder": (lambda w: _run_args(w, "fit", f"--model.hf_export_dir={w.notes}"),
                                    "llama_ft did not write"),
    "fit-export-onto-file": (lambda w: _run_args(w, "fit", f"--model.hf_export_dir={w.notes_file}"),
                             "is an existing file"),
    "fit-export-into-data": (lambda w: _run_args(w, "fit", f"--data.dataset={w.data}",
                                                 f"--model.hf_export_dir={w.data / '3.0.0'}"),
                             "which this run reads from"),
    "export-into-user-folder": (lambda w: ["export", "--ckpt", str(w.trained), "--out", str(w.notes)],
                                "llama_ft did not write"),
    "export-onto-checkpoint": (lambda w: ["export", "--ckpt", str(w.good_dcp), "--out", str(w.good_dcp)],
                               "which this run reads from"),
    "export-over-checkpoint-parent": (lambda w: ["export", "--ckpt", str(w.trained), "--out", str(w.user),
                                                 "--overwrite"], "which this run reads from"),
    "predict-onto-user-file": (lambda w: _run_args(w, "predict", f"--trainer.callbacks.init_args.output_path="
                                                                 f"{w.notes_file}"), "llama_ft did not write"),
    "predict-onto-data": (lambda w: _run_args(w, "predict", f"--data.dataset={w.data}",
                                              f"--trainer.callbacks.init_args.output_path={w.parquet}"),
                          "which this run reads from"),
    # 4. a checkpoint must fit the run: strategy, settings, existence
    "fit-sharded-without-advanced": (lambda w: _run_args(w, "fit", f"--ckpt_path={w.good_dcp}"),
                                     "--trainer.strategy advanced"),
    "validate-sharded-without-advanced": (lambda w: _run_args(w, "validate", f"--ckpt_path={w.good_dcp}"),
                                          "--trainer.strategy advanced"),
    "fit-conflicting-settings": (lambda w: _run_args(w, "fit", f"--ckpt_path={w.conflicting_file}"),
                                 "model.learning_rate: given 0.003, checkpoint 0.1; data.max_length: given 512"),
    "test-other-tokenizer": (lambda w: _run_args(w, "test", f"--ckpt_path={w.other_tokenizer_file}"),
                             "data.tokenizer: given 'sample', checkpoint 'gpt2'"),
    "fit-conflict-overridden-then-sharded": (
        lambda w: _run_args(w, "fit", f"--ckpt_path={w.conflicting_dcp}", "--ckpt_overrides"),
        "--trainer.strategy advanced"),
    "fit-missing-checkpoint": (lambda w: _run_args(w, "fit", f"--ckpt_path={w.user / 'nope.ckpt'}"),
                               "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_exits_2_with_one_line_and_changes_nothing(case, world, capsys):
    args, expected = CASES[case]
    before = _tree(world.user)
    code = main(args(world))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and expected in errors[0], err[-3000:]
    assert err.rstrip().endswith(errors[0]) and "Traceback" not in err  # the message is that one line
    assert not world.marker.exists(), "the checkpoint ran code"
    assert _tree(world.user) == before, "a user file changed"


def test_export_replaces_a_user_folder_only_with_overwrite_and_then_marks_it(world, capsys):
    out = world.runs / "consented"
    out.mkdir()
    (out / "LICENSE").write_text("replace me\n")
    assert main(["export", "--ckpt", str(world.trained), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "LICENSE").exists() and (out / MARKER).is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}, modes
    assert main(["export", "--ckpt", str(world.trained), "--out", str(out)]) == 0  # its own output: no consent needed
    assert not world.marker.exists()


def test_a_genuine_distributed_checkpoint_metadata_passes_the_allow_list(world):
    check_dcp_metadata(world.good_dcp)  # dtypes, sizes, layouts, paths, storage info: all allowed
    with pytest.raises(ConfigError, match=r"posix\.system is not a checkpoint metadata type"):
        check_dcp_metadata(world.evil_dcp)
    assert not world.marker.exists()


def test_last_is_the_newest_last_checkpoint_of_the_same_run(tmp_path):
    def checkpoint(name: str, version: str, age: int) -> Path:
        path = tmp_path / name / version / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1e9 - age, 1e9 - age))
        return path

    checkpoint("tiny", "version_0", age=30)
    newest = checkpoint("tiny", "version_1", age=20)
    checkpoint("other_name", "version_5", age=0)  # another run under the same root: not ours
    trainer = Namespace(default_root_dir=str(tmp_path), callbacks=[], logger=Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=str(tmp_path), name="tiny", version=None)))
    found, _ = find_last(trainer)
    assert found == newest and trainer.logger.init_args.version == "version_1"
    trainer.logger.init_args.version = "version_0"  # a pinned version looks only there
    assert find_last(trainer)[0] == tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    trainer.logger.init_args.version = "slurm-1"
    assert find_last(trainer)[0] is None


def test_plan_reads_only_the_config_of_a_model_folder_holding_a_pickle(world, capsys):
    folder = world.user / "pickled_model"
    if not folder.exists():
        folder.mkdir()
        (folder / "config.json").write_text((world.base_model / "config.json").read_text())
        torch.save({"model.embed_tokens.weight": _Payload(world.marker)}, folder / "pytorch_model.bin")
    before = _tree(world.user)
    assert main(["plan", f"--model.model_name_or_path={folder}", "--nodes=1", "--devices=2", "--gpu=h100-80gb"]) == 0
    assert "chosen" in capsys.readouterr().out.lower()
    assert not world.marker.exists() and _tree(world.user) == before


def test_new_empty_and_own_outputs_are_accepted(tmp_path):
    from llama_ft.outputs import check_output_dir, check_output_file, mark_output_file

    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_dir(empty, "--out")
    check_output_dir(tmp_path / "new", "--out")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "1"}\n')
    with pytest.raises(ConfigError, match="llama_ft did not write it"):
        check_output_file(predictions, "output_path")
    mark_output_file(predictions)
    check_output_file(predictions, "output_path")  # its own earlier output: replaced without --overwrite

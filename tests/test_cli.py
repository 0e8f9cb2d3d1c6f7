"""The LightningCLI: every Trainer command on the embedded default, through main()."""

from __future__ import annotations

import json

import pytest
import yaml

from llama_ft.cli import main

QUICK = ["--data.max_examples_per_split=16", "--model.max_new_tokens=4"]


def _run(command: str, tmp_path, *extra: str) -> None:
    assert main([command, f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                 f"--data.cache_dir={tmp_path / 'cache'}", *QUICK, *extra]) == 0


@pytest.mark.slow
def test_fit_validate_test_predict_on_the_embedded_default(tmp_path, capsys):
    _run("fit", tmp_path, "--trainer.fast_dev_run=2", f"--model.hf_export_dir={tmp_path / 'hf'}")
    assert (tmp_path / "hf" / "config.json").is_file()
    _run("validate", tmp_path, "--trainer.fast_dev_run=1")
    assert "val_loss" in capsys.readouterr().out
    _run("test", tmp_path, "--trainer.fast_dev_run=1")
    out = capsys.readouterr().out
    for metric in ("test_loss", "test_rouge1", "test_rouge2", "test_rougeL", "test_rougeLsum"):
        assert metric in out
    assert (tmp_path / "hf" / "README.md").is_file() and (tmp_path / "hf" / "llama_ft_prompt.json").is_file()
    _run("predict", tmp_path, "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false")
    # Into the run's own version directory, beside the config.yaml it saved.
    (predictions,) = tmp_path.glob("tiny/version_*/predictions.jsonl")
    assert (predictions.parent / "config.yaml").is_file()
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert rows and set(rows[0]) == {"id", "summary", "reference"}
    assert len({r["id"] for r in rows}) == len(rows)


def test_print_config_shows_the_embedded_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["model_config"] == "llama-tiny"
    assert config["data"]["dataset"] == "sample"
    assert config["trainer"]["strategy"] == "auto"


def test_a_recipe_replaces_the_embedded_default(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/llama3_8b_cnn_dailymail.yaml", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["model_name_or_path"] == "meta-llama/Meta-Llama-3-8B"
    assert config["data"]["global_batch_size"] == 256 and config["data"]["max_length"] == 1024
    assert config["model"]["learning_rate"] == pytest.approx(1e-5)
    assert config["trainer"]["precision"] == "bf16-mixed" and config["trainer"]["max_epochs"] == 3

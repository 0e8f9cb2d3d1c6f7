"""``python main.py slurm``: the sbatch script it writes, and its dry run (no SLURM needed here).

The real submission, preemption and requeue are tested against a local SLURM in tests/slurm/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llama_ft.cli import main as cli_main
from llama_ft.presets import DEFAULT_RECIPE
from tests.helpers import REPO_ROOT

FULL_RECIPE = str(REPO_ROOT / "configs" / "llama3_8b_cnn_dailymail.yaml")


@pytest.fixture
def no_slurm(tmp_path, monkeypatch) -> Path:
    """Run from an empty directory with no SLURM command on PATH."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path


def main(argv: list[str]) -> int:
    """``llama-ft slurm ARGV``; an argument the parser refuses exits 2 as on the command line."""
    try:
        return cli_main(["slurm", *argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)


def _dry_run(capsys, *args: str) -> str:
    assert main([*args, "--dry_run"]) == 0
    return capsys.readouterr().out


def test_dry_run_of_the_full_recipe_prints_the_script_and_writes_nothing(no_slurm, capsys):
    script = _dry_run(capsys, "--config", FULL_RECIPE, "--nodes", "2", "--devices", "8", "--partition", "gpu",
                      "--time", "24:00:00")
    for line in ("#!/bin/bash", "#SBATCH --job-name=llama_ft-llama3_8b_cnn_dailymail", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=24:00:00", "#SBATCH --signal=SIGUSR1@120", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --chdir={no_slurm}",
                 f"#SBATCH --output={no_slurm}/runs/llama3_8b/cnn_dailymail/slurm/"
                 "llama_ft-llama3_8b_cnn_dailymail-%j.out",
                 f"--config {FULL_RECIPE}", "--trainer.num_nodes 2", "--trainer.devices 8",
                 '--trainer.logger.init_args.version "slurm-$SLURM_JOB_ID"',
                 "--trainer.callbacks+=llama_ft.callbacks.PreemptionCheckpoint", "--ckpt_path last"):
        assert line in script, line
    assert "srun --kill-on-bad-exit=1 " in script and " -m llama_ft fit" in script
    assert "export MASTER_PORT=" in script and "export MASTER_ADDR=" in script
    assert "--account" not in script and "--cpus-per-task" not in script
    assert list(no_slurm.iterdir()) == []  # a dry run writes nothing


def test_the_script_is_valid_bash(no_slurm, capsys):
    script = _dry_run(capsys, "--nodes", "1", "--devices", "2", "--account", "proj", "--cpus_per_task", "4",
                      "--trainer.max_steps=5", "--data.dataset", "/data/my cnn")
    bash = shutil.which("bash", path="/bin:/usr/bin")
    assert subprocess.run([bash, "-n"], input=script, text=True).returncode == 0
    assert "#SBATCH --account=proj" in script and "#SBATCH --cpus-per-task=4" in script
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=4 " in script  # srun no longer inherits it (Slurm 22.05)
    # Unknown arguments go on to `fit`, quoted, after the script's own (so they can override the recipe).
    assert script.index("--ckpt_path last") < script.index("--trainer.max_steps=5")
    assert "--data.dataset '/data/my cnn'" in script


def test_the_embedded_default_runs_on_cpus_without_gpus(no_slurm, capsys):
    script = _dry_run(capsys, "--nodes", "1", "--devices", "2")
    assert f"--config {DEFAULT_RECIPE}" in script
    assert "--gpus-per-node" not in script  # trainer.accelerator: cpu
    assert f"#SBATCH --output={no_slurm}/runs/default/tiny/slurm/llama_ft-default-%j.out" in script
    assert "--gpus-per-node=2" in _dry_run(capsys, "--nodes", "1", "--devices", "2", "--trainer.accelerator=gpu")
    assert "--gpus-per-node=4" in _dry_run(capsys, "--nodes", "1", "--devices", "2", "--gpus_per_node", "4")


def test_log_directory_follows_logger_overrides(no_slurm, capsys):
    script = _dry_run(capsys, "--devices", "2", "--trainer.logger.init_args.save_dir=/scratch/me",
                      "--trainer.logger.init_args.name", "exp1")
    assert "#SBATCH --output=/scratch/me/exp1/slurm/llama_ft-default-%j.out" in script
    assert "#SBATCH --nodes=1" in script  # trainer.num_nodes is not in the embedded default


def _recipe(tmp_path: Path, trainer: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"devices": 2, **trainer}, "model": {"model_config": "llama-tiny"}}))
    return str(path)


def test_logger_version_is_pinned_to_the_job_whatever_the_recipe_says(no_slurm, capsys):
    # No logger in the recipe: Lightning's default TensorBoard logger, made explicit so its version can be pinned.
    script = _dry_run(capsys, "--config", _recipe(no_slurm, {"default_root_dir": "out"}))
    assert "--trainer.logger lightning.pytorch.loggers.TensorBoardLogger" in script
    assert "--trainer.logger.init_args.save_dir out" in script
    assert '--trainer.logger.init_args.version "slurm-$SLURM_JOB_ID"' in script
    assert f"#SBATCH --output={no_slurm}/out/lightning_logs/slurm/llama_ft-recipe-%j.out" in script
    # No logger at all: checkpoints live under default_root_dir, the same for every attempt.
    script = _dry_run(capsys, "--config", _recipe(no_slurm, {"default_root_dir": "out", "logger": False}))
    assert "init_args.version" not in script
    assert f"#SBATCH --output={no_slurm}/out/slurm/llama_ft-recipe-%j.out" in script


@pytest.mark.parametrize("arg", ["--ckpt_path=some.ckpt", "--trainer.devices", "--trainer.num_nodes=3"])
def test_arguments_the_script_owns_are_refused(no_slurm, capsys, arg):
    assert main(["--devices", "2", arg, "4", "--dry_run"]) == 2
    assert "set by the script" in capsys.readouterr().err


def test_bad_values_are_refused_with_the_fix(no_slurm, capsys):
    assert main(["--devices", "0", "--dry_run"]) == 2
    assert "--devices" in capsys.readouterr().err
    assert main(["--config", _recipe(no_slurm, {"devices": "auto"}), "--dry_run"]) == 2
    assert "pass --devices" in capsys.readouterr().err
    two_loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "a"}}] * 2
    assert main(["--config", _recipe(no_slurm, {"logger": two_loggers}), "--dry_run"]) == 2
    assert "one logger given by class_path" in capsys.readouterr().err
    # A time limit SLURM would refuse, and a typo in an option meant for `fit`, fail here, not on the cluster.
    assert main(["--devices", "2", "--time", "24h", "--dry_run"]) == 2
    assert "--time" in capsys.readouterr().err
    assert main(["--devices", "2", "--trainer.max_stepz", "5", "--dry_run"]) == 2
    assert "max_stepz" in capsys.readouterr().err
    assert list(no_slurm.iterdir()) == ["recipe.yaml"] or [p.name for p in no_slurm.iterdir()] == ["recipe.yaml"]


def test_without_sbatch_submission_says_what_to_do(no_slurm, capsys):
    assert main(["--devices", "2"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


def test_submission_writes_the_script_beside_the_logs_and_prints_where(no_slurm, capsys, monkeypatch):
    # A stand-in sbatch that records what it was given (the real one is exercised in tests/slurm/).
    bin_dir = no_slurm / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" > {bin_dir / "args"}\necho "4242;cluster"\n')
    sbatch.chmod(0o755)
    assert main(["--devices", "2", "--trainer.max_steps=5"]) == 0
    out = capsys.readouterr().out
    slurm_dir = Path("runs/default/tiny/slurm")
    assert "Submitted batch job 4242" in out
    assert f"script:  {slurm_dir / 'llama_ft-default-4242.sbatch'}" in out
    assert f"log:     {slurm_dir / 'llama_ft-default-4242.out'}" in out
    assert "run dir: runs/default/tiny/slurm-4242" in out
    script = (no_slurm / slurm_dir / "llama_ft-default-4242.sbatch").read_text()
    assert "--trainer.max_steps=5" in script
    args = (bin_dir / "args").read_text().split()
    assert args[0] == "--parsable" and Path(args[1]).parent == no_slurm / slurm_dir
    assert [p.name for p in (no_slurm / slurm_dir).iterdir()] == ["llama_ft-default-4242.sbatch"]
    assert os.access(no_slurm / slurm_dir, os.W_OK)


def test_a_pinned_version_continues_that_run(no_slurm, capsys):
    bin_dir = no_slurm / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho 77\n')
    (bin_dir / "sbatch").chmod(0o755)
    assert main(["--devices", "2", "--trainer.logger.init_args.version", "slurm-4242"]) == 0
    assert "run dir: runs/default/tiny/slurm-4242" in capsys.readouterr().out
    script = (no_slurm / "runs/default/tiny/slurm/llama_ft-default-77.sbatch").read_text()
    # The user's version comes after the script's own, so it wins.
    assert script.index('version "slurm-$SLURM_JOB_ID"') < script.index("--trainer.logger.init_args.version slurm-4242")

"""A preempted, resumed run ends with the weights of an uninterrupted one (no SLURM needed).

A run gets SIGUSR1 at a chosen step; ``PreemptionCheckpoint`` saves ``last.ckpt`` at that step boundary and stops it;
``fit --ckpt_path last`` resumes it. Its Hugging Face export must equal an uninterrupted run's within 1e-6 (fp32, CPU):
same data order, optimizer and LR-scheduler state. On one process, inside an epoch and right after one ends; on two
(gloo) with the ``advanced`` strategy, whose checkpoint is a distributed directory, where only rank 0 is signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors.torch import load_file

from llama_ft.callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from llama_ft.data.batching import MicroBatchSampler
from tests.helpers import REPO_ROOT, free_port

RUN_TIMEOUT_S = 420
# 64 training rows: 8 micro-batches of 8 per epoch. One process accumulates 2 (4 steps per epoch); two data-parallel
# processes take 4 each with no accumulation (4 steps per epoch too). 8 steps are two epochs.
QUICK = ["--data.max_examples_per_split=64", "--data.val_every_n_steps=3", "--trainer.max_steps=8",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(root: Path, cache: Path, devices: int, *extra: str, expect: int = 0) -> str:
    """``python main.py fit`` on the embedded default under ``root`` (logger version pinned so `last` is found)."""
    args = [sys.executable, str(REPO_ROOT / "main.py"), "fit", *QUICK, f"--trainer.devices={devices}",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.logger.init_args.version=run", f"--data.cache_dir={cache}", *extra]
    if devices > 1 and not any(arg.startswith("--trainer.strategy") for arg in extra):
        args.append("--trainer.strategy=advanced")
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)  # these tests run outside SLURM even when pytest itself runs in a job
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{log[-6000:]}"
    return log


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "tiny" / "run" / "hf_model" / "model.safetensors")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tokenization cache for the module's runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, cache) -> Callable[[int], Path]:
    """Uninterrupted runs, one per process count, each made once for the module."""
    root = tmp_path_factory.mktemp("straight")

    def run(devices: int) -> Path:
        out = root / f"devices{devices}"
        if not out.exists():
            _fit(out, cache, devices)
        return out

    return run


def _preempted_then_resumed(tmp_path: Path, cache: Path, straight: Path, devices: int, step: int,
                            *extra: str) -> tuple[float, str]:
    interrupted = tmp_path / "interrupted"
    first = _fit(interrupted, cache, devices, *extra, "--trainer.callbacks+=tests.scripts.job_callbacks.SignalAtStep",
                 f"--trainer.callbacks.step={step}", "--trainer.callbacks+=llama_ft.callbacks.PreemptionCheckpoint",
                 expect=PREEMPTED_EXIT_CODE)
    assert not (interrupted / "tiny" / "run" / "hf_model").exists()  # stopped: no end-of-training export
    last = interrupted / "tiny" / "run" / "checkpoints" / "last.ckpt"
    assert f"SIGUSR1 received: saved {last} at step {step}." in first
    assert not list(last.parent.glob(".*.partial")), "a save left its partial behind"
    second = _fit(interrupted, cache, devices, *extra, "--ckpt_path=last")
    assert f"Restored all states from the checkpoint at {last}" in second
    difference = _max_difference(_weights(straight), _weights(interrupted))
    print(f"max |Δweight| after preemption at step {step} on {devices} process(es): {difference:.3g}")
    return difference, first


@pytest.mark.slow
@pytest.mark.timeout(5 * RUN_TIMEOUT_S)
@pytest.mark.parametrize("step", [5, 4], ids=["mid-epoch", "epoch-end"])
def test_resumed_run_matches_uninterrupted_on_one_process(tmp_path, cache, straight_runs, step):
    # One process accumulates 2 micro-batches per step, 4 steps per epoch: step 5 stops inside the second epoch,
    # step 4 right after the first one's last batch.
    difference, first = _preempted_then_resumed(tmp_path, cache, straight_runs(1), devices=1, step=step)
    assert "Stopping; `fit --ckpt_path last`" in first
    assert difference <= 1e-6


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(5 * RUN_TIMEOUT_S)
def test_resumed_run_matches_uninterrupted_on_two_processes_with_a_distributed_checkpoint(tmp_path, cache,
                                                                                          straight_runs):
    # Only rank 0 is signalled; both must save the same step. Step 5 is the second micro-batch of the second epoch.
    difference, _ = _preempted_then_resumed(tmp_path, cache, straight_runs(2), devices=2, step=5)
    assert (tmp_path / "interrupted" / "tiny" / "run" / "checkpoints" / "last.ckpt").is_dir()  # sharded
    assert difference <= 1e-6


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(4 * RUN_TIMEOUT_S)
def test_background_checkpoint_saves_resume_exactly(tmp_path, cache, straight_runs):
    """``async_checkpoint``: the validation save at step 3 and the preemption save at step 5 are written while
    training goes on, published only when complete, and resuming from them still matches the synchronous run."""
    difference, _ = _preempted_then_resumed(tmp_path, cache, straight_runs(2), 2, 5,
                                            "--trainer.strategy=llama_ft.parallel.AdvancedParallelStrategy",
                                            "--trainer.strategy.async_checkpoint=true")
    assert difference <= 1e-6


@pytest.mark.slow
@pytest.mark.timeout(5 * RUN_TIMEOUT_S)
def test_a_run_killed_without_warning_resumes_from_the_last_validation_checkpoint(tmp_path, cache, straight_runs):
    # What a requeue after a node failure does: no signal, no preemption checkpoint; ModelCheckpoint saved last.ckpt
    # at the validation after step 6 (mid-epoch), then the process died before step 7.
    crashed = tmp_path / "crashed"
    _fit(crashed, cache, 1, "--trainer.callbacks+=tests.scripts.job_callbacks.DieAtStep", "--trainer.callbacks.step=6",
         expect=7)
    second = _fit(crashed, cache, 1, "--ckpt_path=last")
    assert f"Restored all states from the checkpoint at {crashed / 'tiny' / 'run' / 'checkpoints' / 'last.ckpt'}" \
        in second
    difference = _max_difference(_weights(straight_runs(1)), _weights(crashed))
    print(f"max |Δweight| after a crash at step 6: {difference:.3g}")
    assert difference <= 1e-6


def test_sampler_resumes_mid_epoch_with_the_same_order_and_resets_next_epoch():
    lengths = [10 + (i * 7) % 50 for i in range(40)]
    make = lambda: MicroBatchSampler(lengths, mode="length_grouped", micro_batch_size=4, max_length=64,  # noqa: E731
                                     num_replicas=2, rank=1, seed=3)
    straight = make()
    straight.set_epoch(2)
    whole_epoch = list(straight)
    straight.set_epoch(3)
    next_epoch = list(straight)

    resumed = make()
    resumed.resume_at(epoch=2, start_batch=3)
    resumed.set_epoch(2)  # Lightning sets the epoch again when the loop restarts: the offset stays
    assert list(resumed) == whole_epoch[3:]
    assert len(resumed) == len(whole_epoch)  # Lightning's progress counts the skipped batches too
    resumed.set_epoch(3)
    assert list(resumed) == next_epoch


def test_preemption_signal_only_raises_a_flag():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        callback = PreemptionCheckpoint()
        assert not callback.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback.requested
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _SignalAtBatch(L.Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture
def restore_sigusr1():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def _boring_trainer(tmp_path: Path, *callbacks: L.Callback, max_steps: int) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


def test_a_signal_mid_accumulation_is_answered_at_the_next_step_boundary(tmp_path, restore_sigusr1):
    # Batch 4 is the first half of step 3 (accumulation 2): the checkpoint must hold 3 whole steps.
    trainer = _boring_trainer(tmp_path, _SignalAtBatch(4), PreemptionCheckpoint(), max_steps=10)
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(BoringModel())
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 6


def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path, restore_sigusr1):
    trainer = _boring_trainer(tmp_path, _SignalAtBatch(4), PreemptionCheckpoint(), max_steps=3)
    trainer.fit(BoringModel())
    assert trainer.global_step == 3 and trainer.state.finished


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_ckpt_path_last_continues_the_newest_version_when_the_version_is_not_pinned(tmp_path, cache, capsys):
    import logging

    from llama_ft.cli import main

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())

    args = ["fit", f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--data.cache_dir={cache}", "--data.max_examples_per_split=16", "--data.max_length=128",
            "--data.global_batch_size=4", "--data.micro_batch_size=4", "--data.val_every_n_steps=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    assert main([*args, "--trainer.max_steps=2"]) == 0
    last = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    logging.getLogger("lightning.pytorch").addHandler(handler)  # Lightning's logger does not propagate
    try:
        assert main([*args, "--trainer.max_steps=4", "--ckpt_path=last"]) == 0
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    assert f"Restored all states from the checkpoint at {last}" in records
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["version_0"]  # no fresh version directory
    assert torch.load(last, weights_only=True, mmap=True)["global_step"] == 4
    assert main([*args, "--trainer.max_steps=6", "--ckpt_path=last", "--model.learning_rate=0.5"]) == 2
    assert "model.learning_rate: given 0.5, checkpoint 0.003" in capsys.readouterr().err

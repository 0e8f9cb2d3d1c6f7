"""Preemption: on SIGUSR1, checkpoint at an optimizer-step boundary, requeue the SLURM job, stop; resume exactly.

SLURM warns a job before it preempts it or its time runs out (``#SBATCH --signal=SIGUSR1@120``; by hand:
``scancel --signal=USR1 JOBID``). ``PreemptionCheckpoint`` answers that signal: every rank finishes the optimizer
step it is in, all save one full checkpoint (weights, optimizer, LR scheduler, loop progress; a directory under the
``advanced`` strategy) as the ``ModelCheckpoint``'s ``last.ckpt``, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``,
and the run exits. The requeued job runs the same script: ``fit --ckpt_path last`` restores everything and the data
module skips the micro-batches already trained on, so the run ends with the weights it would have had uninterrupted.

It replaces Lightning's own auto-requeue handler (``SLURMEnvironment(auto_requeue=True)``), which saves from inside
the signal handler: possibly in the middle of gradient accumulation (the partial gradients are not saved, so the
resumed run differs) and, with a distributed checkpoint, at a different point of the step on each rank (its
collectives then meet the training step's: a hang). Lightning installs its handler only where none exists, and this
callback installs its own when it is created.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from llama_ft.errors import ConfigError

# Exit status of a run that stopped because it was asked to (a checkpoint was saved; requeued under SLURM).
PREEMPTED_EXIT_CODE = 3


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is saved: ends the run without end-of-training work."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


def slurm_job_id() -> str | None:
    """``JOBID`` or ``ARRAYJOBID_TASKID`` of the SLURM batch job this process runs in, else None."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job(job_id: str, timeout_s: float = 60.0) -> bool:
    """``scontrol requeue JOBID``; True when SLURM accepted it."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"could not requeue SLURM job {job_id}: {err}")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"`scontrol requeue {job_id}` failed ({result.returncode}): {result.stderr.strip()}")
        return False
    return True


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``fit --ckpt_path last`` looks: the first ``ModelCheckpoint``'s ``last`` file (or directory)."""
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
        raise ConfigError(
            "PreemptionCheckpoint saves where `--ckpt_path last` finds it, the ModelCheckpoint's directory, but this "
            "Trainer has no ModelCheckpoint; keep trainer.enable_checkpointing on (the recipes configure one)."
        )
    metrics = {**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
               "step": torch.tensor(trainer.global_step)}
    return Path(callback.format_checkpoint_name(metrics, filename=callback.CHECKPOINT_NAME_LAST))


def _training_ends_now(trainer: L.Trainer) -> bool:
    """True after the optimizer step that ends ``fit`` (``max_steps``, or the last batch of ``max_epochs``)."""
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    return bool(trainer.is_last_batch and max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1)


class PreemptionCheckpoint(Callback):
    """On ``signal_name`` (SIGUSR1): at the next optimizer-step boundary save ``last.ckpt``, requeue, stop.

    All ranks agree on the step (one all-reduce of a flag per optimizer step), so they save together even when the
    signal reached only some of them or reached them during different steps.

    Args:
        signal_name: the signal that announces preemption (SLURM's ``--signal``).
        requeue: run ``scontrol requeue`` after saving; default: when running inside a SLURM batch job.
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool | None = None) -> None:
        self.signum = signal.Signals[signal_name]
        self.requeue = requeue
        self.requested = False
        self._last_step: int | None = None
        # Installed now, not at fit start: a signal that arrives while the model and data load is kept for the first
        # step boundary instead of killing the process (the default action of SIGUSR1).
        if threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # only a flag: the work happens between steps, in step on every rank

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_checkpoint_path(trainer)  # fail now, not at preemption, when there is nowhere to save
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # mid-accumulation: the gradients summed so far are in no checkpoint
        self._last_step = trainer.global_step
        if _training_ends_now(trainer):
            return  # the last step: finishing (and exporting) beats a requeued job with nothing left to do
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.checkpoint_and_stop(trainer)

    def checkpoint_and_stop(self, trainer: L.Trainer) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("preemption_checkpoint_saved")  # every shard is on disk before the job is requeued
        # Said before requeueing: SLURM terminates the job's processes as soon as it has requeued it.
        rank_zero_info(f"{self.signum.name} received: saved {path} at step {trainer.global_step}.")
        job_id = slurm_job_id()
        requeue = self.requeue if self.requeue is not None else job_id is not None
        if requeue and job_id is not None:
            requeued = trainer.is_global_zero and requeue_slurm_job(job_id)
            # No rank exits before rank 0 has requeued: srun (--kill-on-bad-exit) would kill it mid-request.
            if trainer.strategy.broadcast(requeued):
                rank_zero_info(f"Requeued SLURM job {job_id}: it resumes from that checkpoint when it restarts.")
        else:
            rank_zero_info("Stopping; `fit --ckpt_path last` (or that path) resumes the run.")
        raise Preempted()

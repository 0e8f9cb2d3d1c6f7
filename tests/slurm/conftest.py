"""The SLURM tests' cluster (one per session, stopped by PID at the end) and their jobs.

Every job is submitted the way a user does it, ``python main.py slurm ...``, and runs the embedded default on one node
with 2 tasks (2 CPU processes, gloo) and the ``advanced`` strategy, shrunk to a few steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.slurm.cluster import FINAL_STATES, LocalSlurmCluster, missing_requirements

# 64 training rows = 8 micro-batches of 8 per epoch, 4 per process: 4 optimizer steps per epoch (no accumulation
# once the planner picks micro-batch 8) — 10 steps are 2.5 epochs, with validation (and last.ckpt) every 3 steps.
MAX_STEPS = 10
FIT_ARGS = ["--trainer.strategy=advanced", f"--trainer.max_steps={MAX_STEPS}", "--data.max_examples_per_split=64",
            "--data.val_every_n_steps=3", "--trainer.enable_progress_bar=false", "--model.max_new_tokens=4",
            "--trainer.callbacks+=tests.scripts.job_callbacks.StepMarker"]
SUBMIT_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420  # one attempt of a job, start to end, on 2 busy cores


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    script: Path
    log: Path
    run_dir: Path
    submit_output: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def hf_weights(self) -> Path:
        return self.run_dir / "hf_model" / "model.safetensors"


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = missing_requirements()
    if missing:
        pytest.fail(f"needs a local SLURM; missing: {', '.join(missing)} (`make slurm-packages` installs it, as root)")
    cluster = LocalSlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_workdir(tmp_path_factory) -> Path:
    """Where the jobs run and log (their --chdir), with a tokenization cache they share."""
    return tmp_path_factory.mktemp("slurm_jobs")


def submit_fit(cluster: LocalSlurmCluster, workdir: Path, name: str, *extra: str) -> SubmittedJob:
    """``python main.py slurm --nodes 1 --devices 2 ...`` from ``workdir``, logging under ``workdir/name``."""
    root = workdir / name
    args = [sys.executable, str(REPO_ROOT / "main.py"), "slurm", "--nodes", "1", "--devices", "2",
            "--cpus_per_task", "1", "--time", "00:30:00", "--job_name", name, *FIT_ARGS,
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            f"--data.cache_dir={workdir / 'cache'}", *extra]
    # The job inherits this environment; it runs `python -m llama_ft` from the workdir, so the test callbacks
    # (tests.scripts.job_callbacks) are found through PYTHONPATH.
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), cluster.env.get("PYTHONPATH")]))}
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = dict(re.findall(r"^(Submitted batch job|script:|log:|run dir:)\s+(\S+)", proc.stdout, re.MULTILINE))
    return SubmittedJob(
        job_id=found["Submitted batch job"],
        script=workdir / found["script:"],
        log=workdir / found["log:"],
        run_dir=workdir / found["run dir:"],
        submit_output=proc.stdout,
    )


def wait_until_done(cluster: LocalSlurmCluster, job: SubmittedJob, timeout: float) -> dict[str, str]:
    """The job's final state (the last attempt's), failing with its log and the daemons' logs on a timeout."""
    try:
        return cluster.wait_for_job(job.job_id, lambda j: j.get("JobState") in FINAL_STATES, timeout, "to end")
    except TimeoutError as err:
        pytest.fail(f"{err}\n--- job log\n{job.log_text()[-8000:]}\n{cluster.logs()}")


def wait_for_log_line(cluster: LocalSlurmCluster, job: SubmittedJob, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, job.log_text(), re.MULTILINE):
            return
        state = cluster.job(job.job_id).get("JobState")
        if state in FINAL_STATES:
            pytest.fail(f"job {job.job_id} ended ({state}) before its log showed /{pattern}/:\n"
                        f"{job.log_text()[-8000:]}")
        time.sleep(0.5)
    pytest.fail(f"job {job.job_id}'s log did not show /{pattern}/ within {timeout:.0f} s:\n{job.log_text()[-8000:]}")


@pytest.fixture(scope="session")
def uninterrupted_job(slurm_cluster, slurm_workdir) -> tuple[SubmittedJob, dict[str, str]]:
    """One job run start to end: the submission test checks it, the preemption test compares weights with it."""
    job = submit_fit(slurm_cluster, slurm_workdir, "straight")
    return job, wait_until_done(slurm_cluster, job, JOB_TIMEOUT_S)

"""``python main.py slurm`` against a real SLURM: the job runs the embedded default on 2 ranks and completes."""

from __future__ import annotations

import pytest

from tests.slurm.conftest import JOB_TIMEOUT_S, MAX_STEPS

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(JOB_TIMEOUT_S + 120)]


def test_submitted_job_fits_on_two_ranks_with_the_advanced_strategy(uninterrupted_job):
    job, state = uninterrupted_job
    log = job.log_text()
    context = f"\n{state}\n--- {job.log}\n{log[-8000:]}"
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", context

    script = job.script.read_text()
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --signal=SIGUSR1@120",
                 "#SBATCH --requeue", f"#SBATCH --output={job.log.parent}/straight-%j.out", "--ckpt_path last"):
        assert line in script, line
    assert "--gpus-per-node" not in script  # the embedded default runs on CPUs
    assert job.log == job.script.with_suffix(".out")
    assert f"Submitted batch job {job.job_id}" in job.submit_output

    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, context
    assert "Plan for 1 node" in log and "feasible plans ranked" in log, context  # the advanced strategy's plan
    assert (job.run_dir / "plan.json").is_file()
    assert f"[step-marker] step {MAX_STEPS}" in log, context
    assert "attempt 2" not in log, context
    assert job.hf_weights().is_file(), context

"""Preemption against a real SLURM: SIGUSR1 -> checkpoint -> requeue -> resume -> the uninterrupted run's weights.

The job is signalled the way ``#SBATCH --signal`` warns it (here through the batch shell,
``scancel --signal=USR1 --batch``, which the script passes on to the tasks) once it has trained two steps.
"""

from __future__ import annotations

import re

import pytest
from safetensors.torch import load_file

from tests.slurm.cluster import FINAL_STATES
from tests.slurm.conftest import JOB_TIMEOUT_S, MAX_STEPS, submit_fit, wait_for_log_line

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(4 * JOB_TIMEOUT_S)]


def test_preempted_job_requeues_resumes_and_ends_with_the_uninterrupted_weights(
    slurm_cluster, slurm_workdir, uninterrupted_job
):
    straight, _ = uninterrupted_job
    # A pause after each step leaves time to signal mid-run; it changes nothing the model learns.
    job = submit_fit(slurm_cluster, slurm_workdir, "preempted", "--trainer.callbacks.pause_s=1.0")
    wait_for_log_line(slurm_cluster, job, r"^\[step-marker\] step 2$", JOB_TIMEOUT_S)
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", job.job_id)

    try:
        state = slurm_cluster.wait_for_job(
            job.job_id, lambda j: j.get("Restarts", "0") != "0" and j.get("JobState") in FINAL_STATES,
            2 * JOB_TIMEOUT_S, "to be requeued and end")
    except TimeoutError as err:
        pytest.fail(f"{err}\n--- {job.log}\n{job.log_text()[-8000:]}\n{slurm_cluster.logs()}")
    log = job.log_text()
    context = f"\n{state}\n--- {job.log}\n{log[-8000:]}"
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", context

    last = job.run_dir / "checkpoints" / "last.ckpt"
    saved = re.search(rf"SIGUSR1 received: saved {re.escape(str(last))} at step (\d+)\.", log)
    assert saved, context
    assert 2 <= int(saved.group(1)) < MAX_STEPS, context  # preempted mid-run, not at the end
    assert "attempt 2" in log and f"Restored all states from the checkpoint at {last}" in log, context
    assert f"[step-marker] step {MAX_STEPS}" in log, context

    expected, resumed = load_file(straight.hf_weights()), load_file(job.hf_weights())
    assert expected.keys() == resumed.keys()
    difference = max(float((expected[k].double() - resumed[k].double()).abs().max()) for k in expected)
    print(f"preempted at step {saved.group(1)}, requeued, resumed: max |Δweight| = {difference:.3g}")
    assert difference <= 1e-6, context

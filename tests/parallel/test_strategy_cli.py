"""The one switch from the command line: two CPU processes, the plan report, plan.json, a bad pin, own devices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, free_port
from tests.scripts.recording import DEVICE_MARKER

TIMEOUT_S = 300


def _fit(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "main.py", "fit", "--trainer.devices=2", "--trainer.max_steps=4",
           "--data.val_every_n_steps=2", "--data.max_examples_per_split=48", f"--data.cache_dir={tmp_path / 'c'}",
           f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}", *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_advanced_fits_the_embedded_default_on_two_processes(tmp_path):
    proc = _fit(tmp_path, "--trainer.strategy=advanced")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Chosen: DDP 2, AC" in output
    assert "Starting with 2 processes" in output
    (plan_file,) = tmp_path.glob("tiny/version_*/plan.json")
    plan = json.loads(plan_file.read_text())
    assert (plan["chosen"]["dp_replicate"], plan["chosen"]["dp_shard"], plan["chosen"]["tp"]) == (2, 1, 1)
    assert plan["candidates"][0] == plan["chosen"] and plan["rejected"] is not None
    assert plan_file.with_name("plan.png").read_bytes()[:4] == b"\x89PNG"  # the picture beside the JSON
    # A few lines in the log, the whole report in plan.txt, and where both went.
    report = plan_file.with_name("plan.txt").read_text()
    assert "feasible plans (GiB per device" in report and "feasible plans (GiB per device" not in output
    assert f"report  {plan_file.with_name('plan.txt')}" in output and f"JSON {plan_file}" in output
    # The plan checked against the run: 4 steps, 2 of them warm-up, so only the whole-fit comparison.
    assert "Plan vs run over the whole fit (2 optimizer steps after 2 warm-up step(s)" in output
    assert re.search(r"tokens/s/device +predicted [\d,]+ +measured [\d,]+", output), output[-3000:]
    measured = plan["measured"]["fit"]
    assert measured["optimizer_steps"] == 2 and measured["step_time_s"] > 0 and 0 < measured["mfu"] < 1
    assert measured["peak_memory"] == "not reported on cpu" and "first_steps" not in plan["measured"]
    assert list(tmp_path.glob("tiny/version_*/hf_model/model.safetensors"))


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_a_pin_that_cannot_work_fails_before_any_data_or_model_work(tmp_path):
    proc = _fit(tmp_path, "--trainer.strategy=llama_ft.parallel.AdvancedParallelStrategy",
                "--trainer.strategy.tp_size=3")
    assert proc.returncode != 0
    assert "tp_size=3 does not divide num_attention_heads=4" in proc.stderr
    assert "valid tp sizes on this cluster (1 × 2 devices): [1, 2]" in proc.stderr
    assert "Tokenizing" not in proc.stderr


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_each_process_sets_up_its_own_device(tmp_path):
    # Lightning's accelerator.setup_device(root_device) must run in every process; the recording accelerator numbers
    # its CPU devices so that "its own" is visible.
    proc = _fit(tmp_path, "--trainer.strategy=advanced", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                '--trainer.accelerator={"class_path": "tests.scripts.recording.RecordingCPUAccelerator"}')
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    recorded = sorted(line for line in output.splitlines() if line.startswith(DEVICE_MARKER))
    assert recorded == [f"{DEVICE_MARKER} local rank 0: cpu:0", f"{DEVICE_MARKER} local rank 1: cpu:1"]
    (picture,) = tmp_path.glob("tiny/version_*/plan.png")  # rank 0 draws the plan beside plan.json
    assert picture.read_bytes()[:4] == b"\x89PNG" and picture.with_name("plan.json").is_file()

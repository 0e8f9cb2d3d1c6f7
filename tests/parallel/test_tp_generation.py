"""Greedy generation through a sequence- and loss-parallel TP model equals the plain model's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, free_port

SCRIPT = Path(__file__).parent.parent / "scripts" / "tp_generate.py"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tensor_parallel_generation_matches_one_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]

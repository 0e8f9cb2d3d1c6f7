"""The GPU benchmark waits for a session that is lent a device; its ``--smoke`` mode runs the same code on the CPU so
it cannot rot unseen (it once failed on the advanced strategy's ``PlannableData`` contract, found only by hand)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.timeout(300)
def test_the_h200_benchmark_runs_every_row_in_smoke_mode(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu/h200_throughput.py", "--smoke"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| none |") or line.startswith("| full |")]
    assert len(rows) == 4, proc.stdout[-3000:]
    for row in rows:  # AC, side, tokens/s: a measured number on every row, no error column
        assert row[2].replace(",", "").isdigit(), row

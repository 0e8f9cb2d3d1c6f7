"""Run every CPU benchmark in sequence, print each table, and summarize (``make bench``).

Runs ``overhead.py``, ``preprocess.py``, ``token_efficiency.py`` and ``planner_speed.py``, each in its own process
(so one cannot warm or slow another) from the repository root, with the Hub offline, prints their tables and a
summary. Nothing is written unless ``--write`` is given: then each script gets ``--write`` too (it writes
``benchmarks/results/<name>.md``) and this script writes the summary to ``benchmarks/results/run_all.md`` — what
``make bench`` does. Target: all of it in under 15 minutes (about 4-5 minutes on 2 busy cores); each script has its
own timeout and the whole run a 15-minute guard.

Exit status: 1 when a script fails (non-zero exit, timeout, or, with ``--write``, no fresh result file), else 0. A
missed performance target is reported (``MISSED`` in its table and the summary), not a failure. Not run here:
``planner_accuracy.py`` (long) and ``gpu/`` (needs a GPU). Run: ``.venv/bin/python benchmarks/run_all.py [--write]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
SCRIPTS = ("overhead", "preprocess", "token_efficiency", "planner_speed")
SCRIPT_TIMEOUT_S = 360
TOTAL_BUDGET_S = 15 * 60


def run_one(name: str, timeout_s: float, env: dict[str, str], write: bool) -> tuple[str, float, int]:
    """(status, seconds, targets missed) of one benchmark script; prints its table or its error."""
    result = RESULTS / f"{name}.md"
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), *(["--write"] if write else [])]
    start = time.time()
    try:
        proc = subprocess.run(command, cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"FAILED: timed out after {timeout_s:.0f} s\n")
        return f"timed out ({timeout_s:.0f} s)", time.time() - start, 0
    seconds = time.time() - start
    if proc.returncode != 0:
        print(f"FAILED: exit status {proc.returncode}\n{proc.stderr[-3000:]}\n")
        return f"failed (exit {proc.returncode})", seconds, 0
    if write and (not result.is_file() or result.stat().st_mtime < start):
        print(f"FAILED: {result.relative_to(BENCHMARKS.parent)} was not written\n")
        return "failed (no result file)", seconds, 0
    text = proc.stdout
    print(text)
    return "ok", seconds, text.count("MISSED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="write each table to benchmarks/results/<name>.md and the summary to run_all.md "
                             "(default: print only)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    start = time.time()
    rows = ["| benchmark | status | seconds | targets missed |", "|---|---|---:|---:|"]
    failed = False
    for name in SCRIPTS:
        left = TOTAL_BUDGET_S - (time.time() - start)
        print(f"=== {name} ===", flush=True)
        if left < 30:
            status, seconds, missed = "skipped (15-minute budget spent)", 0.0, 0
        else:
            status, seconds, missed = run_one(name, min(SCRIPT_TIMEOUT_S, left), env, args.write)
        sys.stdout.flush()
        failed |= status != "ok"
        rows.append(f"| {name} | {status} | {seconds:.0f} | {missed} |")
    total = time.time() - start
    summary = "\n".join(rows)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "run_all.md").write_text(
            f"# All CPU benchmarks\n\n`benchmarks/run_all.py`: {total:.0f} s in all (budget {TOTAL_BUDGET_S} s)."
            f"\n\n{summary}\n")
    print(f"=== summary ({total:.0f} s) ===\n{summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The one command-line program, ``llama-ft`` (= ``python main.py`` = ``python -m llama_ft``): fit validate test
predict plan slurm export.

``plan`` answers here without loading Lightning or torch (``fast_plan``) unless it needs LightningCLI; every other
command line goes to the LightningCLI program (``lightning_cli``).
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run one command (``argv`` defaults to ``sys.argv[1:]``) and return its exit code."""
    from llama_ft.cli import fast_plan

    try:
        status = fast_plan.main(list(sys.argv[1:] if argv is None else argv))
        if status is not None:
            return status
        from llama_ft.cli.lightning_cli import main as lightning_main

        return lightning_main(argv)
    except BrokenPipeError:  # the reader went away (``llama-ft plan | head``): stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

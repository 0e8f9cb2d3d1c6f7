"""The one command-line program, ``llama-ft`` (= ``python main.py``): fit validate test predict plan slurm export."""

from llama_ft.cli.main import main

__all__ = ["main"]

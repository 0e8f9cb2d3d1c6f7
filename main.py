"""llama_ft entry point: ``python main.py fit|validate|test|predict|plan|slurm|export ...``."""

import sys

from llama_ft.cli import main

if __name__ == "__main__":
    sys.exit(main())

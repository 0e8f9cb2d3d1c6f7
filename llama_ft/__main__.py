"""``python -m llama_ft fit|validate|test|predict|plan|slurm|export ...``: the ``llama-ft`` program."""

import sys

from llama_ft.cli import main

if __name__ == "__main__":
    sys.exit(main())

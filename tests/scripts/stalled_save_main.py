"""``main.py`` whose N-th publish of ``last.ckpt`` stalls, so a test can kill a run in the middle of a save.

Used by tests/test_faults.py as a script (Lightning re-launches ``sys.argv``; the test launches each rank itself).
``STALL_AT_SAVE`` = which save of ``last.ckpt`` stalls (1-based); ``STALL_MARKER`` = a file created when the stall
begins. The stall sits where a crash hurts most: the new checkpoint is fully written beside the old one, and nothing
has been moved yet.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from llama_ft.checkpoint import atomic as checkpointing
from llama_ft.cli import main

_publish = checkpointing.publish
_saves = {"last.ckpt": 0}


def stalled_publish(partial: str | Path, target: str | Path) -> None:
    if Path(target).name == "last.ckpt":
        _saves["last.ckpt"] += 1
        if _saves["last.ckpt"] == int(os.environ["STALL_AT_SAVE"]):
            Path(os.environ["STALL_MARKER"]).write_text(str(partial))
            time.sleep(600)
    _publish(partial, target)


checkpointing.publish = stalled_publish

if __name__ == "__main__":
    sys.exit(main())

"""Lightning messages that are wrong for this program, silenced by their exact text (and only those).

- "... your dataloader is not resumable": it is — ``CNNDailyMailDataModule.state_dict`` saves the training position
  and the resumed loader starts there; Lightning only looks for ``state_dict`` on the DataLoader object itself.
- "... does not have many workers": batches are slices of already tokenized rows padded in the collator, which
  costs microseconds; ``data.num_workers`` is there for the rare case where it matters.
- "💡 Tip: ... litlogger / litmodels": advertisements for a hosted service, not advice about the run.

TensorBoard's placeholder ``hp_metric = -1`` is switched off in the recipes (``default_hp_metric: false``).
"""

from __future__ import annotations

import logging
import warnings

_WRONG_WARNINGS = (
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
    r"The '\w+' does not have many workers which may be a bottleneck",
)
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def silence_wrong_messages() -> None:
    """Install the filters (idempotent); every launched process runs ``main`` and so installs them too."""
    for pattern in _WRONG_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())

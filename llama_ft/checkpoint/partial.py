"""Resume from a distributed checkpoint that holds only part of the model (LoRA: the adapters, not the base).

Lightning's ``ModelParallelStrategy`` asks the checkpoint for every tensor of the model and fails on the first one it
lacks; here the checkpoint is read with a partial-load planner, so each tensor it lacks keeps the value the model
already has (the base weights loaded from ``model_name_or_path``). Optimizer states load as Lightning loads them (the
optimizer holds only what was trained), and the metadata with ``torch.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from llama_ft.checkpoint.reader import LIGHTNING_METADATA, STATE_DICT_KEY


def load_partial_distributed_checkpoint(path: Path, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                                        weights_only: bool | None = None) -> dict[str, Any]:
    """Load what the checkpoint at ``path`` holds into ``module`` (in place) and ``optimizers``; return the metadata
    (loops, callbacks, schedulers) as Lightning's own loader does. Collective: every rank calls it."""
    state = {STATE_DICT_KEY: get_model_state_dict(module)}
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    module.load_state_dict(state[STATE_DICT_KEY], strict=False)
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"  # the name ModelParallelStrategy saves it under
        optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(optimizer_state, checkpoint_id=path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / LIGHTNING_METADATA, weights_only=weights_only)

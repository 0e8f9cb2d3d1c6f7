"""Moving Llama weights between Hugging Face files and (possibly sharded) in-memory models.

Sharded models hold DTensor parameters; the ``torch.distributed.checkpoint.state_dict`` helpers gather or
scatter them, so the same functions serve a single process, DDP, FSDP2 and tensor parallel.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_ft.checkpoint.model_card import TrainingRecord, write_model_card
from llama_ft.errors import ConfigError
from llama_ft.outputs import mark_output_dir

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory (single file or sharded with an index)."""
    directory = Path(directory)
    if (directory / _SINGLE_FILE).is_file():
        return load_file(directory / _SINGLE_FILE)
    if (directory / _INDEX_FILE).is_file():
        shards = sorted(set(json.loads((directory / _INDEX_FILE).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    raise ConfigError(
        f"{directory} holds no {_SINGLE_FILE} or {_INDEX_FILE}; llama_ft loads safetensors weights only "
        "(safe by default). Convert the checkpoint with transformers' save_pretrained(safe_serialization=True)."
    )


def load_full_weights(model: PreTrainedModel, directory: str | Path, key_map: Mapping[str, str] | None = None) -> None:
    """Fill a materialized (possibly sharded) model with a checkpoint's weights; rank 0 reads, others receive.

    ``key_map`` renames checkpoint keys to the model's (LoRA keeps a wrapped projection's weight under another name).
    """
    full = read_safetensors(directory) if _is_rank_zero() else {}
    key_map = key_map or {}
    full = {key_map.get(k, k): v for k, v in full.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=False)
    incompatible = set_model_state_dict(model, full, options=options)
    expected_missing = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(getattr(incompatible, "missing_keys", [])) - expected_missing
    missing = {k for k in missing if ".lora_A." not in k and ".lora_B." not in k}  # adapters: initialized apart
    if missing:
        raise ConfigError(f"checkpoint {directory} lacks weights for {sorted(missing)[:5]}…; is it a Llama checkpoint?")


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (complete on rank 0 when sharded; every rank must call this)."""
    if not _is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf_directory(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    record: TrainingRecord | None = None,
    max_new_tokens: int = 128,
) -> Path | None:
    """Write ``config.json`` + safetensors (+ tokenizer) loadable by ``LlamaForCausalLM.from_pretrained``, with a
    model card, generation settings and the prompt (``model_card``; ``record`` says what the run was).

    Collective when the model is sharded: every rank must call it; rank 0 writes.
    """
    state = full_state_dict(model)
    if not _is_rank_zero():
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_model_card(out, model.config, tokenizer, record or TrainingRecord(), max_new_tokens)
    mark_output_dir(out)  # after every file: it also gives them the user's normal permissions
    return out

"""A LoRA run exported as one merged Hugging Face model, streamed: no process ever holds the whole model.

The adapters are small (``A``: r × in, ``B``: out × r) and are read first; the base weights then pass one at a time
through ``llama_ft.lora.merged_weights`` into the safetensors writer. The base comes from the trained model at the end
of ``fit`` (gathered a tensor at a time), and for ``export`` from the checkpoint (a random-init base is saved in it)
or from the base's Hugging Face directory (a pretrained base's checkpoint holds only the adapters).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_ft.checkpoint.hf_headers import checkpoint_shapes, weight_files
from llama_ft.checkpoint.huggingface import (
    gathered_tensors,
    hf_state_dict,
    is_rank_zero,
    tensor_specs,
    write_hf_directory,
)
from llama_ft.checkpoint.model_card import TrainingRecord
from llama_ft.checkpoint.reader import LightningCheckpoint
from llama_ft.checkpoint.safetensors_stream import DEFAULT_MAX_SHARD_SIZE, TensorSpec
from llama_ft.lora import LoraSettings, merged_weights, to_hf_names


def read_hf_directory(directory: str | Path) -> LightningCheckpoint:
    """A Hugging Face checkpoint directory read like a checkpoint: every tensor's shape and dtype from the file
    headers, each tensor read only when asked for. The file is opened per tensor: a memory-mapped file's pages
    count in the process's resident memory until it is closed."""
    directory = Path(directory)
    names = checkpoint_shapes(directory)  # one clear error for missing, damaged or incomplete weights
    files = weight_files(directory)
    headers = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    specs = {name: TensorSpec(name, tuple(headers[name].size), headers[name].properties.dtype) for name in names}

    def load(name: str) -> torch.Tensor:
        with safe_open(directory / files[name], framework="pt") as file:
            return file.get_tensor(name)

    return LightningCheckpoint(specs, {}, load)


def save_merged_hf_directory(
    model: PreTrainedModel, settings: LoraSettings, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path,
    record: TrainingRecord | None = None, max_new_tokens: int = 128,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path | None:
    """The trained LoRA model, adapters merged, as a plain Llama Hugging Face directory (returned on rank 0).

    Collective when the model is sharded: every rank must call it. All ranks gather the adapters, then each base
    weight one at a time; rank 0 merges it and streams it into the files, so a rank holds its shards, the adapters
    and one full tensor.
    """
    base, adapter_state = to_hf_names(hf_state_dict(model))
    adapters = dict(gathered_tensors(adapter_state))
    tensors = gathered_tensors(base)
    if not is_rank_zero():
        deque(tensors, maxlen=0)  # take part in every gather, keeping none of the results
        return None
    merged = merged_weights(tensors, adapters, model.config, settings)
    return write_hf_directory(model.config, tensor_specs(base), merged, tokenizer, out_dir, max_shard_size, record,
                              max_new_tokens)

"""Moving Llama weights between Hugging Face files and (possibly sharded) in-memory models, a tensor at a time.

Load: every rank reads only the slices its DTensor shards hold, straight from the safetensors files into the shards
(``torch.distributed.checkpoint`` with its Hugging Face storage reader plans which slice each rank needs, for any
placement: DDP replicas, FSDP, HSDP, TP, FSDP × TP). Save: rank 0 lays out the safetensors files (headers, final
sizes), then every rank writes the bytes of its own shards into them at their offsets (``rank_writes``); no tensor is
gathered. Where the ranks do not share the output directory (several nodes without a shared filesystem), the ranks
gather one parameter at a time and rank 0 streams it into the files instead (``safetensors_stream``). No process ever
holds the whole model.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.futures import Future
from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from llama_ft.checkpoint.hf_headers import checkpoint_shapes, refuse_missing, weight_files
from llama_ft.checkpoint.model_card import TrainingRecord, write_model_card
from llama_ft.checkpoint.rank_writes import agree, shared_output_dir, write_local_slices
from llama_ft.checkpoint.safetensors_stream import (
    DEFAULT_MAX_SHARD_SIZE,
    TensorSpec,
    preallocate_shards,
    shard_files,
    write_safetensors_shards,
)
from llama_ft.outputs import mark_output_dir

WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, not part of the HF name
TIED_HEAD = "lm_head.weight"


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def hf_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's own tensors (DTensor shards when parallelized, sharing storage with the parameters) under their
    Hugging Face names; a tied LM head is left out, as ``save_pretrained`` leaves it out."""
    state = {key.replace(WRAPPER_PREFIX, ""): value for key, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop(TIED_HEAD, None)
    return state


def architecture_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of this Llama architecture must hold, by name and shape (built on the meta device)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(value.shape) for name, value in hf_state_dict(model).items()}


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory in this process (LoRA's merged export needs the base)."""
    directory = Path(directory)
    names = checkpoint_shapes(directory)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_files(directory).values())):
        state.update(load_file(directory / shard))
    return {name: state[name] for name in names}


class _TensorAtATimeReader(HuggingFaceStorageReader):
    """The Hugging Face storage reader, opening the file for each slice it reads: a memory-mapped file's pages count
    in a process's resident memory until it is closed, so keeping a multi-GB shard file open while reading all
    its slices would hold every page read so far."""

    def read_data(self, plan, planner) -> Future[None]:
        for item in plan.items:
            with safe_open(self.storage_data[item.storage_index].relative_path, framework="pt") as file:
                self._process_read_request(file, item, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done


def load_sharded_weights(model: PreTrainedModel, directory: str | Path,
                         key_map: Mapping[str, str] | None = None) -> None:
    """Fill a materialized (possibly sharded) model from a Hugging Face checkpoint directory, each rank reading only
    its own slices, cast to the parameter dtype on the way in. Collective when a process group is up.

    ``key_map`` maps checkpoint names to the model's where they differ (LoRA keeps a wrapped projection's weight
    under ``base_layer``); adapters are not in the checkpoint and are left as they are.
    """
    directory = Path(directory)
    to_checkpoint = {model_name: name for name, model_name in (key_map or {}).items()}
    state = {to_checkpoint.get(key, key): value for key, value in hf_state_dict(model).items()
             if ".lora_A." not in key and ".lora_B." not in key}
    refuse_missing(directory, set(state) - set(checkpoint_shapes(directory)), model.config.num_hidden_layers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, storage_reader=_TensorAtATimeReader(str(directory)), no_dist=not dist.is_initialized())
    model.tie_weights()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (complete on rank 0 when sharded; every rank must call this). For tests and
    small models: it holds the whole model."""
    if not _is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_tensors(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor in full, one at a time, on every rank (``full_tensor`` is a collective over its mesh).

    DTensor warns, once per FSDP × TP tensor, that gathering its two sharded dims takes two all-gathers; for an
    export that happens once per run that is expected, so the warning is held back while gathering."""
    from torch.distributed.tensor import DTensor

    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_log.level
    redistribute_log.setLevel(logging.ERROR)
    try:
        for name, value in state.items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            yield name, full.detach().cpu()
            del full  # before the next gather: one full tensor alive at a time
    finally:
        redistribute_log.setLevel(level)


def tensor_specs(state: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(value.shape), value.dtype) for name, value in state.items()]


def write_hf_config(config: PretrainedConfig, dtype: torch.dtype, out: Path) -> None:
    """``config.json`` as ``save_pretrained`` writes it for a causal LM (``generation_config.json`` comes with the
    model card, which knows the tokenizer's real EOS and pad ids)."""
    config = copy.deepcopy(config)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(out)


def _finish_hf_directory(config: PretrainedConfig, specs: list[TensorSpec], tokenizer: PreTrainedTokenizerBase | None,
                         out: Path, record: TrainingRecord | None, max_new_tokens: int) -> Path:
    """Everything but the weights: config, tokenizer, model card (``model_card``), and the output marker last."""
    floating = [spec.dtype for spec in specs if spec.dtype.is_floating_point]
    write_hf_config(config, floating[0] if floating else torch.float32, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_model_card(out, config, tokenizer, record or TrainingRecord(), max_new_tokens)
    mark_output_dir(out)  # after every file: it also gives them the user's normal permissions
    return out


def write_hf_directory(config: PretrainedConfig, specs: list[TensorSpec], tensors: Iterator[tuple[str, torch.Tensor]],
                       tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, record: TrainingRecord | None = None,
                       max_new_tokens: int = 128) -> Path:
    """A Hugging Face directory from tensors streamed in ``specs`` order: config, safetensors shards (+ index),
    tokenizer, and the model card, generation settings and prompt (``model_card``; ``record`` says what the run
    was). Memory: the tensor being written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_shards(out, specs, tensors, max_shard_size)
    return _finish_hf_directory(config, specs, tokenizer, out, record, max_new_tokens)


def _write_in_place(state: dict[str, torch.Tensor], specs: list[TensorSpec], out: Path,
                    max_shard_size: int | str) -> None:
    """Collective: rank 0 preallocates the files, then every rank writes its own slices into them."""
    files = shard_files(specs, max_shard_size)  # every rank: a bad dtype is refused everywhere, before any I/O
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            preallocate_shards(out, files)
        except Exception as exc:  # re-raised on every rank by ``agree``
            error = exc
    agree(error, f"creating the safetensors files in {out}")  # also the barrier before the writes
    try:
        write_local_slices(state, files, out)
    except Exception as exc:  # re-raised on every rank by ``agree``
        error = exc
    agree(error, f"writing the weights into {out}")


def save_hf_directory(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path,
    record: TrainingRecord | None = None, max_new_tokens: int = 128,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, gather: bool = False,
) -> Path | None:
    """Write ``config.json`` + safetensors (+ tokenizer) loadable by ``LlamaForCausalLM.from_pretrained``.

    Collective when the model is sharded: every rank must call it, and returns None but on rank 0. Every rank
    writes its own shards into the files rank 0 laid out, so a rank holds its shards and one local tensor being
    converted. When the ranks do not all see ``out_dir`` (or with ``gather``, the fallback itself, which benchmarks
    compare against) they gather one tensor at a time and rank 0 writes it: its shards and one full tensor.
    """
    state = hf_state_dict(model)
    specs = tensor_specs(state)
    out = Path(out_dir)
    if dist.is_initialized() and _is_sharded(model) and not gather and shared_output_dir(out):
        _write_in_place(state, specs, out, max_shard_size)
        if not is_rank_zero():
            return None
        return _finish_hf_directory(model.config, specs, tokenizer, out, record, max_new_tokens)
    tensors = gathered_tensors(state)
    if not is_rank_zero():
        deque(tensors, maxlen=0)  # take part in every gather, keeping none of the results
        return None
    return write_hf_directory(model.config, specs, tensors, tokenizer, out, max_shard_size, record, max_new_tokens)

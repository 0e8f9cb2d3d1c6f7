"""``llama-ft export --ckpt PATH --out DIR``: any checkpoint ``fit`` wrote → a Hugging Face directory.

The architecture comes from the hyper-parameters ``LlamaFineTuner`` saved (``model_config`` / ``model_name_or_path``),
else from the recipe (``--config``, parsed as ``fit`` parses it); the tokenizer from ``--tokenizer``, else the data
module's saved ``tokenizer``, else the recipe's ``data.tokenizer``. The weights are streamed one tensor at a time
from the checkpoint into the safetensors shards: memory holds one tensor, never the model. A LoRA run's base weights
stream the same way (from the checkpoint, or from the base's Hugging Face directory) and get their adapters' update
merged in on the way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llama_ft.checkpoint.atomic import partial_path, publish, remove_path
from llama_ft.checkpoint.huggingface import TIED_HEAD, read_safetensors, write_hf_directory
from llama_ft.checkpoint.lora_export import read_hf_directory
from llama_ft.checkpoint.model_card import TrainingRecord
from llama_ft.checkpoint.reader import LightningCheckpoint, hf_tensors, read_checkpoint, stream_tensors
from llama_ft.checkpoint.safetensors_stream import DEFAULT_MAX_SHARD_SIZE, TensorSpec, parse_size
from llama_ft.data.prompt import DEFAULT_PROMPT, read_prompt_format
from llama_ft.data.sources import load_tokenizer
from llama_ft.errors import ConfigError, DataError
from llama_ft.lora import LoraSettings, build_peft_model, merged_weights, to_hf_names
from llama_ft.module import resolve_local_checkpoint
from llama_ft.outputs import check_output_dir, local_sources, mark_output_dir
from llama_ft.presets import resolve_llama_config

DESCRIPTION = ("Turn a checkpoint that fit wrote (single file, FSDP- or TP-sharded directory) into a Hugging Face "
               "directory.")


def add_arguments(parser: LightningArgumentParser) -> None:
    group = parser.add_argument_group("export")
    group.add_argument("--ckpt", type=str, required=True, help="checkpoint file or distributed checkpoint directory")
    group.add_argument("--out", type=str, required=True, help="directory for config.json, safetensors and tokenizer")
    group.add_argument("--tokenizer", type=str | None, help="tokenizer to ship (default: the one the run used)")
    group.add_argument("--adapter_only", type=bool, default=False,
                       help="LoRA runs: write the peft adapter directory (PeftModel.from_pretrained) instead of the "
                            "merged model")
    group.add_argument("--max_shard_size", type=str, default=DEFAULT_MAX_SHARD_SIZE,
                       help="largest safetensors file, e.g. 5GB (as save_pretrained's max_shard_size)")


def trained_architecture(checkpoint: LightningCheckpoint, recipe: Namespace, source: str | Path) -> LlamaConfig:
    """The architecture the run trained: the checkpoint's hyper-parameters, else the recipe's model section."""
    names = ("model_config", "model_name_or_path")
    values = {name: checkpoint.hparam(name) for name in names}
    if all(v is None for v in values.values()):
        values = {name: recipe.model[name] for name in names}
    if all(v is None for v in values.values()):
        raise ConfigError(
            f"checkpoint {source} does not say which model it holds (no model_config / model_name_or_path "
            "hyper-parameters). Pass --config RECIPE.yaml with the recipe the run used."
        )
    return resolve_llama_config(values["model_config"], values["model_name_or_path"])


def check_weights_fit(config: LlamaConfig, checkpoint: LightningCheckpoint, names: dict[str, str],
                      source: str | Path) -> list[TensorSpec]:
    """The tensors to write, in the model's order, after checking names and shapes against the architecture (on
    the meta device: nothing allocated). A tied LM head is written once, as the embedding."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop(TIED_HEAD, None)
        names = {name: key for name, key in names.items() if name != TIED_HEAD}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    wrong = sorted(name for name in set(expected) & set(names)
                   if checkpoint.tensors[names[name]].shape != expected[name])
    if missing or unexpected or wrong:
        raise ConfigError(
            f"checkpoint {source} does not fit the model config {config.to_diff_dict()}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}. Pass --config with the recipe the run used."
        )
    return [TensorSpec(name, expected[name], checkpoint.tensors[names[name]].dtype) for name in expected]


def resolve_tokenizer(
    explicit: str | None, checkpoint: LightningCheckpoint, recipe: Namespace
) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """The tokenizer to ship and, when there is none, why. An explicit ``--tokenizer`` that fails is an error."""
    if explicit is not None:
        return load_tokenizer(explicit), None
    name = checkpoint.hparam("tokenizer", datamodule=True) or recipe.data.tokenizer
    if name is None:
        return None, "the checkpoint names no tokenizer; the export has none (pass --tokenizer to add one)"
    try:
        return load_tokenizer(name), None
    except DataError as err:
        return None, f"the run's tokenizer {name!r} cannot be loaded here ({err}); pass --tokenizer to add one"


def _lora_parts(checkpoint: LightningCheckpoint, names: dict[str, str],
                source: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor], str | None]:
    """A LoRA checkpoint's base (Hugging Face name → checkpoint key; empty when it holds only the adapters), its
    adapters (read: they are small) and the base model it names (``model_name_or_path``)."""
    base, adapter_keys = to_hf_names(names)
    if not adapter_keys:
        raise ConfigError(f"checkpoint {source} has LoRA hyper-parameters but no adapter weights; was it saved by fit?")
    base_name = checkpoint.hparam("model_name_or_path")
    if not base and base_name is None:
        raise ConfigError(f"checkpoint {source} holds only adapters and names no base (model_name_or_path).")
    return base, {name: checkpoint.load(key) for name, key in adapter_keys.items()}, base_name


def lora_peft_model(checkpoint: LightningCheckpoint, names: dict[str, str], config: LlamaConfig,
                    settings: LoraSettings, source: str | Path) -> PeftModel:
    """A LoRA run's model, for its adapter directory: the adapters from the checkpoint, the base from it too when it
    holds one (a random-init base is saved whole), else from the base checkpoint it names."""
    base_keys, adapters, base_name = _lora_parts(checkpoint, names, source)
    if base_keys:
        base = {name: checkpoint.load(key) for name, key in base_keys.items()}
    else:
        base = read_safetensors(resolve_local_checkpoint(base_name))
    return build_peft_model(config, base, adapters, settings, base_name)


def lora_merged_tensors(checkpoint: LightningCheckpoint, names: dict[str, str], config: LlamaConfig,
                        settings: LoraSettings,
                        source: str | Path) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """A LoRA run merged, streamed: the base weights one at a time from the checkpoint (a random-init base is saved
    whole) or else from the base's Hugging Face directory, each adapted projection's update added on the way."""
    base_keys, adapters, base_name = _lora_parts(checkpoint, names, source)
    base = checkpoint
    if not base_keys:
        source = resolve_local_checkpoint(base_name)
        base = read_hf_directory(source)
        base_keys = {name: name for name in base.tensors}
    specs = check_weights_fit(config, base, base_keys, source)
    base_tensors = stream_tensors(base, {spec.name: base_keys[spec.name] for spec in specs})
    return specs, merged_weights(base_tensors, adapters, config, settings)


def _last_validation_loss(checkpoint: LightningCheckpoint) -> float | None:
    """The val_loss a ModelCheckpoint that monitors it saw last (its state is in every checkpoint it writes)."""
    for key, state in (checkpoint.metadata.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor") == "val_loss":
            score = state.get("current_score")
            if score is not None:
                return float(score)
    return None


def training_record(checkpoint: LightningCheckpoint, recipe: Namespace) -> TrainingRecord:
    """The model card's facts: the checkpoint's hyper-parameters (else the recipe's), its step and last val_loss."""
    model = checkpoint.metadata.get("hyper_parameters") or recipe.model.as_dict()
    data = checkpoint.metadata.get("datamodule_hyper_parameters") or recipe.data.as_dict()
    step = checkpoint.metadata.get("global_step")
    return TrainingRecord(
        model_hparams=dict(model),
        data_hparams=dict(data),
        steps=None if step is None else int(step),
        val_loss=_last_validation_loss(checkpoint),
        prompt=read_prompt_format(model.get("model_name_or_path")) or DEFAULT_PROMPT,
    )


def export_checkpoint(ckpt: str | Path, out: str | Path, recipe: Namespace, tokenizer: str | None = None,
                      overwrite: bool = False, adapter_only: bool = False,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> tuple[Path, str | None]:
    """Write the Hugging Face directory; returns it and a note when no tokenizer could be included.

    ``recipe`` is the parsed recipe (its model and data sections). The directory is assembled beside ``out`` and
    swapped in when complete, so an interrupted export never leaves a half-written model where one was. ``out``
    must be new, empty or an earlier llama_ft output unless ``overwrite``, and never the checkpoint or tokenizer.
    A LoRA run is written merged (as ``merge_and_unload`` merges, one tensor at a time: a plain Llama directory), or
    with ``adapter_only`` as peft's adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) for
    ``PeftModel.from_pretrained``.
    """
    ckpt, out = Path(ckpt), Path(out)
    sources = local_sources(ckpt, tokenizer, recipe.model.model_name_or_path, recipe.data.tokenizer)
    check_output_dir(out, "--out", sources, overwrite)
    parse_size(max_shard_size)
    checkpoint = read_checkpoint(ckpt)
    settings = LoraSettings.parse(checkpoint.hparam("lora"))
    if adapter_only and settings is None:
        raise ConfigError(f"--adapter_only needs a LoRA run's checkpoint; {ckpt} trained every weight (drop the flag).")
    names = hf_tensors(checkpoint, ckpt)
    config = trained_architecture(checkpoint, recipe, ckpt)
    if settings is None:  # streamed, one tensor at a time
        specs = check_weights_fit(config, checkpoint, names, ckpt)
        tensors = stream_tensors(checkpoint, {spec.name: names[spec.name] for spec in specs})
    elif not adapter_only:  # the same, with each adapted projection's update merged in
        specs, tensors = lora_merged_tensors(checkpoint, names, config, settings, ckpt)
    hf_tokenizer, note = resolve_tokenizer(tokenizer, checkpoint, recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    remove_path(partial)
    record = training_record(checkpoint, recipe)
    max_new_tokens = int(record.model_hparams.get("max_new_tokens") or 128)
    if adapter_only:  # the adapters are small; peft writes its own directory
        lora_peft_model(checkpoint, names, config, settings, ckpt).save_pretrained(partial, safe_serialization=True)
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(partial)
        mark_output_dir(partial)
    else:
        write_hf_directory(config, specs, tensors, hf_tokenizer, partial, max_shard_size, record, max_new_tokens)
    publish(partial, out)
    return out, note


def run(config: Namespace, argv: list[str]) -> int:
    """Export, and say where (and whether a tokenizer could be included)."""
    out, note = export_checkpoint(config.ckpt, config.out, config, tokenizer=config.tokenizer,
                                   overwrite=config.overwrite, adapter_only=config.adapter_only,
                                   max_shard_size=config.max_shard_size)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    what = "peft adapter directory" if config.adapter_only else "Hugging Face model"
    print(f"{what} written to {out}")
    return 0

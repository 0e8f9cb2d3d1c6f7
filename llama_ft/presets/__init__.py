"""Package data: model presets (``models/<name>.json``) and the embedded default recipe (``default.yaml``).

Shipped inside the package so a normal ``pip install`` finds them; a model is named by a preset or a JSON path.
A local config is read and checked as plain JSON (``plan`` needs no transformers); ``LlamaConfig`` is built from it
only by callers that build a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_ft.errors import ConfigError

if TYPE_CHECKING:
    from transformers import LlamaConfig

PRESETS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_RECIPE = Path(__file__).resolve().parent / "default.yaml"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_config_dict(name_or_path: str | Path) -> dict[str, Any]:
    """The checked config of a preset name, a config JSON or a checkpoint directory, as a dict.

    Anything that is not a Llama architecture is refused here, before weights or data are touched.
    """
    text = str(name_or_path)
    path = Path(text)
    if (PRESETS_DIR / f"{text}.json").is_file():
        path = PRESETS_DIR / f"{text}.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model config {text!r} is neither a preset nor a file. "
            f"Use one of the presets {preset_names()} or a path to a LlamaConfig JSON / checkpoint directory."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: malformed JSON or text that is not UTF-8
        raise ConfigError(f"model config {path} is not valid JSON ({str(err).splitlines()[0][:160]}); fix the file "
                          "or use a preset.") from err
    if not isinstance(config, dict):
        raise ConfigError(f"model config {path} is not a JSON object; fix the file or use a preset.")
    return checked_llama_dict(config, source=str(path))


def load_llama_config(name_or_path: str | Path) -> LlamaConfig:
    """The ``LlamaConfig`` a preset name, a config JSON or a checkpoint directory describes."""
    return llama_config_from_dict(load_config_dict(name_or_path))


def llama_config_from_dict(config: dict[str, Any]) -> LlamaConfig:
    """Build the ``LlamaConfig`` of a checked config dict (imports transformers)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**config)


def checked_llama_dict(config: dict[str, Any], source: str) -> dict[str, Any]:
    """Check that ``config`` describes a Llama model; return it."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(f'{source} has no "model_type"; a Llama config says "model_type": "llama" (as '
                          "save_pretrained writes it). Add it, or use one of the presets " f"{preset_names()}.")
    if model_type != "llama":
        raise ConfigError(
            f"{source} describes a {model_type!r} model, but llama_ft fine-tunes Llama-architecture models only "
            f"(model_type 'llama'). Pick a Llama checkpoint or one of the presets {preset_names()}."
        )
    check_architecture(config, source)
    return config


def check_architecture(config: dict, source: str) -> None:
    """Types and shapes a Llama needs, checked before anything is built (else they fail at the first forward)."""
    for key in REQUIRED_KEYS:
        if config.get(key) is None:
            raise ConfigError(f"{source}: {key} is missing; a Llama config names its sizes (see the presets).")
    for key in (*ARCHITECTURE_KEYS, "max_position_embeddings"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{source}: {key}={value!r} must be a positive integer.")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if hidden and heads and not config.get("head_dim") and hidden % heads:
        raise ConfigError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
                          "choose sizes whose ratio is the head dimension (e.g. 4096 and 32).")
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}; "
                          "each key/value head serves a whole group of query heads (e.g. 32 and 8).")


ARCHITECTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size")
# transformers would fill a missing size with its own default (a 7B shape): a config must name them (KV heads default
# to the attention heads)
REQUIRED_KEYS = tuple(key for key in ARCHITECTURE_KEYS if key != "num_key_value_heads")


def resolve_llama_config(model_config: str | None, model_name_or_path: str | None) -> LlamaConfig:
    """The ``LlamaConfig`` of ``resolve_config_dict``."""
    return llama_config_from_dict(resolve_config_dict(model_config, model_name_or_path))


def resolve_config_dict(model_config: str | None, model_name_or_path: str | None) -> dict[str, Any]:
    """The architecture a run trains, read before any weights: a preset or JSON, else the checkpoint's own config.

    When both are given and the checkpoint is local, they must agree on the architecture. Only a Hub name (no local
    config) imports transformers, to fetch its config.
    """
    if model_config is None and model_name_or_path is None:
        raise ConfigError("set model.model_config (a preset or JSON) and/or model.model_name_or_path (weights).")
    if model_config is not None:
        config = load_config_dict(model_config)
        if model_name_or_path is not None and Path(model_name_or_path).is_dir():
            weights_config = load_config_dict(model_name_or_path)
            diff = {k: (_size(config, k), _size(weights_config, k)) for k in ARCHITECTURE_KEYS
                    if _size(config, k) != _size(weights_config, k)}
            if diff:
                raise ConfigError(f"model_config and the checkpoint disagree on {diff}; drop one of them.")
        return config
    if Path(str(model_name_or_path)).is_dir():
        return load_config_dict(str(model_name_or_path))
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name_or_path).to_dict()
    except Exception as err:
        raise ConfigError(
            f"cannot read the config of {model_name_or_path!r} ({type(err).__name__}). Offline, set "
            "model.model_config to a preset (e.g. llama-3-8b) and model.model_name_or_path to a local copy."
        ) from err
    return checked_llama_dict(config, source=str(model_name_or_path))


def _size(config: dict[str, Any], key: str) -> Any:
    """An architecture size as ``LlamaConfig`` reads it (key/value heads default to the attention heads)."""
    if key == "num_key_value_heads":
        return config.get(key) or config.get("num_attention_heads")
    return config.get(key)

"""LoRA adapters (Hugging Face ``peft``) on a ``LlamaForCausalLM``: settings, injection, initialization, merging.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the model stays a ``LlamaForCausalLM`` and the
``advanced`` strategy parallelizes it as it does any other; peft freezes every base weight. A wrapped projection keeps
its base weight under ``<proj>.base_layer.weight``, so Hugging Face weights are renamed on the way in
(:func:`base_key_map`) and back on the way out (:func:`to_hf_names`).

The merged export never builds the model: :func:`merged_weights` adds each projection's update to its base weight as
the base tensors stream past, one at a time, with the scale and rounding of peft's ``merge_and_unload``.

The adapters' first values come from a generator seeded with ``torch.initial_seed()`` (``seed_everything`` sets it)
and are identical whatever the layout, so a sharded run starts from exactly the single-process run's adapters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.errors import ConfigError

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_MARKERS = (".lora_A.", ".lora_B.")
T = TypeVar("T")


@dataclass
class LoraSettings:
    """LoRA on the named projections: ``W x + (alpha / r) · B A x``, with ``A`` (r × in) and ``B`` (out × r).

    Args:
        r: adapter rank.
        alpha: scale numerator (the update is multiplied by ``alpha / r``).
        dropout: dropout on the adapters' input during training.
        target_modules: Llama projections that get adapters (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
            ``gate_proj``, ``up_proj``, ``down_proj``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"model.lora.r={self.r} must be a positive integer (the adapter rank, e.g. 8 or 64).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout={self.dropout} must be in [0, 1).")
        unknown = sorted(set(self.target_modules) - set(LLAMA_PROJECTIONS))
        if unknown or not self.target_modules:
            raise ConfigError(
                f"model.lora.target_modules={list(self.target_modules)} must name Llama projections from "
                f"{list(LLAMA_PROJECTIONS)}" + (f"; unknown: {unknown}." if unknown else ".")
            )

    @classmethod
    def parse(cls, value: LoraSettings | Mapping[str, Any] | None) -> LoraSettings | None:
        """Accept the settings, the plain dict a checkpoint's hyper-parameters hold, or None (LoRA off)."""
        if value is None or isinstance(value, LoraSettings):
            return value
        return cls(**dict(value))

    def as_dict(self) -> dict[str, Any]:
        """Plain values for hyper-parameters (a checkpoint is read with ``weights_only=True``)."""
        return {**asdict(self), "target_modules": list(self.target_modules)}

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


def is_adapter_key(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def has_adapters(model: torch.nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


def inject_lora(model: LlamaForCausalLM, settings: LoraSettings) -> None:
    """Add adapters in place (works on the meta device too); peft leaves only the adapters trainable."""
    inject_adapter_in_model(settings.peft_config(), model)


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def base_key_map(model: torch.nn.Module) -> dict[str, str]:
    """Hugging Face weight name → this model's name, for every projection that carries an adapter."""
    mapping = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            prefix = _clean(name)
            for tensor in ("weight", "bias"):
                mapping[f"{prefix}.{tensor}"] = f"{prefix}.base_layer.{tensor}"
    return mapping


def initial_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-size first values of every adapter, the same on every rank and layout: ``A`` as ``nn.Linear`` initializes
    its weight (Kaiming-uniform, a = √5, as peft does), ``B`` zero, so training starts from the base model."""
    generator = torch.Generator().manual_seed(torch.initial_seed())
    state = {}
    for name, param in sorted(model.named_parameters(), key=lambda item: _clean(item[0])):
        if not is_adapter_key(name):
            continue
        value = torch.zeros(param.shape, dtype=torch.float32)
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=√5) on a (r × in) matrix
            value.uniform_(-bound, bound, generator=generator)
        state[_clean(name)] = value.to(param.dtype)
    return state


def to_hf_names(state: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """Split a LoRA model's state (or its names → checkpoint keys) into Hugging Face base weights (original names)
    and the adapters (names as in training)."""
    base, adapters = {}, {}
    for key, value in state.items():
        key = _clean(key)
        if is_adapter_key(key):
            adapters[key] = value
        else:
            base[key.replace(".base_layer.", ".")] = value
    return base, adapters


def build_peft_model(config: LlamaConfig, base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor],
                     settings: LoraSettings, base_name: str | None) -> PeftModel:
    """A ``PeftModel`` holding ``base`` (Hugging Face names) and the trained ``adapters`` (names as in training).

    ``base_name`` is recorded as the adapter's base model (``adapter_config.json``) for ``PeftModel.from_pretrained``.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    result = model.load_state_dict(dict(base), strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ConfigError(f"base weights do not fit the model: missing {sorted(missing)[:3]}, unexpected "
                          f"{sorted(result.unexpected_keys)[:3]}; pass the recipe the run used.")
    model.tie_weights()
    model.name_or_path = model.config.name_or_path = base_name or ""
    config_ = settings.peft_config()
    config_.lora_dropout = 0.0  # inference copy
    peft_model = get_peft_model(model, config_)
    inner = peft_model.base_model.model
    result = inner.load_state_dict(dict(adapters), strict=False)
    if result.unexpected_keys or any(is_adapter_key(k) for k in result.missing_keys):
        raise ConfigError(f"the checkpoint's adapters do not fit model.lora={settings.as_dict()}: unexpected "
                          f"{sorted(result.unexpected_keys)[:3]}, missing "
                          f"{sorted(k for k in result.missing_keys if is_adapter_key(k))[:3]}.")
    return peft_model.eval()


@dataclass(frozen=True)
class LoraUpdate:
    """One projection's trained update ``scaling · B A`` (``A``: r × in, ``B``: out × r)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def merged_into(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scaling · B A`` rounded as peft's ``merge_and_unload`` rounds it on the CPU: the product in
        fp32, cast to the adapters' dtype, then added to the weight in fp32 and cast to the weight's dtype."""
        delta = ((self.b.float() @ self.a.float()) * self.scaling).to(self.b.dtype)
        return (weight.float() + delta.float()).to(weight.dtype)


def lora_updates(config: LlamaConfig, settings: LoraSettings,
                 adapters: Mapping[str, torch.Tensor]) -> dict[str, LoraUpdate]:
    """Hugging Face weight name → its update, for every projection ``settings`` adapt.

    The names, shapes and scales come from the layers peft builds for these settings on the meta device (nothing is
    allocated), so the scale is the one ``merge_and_unload`` would use; ``adapters`` (full tensors, names as in
    training) must match them exactly.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inject_lora(model, settings)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items() if is_adapter_key(name)}
    missing, unexpected = sorted(set(expected) - set(adapters)), sorted(set(adapters) - set(expected))
    wrong = sorted(name for name in set(expected) & set(adapters) if tuple(adapters[name].shape) != expected[name])
    if missing or unexpected or wrong:
        raise ConfigError(f"the checkpoint's adapters do not fit model.lora={settings.as_dict()}: unexpected "
                          f"{unexpected[:3]}, missing {missing[:3]}, other shapes {wrong[:3]}.")
    updates = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            ((adapter, scaling),) = module.scaling.items()  # inject_lora adds one adapter
            updates[f"{name}.weight"] = LoraUpdate(adapters[f"{name}.lora_A.{adapter}.weight"],
                                                   adapters[f"{name}.lora_B.{adapter}.weight"], scaling)
    return updates


def merged_weights(base: Iterable[tuple[str, torch.Tensor]], adapters: Mapping[str, torch.Tensor],
                   config: LlamaConfig, settings: LoraSettings) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's tensors, one at a time: ``base`` (Hugging Face names, in export order) with each adapted
    projection's update added. The adapters are checked here, before the first base tensor is read."""
    updates = lora_updates(config, settings, adapters)

    def merge() -> Iterator[tuple[str, torch.Tensor]]:
        for name, weight in base:
            update = updates.get(name)
            yield name, weight if update is None else update.merged_into(weight)

    return merge()

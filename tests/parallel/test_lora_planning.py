"""The planner with LoRA: exact adapter counts, the headroom a frozen base leaves, TP refused with one line, the
report's trainable/frozen counts, and the memory model against the simulation of a small model with peft adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_ft.errors import PlanError
from llama_ft.lora import LoraSettings, inject_lora
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.memory import estimate_memory
from llama_ft.parallel.planning.planner import PlanPins, plan_parallelism
from llama_ft.parallel.planning.report import format_plan_report, plan_result_to_dict
from llama_ft.parallel.planning.simulate import simulate_peak_memory
from llama_ft.parallel.planning.specs import ClusterSpec, LoraSpec, ModelSpec, TrainSpec
from llama_ft.presets import load_llama_config
from tests.helpers import tiny_llama_config

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _spec(name: str) -> ModelSpec:
    return ModelSpec.from_llama_config(load_llama_config(name), name=name)


def _train(lora: LoraSpec | None, batch: int = 256) -> TrainSpec:
    return TrainSpec(1024, batch, "bf16-mixed", lora=lora)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL])
def test_adapter_count_matches_peft(targets):
    config = tiny_llama_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inject_lora(model, LoraSettings(r=4, target_modules=list(targets)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    spec = ModelSpec.from_llama_config(config)
    assert LoraSpec(4, targets).trainable_params(spec) == trainable
    assert spec.total_params == frozen


def test_lora_uses_the_headroom_8b_on_one_gpu_and_70b_on_eight_without_offload():
    one = ClusterSpec.from_accelerator("h100-80gb", 1, 1)
    eight = ClusterSpec.from_accelerator("h100-80gb", 1, 8)
    lora = LoraSpec(64)
    chosen_8b = plan_parallelism(_spec("llama-3-8b"), one, _train(lora)).chosen
    assert not chosen_8b.layout.cpu_offload
    full_70b = plan_parallelism(_spec("llama-3-70b"), eight, _train(None)).chosen
    lora_70b = plan_parallelism(_spec("llama-3-70b"), eight, _train(lora)).chosen
    assert full_70b.layout.cpu_offload and not lora_70b.layout.cpu_offload
    assert lora_70b.tokens_per_s_per_device > full_70b.tokens_per_s_per_device


def test_lora_never_plans_tensor_parallel_and_a_tp_pin_is_one_line():
    cluster = ClusterSpec.from_accelerator("h100-80gb", 1, 8)
    result = plan_parallelism(_spec("llama-3-70b"), cluster, _train(LoraSpec(64)))
    assert all(plan.layout.tp == 1 for plan in result.candidates)
    assert any("no tensor-parallel plan" in r.reason for r in result.rejected)
    with pytest.raises(PlanError) as error:
        plan_parallelism(_spec("llama-3-8b"), cluster, _train(LoraSpec(64)), pins=PlanPins(tp_size=2))
    message = str(error.value)
    assert "\n" not in message and "tp_size=2" in message and "DDP, FSDP or HSDP" in message


def test_report_shows_trainable_and_frozen_parameters():
    cluster = ClusterSpec.from_accelerator("h100-80gb", 1, 8)
    spec = _spec("llama-3-8b")
    result = plan_parallelism(spec, cluster, _train(LoraSpec(64)))
    assert "27.3 M trainable, 8,030.3 M frozen" in format_plan_report(result)
    train = plan_result_to_dict(result)["train"]
    assert train["trainable_params"] == LoraSpec(64).trainable_params(spec) and train["frozen_params"] == (
        spec.total_params)
    assert train["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_lora_needs_far_less_than_full_fine_tuning_per_device():
    spec, layout = _spec("llama-3-8b"), Layout(dp_shard=8)
    full = estimate_memory(spec, _train(None, 8), layout, 1)
    lora = estimate_memory(spec, _train(LoraSpec(64), 8), layout, 1)
    assert lora.adam_moments < full.adam_moments / 100 and lora.gradients < full.gradients / 100
    assert lora.parameters == pytest.approx(full.parameters, rel=0.01)  # the frozen base is still stored (fp32)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_memory_model_matches_the_simulation_of_a_small_lora_model():
    """llama-tiny, FSDP 2, peft adapters on every projection with dropout: within ±10 % of the fake-tensor step,
    whose optimizer state is the adapters' fp32 moments alone."""
    lora = LoraSpec(8, ALL, dropout=0.05)
    layout = Layout(dp_shard=2)
    result = simulate_peak_memory("llama-tiny", layout, 2, 256, lora=lora, timeout_s=200)
    spec = _spec("llama-tiny")
    assert result.breakdown["OptState"] == pytest.approx(lora.trainable_params(spec) / 2 * 8, rel=0.01)
    predicted = estimate_memory(spec, TrainSpec(256, 4, "bf16-mixed", lora=lora), layout, 2).tensors
    assert predicted == pytest.approx(result.peak_bytes, rel=0.10)

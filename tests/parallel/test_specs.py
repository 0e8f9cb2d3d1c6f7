"""ModelSpec counts parameters exactly; ClusterSpec and TrainSpec read and validate what the planner is told."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.errors import ConfigError
from llama_ft.parallel.planning.accelerators import ACCELERATORS, get_accelerator, match_device_name
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec, normalize_precision
from llama_ft.parallel.planning.units import GiB
from llama_ft.presets import load_llama_config, preset_names


def true_parameter_count(config: LlamaConfig) -> int:
    """Build the real HF model on the meta device (no memory) and count its parameters."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", preset_names())
def test_model_spec_counts_every_preset_exactly(preset):
    config = load_llama_config(preset)
    spec = ModelSpec.from_llama_config(config, name=preset)
    assert spec.total_params == true_parameter_count(config)


def test_model_spec_counts_biases_and_explicit_head_dim_exactly():
    config = LlamaConfig(
        hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=40, vocab_size=300, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
    )
    spec = ModelSpec.from_llama_config(config)
    assert spec.head_dim == 40 and spec.q_dim == 160 and spec.kv_dim == 80
    assert spec.total_params == true_parameter_count(config)


def test_model_spec_parts_add_up_and_tied_head_costs_no_parameters():
    tied = ModelSpec.from_llama_config(load_llama_config("llama-3.2-1b"))
    untied = ModelSpec.from_llama_config(load_llama_config("llama-3-8b"))
    assert tied.tied_embeddings and tied.lm_head_params == 0
    assert untied.lm_head_params == untied.embedding_params == 128256 * 4096
    for spec in (tied, untied):
        parts = (spec.embedding_params + spec.num_layers * (spec.attention_params_per_layer + spec.mlp_params_per_layer
                 + spec.norm_params_per_layer) + spec.final_norm_params + spec.lm_head_params)
        assert parts == spec.total_params
        assert spec.non_embedding_params == spec.total_params - spec.embedding_params
    # the output matmul costs FLOPs even when tied
    assert tied.matmul_params > tied.non_embedding_params


def test_model_spec_rejects_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        ModelSpec(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=3, head_dim=16, intermediate_size=128,
                  vocab_size=100)


def test_cluster_from_accelerator_reads_the_table():
    cluster = ClusterSpec.from_accelerator("H100-80GB", nodes=2, devices_per_node=8)
    acc = ACCELERATORS["h100-80gb"]
    assert cluster.world_size == 16
    assert cluster.accelerator == "h100-80gb"
    assert cluster.device_memory_bytes == acc.memory_bytes
    assert 75 * GiB < cluster.device_memory_bytes <= 80 * GiB
    assert cluster.peak_flops == pytest.approx(989e12)
    assert cluster.intra_node_bandwidth > 5 * cluster.inter_node_bandwidth  # NVLink vs InfiniBand


def test_every_accelerator_has_sane_numbers():
    for acc in ACCELERATORS.values():
        assert acc.memory_bytes >= 16 * GiB
        assert acc.peak_flops > 0 and acc.memory_bandwidth > 0
        assert acc.intra_node_bandwidth > acc.inter_node_bandwidth > 0
    assert ACCELERATORS["l40s-48gb"].intra_node_bandwidth < ACCELERATORS["a100-80gb"].intra_node_bandwidth / 5


def test_unknown_accelerator_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        get_accelerator("v100-16gb")
    for name in ("h100-80gb", "mi300x-192gb", "cpu"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("device_name", "memory_gib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 79.6, "h100-80gb"),
        ("NVIDIA H200", 140.0, "h200-141gb"),
        ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", None, "a100-40gb"),
        ("NVIDIA L40S", 44.5, "l40s-48gb"),
        ("AMD Instinct MI300X", 191.5, "mi300x-192gb"),
        ("Tesla T4", 15.0, None),
    ],
)
def test_driver_device_names_match_table_entries(device_name, memory_gib, expected):
    memory = None if memory_gib is None else int(memory_gib * GiB)
    match = match_device_name(device_name, memory)
    assert (match.name if match else None) == expected


def test_detect_uses_the_cpu_entry_without_cuda_and_honours_an_override():
    assert not torch.cuda.is_available()  # this suite runs on CPU machines
    detected = ClusterSpec.detect(num_nodes=1, devices_per_node=2)
    assert detected.accelerator == "cpu" and detected.world_size == 2
    forced = ClusterSpec.detect(num_nodes=4, devices_per_node=8, accelerator_override="a100-40gb")
    assert forced.accelerator == "a100-40gb" and forced.world_size == 32


def test_describe_device_builds_a_cluster_of_an_unknown_device():
    cluster = ClusterSpec.describe_device(memory_gib=24, peak_tflops=165, nodes=1, devices_per_node=4, name="rtx")
    assert cluster.device_memory_bytes == 24 * GiB
    assert cluster.peak_flops == pytest.approx(165e12)
    assert cluster.hbm_bandwidth > 0
    with pytest.raises(ConfigError):
        ClusterSpec.describe_device(memory_gib=0, peak_tflops=100)


def test_cluster_rejects_empty_sizes():
    with pytest.raises(ConfigError, match="at least 1 node"):
        ClusterSpec.from_accelerator("cpu", nodes=0, devices_per_node=2)


def test_train_spec_normalizes_lightning_precision_spellings():
    assert TrainSpec(1024, 256, "bf16").precision == "bf16-mixed"
    assert TrainSpec(1024, 256, "32").precision == "32-true"
    assert normalize_precision(16) == "16-mixed"
    assert normalize_precision(None) == "32-true"
    assert TrainSpec(1024, 256).tokens_per_step == 262144
    with pytest.raises(ConfigError, match="precision"):
        TrainSpec(1024, 256, "fp8")
    with pytest.raises(ConfigError, match="optimizer"):
        TrainSpec(1024, 256, "bf16-mixed", optimizer="sgd")
    with pytest.raises(ConfigError):
        TrainSpec(0, 256)


@pytest.mark.parametrize("preset", preset_names())
def test_model_spec_from_preset_json_equals_the_llama_config_route(preset):
    assert ModelSpec.from_preset(preset) == ModelSpec.from_llama_config(load_llama_config(preset), name=preset)


def test_model_spec_from_preset_refuses_unknown_names_and_other_architectures(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        ModelSpec.from_preset("llama-9000")
    gpt = tmp_path / "gpt.json"
    gpt.write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="Llama only"):
        ModelSpec.from_preset(gpt)
